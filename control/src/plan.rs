//! What `blixardctl apply` would change: a declared list of VMs against the cluster, with the
//! scheduler's placement for every VM it would (re)place. Pure, like the scheduler it runs on a
//! copy of the state.

use std::collections::BTreeSet;

use blixard_api::{DesiredState, Plan, PlanItem, PlanRequest, Vm, VmSpec, VmState};

use crate::scheduler::{self, Overcommit};
use crate::state_machine::ClusterState;

/// Names of the top-level spec fields that differ.
fn changed_fields(old: &VmSpec, new: &VmSpec) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return vec!["spec".into()];
    };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// The plan for `req` against `state`.
pub fn plan(state: &ClusterState, req: &PlanRequest, oc: Overcommit) -> Plan {
    let mut out = Plan::default();
    let mut sim = ClusterState {
        hosts: state.hosts.clone(),
        vms: state.vms.clone(),
        ..Default::default()
    };
    let declared: BTreeSet<&str> = req.vms.iter().map(|v| v.name.as_str()).collect();
    for spec in &req.vms {
        match state.vms.get(&spec.name) {
            None => {
                out.create.push(PlanItem {
                    name: spec.name.clone(),
                    changes: vec![],
                    host: None,
                    pending_reason: None,
                    generation: None,
                });
                sim.vms
                    .insert(spec.name.clone(), pending_vm(spec.clone(), None));
            }
            Some(vm) if vm.spec != *spec => {
                out.update.push(PlanItem {
                    name: spec.name.clone(),
                    changes: changed_fields(&vm.spec, spec),
                    host: None,
                    pending_reason: None,
                    generation: Some(vm.generation),
                });
                let mut moved = pending_vm(spec.clone(), Some(vm));
                if vm.desired == DesiredState::Stopped {
                    moved.desired = DesiredState::Stopped;
                    moved.state = VmState::Stopped;
                }
                sim.vms.insert(spec.name.clone(), moved);
            }
            Some(_) => out.unchanged.push(spec.name.clone()),
        }
    }
    if req.prune {
        for (name, vm) in &state.vms {
            if !declared.contains(name.as_str()) {
                out.delete.push(PlanItem {
                    name: name.clone(),
                    changes: vec![],
                    host: vm.host.clone(),
                    pending_reason: None,
                    generation: Some(vm.generation),
                });
                sim.vms.remove(name);
            }
        }
    }
    // Every pending VM is tried, as after a capacity change.
    sim.reindex(0);
    let (placements, unplaced) = scheduler::schedule(&sim, oc);
    for item in out.create.iter_mut().chain(out.update.iter_mut()) {
        item.host = placements
            .iter()
            .find(|p| p.vm == item.name)
            .map(|p| p.host.clone());
        item.pending_reason = unplaced
            .iter()
            .find(|u| u.vm == item.name)
            .map(|u| u.reason.clone());
    }
    out
}

/// The VM as it would be right after a create (or an update that re-places it).
fn pending_vm(spec: VmSpec, old: Option<&Vm>) -> Vm {
    Vm {
        spec,
        desired: DesiredState::Running,
        state: VmState::Pending,
        reason: None,
        host: None,
        generation: old.map(|v| v.generation + 1).unwrap_or(1),
        since_ms: 0,
        created_ms: old.map(|v| v.created_ms).unwrap_or(u64::MAX),
        mod_index: 0,
        restarts: vec![],
        evicting: None,
        idempotency_key: None,
        task_result: None,
        task_started_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::{apply, Command, Placement};
    use blixard_api::{Capacity, HostRegistration, Hypervisor};

    fn spec(name: &str, mem: u64) -> VmSpec {
        let mut s = crate::state_machine::tests_support::spec(name);
        s.memory_mib = mem;
        s
    }

    #[test]
    fn create_update_delete_unchanged_with_placements() {
        let mut s = ClusterState::default();
        let reg = HostRegistration {
            fence: None,
            id: "h1".into(),
            address: String::new(),
            capacity: Capacity {
                vcpus: 8,
                memory_mib: 1000,
                disk_gib: 1,
                kvm: false,
            },
            labels: Default::default(),
            hypervisors: vec![Hypervisor::Process],
            agent_url: None,
        };
        let cmds = [
            Command::RegisterHost {
                registration: reg,
                now_ms: 1,
            },
            Command::CreateVm {
                spec: spec("keep", 100),
                now_ms: 1,
                idempotency_key: None,
                placement: None,
            },
            Command::CreateVm {
                spec: spec("grow", 100),
                now_ms: 1,
                idempotency_key: None,
                placement: None,
            },
            Command::CreateVm {
                spec: spec("gone", 100),
                now_ms: 1,
                idempotency_key: None,
                placement: None,
            },
        ];
        for (i, c) in cmds.iter().enumerate() {
            apply(&mut s, i as u64 + 1, c);
        }
        let placements = ["keep", "grow", "gone"]
            .iter()
            .map(|n| Placement {
                vm: n.to_string(),
                host: "h1".into(),
                generation: 1,
            })
            .collect();
        apply(
            &mut s,
            9,
            &Command::Place {
                placements,
                unplaced: vec![],
                now_ms: 2,
                overcommit: Some(Overcommit::default()),
                capacity_rev: None,
            },
        );
        let req = PlanRequest {
            vms: vec![
                spec("keep", 100),
                spec("grow", 200),
                spec("new", 300),
                spec("huge", 5000),
            ],
            prune: true,
        };
        let p = plan(&s, &req, Overcommit::default());
        assert_eq!(p.unchanged, vec!["keep"]);
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.update[0].changes, vec!["memory_mib"]);
        assert_eq!(p.update[0].host.as_deref(), Some("h1"));
        let created: Vec<(&str, Option<&str>)> = p
            .create
            .iter()
            .map(|i| (i.name.as_str(), i.host.as_deref()))
            .collect();
        assert_eq!(created, vec![("new", Some("h1")), ("huge", None)]);
        assert!(p.create[1].pending_reason.is_some());
        assert_eq!(
            p.delete.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            vec!["gone"]
        );
        // Without prune nothing is deleted.
        let p = plan(
            &s,
            &PlanRequest {
                prune: false,
                ..req
            },
            Overcommit::default(),
        );
        assert!(p.delete.is_empty());
    }
}
