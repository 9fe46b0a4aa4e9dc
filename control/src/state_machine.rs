//! The replicated state and its pure `apply`: a committed [`Command`] → changes to
//! [`ClusterState`] and a [`Response`].
//!
//! No IO here. The SQLite store (`store::state`) calls [`apply`] for every committed entry and
//! writes the rows named in [`Touched`] in the same transaction as the applied log id.
//! Timestamps come from the command (stamped by the leader), never from a clock, so every
//! node computes the same state.
//!
//! VM lifecycle rules live here too: restart policies (a VM that ended on its own gets a new
//! generation, up to `max_restarts` within the window, then stays `failed`), host loss (its
//! `move` VMs are taken off it and placed again, or failed for policy `never`; its `stay` VMs
//! stay until it comes back or an operator declares it gone), drains and updates (the VM is
//! stopped on its host first, then placed again: never taken off a host that may still run it
//! without the host confirming the stop), placements (checked again on apply with the
//! scheduler's rule) and idempotent creates.
//!
//! Tasks (`spec.task`) end once: the end a host reports becomes the VM's [`TaskResult`]
//! ([`task_result`]); a failure runs again only within `max_restarts`, a lost host only when
//! `rerun_on_host_loss` says so; a finished task leaves its host (its capacity is free) and
//! keeps its result until it is deleted.
//!
//! The command enum is append-only: tags are explicit and pinned by a test, so old log
//! entries and snapshots keep decoding; new fields are optional.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use blixard_api::{
    DesiredState, Event, EventKind, Eviction, Host, HostRegistration, HostStatus, OnHostLoss,
    RestartPolicy, TaskEnd, TaskEndReason, TaskOutcome, TaskResult, Vm, VmSpec, VmState,
    VmStatusReport,
};
use serde::{Deserialize, Serialize};

use crate::scheduler::{self, Overcommit};
use crate::state_index::StateIndex;

/// How many events each node keeps for `GET /v1/events`.
pub const EVENT_LOG_CAP: usize = 20_000;

/// One placement decided by the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub vm: String,
    pub host: String,
    /// The VM generation the scheduler saw; a stale placement is dropped on apply.
    pub generation: u64,
}

/// What the leader decided for a VM when it admitted its create (see `crate::admission`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admitted {
    /// Placed on `host`, under these ratios.
    Placed {
        host: String,
        overcommit: Overcommit,
    },
    /// No host fits, and why.
    Unplaced { reason: String },
}

/// A VM the scheduler could not place, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    pub vm: String,
    pub reason: String,
}

/// A VM to take off its host, at the generation the leader saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    pub vm: String,
    pub generation: u64,
}

/// A replicated command. Append-only: never reorder, rename or remove a variant; new fields
/// must be optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    CreateVm {
        spec: VmSpec,
        now_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// Where the leader placed the VM when it admitted the create (see
        /// `crate::admission`), re-checked on apply as a `Place` would be: one Raft round per
        /// create. Absent from older entries and when nothing was decided: the VM is pending.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        placement: Option<Admitted>,
    },
    DeleteVm {
        name: String,
        now_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_generation: Option<u64>,
    },
    SetDesired {
        name: String,
        desired: DesiredState,
        now_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_generation: Option<u64>,
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
        /// The leader's overcommit ratios. With them, every placement is checked again at this
        /// index by the scheduler's own rule ([`scheduler::fit`]: host up, hypervisor, labels,
        /// anti-affinity, capacity, counting the placements before it in this command), and
        /// one that no longer fits leaves its VM pending with the reason. Absent from older
        /// entries, which apply as they did when written (only the host's status is checked).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        overcommit: Option<Overcommit>,
        /// The capacity revision (`StateIndex::capacity_rev`) of the state the leader decided
        /// on. A VM in `unplaced` is blocked (not tried again until capacity changes) only if
        /// capacity has not changed since. Absent from older entries: nothing is blocked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        capacity_rev: Option<u64>,
    },
    SetHostStatus {
        host: String,
        status: HostStatus,
        now_ms: u64,
    },
    UpdateVm {
        spec: VmSpec,
        expected_generation: Option<u64>,
        now_ms: u64,
    },
    DrainHost {
        host: String,
        deadline_ms: u64,
        now_ms: u64,
    },
    /// An eviction past its deadline. With `keep_on_live_host` (every leader since the
    /// field exists), a VM whose host is not down, or that is `on_host_loss = stay`, stays
    /// assigned and only its reason says that it waits for the host to confirm the stop (see
    /// [`overdue_wait_reason`]); the others are taken off their hosts now. Older entries
    /// (without the field) take every VM off, as they did when they were written.
    Unassign {
        vms: Vec<VmRef>,
        reason: String,
        now_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep_on_live_host: Option<bool>,
    },
    /// Replaces every host and VM (disaster recovery from `cluster snapshot save`).
    RestoreState {
        hosts: Vec<Host>,
        vms: Vec<Vm>,
        now_ms: u64,
    },
    /// Several proposals in one log entry, applied in order as if each were its own entry
    /// at this index; each gets its own response (see [`Response::Batch`]). The leader
    /// gathers concurrent proposals into one so that one fsync and one replication round
    /// carry all of them. A batch never holds a batch.
    Batch {
        commands: Vec<Command>,
    },
    /// An operator's word that a host is gone for good (`blixardctl host declare-gone`): it is
    /// marked down and every VM on it is taken off it and placed again, `on_host_loss = stay`
    /// ones included. The host stays down (its heartbeats are refused as from an unknown host)
    /// until its agent registers again.
    DeclareHostGone {
        host: String,
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
            | Command::SetHostStatus { now_ms, .. }
            | Command::UpdateVm { now_ms, .. }
            | Command::DrainHost { now_ms, .. }
            | Command::Unassign { now_ms, .. }
            | Command::RestoreState { now_ms, .. }
            | Command::DeclareHostGone { now_ms, .. } => *now_ms = now,
            Command::Batch { commands } => commands.iter_mut().for_each(|c| c.stamp(now)),
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
            Command::UpdateVm { .. } => "update_vm",
            Command::DrainHost { .. } => "drain_host",
            Command::Unassign { .. } => "unassign",
            Command::RestoreState { .. } => "restore_state",
            Command::Batch { .. } => "batch",
            Command::DeclareHostGone { .. } => "declare_host_gone",
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
    /// An idempotency key sent again with a different request than the one it made.
    #[error("{0}")]
    KeyMismatch(String),
    /// An idempotency key whose VM was deleted since (within [`KEY_RETENTION_MS`]).
    #[error("{0}")]
    KeySpent(String),
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
    /// A create that repeated an earlier one's idempotency key: the VM it made.
    Existing(Box<Vm>),
    Count(usize),
    /// The responses to a [`Command::Batch`], one per command, in order.
    Batch(Vec<Response>),
}

/// Keys whose rows changed, for the store to write.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    pub vms: BTreeSet<String>,
    pub hosts: BTreeSet<String>,
    /// Idempotency keys whose record changed.
    pub keys: BTreeSet<String>,
}

impl Touched {
    pub fn merge(&mut self, other: Touched) {
        self.vms.extend(other.vms);
        self.hosts.extend(other.hosts);
        self.keys.extend(other.keys);
    }
}

/// How long an idempotency key outlives the VM it created: within it, the same request again
/// is refused ([`ApplyError::KeySpent`]), never a second create (24 h, as payment APIs keep
/// theirs).
pub const KEY_RETENTION_MS: u64 = 24 * 3600 * 1000;

/// What an idempotency key is bound to: the VM it created and the request that did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub vm: String,
    /// SHA-256 (hex) of the create's spec as JSON; absent for keys from before it was kept
    /// (any request matches those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_sha256: Option<String>,
    pub created_ms: u64,
    /// When its VM was deleted; the record goes [`KEY_RETENTION_MS`] after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_ms: Option<u64>,
}

/// The fingerprint a key is bound to: SHA-256 of the spec's JSON (its field order is the
/// struct's and its maps are sorted, so equal specs give equal bytes on every node).
pub fn request_sha256(spec: &VmSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything the cluster knows: hosts and VMs (a VM's host is its assignment).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub hosts: BTreeMap<String, Host>,
    pub vms: BTreeMap<String, Vm>,
    /// Per host, the log index of the last change to its assignments (derived, not stored).
    #[serde(skip)]
    pub host_rev: BTreeMap<String, u64>,
    /// Recent events, oldest first (derived, not stored).
    #[serde(skip)]
    pub events: VecDeque<Event>,
    /// Events after this index are all in `events` (earlier ones may be gone).
    #[serde(skip)]
    pub events_from: u64,
    /// Per-host loads and assignments, pending VMs, evictions, ended tasks (derived, not
    /// stored; kept current by [`apply`]).
    #[serde(skip)]
    pub index: StateIndex,
    /// Idempotency keys of creates, live VMs' and recently deleted ones' (stored).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, KeyRecord>,
    /// Keys of deleted VMs by when they go (derived, not stored).
    #[serde(skip)]
    pub key_expiry: BTreeSet<(u64, String)>,
}

impl ClusterState {
    /// Recomputes derived fields after loading from storage: every host's revision starts at
    /// `index`, so a long-poll from before the load wakes once; events start at `index`.
    pub fn rebuild_derived(&mut self, index: u64) {
        self.host_rev = self.hosts.keys().map(|h| (h.clone(), index)).collect();
        self.events.clear();
        self.events_from = index;
        self.reindex(index);
        // Keys from before they had records of their own: bound to their VM, any request.
        for vm in self.vms.values() {
            if let Some(k) = &vm.idempotency_key {
                self.keys.entry(k.clone()).or_insert_with(|| KeyRecord {
                    vm: vm.spec.name.clone(),
                    request_sha256: None,
                    created_ms: vm.created_ms,
                    deleted_ms: None,
                });
            }
        }
        self.key_expiry = self
            .keys
            .iter()
            .filter_map(|(k, r)| Some((r.deleted_ms? + KEY_RETENTION_MS, k.clone())))
            .collect();
    }

    /// Builds [`Self::index`] from the rows (after loading them, or in tests that set rows
    /// directly).
    pub fn reindex(&mut self, index: u64) {
        self.index = StateIndex::build(self.vms.values(), index);
    }

    /// The VMs assigned to `host`, by name.
    pub fn assigned_to<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Vm> + 'a {
        self.index
            .assigned_to(host)
            .filter_map(|name| self.vms.get(name))
    }

    /// Index of the last change to `host`'s assignments.
    pub fn host_revision(&self, host: &str) -> u64 {
        self.host_rev.get(host).copied().unwrap_or(0)
    }

    /// Events after `since`, or `None` if some of them are no longer kept.
    pub fn events_after(&self, since: u64) -> Option<Vec<Event>> {
        if since < self.events_from {
            return None;
        }
        let start = self.events.partition_point(|e| e.index <= since);
        Some(self.events.range(start..).cloned().collect())
    }

    fn bump_host(&mut self, host: Option<&str>, index: u64) {
        if let Some(h) = host {
            self.host_rev.insert(h.to_string(), index);
        }
    }
}

/// Why an evicted VM past its deadline stays on its host, or `None` if it is to be taken off
/// it: a VM is never taken off a host that may still run it without the host confirming the
/// stop. That is every host not declared down, and a down host for a VM that is
/// `on_host_loss = stay` (only `DeclareHostGone` frees those). A VM whose host is unknown is
/// taken off.
pub fn overdue_wait_reason(s: &ClusterState, vm: &Vm) -> Option<String> {
    let host = s.hosts.get(vm.host.as_deref()?)?;
    if host.status != HostStatus::Down {
        let why = vm
            .evicting
            .as_ref()
            .map(|e| e.reason.as_str())
            .unwrap_or("evicted");
        return Some(format!(
            "{why}; deadline passed, waiting for {} to confirm the VM stopped",
            host.id
        ));
    }
    (vm.spec.on_host_loss() == OnHostLoss::Stay).then(|| stay_reason(&host.id))
}

/// `last_heartbeat_ms` of a host declared gone: no heartbeat of it counts any more, until its
/// agent registers again (which stamps it). Every real heartbeat and registration is stamped
/// by a leader's clock, never 0.
const GONE_HEARTBEAT_MS: u64 = 0;

/// Whether an operator declared `host` gone and its agent has not registered since.
pub fn declared_gone(host: &Host) -> bool {
    host.status == HostStatus::Down && host.last_heartbeat_ms == GONE_HEARTBEAT_MS
}

fn gone_refusal(host: &str) -> Response {
    Response::Error(ApplyError::NotFound(format!(
        "host {host} was declared gone; its agent must register again"
    )))
}

/// The reason of a `stay` VM whose host was declared down.
fn stay_reason(host: &str) -> String {
    format!(
        "host {host} lost; on_host_loss=stay: waiting for the host to come back or to be declared gone"
    )
}

fn set_state(vm: &mut Vm, state: VmState, reason: Option<String>, now_ms: u64) {
    if vm.state != state {
        vm.since_ms = now_ms;
    }
    vm.state = state;
    vm.reason = reason;
}

/// Applying one command: the state, the entry's index and time, and what changed.
struct Apply<'a> {
    /// VMs the leader found fit no host, at the capacity revision it saw: blocked once the
    /// index is current (see [`StateIndex::block`]).
    blocked: Vec<(String, u64)>,
    s: &'a mut ClusterState,
    index: u64,
    now: u64,
    touched: Touched,
}

fn not_found_vm(name: &str) -> Response {
    Response::Error(ApplyError::NotFound(format!("vm {name} not found")))
}

fn generation_conflict(name: &str, expected: u64, actual: u64) -> Response {
    Response::Error(ApplyError::Conflict(format!(
        "vm {name} is at generation {actual}, not {expected}"
    )))
}

impl Apply<'_> {
    fn event(
        &mut self,
        kind: EventKind,
        vm: Option<&Vm>,
        host: Option<&str>,
        message: Option<String>,
    ) {
        let ev = Event {
            index: self.index,
            time_ms: self.now,
            kind,
            vm: vm.map(|v| v.spec.name.clone()),
            host: host
                .map(str::to_string)
                .or_else(|| vm.and_then(|v| v.host.clone())),
            state: vm.map(|v| v.state),
            host_status: None,
            message,
        };
        self.push_event(ev);
    }

    fn push_event(&mut self, ev: Event) {
        if self.s.events.len() >= EVENT_LOG_CAP {
            if let Some(old) = self.s.events.pop_front() {
                self.s.events_from = old.index;
            }
        }
        self.s.events.push_back(ev);
    }

    fn touch_vm(&mut self, name: &str) {
        self.touched.vms.insert(name.to_string());
        if let Some(vm) = self.s.vms.get_mut(name) {
            vm.mod_index = self.index;
        }
    }

    /// Takes a VM off its host: it becomes pending (or failed for policy `never` when the host
    /// was lost), with a new generation, and its old host's agent stops it.
    fn unassign(&mut self, name: &str, reason: &str, host_lost: bool) {
        let (index, now) = (self.index, self.now);
        let Some(vm) = self.s.vms.get_mut(name) else {
            return;
        };
        let rerun = vm.spec.task.as_ref().is_some_and(|t| t.rerun_on_host_loss);
        if host_lost && vm.spec.is_task() && !rerun && vm.desired == DesiredState::Running {
            let host = vm.host.clone().unwrap_or_default();
            let end = TaskEnd {
                reason: TaskEndReason::HostLost,
                exit_status: None,
                detail: Some(reason.to_string()),
                console: vec![],
            };
            let result = task_result(vm, &host, &end, self.now);
            self.finish_task(name, result);
            return;
        }
        let old = vm.host.take();
        vm.evicting = None;
        vm.generation += 1;
        let next = if vm.desired == DesiredState::Stopped {
            (VmState::Stopped, None)
        } else if host_lost && vm.spec.restart_policy == RestartPolicy::Never {
            (
                VmState::Failed,
                Some(format!("{reason}; restart policy is never")),
            )
        } else {
            (
                VmState::Pending,
                Some(format!("{reason}; waiting for placement")),
            )
        };
        set_state(vm, next.0, next.1.clone(), now);
        let vm = vm.clone();
        self.s.bump_host(old.as_deref(), index);
        self.touch_vm(name);
        self.event(EventKind::VmPending, Some(&vm), old.as_deref(), next.1);
    }

    /// A task's final result: the VM ends `stopped` (succeeded) or `failed` with it, and
    /// leaves its host (a new generation: the host's agent forgets it, its capacity is free).
    fn finish_task(&mut self, name: &str, result: TaskResult) {
        let (index, now) = (self.index, self.now);
        let Some(vm) = self.s.vms.get_mut(name) else {
            return;
        };
        let state = match result.outcome {
            TaskOutcome::Succeeded => VmState::Stopped,
            TaskOutcome::Failed => VmState::Failed,
        };
        let old = vm.host.take();
        vm.evicting = None;
        vm.generation += 1;
        vm.task_started_ms = None;
        set_state(vm, state, Some(result.summary()), now);
        vm.task_result = Some(result);
        let vm = vm.clone();
        self.s.bump_host(old.as_deref(), index);
        self.touch_vm(name);
        self.event(
            EventKind::VmState,
            Some(&vm),
            old.as_deref(),
            vm.reason.clone(),
        );
    }

    /// `vm` was deleted: its key, if it still names it, is kept for [`KEY_RETENTION_MS`].
    fn key_deleted(&mut self, vm: &Vm) {
        let Some(k) = &vm.idempotency_key else {
            return;
        };
        if let Some(rec) = self
            .s
            .keys
            .get_mut(k)
            .filter(|r| r.vm == vm.spec.name && r.deleted_ms.is_none())
        {
            rec.deleted_ms = Some(self.now);
            self.s
                .key_expiry
                .insert((self.now + KEY_RETENTION_MS, k.clone()));
            self.touched.keys.insert(k.clone());
        }
    }

    /// Forgets the keys of deleted VMs whose retention has passed at this command's time.
    fn expire_keys(&mut self) {
        while let Some((at, k)) = self.s.key_expiry.first().cloned() {
            if at > self.now {
                break;
            }
            self.s.key_expiry.pop_first();
            if self.s.keys.get(&k).is_some_and(|r| r.deleted_ms.is_some()) {
                self.s.keys.remove(&k);
                self.touched.keys.insert(k);
            }
        }
    }

    fn create_vm(&mut self, spec: &VmSpec, key: &Option<String>) -> Response {
        let fingerprint = key.as_ref().map(|_| request_sha256(spec));
        if let (Some(k), Some(fp)) = (key, &fingerprint) {
            if let Some(rec) = self.s.keys.get(k) {
                if rec.request_sha256.as_ref().is_some_and(|r| r != fp) {
                    return Response::Error(ApplyError::KeyMismatch(format!(
                        "Idempotency-Key {k} was used for a different request (it created vm {}); use a new key",
                        rec.vm
                    )));
                }
                match (rec.deleted_ms, self.s.vms.get(&rec.vm)) {
                    (None, Some(existing)) => {
                        return Response::Existing(Box::new(existing.clone()))
                    }
                    _ => {
                        return Response::Error(ApplyError::KeySpent(format!(
                            "Idempotency-Key {k} created vm {}, which was deleted since; use a new key to create it again",
                            rec.vm
                        )))
                    }
                }
            }
        }
        if self.s.vms.contains_key(&spec.name) {
            return Response::Error(ApplyError::AlreadyExists(format!(
                "vm {} already exists",
                spec.name
            )));
        }
        let vm = Vm {
            spec: spec.clone(),
            desired: DesiredState::Running,
            state: VmState::Pending,
            reason: Some("waiting for placement".into()),
            host: None,
            generation: 1,
            since_ms: self.now,
            created_ms: self.now,
            mod_index: self.index,
            restarts: vec![],
            evicting: None,
            idempotency_key: key.clone(),
            task_started_ms: None,
            task_result: None,
        };
        self.s.vms.insert(spec.name.clone(), vm.clone());
        self.touch_vm(&spec.name);
        if let Some(k) = key {
            self.s.keys.insert(
                k.clone(),
                KeyRecord {
                    vm: spec.name.clone(),
                    request_sha256: fingerprint,
                    created_ms: self.now,
                    deleted_ms: None,
                },
            );
            self.touched.keys.insert(k.clone());
        }
        self.event(EventKind::VmCreated, Some(&vm), None, None);
        Response::Vm(Box::new(vm))
    }

    fn update_vm(&mut self, spec: &VmSpec, expected: Option<u64>) -> Response {
        let Some(vm) = self.s.vms.get_mut(&spec.name) else {
            return not_found_vm(&spec.name);
        };
        if let Some(e) = expected.filter(|e| *e != vm.generation) {
            return generation_conflict(&spec.name, e, vm.generation);
        }
        if vm.spec == *spec {
            return Response::Vm(Box::new(vm.clone()));
        }
        vm.spec = spec.clone();
        vm.generation += 1;
        vm.restarts.clear();
        let placed = vm.host.is_some();
        let running = !matches!(vm.state, VmState::Stopped | VmState::Failed);
        let name = spec.name.clone();
        if placed && running && vm.desired == DesiredState::Running {
            // Stop it where it is, then place it again with the new spec.
            vm.evicting = Some(Eviction {
                reason: "spec updated".into(),
                deadline_ms: self.now + 60_000,
            });
            set_state(
                vm,
                VmState::Stopping,
                Some("spec updated; moving".into()),
                self.now,
            );
            let host = vm.host.clone();
            self.s.bump_host(host.as_deref(), self.index);
        } else if placed {
            self.unassign(&name, "spec updated", false);
        } else if vm.desired == DesiredState::Running {
            set_state(
                vm,
                VmState::Pending,
                Some("waiting for placement".into()),
                self.now,
            );
        }
        self.touch_vm(&name);
        let vm = self.s.vms.get(&name).cloned();
        if let Some(v) = &vm {
            self.event(EventKind::VmUpdated, Some(v), None, None);
        }
        vm.map(|v| Response::Vm(Box::new(v)))
            .unwrap_or(Response::None)
    }

    fn delete_vm(&mut self, name: &str, expected: Option<u64>) -> Response {
        let Some(vm) = self.s.vms.get(name) else {
            return not_found_vm(name);
        };
        if let Some(e) = expected.filter(|e| *e != vm.generation) {
            return generation_conflict(name, e, vm.generation);
        }
        let Some(vm) = self.s.vms.remove(name) else {
            return not_found_vm(name);
        };
        self.s.bump_host(vm.host.as_deref(), self.index);
        self.touched.vms.insert(name.to_string());
        self.key_deleted(&vm);
        self.event(EventKind::VmDeleted, Some(&vm), None, None);
        Response::Vm(Box::new(vm))
    }

    fn set_desired(
        &mut self,
        name: &str,
        desired: DesiredState,
        expected: Option<u64>,
    ) -> Response {
        let now = self.now;
        let Some(vm) = self.s.vms.get_mut(name) else {
            return not_found_vm(name);
        };
        if let Some(e) = expected.filter(|e| *e != vm.generation) {
            return generation_conflict(name, e, vm.generation);
        }
        let ended = matches!(vm.state, VmState::Stopped | VmState::Failed);
        // Starting a VM that wants to run but ended (failed, gave up restarting) restarts it.
        let restart = desired == DesiredState::Running && vm.desired == desired && ended;
        if vm.desired == desired && !restart {
            return Response::Vm(Box::new(vm.clone()));
        }
        vm.desired = desired;
        vm.generation += 1;
        vm.restarts.clear();
        match (desired, vm.host.is_some()) {
            (DesiredState::Stopped, false) => set_state(vm, VmState::Stopped, None, now),
            (DesiredState::Running, false) => set_state(
                vm,
                VmState::Pending,
                Some("waiting for placement".into()),
                now,
            ),
            (DesiredState::Stopped, true) => {
                if !ended {
                    set_state(vm, VmState::Stopping, None, now);
                }
            }
            (DesiredState::Running, true) => {
                if vm.state != VmState::Running {
                    set_state(vm, VmState::Scheduled, None, now);
                }
            }
        }
        let vm = vm.clone();
        self.s.bump_host(vm.host.as_deref(), self.index);
        self.touch_vm(name);
        self.event(EventKind::VmState, Some(&vm), None, None);
        Response::Vm(Box::new(vm))
    }

    fn register_host(&mut self, r: &HostRegistration) -> Response {
        let now = self.now;
        let host = match self.s.hosts.get(&r.id) {
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
                last_heartbeat_ms: now,
                registered_ms: old.registered_ms,
                drain_deadline_ms: old.drain_deadline_ms,
                epoch: old.epoch + 1,
                agent_url: r.agent_url.clone(),
                fence: r.fence,
            },
            None => Host {
                id: r.id.clone(),
                address: r.address.clone(),
                capacity: r.capacity,
                labels: r.labels.clone(),
                hypervisors: r.hypervisors.clone(),
                status: HostStatus::Up,
                last_heartbeat_ms: now,
                registered_ms: now,
                drain_deadline_ms: None,
                epoch: 1,
                agent_url: r.agent_url.clone(),
                fence: r.fence,
            },
        };
        let was_down = self
            .s
            .hosts
            .get(&r.id)
            .is_some_and(|h| h.status == HostStatus::Down);
        self.s.hosts.insert(r.id.clone(), host.clone());
        self.s.bump_host(Some(&r.id), self.index);
        self.touched.hosts.insert(r.id.clone());
        self.host_event(&host, EventKind::HostRegistered);
        if was_down {
            self.host_back(&r.id);
        }
        Response::Host(Box::new(host))
    }

    fn host_event(&mut self, h: &Host, kind: EventKind) {
        let ev = Event {
            index: self.index,
            time_ms: self.now,
            kind,
            vm: None,
            host: Some(h.id.clone()),
            state: None,
            host_status: Some(h.status),
            message: None,
        };
        self.push_event(ev);
    }

    fn heartbeat(&mut self, host: &str) -> Response {
        let Some(h) = self.s.hosts.get_mut(host) else {
            return Response::Error(ApplyError::NotFound(format!("host {host} not registered")));
        };
        if declared_gone(h) {
            return gone_refusal(host);
        }
        h.last_heartbeat_ms = self.now;
        let came_back = h.status == HostStatus::Down;
        if came_back {
            h.status = HostStatus::Up;
        }
        let h = h.clone();
        self.touched.hosts.insert(host.to_string());
        if came_back {
            self.host_event(&h, EventKind::HostStatus);
            self.host_back(host);
        }
        Response::Host(Box::new(h))
    }

    fn report(&mut self, host: &str, name: &str, report: &VmStatusReport) -> Response {
        let (now, index) = (self.now, self.index);
        let Some(vm) = self.s.vms.get_mut(name) else {
            return not_found_vm(name);
        };
        if vm.host.as_deref() != Some(host) {
            return Response::Error(ApplyError::Conflict(format!(
                "vm {name} is not assigned to host {host}"
            )));
        }
        let ended = matches!(report.state, VmState::Stopped | VmState::Failed);
        // A report about an older generation says nothing about what the host runs now: in
        // particular, the stop of an older incarnation never completes an eviction.
        if report.generation != 0 && report.generation < vm.generation {
            return Response::Vm(Box::new(vm.clone()));
        }
        if ended && vm.evicting.is_some() {
            // Generation 0 (an agent that does not say which incarnation ended) is unknown:
            // only a stop of the current generation confirms the VM is gone from the host.
            if report.generation == 0 {
                return Response::Vm(Box::new(vm.clone()));
            }
            self.unassign(name, "moved off its host", false);
            return self
                .s
                .vms
                .get(name)
                .cloned()
                .map(|v| Response::Vm(Box::new(v)))
                .unwrap_or_default();
        }
        if vm.state == report.state && vm.reason == report.reason {
            return Response::Vm(Box::new(vm.clone()));
        }
        if vm.spec.is_task() {
            return self.report_task(host, name, report);
        }
        set_state(vm, report.state, report.reason.clone(), now);
        let mut restarted = false;
        if ended && vm.desired == DesiredState::Running {
            let restart = match vm.spec.restart_policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => report.state == VmState::Failed,
                RestartPolicy::Never => false,
            };
            if restart {
                let window = vm.spec.restart_window_ms();
                vm.restarts.retain(|t| now.saturating_sub(*t) < window);
                let why = report
                    .reason
                    .clone()
                    .unwrap_or_else(|| report.state.as_str().into());
                if vm.restarts.len() as u32 >= vm.spec.max_restarts() {
                    let msg = format!(
                        "{why}; restarted {} times within {}s, giving up",
                        vm.restarts.len(),
                        window / 1000
                    );
                    set_state(vm, VmState::Failed, Some(msg), now);
                } else {
                    vm.restarts.push(now);
                    vm.generation += 1;
                    set_state(
                        vm,
                        VmState::Scheduled,
                        Some(format!("restarting after: {why}")),
                        now,
                    );
                    restarted = true;
                }
            }
        }
        let vm = vm.clone();
        if restarted {
            self.s.bump_host(Some(host), index);
        }
        self.touch_vm(name);
        self.event(EventKind::VmState, Some(&vm), None, vm.reason.clone());
        Response::Vm(Box::new(vm))
    }

    /// A report about a task (not evicting, current generation, changed): a run that
    /// started is timed, an end becomes its result; a failure runs again within
    /// `max_restarts`, a lost host only with `rerun_on_host_loss`.
    fn report_task(&mut self, host: &str, name: &str, report: &VmStatusReport) -> Response {
        let (now, index) = (self.now, self.index);
        let Some(vm) = self.s.vms.get_mut(name) else {
            return not_found_vm(name);
        };
        let ended = matches!(report.state, VmState::Stopped | VmState::Failed);
        if !ended || vm.desired != DesiredState::Running {
            let up = matches!(report.state, VmState::Starting | VmState::Running);
            if up && vm.task_started_ms.is_none() {
                vm.task_started_ms = Some(now);
            }
            set_state(vm, report.state, report.reason.clone(), now);
            let vm = vm.clone();
            self.touch_vm(name);
            self.event(EventKind::VmState, Some(&vm), None, vm.reason.clone());
            return Response::Vm(Box::new(vm));
        }
        let end = report.task_end.clone().unwrap_or_else(|| TaskEnd {
            // An agent that does not describe task ends: its state says enough.
            reason: TaskEndReason::Exited,
            exit_status: (report.state == VmState::Stopped).then_some(0),
            detail: report.reason.clone(),
            console: vec![],
        });
        let result = task_result(vm, host, &end, now);
        let again = match (result.outcome, result.reason) {
            (TaskOutcome::Succeeded, _) => None,
            (TaskOutcome::Failed, TaskEndReason::HostLost) => vm
                .spec
                .task
                .as_ref()
                .is_some_and(|t| t.rerun_on_host_loss)
                .then_some(false),
            (TaskOutcome::Failed, _) => {
                ((vm.restarts.len() as u32) < vm.spec.max_restarts()).then_some(true)
            }
        };
        let Some(counted) = again else {
            self.finish_task(name, result);
            return self
                .s
                .vms
                .get(name)
                .map(|v| Response::Vm(Box::new(v.clone())))
                .unwrap_or_default();
        };
        if counted {
            vm.restarts.push(now);
        }
        vm.generation += 1;
        vm.task_started_ms = None;
        let why = format!("running again after: {}", result.summary());
        vm.task_result = Some(result);
        set_state(vm, VmState::Scheduled, Some(why), now);
        let vm = vm.clone();
        self.s.bump_host(Some(host), index);
        self.touch_vm(name);
        self.event(EventKind::VmState, Some(&vm), None, vm.reason.clone());
        Response::Vm(Box::new(vm))
    }

    fn place(
        &mut self,
        placements: &[Placement],
        unplaced: &[Unplaced],
        overcommit: Option<Overcommit>,
        capacity_rev: Option<u64>,
    ) -> Response {
        // With the ratios, the load on every host named here: one pass over the VMs for the
        // whole command, then updated as its placements are accepted.
        let mut check = overcommit.map(|oc| {
            let named: BTreeSet<&str> = placements.iter().map(|p| p.host.as_str()).collect();
            scheduler::PlacementCheck::new(self.s, oc, |h| named.contains(h))
        });
        let mut placed = 0;
        let mut refused = 0;
        for p in placements {
            let Some(vm) = self.s.vms.get(&p.vm) else {
                continue;
            };
            if vm.generation != p.generation || vm.host.is_some() || vm.state != VmState::Pending {
                continue;
            }
            match check.as_mut() {
                Some(check) => {
                    if let Err(why) = check.admit(self.s, &p.host, &vm.spec) {
                        let reason = format!("placement on {} no longer fits: {why}", p.host);
                        self.set_reason(&p.vm, reason, EventKind::VmPending);
                        refused += 1;
                        continue;
                    }
                }
                // An entry from before the ratios were carried: as it applied then.
                None => {
                    let up = self
                        .s
                        .hosts
                        .get(&p.host)
                        .is_some_and(|h| h.status == HostStatus::Up);
                    if !up {
                        continue;
                    }
                }
            }
            let Some(vm) = self.s.vms.get_mut(&p.vm) else {
                continue;
            };
            vm.host = Some(p.host.clone());
            vm.generation += 1;
            let next = if vm.desired == DesiredState::Running {
                VmState::Scheduled
            } else {
                VmState::Stopped
            };
            set_state(vm, next, None, self.now);
            let vm = vm.clone();
            self.touch_vm(&p.vm);
            self.s.host_rev.insert(p.host.clone(), self.index);
            self.event(EventKind::VmPlaced, Some(&vm), None, None);
            placed += 1;
        }
        let mut not_placed = 0;
        for u in unplaced {
            let Some(vm) = self.s.vms.get_mut(&u.vm) else {
                continue;
            };
            if vm.host.is_none()
                && vm.state == VmState::Pending
                && vm.reason.as_deref() != Some(u.reason.as_str())
            {
                vm.reason = Some(u.reason.clone());
                let vm = vm.clone();
                self.touch_vm(&u.vm);
                self.event(
                    EventKind::VmPending,
                    Some(&vm),
                    None,
                    Some(u.reason.clone()),
                );
            }
            if let Some(seen) = capacity_rev {
                self.blocked.push((u.vm.clone(), seen));
            }
            not_placed += 1;
        }
        Response::Placed {
            placed,
            unplaced: not_placed + refused,
        }
    }

    fn set_host_status(&mut self, host: &str, status: HostStatus) -> Response {
        let Some(h) = self.s.hosts.get_mut(host) else {
            return Response::Error(ApplyError::NotFound(format!("host {host} not registered")));
        };
        if declared_gone(h) && status != HostStatus::Down {
            return gone_refusal(host);
        }
        let was = h.status;
        h.status = status;
        if status != HostStatus::Draining {
            h.drain_deadline_ms = None;
        }
        let h = h.clone();
        self.touched.hosts.insert(host.to_string());
        self.s.bump_host(Some(host), self.index);
        if was != status {
            self.host_event(&h, EventKind::HostStatus);
        }
        if status == HostStatus::Down && was != HostStatus::Down {
            let vms: Vec<(String, OnHostLoss)> = self
                .s
                .assigned_to(host)
                .map(|v| (v.spec.name.clone(), v.spec.on_host_loss()))
                .collect();
            for (n, on_loss) in vms {
                match on_loss {
                    // It may still run there: it stays until the host comes back or is
                    // declared gone.
                    OnHostLoss::Stay => self.set_reason(&n, stay_reason(host), EventKind::VmState),
                    OnHostLoss::Move => self.unassign(&n, &format!("host {host} lost"), true),
                }
            }
        } else if was == HostStatus::Down && status != HostStatus::Down {
            self.host_back(host);
        }
        Response::Host(Box::new(h))
    }

    /// A host is up again: its `stay` VMs no longer wait for it (its agent reports what it
    /// really runs).
    fn host_back(&mut self, host: &str) {
        let lost = stay_reason(host);
        let names: Vec<String> = self
            .s
            .assigned_to(host)
            .filter(|v| v.reason.as_deref() == Some(lost.as_str()))
            .map(|v| v.spec.name.clone())
            .collect();
        for n in names {
            if let Some(vm) = self.s.vms.get_mut(&n) {
                vm.reason = None;
                let vm = vm.clone();
                self.touch_vm(&n);
                self.event(EventKind::VmState, Some(&vm), None, None);
            }
        }
    }

    fn declare_gone(&mut self, host: &str) -> Response {
        let Some(h) = self.s.hosts.get_mut(host) else {
            return Response::Error(ApplyError::NotFound(format!("host {host} not registered")));
        };
        h.status = HostStatus::Down;
        h.drain_deadline_ms = None;
        h.last_heartbeat_ms = GONE_HEARTBEAT_MS;
        let h = h.clone();
        self.touched.hosts.insert(host.to_string());
        self.s.bump_host(Some(host), self.index);
        let ev = Event {
            index: self.index,
            time_ms: self.now,
            kind: EventKind::HostStatus,
            vm: None,
            host: Some(host.to_string()),
            state: None,
            host_status: Some(h.status),
            message: Some(format!("host {host} declared gone by an operator")),
        };
        self.push_event(ev);
        let names: Vec<String> = self
            .s
            .assigned_to(host)
            .map(|v| v.spec.name.clone())
            .collect();
        for n in names {
            self.unassign(&n, &format!("host {host} declared gone"), true);
        }
        Response::Host(Box::new(h))
    }

    fn drain(&mut self, host: &str, deadline_ms: u64) -> Response {
        let now = self.now;
        let Some(h) = self.s.hosts.get_mut(host) else {
            return Response::Error(ApplyError::NotFound(format!("host {host} not registered")));
        };
        if h.status == HostStatus::Down {
            return Response::Error(ApplyError::Conflict(format!("host {host} is down")));
        }
        h.status = HostStatus::Draining;
        h.drain_deadline_ms = Some(deadline_ms);
        let h = h.clone();
        self.touched.hosts.insert(host.to_string());
        self.s.bump_host(Some(host), self.index);
        self.host_event(&h, EventKind::HostStatus);
        let names: Vec<String> = self
            .s
            .assigned_to(host)
            .map(|v| v.spec.name.clone())
            .collect();
        for n in names {
            let Some(vm) = self.s.vms.get_mut(&n) else {
                continue;
            };
            let active = vm.desired == DesiredState::Running
                && !matches!(vm.state, VmState::Stopped | VmState::Failed);
            if active && vm.spec.is_task() {
                // A task is not moved (it may not be safe to run twice): it runs to its end
                // here, which frees the host.
                let why = format!("host {host} draining; the task runs to its end here");
                self.set_reason(&n, why, EventKind::VmState);
            } else if active {
                vm.evicting = Some(Eviction {
                    reason: format!("host {host} draining"),
                    deadline_ms,
                });
                vm.generation += 1;
                set_state(
                    vm,
                    VmState::Stopping,
                    Some(format!("host {host} draining; moving")),
                    now,
                );
                let vm = vm.clone();
                self.touch_vm(&n);
                self.event(EventKind::VmState, Some(&vm), None, vm.reason.clone());
            } else {
                self.unassign(&n, &format!("host {host} draining"), false);
            }
        }
        Response::Host(Box::new(h))
    }

    /// Takes the VMs still at the given generations off their hosts; with
    /// `keep_on_live_host`, those whose host may still run them only get the reason why they
    /// wait (once: an unchanged reason is not written again). Counts the VMs taken off.
    fn unassign_many(&mut self, vms: &[VmRef], reason: &str, keep_on_live_host: bool) -> Response {
        let mut n = 0;
        for r in vms {
            let Some(vm) = self.s.vms.get(&r.vm) else {
                continue;
            };
            if vm.generation != r.generation || vm.host.is_none() {
                continue;
            }
            let wait = keep_on_live_host
                .then(|| overdue_wait_reason(self.s, vm))
                .flatten();
            match wait {
                Some(why) => self.set_reason(&r.vm, why, EventKind::VmState),
                None => {
                    self.unassign(&r.vm, reason, false);
                    n += 1;
                }
            }
        }
        Response::Count(n)
    }

    /// Sets a VM's reason (its state unchanged), if it differs.
    fn set_reason(&mut self, name: &str, reason: String, kind: EventKind) {
        let Some(vm) = self.s.vms.get_mut(name) else {
            return;
        };
        if vm.reason.as_deref() == Some(reason.as_str()) {
            return;
        }
        vm.reason = Some(reason);
        let vm = vm.clone();
        self.touch_vm(name);
        self.event(kind, Some(&vm), None, vm.reason.clone());
    }

    fn restore(&mut self, hosts: &[Host], vms: &[Vm]) -> Response {
        for name in self.s.vms.keys() {
            self.touched.vms.insert(name.clone());
        }
        for id in self.s.hosts.keys() {
            self.touched.hosts.insert(id.clone());
        }
        self.s.hosts = hosts.iter().map(|h| (h.id.clone(), h.clone())).collect();
        // Generations never go back: a VM the state holds now comes back with a generation
        // above its current one, so no agent can take the restored VM for an older
        // incarnation (or an older one's report for the restored one).
        let restored: BTreeMap<String, Vm> = vms
            .iter()
            .map(|v| {
                let mut v = v.clone();
                if let Some(now) = self.s.vms.get(&v.spec.name) {
                    v.generation = v.generation.max(now.generation + 1);
                }
                v.mod_index = self.index;
                (v.spec.name.clone(), v)
            })
            .collect();
        self.s.vms = restored;
        self.touched.vms.extend(self.s.vms.keys().cloned());
        self.touched.hosts.extend(self.s.hosts.keys().cloned());
        let index = self.index;
        let ids: Vec<String> = self.s.hosts.keys().cloned().collect();
        for id in ids {
            self.s.bump_host(Some(&id), index);
        }
        Response::Count(vms.len())
    }
}

/// The result of a task `vm`'s run on `host` that ended as `end`, at `now`: succeeded only
/// for an exit with status 0.
pub fn task_result(vm: &Vm, host: &str, end: &TaskEnd, now: u64) -> TaskResult {
    let succeeded = end.reason == TaskEndReason::Exited && end.exit_status == Some(0);
    let detail = end.detail.as_deref().filter(|d| !d.is_empty());
    let message = match (end.reason, end.exit_status, detail) {
        (TaskEndReason::Exited, Some(status), _) => format!("exited with status {status}"),
        (TaskEndReason::Exited, None, Some(d)) => d.to_string(),
        (TaskEndReason::Exited, None, None) => "exited".to_string(),
        (TaskEndReason::TimedOut, _, _) => {
            let secs = vm
                .spec
                .task
                .as_ref()
                .and_then(|t| t.timeout_secs)
                .unwrap_or(0);
            format!("timed out after {secs} s")
        }
        (TaskEndReason::HostLost, _, Some(d)) if d.starts_with("host ") => d.to_string(),
        (TaskEndReason::HostLost, _, Some(d)) => format!("host {host} lost: {d}"),
        (TaskEndReason::HostLost, _, None) => format!("host {host} lost"),
        (TaskEndReason::CouldNotStart, _, Some(d)) => format!("could not start: {d}"),
        (TaskEndReason::CouldNotStart, _, None) => "could not start".to_string(),
    };
    TaskResult {
        outcome: if succeeded {
            TaskOutcome::Succeeded
        } else {
            TaskOutcome::Failed
        },
        reason: end.reason,
        exit_status: end.exit_status,
        message,
        started_ms: vm.task_started_ms,
        ended_ms: now,
        host: (!host.is_empty()).then(|| host.to_string()),
        generation: vm.generation,
        console: blixard_api::bound_console(&end.console),
    }
}

/// Finished tasks whose result is older than `retention_ms` at `now`: to be deleted.
pub fn expired_tasks(s: &ClusterState, now: u64, retention_ms: u64) -> Vec<VmRef> {
    s.index
        .tasks_done()
        .filter_map(|name| s.vms.get(name))
        .filter(|vm| {
            vm.task_finished()
                && vm
                    .task_result
                    .as_ref()
                    .is_some_and(|r| now.saturating_sub(r.ended_ms) >= retention_ms)
        })
        .map(|vm| VmRef {
            vm: vm.spec.name.clone(),
            generation: vm.generation,
        })
        .collect()
}

/// Applies one committed command at log `index`.
pub fn apply(state: &mut ClusterState, index: u64, cmd: &Command) -> (Response, Touched) {
    let now = match cmd {
        Command::Batch { commands } => {
            let mut touched = Touched::default();
            let responses = commands
                .iter()
                .map(|c| match c {
                    Command::Batch { .. } => Response::Error(ApplyError::Conflict(
                        "a batch cannot hold another batch".into(),
                    )),
                    c => {
                        let (r, t) = apply(state, index, c);
                        touched.merge(t);
                        r
                    }
                })
                .collect();
            return (Response::Batch(responses), touched);
        }
        Command::CreateVm { now_ms, .. }
        | Command::DeleteVm { now_ms, .. }
        | Command::SetDesired { now_ms, .. }
        | Command::RegisterHost { now_ms, .. }
        | Command::Heartbeat { now_ms, .. }
        | Command::ReportVmStatus { now_ms, .. }
        | Command::Place { now_ms, .. }
        | Command::SetHostStatus { now_ms, .. }
        | Command::UpdateVm { now_ms, .. }
        | Command::DrainHost { now_ms, .. }
        | Command::Unassign { now_ms, .. }
        | Command::RestoreState { now_ms, .. }
        | Command::DeclareHostGone { now_ms, .. } => *now_ms,
    };
    let mut a = Apply {
        s: state,
        index,
        now,
        touched: Touched::default(),
        blocked: Vec::new(),
    };
    a.expire_keys();
    let resp = match cmd {
        Command::CreateVm {
            spec,
            idempotency_key,
            placement,
            ..
        } => {
            let created = a.create_vm(spec, idempotency_key);
            match (placement, &created) {
                // Only a VM this entry created (not an idempotent repeat) is placed, checked as
                // the placement loop's would be; one that no longer fits stays pending.
                (Some(p), Response::Vm(_)) => {
                    let name = spec.name.clone();
                    match p {
                        Admitted::Placed { host, overcommit } => {
                            let at = Placement {
                                vm: name,
                                host: host.clone(),
                                generation: 1,
                            };
                            a.place(&[at], &[], Some(*overcommit), None);
                        }
                        Admitted::Unplaced { reason } => {
                            let why = Unplaced {
                                vm: name,
                                reason: reason.clone(),
                            };
                            a.place(&[], &[why], None, None);
                        }
                    }
                    a.s.vms
                        .get(&spec.name)
                        .map(|v| Response::Vm(Box::new(v.clone())))
                        .unwrap_or(created)
                }
                _ => created,
            }
        }
        Command::DeleteVm {
            name,
            expected_generation,
            ..
        } => a.delete_vm(name, *expected_generation),
        Command::SetDesired {
            name,
            desired,
            expected_generation,
            ..
        } => a.set_desired(name, *desired, *expected_generation),
        Command::RegisterHost { registration, .. } => a.register_host(registration),
        Command::Heartbeat { host, .. } => a.heartbeat(host),
        Command::ReportVmStatus {
            host, name, report, ..
        } => a.report(host, name, report),
        Command::Place {
            placements,
            unplaced,
            overcommit,
            capacity_rev,
            ..
        } => a.place(placements, unplaced, *overcommit, *capacity_rev),
        Command::SetHostStatus { host, status, .. } => a.set_host_status(host, *status),
        Command::UpdateVm {
            spec,
            expected_generation,
            ..
        } => a.update_vm(spec, *expected_generation),
        Command::DrainHost {
            host, deadline_ms, ..
        } => a.drain(host, *deadline_ms),
        Command::Unassign {
            vms,
            reason,
            keep_on_live_host,
            ..
        } => a.unassign_many(vms, reason, keep_on_live_host.unwrap_or(false)),
        Command::RestoreState { hosts, vms, .. } => a.restore(hosts, vms),
        Command::DeclareHostGone { host, .. } => a.declare_gone(host),
        Command::Batch { .. } => Response::None,
    };
    let Apply {
        touched, blocked, ..
    } = a;
    reindex_touched(state, index, &touched, &blocked);
    (resp, touched)
}

/// Brings the index up to date with what one command changed: every touched VM, capacity for
/// every touched host, then the VMs the command found blocked.
fn reindex_touched(state: &mut ClusterState, index: u64, t: &Touched, blocked: &[(String, u64)]) {
    for name in &t.vms {
        state.index.update(name, state.vms.get(name), index);
    }
    if !t.hosts.is_empty() {
        state.index.capacity_changed(index);
    }
    for (name, seen) in blocked {
        state.index.block(name, *seen);
    }
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
pub(crate) use tests as tests_support;
