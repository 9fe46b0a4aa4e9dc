//! The agent daemon: connects to systemd, adopts the VM units it finds, registers the host,
//! and then keeps the host's units in line with its assignments.
//!
//! Three loops run side by side:
//! - the control link registers the host (retrying with backoff while the control plane is
//!   unreachable) and long-polls its assignments;
//! - the heartbeat loop; a heartbeat answered 200 is leader-confirmed and renews the host's
//!   lease ([`crate::lease`]); one answered 404 (the cluster forgot the host) makes the link
//!   register again;
//! - the main loop owns all state: on new assignments, unit signals, the lease's deadlines or a
//!   periodic resync it lists the `blixard-vm-*` units, records how units ended
//!   ([`crate::unit_track`]), runs [`reconcile`] and carries out the actions.
//!
//! The agent acts only once it knows the desired state, and starts a VM only under a lease
//! that holds. When the lease runs out it fences: every `move` VM gets SIGTERM, then SIGKILL
//! after `fence_grace_ms` ([`crate::fence_watch`]), nothing starts, and the ends are reported
//! as `failed` once the fence is over, for the cluster to decide on. `stay` VMs are left alone.
//! Each renewal is written to the lease file that the dead man's switch,
//! `blixard-fence.service`, watches, so the fence holds when the agent is dead too.
//! On SIGTERM or SIGINT it says `STOPPING=1` and exits without stopping any VM (the switch
//! fences them if no agent renews the lease in time).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_api::{
    unit_name, vm_name_of_unit, Assignments, Client, ClientError, Host, HostRegistration,
    Hypervisor, OnHostLoss, VmState, VmStatusReport,
};
use tokio::sync::{mpsc, Notify};

use crate::agent_api;
use crate::capacity::{self, CapacityError};
use crate::command::CommandBuilders;
use crate::config::{Config, ConfigError, SystemdBus};
use crate::fence_watch::{self, Fence, Kill, Watch};
use crate::journal::Manager;
use crate::lease::{Change, Lease, LeaseState, Verdict};
use crate::lease_file::{self, boottime_ms, LeaseFile};
use crate::notify;
use crate::reconcile::{reconcile, Action, Ended, Input};
use crate::started::Started;
use crate::systemd::{StartOutcome, Systemd, SystemdClient, SystemdError, UnitEvent, UnitEvents};
use crate::unit_spec;
use crate::unit_track::{Context, EndKind, Signal, UnitTracker};
use crate::{guest_end, last_run_log, task_end};

/// How long one assignments long-poll may wait on the server.
pub const LONG_POLL: Duration = Duration::from_secs(30);
/// A full pass even without any news, in case a signal was lost.
pub const RESYNC: Duration = Duration::from_secs(15);
/// When a report could not be delivered, the next try.
const RETRY: Duration = Duration::from_secs(1);
/// Reads of an ended QEMU VM's journal before its reason is reported as systemd gave it.
const JOURNAL_TRIES: usize = 5;
const JOURNAL_RETRY: Duration = Duration::from_millis(200);

/// Errors that end the daemon.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error("cannot probe the host's capacity")]
    Capacity(#[from] CapacityError),
    #[error("cannot read the token file {path}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the control endpoints")]
    Client(#[source] ClientError),
    #[error("lost the connection to systemd (its signal stream ended)")]
    SignalsLost,
    #[error(transparent)]
    Api(#[from] agent_api::AgentApiError),
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot start the dead man's switch ({unit})")]
    FenceUnit {
        unit: &'static str,
        #[source]
        source: SystemdError,
    },
    #[error("cannot find the agent's own executable for the dead man's switch")]
    OwnExe(#[source] std::io::Error),
    #[error(transparent)]
    Started(#[from] crate::started::StartedError),
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AgentError> {
    config.validate()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signals)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(AgentError::Signals)?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the agent, VMs keep running"),
            _ = int.recv() => tracing::info!("SIGINT: stopping the agent, VMs keep running"),
        }
    };
    let systemd = Systemd::connect(config.systemd_bus).await?;
    tracing::info!(
        bus = config.systemd_bus.as_str(),
        "connected to the {} bus of systemd",
        config.systemd_bus.as_str()
    );
    run_with(config, systemd, shutdown).await
}

/// Runs the agent against `systemd` until `shutdown` completes.
pub async fn run_with<S, F>(config: Config, systemd: S, shutdown: F) -> Result<(), AgentError>
where
    S: SystemdClient + 'static,
    F: Future<Output = ()>,
{
    let host = config.host_id.clone();
    if let Some(w) = config.deprecation_warning() {
        tracing::warn!(host = %host, "{w}");
    }
    // Subscribe before anything is started, so that no end goes unseen.
    let events = systemd.watch().await?;
    let units = systemd.list_vm_units().await?;
    let mut tracker = UnitTracker::new();
    for u in &units {
        let pid = match systemd.unit_status(&unit_name(&u.vm)).await {
            Ok(Some(s)) => s.main_pid,
            _ => 0,
        };
        if u.active.is_up() {
            tracker.adopt(&u.vm, u.generation.unwrap_or(0));
        }
        tracing::info!(vm = %u.vm, host = %host, state = ?u.active, generation = ?u.generation, main_pid = pid, "adopting VM {} on {host} (unit {:?}, generation {:?}, main PID {pid})", u.vm, u.active, u.generation);
    }

    // The lease a previous run left, if any.
    let lease_path = lease_file::path_in(&config.runtime_dir);
    let previous = match lease_file::read(&lease_path) {
        Ok(l) => l,
        Err(e) => {
            // Unreadable: as if it ran out (the switch keeps its last good reading).
            tracing::warn!(host = %host, error = %crate::error_chain(&e), "host {host}: cannot read the lease file ({}); starting fenced", crate::error_chain(&e));
            Some(LeaseFile {
                expires_boottime_ms: 0,
                grace_ms: config.fence_grace_ms,
                stay: BTreeSet::new(),
                boot_id: lease_file::boot_id(),
            })
        }
    };
    let now = boottime_ms();
    let lease = Lease::resume(
        config.lease_ms(),
        previous.as_ref().map(|l| l.expires_boottime_ms),
        now,
    );
    match lease.state() {
        LeaseState::Never => {
            tracing::info!(host = %host, "host {host}: no lease held this boot; waiting for a confirmed heartbeat")
        }
        LeaseState::Held { until } => tracing::info!(
            host = %host,
            remaining_ms = until.saturating_sub(now),
            "host {host}: the previous run's lease still holds for {} ms; adopting its VMs", until.saturating_sub(now)
        ),
        LeaseState::Fenced { since } => tracing::warn!(
            host = %host,
            expired_ms_ago = now.saturating_sub(since),
            "host {host}: the previous run's lease ran out {} ms ago; starting fenced: stopping every move VM", now.saturating_sub(since)
        ),
    }
    let stay = previous.map(|l| l.stay).unwrap_or_default();
    start_fence_unit(&systemd, &config, &lease_path).await?;
    let started = Started::load(&config.data_dir)?;

    let probe = capacity::probe(&config)?;
    tracing::info!(
        host = %host,
        vcpus = probe.capacity.vcpus,
        memory_mib = probe.capacity.memory_mib,
        disk_gib = probe.capacity.disk_gib,
        kvm = probe.capacity.kvm,
        kvm_note = %probe.kvm_note,
        "host {host}: {} vCPUs, {} MiB memory, {} GiB disk, KVM {} ({})",
        probe.capacity.vcpus,
        probe.capacity.memory_mib,
        probe.capacity.disk_gib,
        if probe.capacity.kvm { "yes" } else { "no" },
        probe.kvm_note
    );
    for (hv, status) in
        CommandBuilders::availability(&config, probe.capacity.kvm, &crate::command::is_executable)
    {
        tracing::info!(hypervisor = hv.as_str(), status = %status, "hypervisor {}: {status}", hv.as_str());
    }
    let builders = CommandBuilders::from_config(&config, probe.capacity.kvm);
    let token = match &config.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|source| AgentError::Token {
                    path: p.display().to_string(),
                    source,
                })?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    // The agent API is bound before registering, so the registration carries its real port.
    let api = match &config.api_listen {
        Some(addr) => {
            let tls = config
                .api_tls_cert_file
                .as_deref()
                .zip(config.api_tls_key_file.as_deref());
            let bound = agent_api::bind(addr, tls).await?;
            tracing::info!(url = %bound.url, "agent API listening on {}", bound.url);
            let url = bound.url.clone();
            let task = tokio::spawn(agent_api::serve(
                bound,
                agent_api::ApiState::new(
                    token.clone(),
                    &config.journalctl,
                    match config.systemd_bus {
                        SystemdBus::System => Manager::System,
                        SystemdBus::Session => Manager::User,
                    },
                ),
            ));
            Some((url, task))
        }
        None => None,
    };
    let registration = HostRegistration {
        id: host.clone(),
        address: config.advertise_address.clone(),
        capacity: probe.capacity,
        labels: config.labels.clone(),
        hypervisors: builders.hypervisors(),
        agent_url: api.as_ref().map(|(url, _)| url.clone()),
        fence: None,
    };
    let client = Arc::new(
        Client::with_ca(&config.control_endpoints, config.ca_file.as_deref())
            .map_err(AgentError::Client)?
            .with_bearer(token),
    );

    let (link_tx, link_rx) = mpsc::channel(64);
    let reregister = Arc::new(Notify::new());
    let refetch = Arc::new(Notify::new());
    let link = tokio::spawn(control_link(
        client.clone(),
        registration,
        link_tx.clone(),
        reregister.clone(),
        refetch.clone(),
    ));
    let fence_reason = format!(
        "fenced: no leader-confirmed heartbeat for {} ms",
        config.lease_ms()
    );
    let mut agent = Agent {
        host,
        config,
        systemd,
        builders,
        client,
        assignments: None,
        host_record: None,
        link_ok: false,
        link_error: None,
        lease,
        watch: Watch::new(),
        stay,
        lease_path,
        published: None,
        fence_reason,
        refetch,
        deferred_starts: false,
        started,
        reported: BTreeMap::new(),
        tracker,
        unexplained: BTreeMap::new(),
        observed_running: units.iter().filter(|u| u.active.is_up()).count(),
        heartbeat: None,
    };
    agent.publish();
    notify::status(&agent.status_line());
    let result = agent
        .main_loop(events, link_rx, link_tx, reregister, shutdown)
        .await;
    link.abort();
    if let Some((_, task)) = api {
        task.abort();
    }
    if let Some(h) = agent.heartbeat.take() {
        h.abort();
    }
    result
}

/// The dead man's switch: `blixard-fence.service` on the manager the agent drives, running
/// this executable's `fence-watch` on the lease file. Left alone if it exists already.
async fn start_fence_unit<S: SystemdClient>(
    systemd: &S,
    config: &Config,
    lease_path: &std::path::Path,
) -> Result<(), AgentError> {
    let exe = std::env::current_exe().map_err(AgentError::OwnExe)?;
    // After an upgrade replaced the binary, /proc/self/exe names the old, deleted file.
    let exe = exe.display().to_string();
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe).to_string();
    let argv = vec![
        exe,
        "fence-watch".to_string(),
        "--lease-file".to_string(),
        lease_path.display().to_string(),
        "--systemd-bus".to_string(),
        config.systemd_bus.as_str().to_string(),
    ];
    // The bus of a user manager is found through these; the system bus needs none.
    let environment: Vec<String> = ["DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "RUST_LOG"]
        .iter()
        .filter(|_| config.systemd_bus == SystemdBus::Session)
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .filter(|kv| !kv.contains('\n'))
        .collect();
    let spec = unit_spec::fence_unit(argv, environment);
    match systemd.start_transient_unit(&spec).await {
        Ok(StartOutcome::Started { job }) => {
            tracing::info!(unit = unit_spec::FENCE_UNIT, job = %job, "started the dead man's switch {} (job {job})", unit_spec::FENCE_UNIT);
            Ok(())
        }
        Ok(StartOutcome::AlreadyExists) => {
            tracing::info!(
                unit = unit_spec::FENCE_UNIT,
                "the dead man's switch runs already"
            );
            Ok(())
        }
        Err(source) => Err(AgentError::FenceUnit {
            unit: unit_spec::FENCE_UNIT,
            source,
        }),
    }
}

/// What the control link and the heartbeat loop tell the main loop.
#[derive(Debug)]
enum LinkEvent {
    Registered(Host),
    /// An assignments answer, with when its request was sent (`CLOCK_BOOTTIME` ms).
    Assignments {
        assignments: Assignments,
        sent_at: u64,
    },
    /// A heartbeat answered 200 (leader-confirmed), with when it was sent.
    HeartbeatConfirmed {
        sent_at: u64,
    },
    Unreachable(String),
}

/// Exponential backoff between 100 ms and 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

/// Registers the host, then long-polls its assignments; registers again when the cluster
/// no longer knows the host. `refetch` makes it drop the long-poll and fetch at once (the
/// last step out of a fence).
async fn control_link(
    client: Arc<Client>,
    registration: HostRegistration,
    tx: mpsc::Sender<LinkEvent>,
    reregister: Arc<Notify>,
    refetch: Arc<Notify>,
) {
    let host = registration.id.clone();
    let mut backoff = Backoff::new();
    loop {
        let record = loop {
            match client.register_host(&registration).await {
                Ok(h) => break h,
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "cannot register host {host}: {e}; retrying");
                    if tx
                        .send(LinkEvent::Unreachable(e.to_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        };
        backoff.reset();
        tracing::info!(host = %host, epoch = record.epoch, "registered host {host} with the control plane (epoch {})", record.epoch);
        if tx.send(LinkEvent::Registered(record)).await.is_err() {
            return;
        }
        let mut index: Option<u64> = None;
        let mut fresh = false;
        loop {
            let started = Instant::now();
            let sent_at = boottime_ms();
            let wait_index = if std::mem::take(&mut fresh) {
                None
            } else {
                index
            };
            let res = tokio::select! {
                r = client.assignments(&host, wait_index, LONG_POLL) => r,
                _ = reregister.notified() => break,
                _ = refetch.notified() => {
                    fresh = true;
                    continue;
                }
            };
            match res {
                Ok(a) => {
                    backoff.reset();
                    let unchanged = index.is_some_and(|i| a.index <= i);
                    // Never wait on a lower index than one seen (a lagging node's answer).
                    index = Some(index.map_or(a.index, |i| i.max(a.index)));
                    let event = LinkEvent::Assignments {
                        assignments: a,
                        sent_at,
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                    // A server that answers a long-poll at once with nothing new must not
                    // make this a busy loop.
                    if wait_index.is_some()
                        && unchanged
                        && started.elapsed() < Duration::from_millis(100)
                    {
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
                Err(e) if e.is_not_found() => {
                    tracing::warn!(host = %host, "the control plane does not know host {host}");
                    break;
                }
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "cannot fetch the assignments of host {host}: {e}; retrying");
                    if tx
                        .send(LinkEvent::Unreachable(e.to_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }
}

/// Heartbeats every `interval`. A heartbeat that takes longer than the lease renews nothing,
/// so it is given up then and the next one is sent.
async fn heartbeat_loop(
    client: Arc<Client>,
    host: String,
    interval: Duration,
    lease: Duration,
    tx: mpsc::Sender<LinkEvent>,
    reregister: Arc<Notify>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let sent_at = boottime_ms();
        let event = match tokio::time::timeout(lease, client.heartbeat(&host)).await {
            Ok(Ok(_)) => LinkEvent::HeartbeatConfirmed { sent_at },
            Ok(Err(e)) if e.is_not_found() => {
                reregister.notify_one();
                LinkEvent::Unreachable("the control plane does not know this host".into())
            }
            Ok(Err(e)) => {
                tracing::debug!(host = %host, error = %e, "heartbeat failed");
                LinkEvent::Unreachable(e.to_string())
            }
            Err(_) => {
                tracing::debug!(host = %host, "heartbeat timed out");
                LinkEvent::Unreachable("heartbeat timed out".into())
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

struct Agent<S> {
    host: String,
    config: Config,
    systemd: S,
    builders: CommandBuilders,
    client: Arc<Client>,
    /// The last assignments received; `None` until the first arrive (nothing is done before).
    assignments: Option<Assignments>,
    host_record: Option<Host>,
    link_ok: bool,
    link_error: Option<String>,
    /// The host's lease and whether it is fenced.
    lease: Lease,
    /// The agent's own fence: which move VMs it signalled.
    watch: Watch,
    /// VMs never fenced (`on_host_loss = stay`), from the assignments (or the lease file
    /// until they arrive).
    stay: BTreeSet<String>,
    lease_path: PathBuf,
    /// What the lease file last said.
    published: Option<LeaseFile>,
    fence_reason: String,
    /// Tells the control link to fetch assignments now.
    refetch: Arc<Notify>,
    /// A start waits for the lease to be held.
    deferred_starts: bool,
    /// Generations started by this agent, across runs.
    started: Started,
    /// Reports the control plane accepted.
    reported: BTreeMap<String, VmStatusReport>,
    /// How units ended.
    tracker: UnitTracker,
    /// QEMU VMs whose end has not been explained from the console yet, with when this agent
    /// started them, if it did.
    unexplained: BTreeMap<String, Option<std::time::SystemTime>>,
    observed_running: usize,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

/// A tokio instant `at` (ms on `CLOCK_BOOTTIME`), from `now`.
fn instant_at(at: u64, now: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now))
}

impl<S: SystemdClient> Agent<S> {
    async fn main_loop<F: Future<Output = ()>>(
        &mut self,
        mut events: UnitEvents,
        mut link: mpsc::Receiver<LinkEvent>,
        link_tx: mpsc::Sender<LinkEvent>,
        reregister: Arc<Notify>,
        shutdown: F,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watchdog_period = notify::watchdog_period();
        let mut watchdog =
            tokio::time::interval(watchdog_period.unwrap_or(Duration::from_secs(3600)));
        let mut ready = false;
        // When set, a pass is due at that instant (a retry after a failed report).
        let mut retry_at: Option<tokio::time::Instant> = None;
        // Starting fenced: the move VMs are stopped at once, assignments or not.
        if self.lease.is_fenced() {
            self.pass().await;
        }
        let mut last_status = self.status_line();
        loop {
            let mut pass = false;
            let now = boottime_ms();
            // The lease's end, and while fenced the next SIGKILL.
            let deadline = [
                self.lease.next_deadline(),
                self.lease
                    .is_fenced()
                    .then(|| self.watch.next_deadline(self.config.fence_grace_ms))
                    .flatten(),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|at| instant_at(at, now));
            tokio::select! {
                _ = &mut shutdown => {
                    notify::stopping();
                    return Ok(());
                }
                ev = events.next() => {
                    let Some(ev) = ev else { return Err(AgentError::SignalsLost) };
                    self.on_unit_event(ev);
                    while let Some(ev) = events.try_next() {
                        self.on_unit_event(ev);
                    }
                    pass = true;
                }
                ev = link.recv() => {
                    // The link's sender lives as long as this loop (link_tx), so None is
                    // impossible; treat it as nothing new.
                    let Some(ev) = ev else { continue };
                    pass = self.on_link_event(ev, &link_tx, &reregister);
                    while let Ok(ev) = link.try_recv() {
                        pass |= self.on_link_event(ev, &link_tx, &reregister);
                    }
                    if !ready && self.host_record.is_some() {
                        ready = true;
                        notify::ready(&self.status_line());
                    }
                }
                _ = resync.tick() => pass = true,
                _ = watchdog.tick(), if watchdog_period.is_some() => notify::watchdog(),
                _ = sleep_until(retry_at), if retry_at.is_some() => {
                    retry_at = None;
                    pass = true;
                }
                _ = sleep_until(deadline), if deadline.is_some() => pass = true,
            }
            pass |= self.tick();
            if pass {
                let again = self.pass().await;
                if again && retry_at.is_none() {
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                }
            }
            let status = self.status_line();
            if status != last_status {
                notify::status(&status);
                last_status = status;
            }
        }
    }

    /// Fences once the lease has run out; `true` if it just did.
    fn tick(&mut self) -> bool {
        let change = self.lease.tick(boottime_ms());
        self.on_change(change)
    }

    /// Logs and acts on a change of the lease; `true` when a pass is due.
    fn on_change(&mut self, change: Option<Change>) -> bool {
        match change {
            None => false,
            Some(Change::Fenced { since }) => {
                tracing::warn!(
                    host = %self.host,
                    lease_ms = self.lease.lease_ms(),
                    late_ms = boottime_ms().saturating_sub(since),
                    stay = ?self.stay,
                    "no leader-confirmed heartbeat for the lease; fencing: stopping every move VM on this host"
                );
                self.publish();
                true
            }
            Some(Change::FetchAssignments) => {
                tracing::info!(host = %self.host, "host {}: heartbeat confirmed while fenced; fetching assignments", self.host);
                self.refetch.notify_one();
                false
            }
            Some(Change::Unfenced { since, until }) => {
                let now = boottime_ms();
                tracing::warn!(
                    host = %self.host,
                    fenced_ms = now.saturating_sub(since),
                    lease_ms_left = until.saturating_sub(now),
                    "leader-confirmed heartbeat and fresh assignments; ending the fence"
                );
                self.publish();
                true
            }
        }
    }

    /// Writes the lease file if what it should say changed.
    fn publish(&mut self) {
        let Some(expiry) = self.lease.expiry() else {
            return;
        };
        let file = LeaseFile {
            expires_boottime_ms: expiry,
            grace_ms: self.config.fence_grace_ms,
            stay: self.stay.clone(),
            boot_id: self
                .published
                .as_ref()
                .map(|p| p.boot_id.clone())
                .unwrap_or_else(lease_file::boot_id),
        };
        if self.published.as_ref() == Some(&file) {
            return;
        }
        match lease_file::write(&self.lease_path, &file) {
            Ok(()) => self.published = Some(file),
            // The switch then fences at the last expiry it read: early, never late.
            Err(e) => {
                tracing::warn!(host = %self.host, error = %crate::error_chain(&e), "host {}: cannot write the lease file: {}", self.host, crate::error_chain(&e))
            }
        }
    }

    fn on_link_event(
        &mut self,
        ev: LinkEvent,
        link_tx: &mpsc::Sender<LinkEvent>,
        reregister: &Arc<Notify>,
    ) -> bool {
        match ev {
            LinkEvent::Registered(h) => {
                self.link_ok = true;
                self.link_error = None;
                // A new session of the agent on the control plane: report everything again.
                self.reported.clear();
                self.host_record = Some(h);
                if self.heartbeat.is_none() {
                    self.heartbeat = Some(tokio::spawn(heartbeat_loop(
                        self.client.clone(),
                        self.host.clone(),
                        self.config.heartbeat_interval(),
                        Duration::from_millis(self.config.lease_ms()),
                        link_tx.clone(),
                        reregister.clone(),
                    )));
                }
                false
            }
            LinkEvent::Assignments {
                assignments: a,
                sent_at,
            } => {
                let now = boottime_ms();
                let change = match self.lease.assignments(a.index, sent_at, now) {
                    Verdict::Regressed { seen } => {
                        tracing::warn!(host = %self.host, index = a.index, seen, "host {}: ignoring assignments at index {} older than index {seen} already seen", self.host, a.index);
                        return false;
                    }
                    Verdict::Accept { change } => change,
                };
                self.link_ok = true;
                self.link_error = None;
                let changed = self.assignments.as_ref().is_none_or(|old| old != &a);
                if changed {
                    tracing::debug!(host = %self.host, index = a.index, vms = a.vms.len(), "assignments");
                    self.stay = a
                        .vms
                        .iter()
                        .filter(|x| x.spec.on_host_loss() == OnHostLoss::Stay)
                        .map(|x| x.spec.name.clone())
                        .collect();
                }
                self.assignments = Some(a);
                self.publish();
                self.on_change(change) | changed
            }
            LinkEvent::HeartbeatConfirmed { sent_at } => {
                let was = (self.link_ok, self.lease.state());
                let change = self.lease.heartbeat_confirmed(sent_at, boottime_ms());
                self.link_ok = true;
                self.link_error = None;
                self.publish();
                let first = matches!(was.1, LeaseState::Never) && !self.lease.is_fenced();
                // Back from an outage: deliver what could not be reported; a held lease lets
                // the deferred starts go.
                self.on_change(change) | !was.0 | (first && self.deferred_starts)
            }
            LinkEvent::Unreachable(e) => {
                if self.link_ok {
                    tracing::warn!(host = %self.host, error = %e, "host {}: control plane unreachable ({e}); VMs keep running until the lease runs out", self.host);
                }
                self.link_ok = false;
                self.link_error = Some(e);
                false
            }
        }
    }

    fn on_unit_event(&mut self, ev: UnitEvent) {
        let (unit, signal) = match ev {
            UnitEvent::Changed { unit, change } => (
                unit,
                Signal::Changed {
                    active_state: change.active_state,
                    result: change.result,
                    exec_main_code: change.exec_main_code,
                    exec_main_status: change.exec_main_status,
                },
            ),
            UnitEvent::JobRemoved { unit, job, result } => {
                if result == "done" {
                    return;
                }
                tracing::debug!(unit = %unit, job = %job, result = %result, "job did not complete");
                (unit, Signal::JobFailed { result })
            }
            UnitEvent::Removed { unit } => (unit, Signal::Removed),
        };
        if let Some(vm) = vm_name_of_unit(&unit) {
            self.tracker.signal(vm, signal);
        }
    }

    fn hypervisor_of(&self, vm: &str) -> Option<Hypervisor> {
        self.assignments
            .as_ref()
            .and_then(|a| a.vms.iter().find(|x| x.spec.name == vm))
            .map(|a| a.spec.hypervisor)
    }

    /// Whether `vm` is assigned here as a task.
    fn is_task(&self, vm: &str) -> bool {
        self.assignments
            .as_ref()
            .and_then(|a| a.vms.iter().find(|x| x.spec.name == vm))
            .is_some_and(|a| a.spec.is_task())
    }

    /// Refines the reason of QEMU VMs that just ended with what their console says (guest
    /// power-off, kernel panic, QEMU's own error), and describes the end of tasks
    /// ([`task_end::classify`], with their last console lines). The unit's last lines may
    /// reach the journal a little after its end, so a QEMU run without a telling line is read
    /// again a few times.
    async fn explain_ends(&mut self) {
        for (vm, since) in std::mem::take(&mut self.unexplained) {
            let Some(end) = self.tracker.ended().get(&vm).cloned() else {
                continue;
            };
            let hv = self.hypervisor_of(&vm).unwrap_or_default();
            let task = self.is_task(&vm);
            let unit = unit_name(&vm);
            let mut console = None;
            let mut lines = Vec::new();
            let tries = if hv == Hypervisor::Qemu {
                JOURNAL_TRIES
            } else {
                1
            };
            for attempt in 0..tries {
                if attempt > 0 {
                    tokio::time::sleep(JOURNAL_RETRY).await;
                }
                match last_run_log::unit_last_run(&self.config.journalctl, &unit, since).await {
                    Ok(l) => {
                        lines = l;
                        console = guest_end::classify(&lines);
                        if console.is_some() || task_end::guest_exit_status(&lines).is_some() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm, error = %crate::error_chain(&e), "cannot read the journal of VM {vm}: {}", crate::error_chain(&e));
                        break;
                    }
                }
            }
            let (state, reason) = if hv == Hypervisor::Qemu {
                guest_end::explain(end.state, &end.reason, console.as_ref())
            } else {
                (end.state, end.reason.clone())
            };
            let task_end = task.then(|| task_end::classify(hv, &end, &lines, &self.fence_reason));
            tracing::info!(vm = %vm, host = %self.host, state = state.as_str(), reason = %reason, task_end = ?task_end.as_ref().map(|t| (t.reason, t.exit_status)), "VM {vm} on {} ended {}: {reason}", self.host, state.as_str());
            self.tracker.record(
                &vm,
                Ended {
                    state,
                    reason,
                    task_end,
                    ..end
                },
            );
        }
    }

    /// The agent's own fence: SIGTERM to every running move VM, SIGKILL after the grace.
    async fn fence_step(&mut self, up: &[String], now: u64) {
        let fence = Fence {
            expires: self.lease.expiry().unwrap_or(0),
            grace_ms: self.config.fence_grace_ms,
            stay: &self.stay,
        };
        for k in self.watch.decide(now, Some(fence), up) {
            let (vm, signal, name) = match &k {
                Kill::Term(vm) => (vm, fence_watch::SIGTERM, "SIGTERM"),
                Kill::Kill(vm) => (vm, fence_watch::SIGKILL, "SIGKILL"),
            };
            self.tracker.fence_killed(vm);
            match self.systemd.kill_unit(&unit_name(vm), signal).await {
                Ok(true) => {
                    tracing::warn!(vm = %vm, host = %self.host, signal = name, "fencing VM {vm} on {}: {name}", self.host)
                }
                Ok(false) => tracing::debug!(vm = %vm, host = %self.host, "fenced VM already gone"),
                Err(e) => {
                    tracing::warn!(vm = %vm, host = %self.host, error = %crate::error_chain(&e), "cannot fence VM {vm} on {}: {}", self.host, crate::error_chain(&e))
                }
            }
        }
    }

    /// One reconcile pass; `true` when something should be retried soon.
    async fn pass(&mut self) -> bool {
        let observed = match self.systemd.list_vm_units().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(host = %self.host, error = %crate::error_chain(&e), "host {}: cannot list VM units: {}", self.host, crate::error_chain(&e));
                return true;
            }
        };
        let now = boottime_ms();
        self.observed_running = observed.iter().filter(|u| u.active.is_up()).count();
        let generations: BTreeMap<String, u64> = self
            .assignments
            .iter()
            .flat_map(|a| a.vms.iter())
            .map(|a| (a.spec.name.clone(), a.generation))
            .collect();
        let fenced = self.lease.is_fenced();
        let outcome = self.tracker.record_ends(
            &observed,
            &Context {
                generations: &generations,
                fenced,
                stay: &self.stay,
                fence_reason: &self.fence_reason,
            },
            now,
        );
        for note in &outcome.ends {
            let vm = &note.vm;
            let end = self.tracker.ended().get(vm);
            let reason = end.map(|e| e.reason.as_str()).unwrap_or("");
            match note.kind {
                EndKind::Stopped => {
                    tracing::info!(vm = %vm, host = %self.host, "VM {vm} stopped on {}", self.host)
                }
                EndKind::Fenced => {
                    tracing::warn!(vm = %vm, host = %self.host, reason = %reason, "VM {vm} fenced on {}: {reason}", self.host);
                    if self.is_task(vm) {
                        self.unexplained.insert(vm.clone(), note.started_at);
                    }
                }
                EndKind::Duplicate => {
                    tracing::debug!(vm = %vm, host = %self.host, "late signals of a recorded end")
                }
                EndKind::Exited | EndKind::Unseen => {
                    if note.kind == EndKind::Unseen {
                        tracing::warn!(vm = %vm, host = %self.host, "the unit of VM {vm} on {} ended without signals", self.host);
                    }
                    if end.is_some_and(|e| e.state == VmState::Failed) {
                        tracing::warn!(vm = %vm, host = %self.host, reason = %reason, "VM {vm} failed on {}: {reason}", self.host);
                    } else {
                        tracing::info!(vm = %vm, host = %self.host, reason = %reason, "VM {vm} exited on {}: {reason}", self.host);
                    }
                    if self.hypervisor_of(vm) == Some(Hypervisor::Qemu) || self.is_task(vm) {
                        self.unexplained.insert(vm.clone(), note.started_at);
                    }
                }
            }
        }
        self.explain_ends().await;
        let up: Vec<String> = observed
            .iter()
            .filter(|u| u.active.is_up())
            .map(|u| u.vm.clone())
            .collect();
        if fenced {
            // Nothing starts, nothing is reported: the ends go out once the fence is over.
            self.fence_step(&up, now).await;
            return !outcome.ending.is_empty();
        }
        // Held (or never held): re-arm the fence.
        self.watch.decide(now, None, &up);
        let Some(assignments) = self.assignments.clone() else {
            // The desired state is unknown: touch nothing.
            return false;
        };
        let assigned: BTreeSet<&str> = assignments
            .vms
            .iter()
            .map(|a| a.spec.name.as_str())
            .collect();
        for vm in
            self.tracker
                .ended_while_down(&assignments.vms, &observed, self.started.generations())
        {
            tracing::warn!(vm = %vm, host = %self.host, "the unit of VM {vm} on {} ended while the agent was not running; reporting it failed", self.host);
        }
        self.tracker.retain(&assigned, &observed);
        self.started.retain(|vm| assigned.contains(vm));
        self.reported.retain(|vm, _| assigned.contains(vm.as_str()));
        let actions = reconcile(&Input {
            desired: &assignments.vms,
            observed: &observed,
            ended: self.tracker.ended(),
            reported: &self.reported,
            ending: &outcome.ending,
        });
        // An ending unit's signals are due any moment; look again soon in any case.
        let mut retry = !outcome.ending.is_empty();
        let may_start = self.lease.may_start(now);
        self.deferred_starts = false;
        let mut deferred = BTreeSet::new();
        for action in actions {
            match &action {
                // No start without a lease that holds: a VM started now might run on after
                // the host is cut off with nothing to fence it.
                Action::Start(a) if !may_start => {
                    deferred.insert(a.spec.name.clone());
                    self.deferred_starts = true;
                    continue;
                }
                Action::Report { vm, .. } if deferred.contains(vm) => continue,
                // One undeliverable report is enough to know the link is down: the others wait
                // for the retry, so a hanging control plane cannot hold the loop (and the
                // watchdog) for one timeout per VM.
                Action::Report { .. } if retry && !self.link_ok => continue,
                _ => {}
            }
            retry |= self.execute(action).await;
        }
        if self.deferred_starts {
            tracing::debug!(host = %self.host, vms = ?deferred, "starts wait for a leader-confirmed heartbeat");
        }
        retry
    }

    /// Carries out one action; `true` when it should be retried.
    async fn execute(&mut self, action: Action) -> bool {
        match action {
            Action::Start(a) => {
                let vm = a.spec.name.clone();
                let spec = match unit_spec::build(&a.spec, &self.builders, &self.config.vm_unit) {
                    Ok(s) => unit_spec::with_generation(s, a.generation),
                    Err(e) => {
                        tracing::warn!(vm = %vm, host = %self.host, error = %e, "cannot build the unit of VM {vm} on {}: {e}", self.host);
                        let task_end = a
                            .spec
                            .is_task()
                            .then(|| task_end::could_not_start(&e.to_string()));
                        self.tracker.record(
                            &vm,
                            Ended {
                                task_end,
                                generation: a.generation,
                                state: VmState::Failed,
                                reason: e.to_string(),
                                exit: None,
                            },
                        );
                        return true;
                    }
                };
                if let Err(e) = self.started.record(&vm, a.generation) {
                    // Without the record a restarted agent could start it again on its own.
                    tracing::warn!(vm = %vm, host = %self.host, error = %crate::error_chain(&e), "cannot record the start of VM {vm} on {}: {}; not starting it", self.host, crate::error_chain(&e));
                    return true;
                }
                match self.systemd.start_transient_unit(&spec).await {
                    Ok(StartOutcome::Started { job }) => {
                        tracing::info!(vm = %vm, host = %self.host, generation = a.generation, job = %job, "starting VM {vm} on {}, generation {} (job {job})", self.host, a.generation);
                        self.tracker
                            .started(&vm, a.generation, std::time::SystemTime::now());
                        false
                    }
                    Ok(StartOutcome::AlreadyExists) => false,
                    Err(e) => {
                        let reason = match e.dbus_message() {
                            Some(m) => format!("cannot start the unit: {m}"),
                            None => format!("cannot start the unit: {e}"),
                        };
                        tracing::warn!(vm = %vm, host = %self.host, reason = %reason, "VM {vm} failed to start on {}: {reason}", self.host);
                        let task_end = a.spec.is_task().then(|| task_end::could_not_start(&reason));
                        self.tracker.record(
                            &vm,
                            Ended {
                                task_end,
                                generation: a.generation,
                                state: VmState::Failed,
                                reason,
                                exit: None,
                            },
                        );
                        true
                    }
                }
            }
            Action::Stop { vm } => self.stop(&vm).await,
            Action::Report { vm, report } => {
                match self.client.report_vm_status(&self.host, &vm, &report).await {
                    Ok(_) => {
                        tracing::debug!(vm = %vm, state = report.state.as_str(), "reported");
                        self.reported.insert(vm, report);
                        false
                    }
                    Err(e) if e.status() == Some(409) || e.is_not_found() => {
                        // The cluster gave this VM to another host, or deleted it.
                        tracing::warn!(vm = %vm, host = %self.host, error = %e, "VM {vm} is no longer assigned to {} ({e}); stopping it", self.host);
                        if let Some(a) = self.assignments.as_mut() {
                            a.vms.retain(|x| x.spec.name != vm);
                        }
                        self.stop(&vm).await;
                        false
                    }
                    Err(e) => {
                        tracing::debug!(vm = %vm, error = %e, "report failed; will retry");
                        if e.status().is_none() || e.status() == Some(503) {
                            self.link_ok = false;
                            self.link_error = Some(e.to_string());
                        }
                        true
                    }
                }
            }
        }
    }

    async fn stop(&mut self, vm: &str) -> bool {
        self.tracker.stop_requested(vm);
        match self.systemd.stop_unit(&unit_name(vm)).await {
            Ok(outcome) => {
                tracing::info!(vm = %vm, host = %self.host, outcome = ?outcome, "stopping VM {vm} on {} ({outcome:?})", self.host);
                false
            }
            Err(e) => {
                tracing::warn!(vm = %vm, host = %self.host, error = %crate::error_chain(&e), "cannot stop VM {vm} on {}: {}", self.host, crate::error_chain(&e));
                true
            }
        }
    }

    fn status_line(&self) -> String {
        let link = match (&self.host_record, self.link_ok, &self.link_error) {
            (None, _, None) => "control plane: registering".to_string(),
            (_, true, _) => "control plane: connected".to_string(),
            (_, false, Some(e)) => format!("control plane: unreachable ({e})"),
            (_, false, None) => "control plane: unreachable".to_string(),
        };
        let n = self.observed_running;
        let fenced = if self.lease.is_fenced() {
            "fenced, "
        } else {
            ""
        };
        format!(
            "{fenced}{n} VM{} running, {link}",
            if n == 1 { "" } else { "s" }
        )
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
