//! The replicated state and its pure `apply`: a committed [`Command`] → changes to
//! [`ClusterState`] and a [`Response`].
//!
//! No IO here. The SQLite store (`store::state`) calls [`apply`] for every committed entry and
//! writes the rows named in [`Touched`] in the same transaction as the applied log id.
//! Timestamps come from the command (stamped by the leader), never from a clock, so every
//! node computes the same state.
//!
//! The command enum is append-only: tags are explicit and pinned by a test, so old log
//! entries and snapshots keep decoding.

use std::collections::{BTreeMap, BTreeSet};

use blixard_api::{
    DesiredState, Host, HostRegistration, HostStatus, Vm, VmSpec, VmState, VmStatusReport,
};
use serde::{Deserialize, Serialize};

/// One placement decided by the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub vm: String,
    pub host: String,
    /// The VM generation the scheduler saw; a stale placement is dropped on apply.
    pub generation: u64,
}

/// A VM the scheduler could not place, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    pub vm: String,
    pub reason: String,
}

/// A replicated command. Append-only: never reorder, rename or remove a variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    CreateVm {
        spec: VmSpec,
        now_ms: u64,
    },
    DeleteVm {
        name: String,
        now_ms: u64,
    },
    SetDesired {
        name: String,
        desired: DesiredState,
        now_ms: u64,
    },
    RegisterHost {
        registration: HostRegistration,
        now_ms: u64,
    },
    Heartbeat {
        host: String,
        now_ms: u64,
    },
    ReportVmStatus {
        host: String,
        name: String,
        report: VmStatusReport,
        now_ms: u64,
    },
    Place {
        placements: Vec<Placement>,
        unplaced: Vec<Unplaced>,
        now_ms: u64,
    },
    SetHostStatus {
        host: String,
        status: HostStatus,
        now_ms: u64,
    },
}

impl Command {
    /// Sets the command's timestamp; the leader calls this just before proposing.
    pub fn stamp(&mut self, now: u64) {
        match self {
            Command::CreateVm { now_ms, .. }
            | Command::DeleteVm { now_ms, .. }
            | Command::SetDesired { now_ms, .. }
            | Command::RegisterHost { now_ms, .. }
            | Command::Heartbeat { now_ms, .. }
            | Command::ReportVmStatus { now_ms, .. }
            | Command::Place { now_ms, .. }
            | Command::SetHostStatus { now_ms, .. } => *now_ms = now,
        }
    }

    /// Short name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateVm { .. } => "create_vm",
            Command::DeleteVm { .. } => "delete_vm",
            Command::SetDesired { .. } => "set_desired",
            Command::RegisterHost { .. } => "register_host",
            Command::Heartbeat { .. } => "heartbeat",
            Command::ReportVmStatus { .. } => "report_vm_status",
            Command::Place { .. } => "place",
            Command::SetHostStatus { .. } => "set_host_status",
        }
    }
}

/// Deterministic refusals of a command: part of the replicated outcome, not storage errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum ApplyError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Conflict(String),
}

/// The outcome of applying one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Response {
    /// Membership changes and blank entries.
    #[default]
    None,
    Vm(Box<Vm>),
    Host(Box<Host>),
    Placed {
        placed: usize,
        unplaced: usize,
    },
    Error(ApplyError),
}

/// Keys whose rows changed, for the store to write.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    pub vms: BTreeSet<String>,
    pub hosts: BTreeSet<String>,
}

impl Touched {
    pub fn merge(&mut self, other: Touched) {
        self.vms.extend(other.vms);
        self.hosts.extend(other.hosts);
    }
}

/// Everything the cluster knows: hosts and VMs (a VM's host is its assignment).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub hosts: BTreeMap<String, Host>,
    pub vms: BTreeMap<String, Vm>,
    /// Per host, the log index of the last change to its assignments (derived, not stored).
    #[serde(skip)]
    pub host_rev: BTreeMap<String, u64>,
}

impl ClusterState {
    /// Recomputes derived fields after loading from storage: every host's revision starts at
    /// `index`, so a long-poll from before the load wakes once.
    pub fn rebuild_derived(&mut self, index: u64) {
        self.host_rev = self.hosts.keys().map(|h| (h.clone(), index)).collect();
    }

    /// The VMs assigned to `host`, by name.
    pub fn assigned_to<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Vm> + 'a {
        self.vms
            .values()
            .filter(move |vm| vm.host.as_deref() == Some(host))
    }

    /// Index of the last change to `host`'s assignments.
    pub fn host_revision(&self, host: &str) -> u64 {
        self.host_rev.get(host).copied().unwrap_or(0)
    }

    fn bump_host(&mut self, host: Option<&str>, index: u64) {
        if let Some(h) = host {
            self.host_rev.insert(h.to_string(), index);
        }
    }
}

fn set_state(vm: &mut Vm, state: VmState, reason: Option<String>, now_ms: u64) {
    if vm.state != state {
        vm.since_ms = now_ms;
    }
    vm.state = state;
    vm.reason = reason;
}

/// Applies one committed command at log `index`.
pub fn apply(state: &mut ClusterState, index: u64, cmd: &Command) -> (Response, Touched) {
    let mut touched = Touched::default();
    let resp = match cmd {
        Command::CreateVm { spec, now_ms } => {
            if state.vms.contains_key(&spec.name) {
                Response::Error(ApplyError::AlreadyExists(format!(
                    "vm {} already exists",
                    spec.name
                )))
            } else {
                let vm = Vm {
                    spec: spec.clone(),
                    desired: DesiredState::Running,
                    state: VmState::Pending,
                    reason: Some("waiting for placement".into()),
                    host: None,
                    generation: 1,
                    since_ms: *now_ms,
                    created_ms: *now_ms,
                    mod_index: index,
                };
                state.vms.insert(spec.name.clone(), vm.clone());
                touched.vms.insert(spec.name.clone());
                Response::Vm(Box::new(vm))
            }
        }
        Command::DeleteVm { name, .. } => match state.vms.remove(name) {
            None => Response::Error(ApplyError::NotFound(format!("vm {name} not found"))),
            Some(vm) => {
                state.bump_host(vm.host.as_deref(), index);
                touched.vms.insert(name.clone());
                Response::Vm(Box::new(vm))
            }
        },
        Command::SetDesired {
            name,
            desired,
            now_ms,
        } => {
            let Some(vm) = state.vms.get_mut(name) else {
                return (
                    Response::Error(ApplyError::NotFound(format!("vm {name} not found"))),
                    touched,
                );
            };
            if vm.desired != *desired {
                vm.desired = *desired;
                vm.generation += 1;
                vm.mod_index = index;
                match (desired, vm.host.is_some()) {
                    (DesiredState::Stopped, false) => {
                        set_state(vm, VmState::Stopped, None, *now_ms);
                    }
                    (DesiredState::Running, false) => set_state(
                        vm,
                        VmState::Pending,
                        Some("waiting for placement".into()),
                        *now_ms,
                    ),
                    (DesiredState::Stopped, true) => {
                        if vm.state != VmState::Stopped && vm.state != VmState::Failed {
                            set_state(vm, VmState::Stopping, None, *now_ms);
                        }
                    }
                    (DesiredState::Running, true) => {
                        if vm.state != VmState::Running {
                            set_state(vm, VmState::Scheduled, None, *now_ms);
                        }
                    }
                }
                let host = vm.host.clone();
                let vm = vm.clone();
                state.bump_host(host.as_deref(), index);
                touched.vms.insert(name.clone());
                Response::Vm(Box::new(vm))
            } else {
                Response::Vm(Box::new(vm.clone()))
            }
        }
        Command::RegisterHost {
            registration: r,
            now_ms,
        } => {
            let host = match state.hosts.get(&r.id) {
                Some(old) => Host {
                    id: r.id.clone(),
                    address: r.address.clone(),
                    capacity: r.capacity,
                    labels: r.labels.clone(),
                    hypervisors: r.hypervisors.clone(),
                    // A draining host stays draining across agent restarts.
                    status: if old.status == HostStatus::Draining {
                        HostStatus::Draining
                    } else {
                        HostStatus::Up
                    },
                    last_heartbeat_ms: *now_ms,
                    registered_ms: old.registered_ms,
                    epoch: old.epoch + 1,
                },
                None => Host {
                    id: r.id.clone(),
                    address: r.address.clone(),
                    capacity: r.capacity,
                    labels: r.labels.clone(),
                    hypervisors: r.hypervisors.clone(),
                    status: HostStatus::Up,
                    last_heartbeat_ms: *now_ms,
                    registered_ms: *now_ms,
                    epoch: 1,
                },
            };
            state.hosts.insert(r.id.clone(), host.clone());
            state.bump_host(Some(&r.id), index);
            touched.hosts.insert(r.id.clone());
            Response::Host(Box::new(host))
        }
        Command::Heartbeat { host, now_ms } => match state.hosts.get_mut(host) {
            None => Response::Error(ApplyError::NotFound(format!("host {host} not registered"))),
            Some(h) => {
                h.last_heartbeat_ms = *now_ms;
                if h.status == HostStatus::Down {
                    h.status = HostStatus::Up;
                }
                touched.hosts.insert(host.clone());
                Response::Host(Box::new(h.clone()))
            }
        },
        Command::ReportVmStatus {
            host,
            name,
            report,
            now_ms,
        } => {
            let Some(vm) = state.vms.get_mut(name) else {
                return (
                    Response::Error(ApplyError::NotFound(format!("vm {name} not found"))),
                    touched,
                );
            };
            if vm.host.as_deref() != Some(host.as_str()) {
                return (
                    Response::Error(ApplyError::Conflict(format!(
                        "vm {name} is not assigned to host {host}"
                    ))),
                    touched,
                );
            }
            if vm.state != report.state || vm.reason != report.reason {
                set_state(vm, report.state, report.reason.clone(), *now_ms);
                vm.mod_index = index;
                touched.vms.insert(name.clone());
            }
            Response::Vm(Box::new(vm.clone()))
        }
        Command::Place {
            placements,
            unplaced,
            now_ms,
        } => {
            let mut placed = 0;
            for p in placements {
                let host_ok = state
                    .hosts
                    .get(&p.host)
                    .is_some_and(|h| h.status == HostStatus::Up);
                let Some(vm) = state.vms.get_mut(&p.vm) else {
                    continue;
                };
                if !host_ok || vm.generation != p.generation || vm.host.is_some() {
                    continue;
                }
                vm.host = Some(p.host.clone());
                vm.generation += 1;
                vm.mod_index = index;
                let next = if vm.desired == DesiredState::Running {
                    VmState::Scheduled
                } else {
                    VmState::Stopped
                };
                set_state(vm, next, None, *now_ms);
                touched.vms.insert(p.vm.clone());
                state.host_rev.insert(p.host.clone(), index);
                placed += 1;
            }
            let mut not_placed = 0;
            for u in unplaced {
                let Some(vm) = state.vms.get_mut(&u.vm) else {
                    continue;
                };
                if vm.host.is_none() && vm.reason.as_deref() != Some(u.reason.as_str()) {
                    vm.reason = Some(u.reason.clone());
                    vm.mod_index = index;
                    touched.vms.insert(u.vm.clone());
                }
                not_placed += 1;
            }
            Response::Placed {
                placed,
                unplaced: not_placed,
            }
        }
        Command::SetHostStatus { host, status, .. } => match state.hosts.get_mut(host) {
            None => Response::Error(ApplyError::NotFound(format!("host {host} not registered"))),
            Some(h) => {
                h.status = *status;
                let h = h.clone();
                touched.hosts.insert(host.clone());
                state.bump_host(Some(host), index);
                Response::Host(Box::new(h))
            }
        },
    };
    (resp, touched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blixard_api::{Capacity, Hypervisor, PlacementStrategy, RestartPolicy};

    pub(crate) fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: 128,
            hypervisor: Hypervisor::Process,
            kernel: None,
            initrd: None,
            cmdline: None,
            disks: vec![],
            nics: vec![],
            restart_policy: RestartPolicy::Always,
            constraints: Default::default(),
            anti_affinity: None,
            strategy: PlacementStrategy::Spread,
        }
    }

    fn reg(id: &str) -> HostRegistration {
        HostRegistration {
            id: id.into(),
            address: String::new(),
            capacity: Capacity {
                vcpus: 4,
                memory_mib: 4096,
                disk_gib: 10,
                kvm: false,
            },
            labels: Default::default(),
            hypervisors: vec![Hypervisor::Process],
        }
    }

    fn run(state: &mut ClusterState, cmds: &[Command]) -> Vec<Response> {
        cmds.iter()
            .enumerate()
            .map(|(i, c)| apply(state, i as u64 + 1, c).0)
            .collect()
    }

    #[test]
    fn create_place_report_stop_delete() {
        let mut s = ClusterState::default();
        let out = run(
            &mut s,
            &[
                Command::RegisterHost {
                    registration: reg("h1"),
                    now_ms: 1,
                },
                Command::CreateVm {
                    spec: spec("a"),
                    now_ms: 2,
                },
                Command::Place {
                    placements: vec![Placement {
                        vm: "a".into(),
                        host: "h1".into(),
                        generation: 1,
                    }],
                    unplaced: vec![],
                    now_ms: 3,
                },
                Command::ReportVmStatus {
                    host: "h1".into(),
                    name: "a".into(),
                    report: VmStatusReport {
                        state: VmState::Running,
                        reason: None,
                        generation: 2,
                    },
                    now_ms: 4,
                },
            ],
        );
        assert!(matches!(
            out[2],
            Response::Placed {
                placed: 1,
                unplaced: 0
            }
        ));
        let vm = &s.vms["a"];
        assert_eq!(
            (vm.state, vm.host.as_deref(), vm.generation),
            (VmState::Running, Some("h1"), 2)
        );
        assert_eq!(s.host_revision("h1"), 3);

        let (r, _) = apply(
            &mut s,
            5,
            &Command::SetDesired {
                name: "a".into(),
                desired: DesiredState::Stopped,
                now_ms: 5,
            },
        );
        assert!(matches!(r, Response::Vm(ref v) if v.state == VmState::Stopping));
        assert_eq!(s.host_revision("h1"), 5);
        let (r, t) = apply(
            &mut s,
            6,
            &Command::DeleteVm {
                name: "a".into(),
                now_ms: 6,
            },
        );
        assert!(matches!(r, Response::Vm(_)));
        assert!(t.vms.contains("a") && s.vms.is_empty());
        assert_eq!(s.host_revision("h1"), 6);
    }

    #[test]
    fn refusals() {
        let mut s = ClusterState::default();
        let out = run(
            &mut s,
            &[
                Command::CreateVm {
                    spec: spec("a"),
                    now_ms: 1,
                },
                Command::CreateVm {
                    spec: spec("a"),
                    now_ms: 2,
                },
                Command::DeleteVm {
                    name: "zz".into(),
                    now_ms: 3,
                },
                Command::Heartbeat {
                    host: "nope".into(),
                    now_ms: 4,
                },
                Command::ReportVmStatus {
                    host: "h9".into(),
                    name: "a".into(),
                    report: VmStatusReport {
                        state: VmState::Running,
                        reason: None,
                        generation: 0,
                    },
                    now_ms: 5,
                },
                Command::SetDesired {
                    name: "x".into(),
                    desired: DesiredState::Stopped,
                    now_ms: 6,
                },
            ],
        );
        assert!(matches!(
            out[1],
            Response::Error(ApplyError::AlreadyExists(_))
        ));
        assert!(matches!(out[2], Response::Error(ApplyError::NotFound(_))));
        assert!(matches!(out[3], Response::Error(ApplyError::NotFound(_))));
        assert!(matches!(out[4], Response::Error(ApplyError::Conflict(_))));
        assert!(matches!(out[5], Response::Error(ApplyError::NotFound(_))));
    }

    #[test]
    fn stale_or_bad_placements_are_dropped() {
        let mut s = ClusterState::default();
        run(
            &mut s,
            &[
                Command::RegisterHost {
                    registration: reg("h1"),
                    now_ms: 1,
                },
                Command::CreateVm {
                    spec: spec("a"),
                    now_ms: 2,
                },
                Command::SetHostStatus {
                    host: "h1".into(),
                    status: HostStatus::Down,
                    now_ms: 3,
                },
            ],
        );
        let (r, _) = apply(
            &mut s,
            4,
            &Command::Place {
                placements: vec![
                    Placement {
                        vm: "a".into(),
                        host: "h1".into(),
                        generation: 1,
                    },
                    Placement {
                        vm: "ghost".into(),
                        host: "h1".into(),
                        generation: 1,
                    },
                ],
                unplaced: vec![],
                now_ms: 4,
            },
        );
        assert_eq!(
            r,
            Response::Placed {
                placed: 0,
                unplaced: 0
            }
        );
        assert_eq!(s.vms["a"].host, None);
    }

    #[test]
    fn stop_before_placement_and_restart() {
        let mut s = ClusterState::default();
        run(
            &mut s,
            &[
                Command::CreateVm {
                    spec: spec("a"),
                    now_ms: 1,
                },
                Command::SetDesired {
                    name: "a".into(),
                    desired: DesiredState::Stopped,
                    now_ms: 2,
                },
            ],
        );
        assert_eq!(s.vms["a"].state, VmState::Stopped);
        apply(
            &mut s,
            3,
            &Command::SetDesired {
                name: "a".into(),
                desired: DesiredState::Running,
                now_ms: 3,
            },
        );
        assert_eq!(s.vms["a"].state, VmState::Pending);
        assert_eq!(s.vms["a"].generation, 3);
    }

    /// Pins the serialized form of every command: changing it breaks old logs and snapshots.
    #[test]
    fn command_encoding_is_stable() {
        let cases = [
            (
                Command::DeleteVm {
                    name: "a".into(),
                    now_ms: 7,
                },
                r#"{"type":"delete_vm","name":"a","now_ms":7}"#,
            ),
            (
                Command::SetDesired {
                    name: "a".into(),
                    desired: DesiredState::Stopped,
                    now_ms: 1,
                },
                r#"{"type":"set_desired","name":"a","desired":"stopped","now_ms":1}"#,
            ),
            (
                Command::Heartbeat {
                    host: "h".into(),
                    now_ms: 2,
                },
                r#"{"type":"heartbeat","host":"h","now_ms":2}"#,
            ),
            (
                Command::SetHostStatus {
                    host: "h".into(),
                    status: HostStatus::Down,
                    now_ms: 3,
                },
                r#"{"type":"set_host_status","host":"h","status":"down","now_ms":3}"#,
            ),
            (
                Command::Place {
                    placements: vec![Placement {
                        vm: "a".into(),
                        host: "h".into(),
                        generation: 1,
                    }],
                    unplaced: vec![Unplaced {
                        vm: "b".into(),
                        reason: "r".into(),
                    }],
                    now_ms: 4,
                },
                r#"{"type":"place","placements":[{"vm":"a","host":"h","generation":1}],"unplaced":[{"vm":"b","reason":"r"}],"now_ms":4}"#,
            ),
        ];
        for (cmd, json) in cases {
            assert_eq!(serde_json::to_string(&cmd).ok().as_deref(), Some(json));
            let back: Command = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, cmd);
        }
        let create = r#"{"type":"create_vm","spec":{"name":"a","vcpus":1,"memory_mib":128,"hypervisor":"process","restart_policy":"always","strategy":"spread"},"now_ms":1}"#;
        let cmd = Command::CreateVm {
            spec: spec("a"),
            now_ms: 1,
        };
        assert_eq!(serde_json::to_string(&cmd).ok().as_deref(), Some(create));
    }
}
