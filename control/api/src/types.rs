//! Wire types of the `/v1/` HTTP API: VM specs, hosts, cluster status and errors.
//!
//! Every request type rejects unknown fields, so a typo in a spec is an error rather than
//! a silently ignored setting. Validation lives in [`crate::validate`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which hypervisor builds the VM's command line on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Hypervisor {
    /// QEMU (`-M microvm`, `q35` fallback); KVM when it works, TCG otherwise.
    #[default]
    Qemu,
    /// cloud-hypervisor (needs KVM).
    CloudHypervisor,
    /// Firecracker (needs KVM).
    Firecracker,
    /// A plain long-lived process from the agent's own configuration (`process_command`),
    /// for hosts and tests without a hypervisor. The spec cannot choose the executable.
    Process,
}

impl Hypervisor {
    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Qemu => "qemu",
            Hypervisor::CloudHypervisor => "cloud-hypervisor",
            Hypervisor::Firecracker => "firecracker",
            Hypervisor::Process => "process",
        }
    }
}

/// What the cluster does when a VM's process ends or its host is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whenever it stops without being asked to, and move it when its host is lost.
    #[default]
    Always,
    /// Restart only after a failure, up to a limit within a window.
    OnFailure,
    /// Never restart or move it.
    Never,
}

/// What the cluster does with a VM when its host stops answering (see the README's
/// "Exactly once" section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum OnHostLoss {
    /// Fenced on a host cut off from the control plane (stopped once the host's lease runs
    /// out) and placed elsewhere once the host's lease has expired on the control plane: never
    /// runs twice, moves within seconds, but stops during a total control-plane outage.
    #[default]
    Move,
    /// Never fenced and never moved while its host may be alive: rides out control-plane
    /// outages and cut-off links, and is placed again only when its host comes back without
    /// it or an operator declares the host gone (`blixardctl host declare-gone`).
    Stay,
}

impl OnHostLoss {
    pub fn as_str(self) -> &'static str {
        match self {
            OnHostLoss::Move => "move",
            OnHostLoss::Stay => "stay",
        }
    }
}

/// How the scheduler ranks hosts that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum PlacementStrategy {
    /// Prefer the least loaded host.
    #[default]
    Spread,
    /// Prefer the most loaded host that still fits.
    Binpack,
}

/// Image format of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

/// A disk attached to a VM. `path` is relative to the agent's image directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub format: DiskFormat,
}

/// A network interface: a TAP device on a host bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The host bridge the TAP device joins.
    pub bridge: String,
    /// `52:54:00:xx:xx:xx`-style MAC address; generated from the VM name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The desired shape of one VM: structured data, never a command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// DNS label (lowercase letters, digits, `-`; at most 63 characters): it becomes the unit name
    /// `blixard-vm-<name>.service`.
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub hypervisor: Hypervisor,
    /// Kernel image, relative to the agent's image directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Host labels the VM requires (every pair must match).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub constraints: BTreeMap<String, String>,
    /// The VM's own labels, for operators to select VMs by (`vm list -l k=v`); they do not
    /// affect placement.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// No two VMs of the same group run on one host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
    #[serde(default)]
    pub strategy: PlacementStrategy,
    /// Most restarts within `restart_window_secs` before the VM is left `failed` (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    /// Window for `max_restarts`, in seconds (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_window_secs: Option<u64>,
    /// What happens to the VM when its host stops answering (default `move`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_host_loss: Option<OnHostLoss>,
    /// Set for a task: a VM that runs once to completion and records its result (see
    /// [`TaskSpec`]). Absent for a long-running VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskSpec>,
}

/// What makes a VM a task: it runs once, its end is its result ([`TaskResult`]), and it is
/// run again only after a failure and only within `max_restarts` (default 0 for a task), or,
/// when `rerun_on_host_loss` says so, elsewhere after its host was lost. `restart_policy` does
/// not apply to a task.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Seconds the task may run, enforced by its host (systemd's `RuntimeMaxSec=`: the unit is
    /// stopped, gracefully and then killed); it then ends `failed: timed out after N s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Run it again on another host when its host is lost (only safe for a task that may run
    /// twice). Default: it ends `failed: host lost`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rerun_on_host_loss: bool,
}

/// Most bytes of console lines a task result keeps (its newest lines).
pub const TASK_CONSOLE_BYTES: usize = 4096;

/// The newest of `lines` (oldest first) whose lengths add up to at most
/// [`TASK_CONSOLE_BYTES`], oldest first; a single longer line is cut to its end.
pub fn bound_console(lines: &[String]) -> Vec<String> {
    let mut kept = Vec::new();
    let mut total = 0usize;
    for l in lines.iter().rev() {
        if total + l.len() > TASK_CONSOLE_BYTES {
            if kept.is_empty() {
                let mut start = l.len() - TASK_CONSOLE_BYTES;
                while !l.is_char_boundary(start) {
                    start += 1;
                }
                kept.push(l[start..].to_string());
            }
            break;
        }
        total += l.len();
        kept.push(l.clone());
    }
    kept.reverse();
    kept
}

/// How a task ended.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskOutcome {
    /// Exited with status 0 (a guest that powers off without a status counts as 0).
    Succeeded,
    Failed,
}

impl TaskOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskOutcome::Succeeded => "succeeded",
            TaskOutcome::Failed => "failed",
        }
    }
}

/// Why a task ended.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskEndReason {
    /// Its process (or guest) ended by itself; `exit_status` says how, when it is known.
    Exited,
    /// Its host stopped it at `timeout_secs`.
    TimedOut,
    /// Its host was lost (declared down or gone, or the host fenced it).
    HostLost,
    /// Its unit could not be built or started, or its hypervisor refused to start.
    CouldNotStart,
}

impl TaskEndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskEndReason::Exited => "exited",
            TaskEndReason::TimedOut => "timed-out",
            TaskEndReason::HostLost => "host-lost",
            TaskEndReason::CouldNotStart => "could-not-start",
        }
    }
}

/// What an agent reports about the end of a task's run, with the VM's end
/// ([`VmStatusReport`]).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskEnd {
    pub reason: TaskEndReason,
    /// The process's exit status, or the guest's (see the README's "Tasks"); absent when it
    /// did not exit by itself (killed by a signal, timed out, never started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// What ended it, for people (`killed by signal KILL`, QEMU's error, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The run's last console lines, oldest first, at most [`TASK_CONSOLE_BYTES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub console: Vec<String>,
}

/// The recorded result of a task, replicated through Raft with its VM.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub outcome: TaskOutcome,
    pub reason: TaskEndReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// The end in words: `exited with status 3`, `timed out after 10 s`, `host h1 lost`, …
    pub message: String,
    /// Unix milliseconds at which its host reported it running (leader's clock), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Unix milliseconds at which the end was recorded (leader's clock).
    pub ended_ms: u64,
    /// The host it ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The VM generation that ran.
    pub generation: u64,
    /// The last console lines, oldest first, at most [`TASK_CONSOLE_BYTES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub console: Vec<String>,
}

impl TaskResult {
    /// `succeeded: exited with status 0`, `failed: timed out after 10 s`, …
    pub fn summary(&self) -> String {
        format!("{}: {}", self.outcome.as_str(), self.message)
    }
}

impl VmSpec {
    pub const DEFAULT_MAX_RESTARTS: u32 = 5;
    pub const DEFAULT_RESTART_WINDOW_SECS: u64 = 600;

    /// Most restarts within the window; a task's default is 0 (it runs once).
    pub fn max_restarts(&self) -> u32 {
        let default = if self.task.is_some() {
            0
        } else {
            Self::DEFAULT_MAX_RESTARTS
        };
        self.max_restarts.unwrap_or(default)
    }

    /// Whether this VM is a task (see [`TaskSpec`]).
    pub fn is_task(&self) -> bool {
        self.task.is_some()
    }

    /// See [`VmSpec::on_host_loss`].
    pub fn on_host_loss(&self) -> OnHostLoss {
        self.on_host_loss.unwrap_or_default()
    }

    pub fn restart_window_ms(&self) -> u64 {
        self.restart_window_secs
            .unwrap_or(Self::DEFAULT_RESTART_WINDOW_SECS)
            .saturating_mul(1000)
    }
}

/// A VM being moved off its host: it is stopped there first, then placed again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Eviction {
    pub reason: String,
    /// Unix milliseconds by which the host should have confirmed the stop. Past it the VM is
    /// still never taken off a host that is up without that confirmation: it stays assigned
    /// and its reason says it waits, until the host confirms, is declared down or gone.
    pub deadline_ms: u64,
}

/// What the user wants a VM to be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum DesiredState {
    #[default]
    Running,
    Stopped,
}

/// What a VM is doing, as the cluster knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Not placed on any host yet (see `reason`).
    #[default]
    Pending,
    /// Placed on a host; the agent has not reported yet.
    Scheduled,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Scheduled => "scheduled",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }
}

/// A VM as stored by the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Vm {
    pub spec: VmSpec,
    pub desired: DesiredState,
    pub state: VmState,
    /// Why the VM is in its state (pending reason, exit reason, failure), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Host the VM is assigned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Bumped on every change of spec, desired state or assignment.
    pub generation: u64,
    /// Unix milliseconds of the last state change.
    pub since_ms: u64,
    pub created_ms: u64,
    /// Raft log index of the last change to this VM.
    pub mod_index: u64,
    /// Unix milliseconds of the restarts within the restart window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<u64>,
    /// Set while the VM is being moved off its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicting: Option<Eviction>,
    /// The idempotency key of the create that made this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// A task's run: when its current run was reported running (leader's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_started_ms: Option<u64>,
    /// A task's result, once a run ended (the last run's, while it is retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_result: Option<TaskResult>,
}

impl Vm {
    /// Whether this is a task whose result is final: it ended and will not run again.
    pub fn task_finished(&self) -> bool {
        self.spec.is_task()
            && self.task_result.is_some()
            && matches!(self.state, VmState::Stopped | VmState::Failed)
    }
}

/// Host lifecycle as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum HostStatus {
    #[default]
    Up,
    Down,
    Draining,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Up => "up",
            HostStatus::Down => "down",
            HostStatus::Draining => "draining",
        }
    }
}

/// What a host offers to VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    #[serde(default)]
    pub kvm: bool,
}

/// Sent by an agent when it starts (and again whenever its capacity changes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostRegistration {
    /// DNS label naming the host.
    pub id: String,
    /// Where the agent answers (`http://host:port`), for logs; may be empty.
    #[serde(default)]
    pub address: String,
    pub capacity: Capacity,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Hypervisors this host can run.
    #[serde(default)]
    pub hypervisors: Vec<Hypervisor>,
    /// Base URL of the agent's own API (`http://127.0.0.1:7101`), which serves the VMs'
    /// logs; absent when the agent serves none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// The agent's fence timing; absent from agents that predate leases (the control plane's
    /// `host_ttl_ms` then applies alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<FenceTiming>,
}

/// How an agent fences itself: once `lease_ms` has passed since it sent its last heartbeat
/// that a leader confirmed, it stops every `move` VM on the host, SIGTERM first and SIGKILL
/// `grace_ms` later. The control plane declares the host down only after both have passed,
/// plus its margin (see `control::liveness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FenceTiming {
    pub lease_ms: u64,
    pub grace_ms: u64,
}

impl FenceTiming {
    /// When the host's `move` VMs are all gone, counted from its last confirmed heartbeat.
    pub fn fenced_after_ms(&self) -> u64 {
        self.lease_ms.saturating_add(self.grace_ms)
    }
}

/// A host as stored by the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Host {
    pub id: String,
    pub address: String,
    pub capacity: Capacity,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub hypervisors: Vec<Hypervisor>,
    pub status: HostStatus,
    /// Unix milliseconds of the last heartbeat the leader accepted.
    pub last_heartbeat_ms: u64,
    pub registered_ms: u64,
    /// While draining: when the host's VMs are taken off it regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline_ms: Option<u64>,
    /// Bumped whenever the agent (re)registers: a new session of the agent.
    pub epoch: u64,
    /// Base URL of the agent's API (see [`HostRegistration::agent_url`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// The agent's fence timing (see [`HostRegistration::fence`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<FenceTiming>,
}

/// Where a [`LogLine`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LogSource {
    /// The VM's own output: its console, from the unit's processes.
    Console,
    /// systemd's messages about the VM's unit (started, stopped, failed).
    Unit,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Console => "console",
            LogSource::Unit => "unit",
        }
    }
}

/// One line of `GET /v1/vms/{name}/logs`, which streams them as NDJSON (one JSON object a
/// line), oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    /// Unix microseconds at which the host's journal received the line.
    pub ts_us: u64,
    pub source: LogSource,
    pub message: String,
}

/// Most lines `GET /v1/vms/{name}/logs?lines=N` may ask for.
pub const MAX_LOG_LINES: u32 = 10_000;
/// Lines of `GET /v1/vms/{name}/logs` when `lines` is not given.
pub const DEFAULT_LOG_LINES: u32 = 100;

/// Body of `POST /v1/hosts/{id}/drain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Seconds the host's VMs get to stop (default 300). Past it a VM that has not stopped
    /// stays on the host, saying it waits, until the host confirms the stop or is declared
    /// down or gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_secs: Option<u64>,
}

/// Body of `PUT /v1/vms/{name}`: a new spec, optionally only if the VM is still at
/// `expected_generation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    pub spec: VmSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_generation: Option<u64>,
}

/// What changed in the cluster, as `GET /v1/events` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    VmCreated,
    VmUpdated,
    VmDeleted,
    VmPlaced,
    VmState,
    VmPending,
    HostRegistered,
    HostStatus,
}

/// One change, at the Raft index that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    pub index: u64,
    pub time_ms: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_status: Option<HostStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Answer to `GET /v1/events?since=INDEX`: the events after `since`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Events {
    /// Pass as `since` to continue after these.
    pub index: u64,
    pub events: Vec<Event>,
}

/// Body of `POST /v1/plan`: the VMs a file declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    pub vms: Vec<VmSpec>,
    /// Also delete the VMs the file does not declare.
    #[serde(default)]
    pub prune: bool,
}

/// One VM the plan changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanItem {
    pub name: String,
    /// Fields that differ, for updates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    /// Where the scheduler would place it now (creates and updates), if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Why it would stay pending, if it would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
    /// Generation the update expects (to send back with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// What `apply` would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plan {
    pub create: Vec<PlanItem>,
    pub update: Vec<PlanItem>,
    pub delete: Vec<PlanItem>,
    pub unchanged: Vec<String>,
}

/// A saved copy of the cluster's hosts and VMs (`cluster snapshot save|restore`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StateSnapshot {
    /// Applied index the copy was taken at.
    pub index: u64,
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
}

/// Body of `POST /v1/vms/{name}/stop` and `start`: none needed, kept for future options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// One VM the agent should have, with the state it should be in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignment {
    pub spec: VmSpec,
    pub desired: DesiredState,
    pub generation: u64,
}

/// Answer to `GET /v1/hosts/{id}/assignments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignments {
    pub host: String,
    /// Pass as `wait_index` to wait for the next change.
    pub index: u64,
    pub vms: Vec<Assignment>,
}

/// What the agent reports about one VM unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmStatusReport {
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Generation of the assignment the agent acted on.
    #[serde(default)]
    pub generation: u64,
    /// For a task that ended: how (see [`TaskEnd`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_end: Option<TaskEnd>,
}

/// One member of the Raft cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Member {
    pub id: u64,
    pub addr: String,
    /// `voter` or `learner`.
    pub role: String,
}

/// Body of `POST /v1/cluster/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    pub id: u64,
    pub addr: String,
}

/// Whose view a [`ClusterStatus`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StatusView {
    /// The answering node's own, confirmed with no other node: a leader cut off from the
    /// others still reports itself leader until it hears of a newer term.
    #[default]
    Local,
}

impl StatusView {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusView::Local => "local",
        }
    }
}

/// Answer to `GET /v1/cluster/status`: the answering node's own view ([`StatusView::Local`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterStatus {
    pub node_id: u64,
    pub leader: Option<u64>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub state: String,
    pub members: Vec<Member>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    /// Always `local` (absent from nodes that predate the field, whose answers were local too).
    #[serde(default)]
    pub view: StatusView,
    /// Milliseconds since this node last heard from a leader: on a leader, since a quorum
    /// last acknowledged it; on any other node, since a request from a leader it follows
    /// arrived (or since it stopped leading, or started). Absent on a leader no quorum has
    /// acknowledged yet, and from nodes that predate the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_contact_ms: Option<u64>,
    /// The leader lease this node uses (its `election_timeout_max_ms`): contact older than
    /// this means this node's idea of the leader may be stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_lease_ms: Option<u64>,
}

impl ClusterStatus {
    /// Whether this node heard from a leader within its lease; `None` when it cannot tell.
    pub fn leader_contact_recent(&self) -> Option<bool> {
        Some(self.leader_contact_ms? <= self.leader_lease_ms?)
    }
}

/// Answer to `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub status: String,
    pub node_id: u64,
    pub leader: Option<u64>,
}

/// Machine-readable error codes of the API.
pub mod codes {
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    pub const INVALID_JSON: &str = "invalid_json";
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub const NOT_FOUND: &str = "not_found";
    pub const ALREADY_EXISTS: &str = "already_exists";
    pub const CONFLICT: &str = "conflict";
    pub const NO_LEADER: &str = "no_leader";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const INTERNAL: &str = "internal";
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    pub const GONE: &str = "gone";
    pub const UNAUTHENTICATED: &str = "unauthenticated";
    pub const FORBIDDEN: &str = "forbidden";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// 504: a follower forwarded the write and the leader stopped answering before saying
    /// how it ended; it may have been applied.
    pub const OUTCOME_UNKNOWN: &str = "outcome_unknown";
    /// 422: an `Idempotency-Key` sent again with a different request than the one it made.
    pub const IDEMPOTENCY_KEY_MISMATCH: &str = "idempotency_key_mismatch";
    /// 409: an `Idempotency-Key` whose VM was deleted since; a new key creates it again.
    pub const IDEMPOTENCY_KEY_SPENT: &str = "idempotency_key_spent";
}

/// The error object of every non-2xx answer: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// The response header of a list page that has more after it: its value, passed back as
/// `?continue=`, answers the next page. Absent on the last page.
pub const CONTINUE_HEADER: &str = "blixard-continue";

/// Which VMs `GET /v1/vms` answers, and how many at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmSelector {
    /// Only VMs assigned to this host.
    pub host: Option<String>,
    /// Only VMs in this state.
    pub state: Option<VmState>,
    /// Only VMs carrying every one of these labels.
    pub labels: BTreeMap<String, String>,
}

/// Which hosts `GET /v1/hosts` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSelector {
    /// Only hosts with this status.
    pub status: Option<HostStatus>,
    /// Only hosts carrying every one of these labels.
    pub labels: BTreeMap<String, String>,
}

impl VmSelector {
    /// Whether `vm` is selected.
    pub fn matches(&self, vm: &Vm) -> bool {
        self.host
            .as_ref()
            .is_none_or(|h| vm.host.as_ref() == Some(h))
            && self.state.is_none_or(|s| vm.state == s)
            && self
                .labels
                .iter()
                .all(|(k, v)| vm.spec.labels.get(k) == Some(v))
    }
}

impl HostSelector {
    /// Whether `host` is selected.
    pub fn matches(&self, host: &Host) -> bool {
        self.status.is_none_or(|s| host.status == s)
            && self
                .labels
                .iter()
                .all(|(k, v)| host.labels.get(k) == Some(v))
    }
}

/// `k=v,k2=v2`, the form `?label=` takes.
pub fn label_selector_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
