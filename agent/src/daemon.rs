//! The agent daemon: connects to systemd, adopts the VM units it finds, registers the host,
//! and then keeps the host's units in line with its assignments.
//!
//! Three loops run side by side:
//! - the control link registers the host (retrying with backoff while the control plane is
//!   unreachable) and long-polls its assignments;
//! - the heartbeat loop; a heartbeat answered 404 (the cluster forgot the host) makes the link
//!   register again;
//! - the main loop owns all state: on new assignments, unit signals or a periodic resync it
//!   lists the `blixard-vm-*` units, runs [`reconcile`] and carries out the actions.
//!
//! The agent acts only once it knows the desired state: until the first assignments arrive,
//! and whenever the control plane is unreachable, running VMs are left exactly as they are.
//! On SIGTERM or SIGINT it says `STOPPING=1` and exits without stopping any VM.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_api::{
    unit_name, vm_name_of_unit, Assignments, Client, ClientError, Host, HostRegistration,
    Hypervisor, VmState, VmStatusReport,
};
use tokio::sync::{mpsc, Notify};

use crate::agent_api;
use crate::capacity::{self, CapacityError};
use crate::command::CommandBuilders;
use crate::config::{Config, ConfigError, SystemdBus};
use crate::journal::Manager;
use crate::notify;
use crate::reconcile::{describe_end, reconcile, Action, ActiveState, Ended, Input, ObservedUnit};
use crate::systemd::{StartOutcome, Systemd, SystemdClient, SystemdError, UnitEvent, UnitEvents};
use crate::unit_spec;
use crate::{guest_end, last_run_log};

/// How long one assignments long-poll may wait on the server.
pub const LONG_POLL: Duration = Duration::from_secs(30);
/// A full pass even without any news, in case a signal was lost.
pub const RESYNC: Duration = Duration::from_secs(15);
/// When a report could not be delivered, the next try.
const RETRY: Duration = Duration::from_secs(1);
/// How long a unit may be listed as ended before its signals arrive; past that its end is
/// recorded without a result (a lost signal must not hold a VM back for ever).
const UNSEEN_END: Duration = Duration::from_secs(3);
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
    tracing::info!(bus = config.systemd_bus.as_str(), "connected to systemd");
    run_with(config, systemd, shutdown).await
}

/// Runs the agent against `systemd` until `shutdown` completes.
pub async fn run_with<S, F>(config: Config, systemd: S, shutdown: F) -> Result<(), AgentError>
where
    S: SystemdClient + 'static,
    F: Future<Output = ()>,
{
    let host = config.host_id.clone();
    // Subscribe before anything is started, so that no end goes unseen.
    let events = systemd.watch().await?;
    let units = systemd.list_vm_units().await?;
    for u in &units {
        let pid = match systemd.unit_status(&unit_name(&u.vm)).await {
            Ok(Some(s)) => s.main_pid,
            _ => 0,
        };
        tracing::info!(vm = %u.vm, host = %host, state = ?u.active, main_pid = pid, "adopting VM unit");
    }

    let probe = capacity::probe(&config)?;
    tracing::info!(
        host = %host,
        vcpus = probe.capacity.vcpus,
        memory_mib = probe.capacity.memory_mib,
        disk_gib = probe.capacity.disk_gib,
        kvm = probe.capacity.kvm,
        kvm_note = %probe.kvm_note,
        "host capacity"
    );
    for (hv, status) in
        CommandBuilders::availability(&config, probe.capacity.kvm, &crate::command::is_executable)
    {
        tracing::info!(hypervisor = hv.as_str(), status = %status, "hypervisor");
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
            tracing::info!(url = %bound.url, "agent API listening");
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
    let link = tokio::spawn(control_link(
        client.clone(),
        registration,
        link_tx.clone(),
        reregister.clone(),
    ));
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
        last_contact: tokio::time::Instant::now(),
        fenced: false,
        reported: BTreeMap::new(),
        ended: BTreeMap::new(),
        unexplained: BTreeMap::new(),
        tracks: BTreeMap::new(),
        observed_running: units.iter().filter(|u| u.active.is_up()).count(),
        heartbeat: None,
    };
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

/// What the control link tells the main loop.
#[derive(Debug)]
enum LinkEvent {
    Registered(Host),
    Assignments(Assignments),
    Connected,
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
/// no longer knows the host.
async fn control_link(
    client: Arc<Client>,
    registration: HostRegistration,
    tx: mpsc::Sender<LinkEvent>,
    reregister: Arc<Notify>,
) {
    let host = registration.id.clone();
    let mut backoff = Backoff::new();
    loop {
        let record = loop {
            match client.register_host(&registration).await {
                Ok(h) => break h,
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "cannot register the host; retrying");
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
        tracing::info!(host = %host, epoch = record.epoch, "registered with the control plane");
        if tx.send(LinkEvent::Registered(record)).await.is_err() {
            return;
        }
        let mut index: Option<u64> = None;
        loop {
            let started = Instant::now();
            let res = tokio::select! {
                r = client.assignments(&host, index, LONG_POLL) => r,
                _ = reregister.notified() => break,
            };
            match res {
                Ok(a) => {
                    backoff.reset();
                    let unchanged = index.is_some_and(|i| a.index <= i);
                    index = Some(a.index);
                    if tx.send(LinkEvent::Assignments(a)).await.is_err() {
                        return;
                    }
                    // A server that answers a long-poll at once with nothing new must not
                    // make this a busy loop.
                    if unchanged && started.elapsed() < Duration::from_millis(100) {
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
                Err(e) if e.is_not_found() => {
                    tracing::warn!(host = %host, "the control plane does not know this host");
                    break;
                }
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "cannot fetch assignments; retrying");
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

async fn heartbeat_loop(
    client: Arc<Client>,
    host: String,
    interval: Duration,
    tx: mpsc::Sender<LinkEvent>,
    reregister: Arc<Notify>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let event = match client.heartbeat(&host).await {
            Ok(_) => LinkEvent::Connected,
            Err(e) if e.is_not_found() => {
                reregister.notify_one();
                LinkEvent::Unreachable("the control plane does not know this host".into())
            }
            Err(e) => {
                tracing::debug!(host = %host, error = %e, "heartbeat failed");
                LinkEvent::Unreachable(e.to_string())
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// What the agent knows of one VM unit from systemd's signals.
#[derive(Debug, Default, Clone)]
struct Track {
    /// The assignment generation in force while the unit ran.
    generation: u64,
    /// The agent asked for the stop: its end is not a VM failure.
    stop_requested: bool,
    /// The unit reached `inactive` or `failed`; the end is recorded at the next pass.
    end_pending: bool,
    result: Option<String>,
    exec_main_code: Option<i32>,
    exec_main_status: Option<i32>,
    /// A start job that did not finish `done`.
    failed_job: Option<String>,
    /// The unit was started or seen running in this session.
    live: bool,
    /// Since when a live unit is listed as ended or gone while its signals are not read yet.
    missing_since: Option<Instant>,
    /// When this agent started the unit (bounds the journal read of its end).
    started_at: Option<std::time::SystemTime>,
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
    /// When the control plane last answered (or this agent started).
    last_contact: tokio::time::Instant,
    /// Self-fenced (`fence_after_ms`): no answer for too long, so every VM is stopped until
    /// the control plane answers again.
    fenced: bool,
    /// Reports the control plane accepted.
    reported: BTreeMap<String, VmStatusReport>,
    /// Units that ended on their own.
    ended: BTreeMap<String, Ended>,
    /// QEMU VMs in `ended` whose console has not been read for the reason yet, with when
    /// this agent started them, if it did.
    unexplained: BTreeMap<String, Option<std::time::SystemTime>>,
    tracks: BTreeMap<String, Track>,
    observed_running: usize,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
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
        let mut last_status = self.status_line();
        loop {
            let mut pass = false;
            let fence_at = match (self.config.fence_after(), self.fenced) {
                (Some(after), false) => Some(self.last_contact + after),
                _ => None,
            };
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
                _ = sleep_until(fence_at), if fence_at.is_some() => {
                    tracing::warn!(
                        host = %self.host,
                        silent_ms = self.last_contact.elapsed().as_millis() as u64,
                        "no answer from the control plane for fence_after_ms; fencing: stopping every VM on this host"
                    );
                    self.fenced = true;
                    pass = true;
                }
            }
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

    fn on_link_event(
        &mut self,
        ev: LinkEvent,
        link_tx: &mpsc::Sender<LinkEvent>,
        reregister: &Arc<Notify>,
    ) -> bool {
        if !matches!(ev, LinkEvent::Unreachable(_)) {
            self.last_contact = tokio::time::Instant::now();
            if self.fenced {
                tracing::warn!(host = %self.host, "the control plane answers again; ending the fence");
                self.fenced = false;
            }
        }
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
                        link_tx.clone(),
                        reregister.clone(),
                    )));
                }
                false
            }
            LinkEvent::Assignments(a) => {
                self.link_ok = true;
                self.link_error = None;
                let changed = self.assignments.as_ref().is_none_or(|old| old != &a);
                if changed {
                    tracing::debug!(host = %self.host, index = a.index, vms = a.vms.len(), "assignments");
                }
                self.assignments = Some(a);
                changed
            }
            LinkEvent::Connected => {
                let was = self.link_ok;
                self.link_ok = true;
                self.link_error = None;
                // Back from an outage: deliver what could not be reported.
                !was
            }
            LinkEvent::Unreachable(e) => {
                if self.link_ok {
                    tracing::warn!(host = %self.host, error = %e, "control plane unreachable; VMs keep running");
                }
                self.link_ok = false;
                self.link_error = Some(e);
                false
            }
        }
    }

    fn on_unit_event(&mut self, ev: UnitEvent) {
        match ev {
            UnitEvent::Changed { unit, change } => {
                let Some(vm) = vm_name_of_unit(&unit) else {
                    return;
                };
                let t = self.tracks.entry(vm.to_string()).or_default();
                if let Some(r) = change.result {
                    t.result = Some(r);
                }
                if let Some(c) = change.exec_main_code {
                    t.exec_main_code = Some(c);
                }
                if let Some(s) = change.exec_main_status {
                    t.exec_main_status = Some(s);
                }
                match change.active_state.as_deref() {
                    Some("inactive" | "failed") => t.end_pending = true,
                    Some("active" | "activating") => t.end_pending = false,
                    _ => {}
                }
            }
            UnitEvent::JobRemoved { unit, job, result } => {
                let Some(vm) = vm_name_of_unit(&unit) else {
                    return;
                };
                if result != "done" {
                    tracing::debug!(vm = %vm, job = %job, result = %result, "job did not complete");
                    let t = self.tracks.entry(vm.to_string()).or_default();
                    if !t.stop_requested {
                        t.failed_job = Some(result);
                        t.end_pending = true;
                    }
                }
            }
            UnitEvent::Removed { unit } => {
                if let Some(vm) = vm_name_of_unit(&unit) {
                    if let Some(t) = self.tracks.get_mut(vm) {
                        t.end_pending = t.end_pending || !t.stop_requested;
                    }
                }
            }
        }
    }

    fn generation_of(&self, vm: &str) -> u64 {
        self.assignments
            .as_ref()
            .and_then(|a| a.vms.iter().find(|x| x.spec.name == vm))
            .map(|a| a.generation)
            .unwrap_or(0)
    }

    /// Turns the ends seen in signals into [`Ended`] records.
    /// Returns the VMs whose unit is ending (see [`Input::ending`]).
    fn record_ends(&mut self, observed: &[ObservedUnit]) -> BTreeSet<String> {
        let up: BTreeSet<&str> = observed
            .iter()
            .filter(|u| u.active.is_up())
            .map(|u| u.vm.as_str())
            .collect();
        // Stopping: its ExecStop (a QEMU guest's graceful power-off) may take a while; the end
        // comes with signals once it is done, so no "unseen end" clock runs meanwhile.
        let stopping: BTreeSet<&str> = observed
            .iter()
            .filter(|u| u.active == ActiveState::Deactivating)
            .map(|u| u.vm.as_str())
            .collect();
        let mut ending = BTreeSet::new();
        let vms: Vec<String> = self.tracks.keys().cloned().collect();
        for vm in vms {
            let generation = self.generation_of(&vm);
            let Some(t) = self.tracks.get_mut(&vm) else {
                continue;
            };
            if up.contains(vm.as_str()) {
                // Running (again): remember which generation it serves.
                t.generation = t.generation.max(generation);
                t.live = true;
                t.missing_since = None;
                continue;
            }
            if !t.end_pending && stopping.contains(vm.as_str()) {
                t.missing_since = None;
                if !t.stop_requested {
                    ending.insert(vm);
                }
                continue;
            }
            if !t.end_pending {
                if t.live && !t.stop_requested {
                    // Ended in systemd's eyes, but its signals are not here yet.
                    let since = *t.missing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < UNSEEN_END {
                        ending.insert(vm);
                        continue;
                    }
                    tracing::warn!(vm = %vm, host = %self.host, "unit ended without signals");
                    t.end_pending = true;
                } else {
                    continue;
                }
            }
            let t = self.tracks.remove(&vm).unwrap_or_default();
            // While fenced every end is the fence's own stop, even one whose signals come after
            // its track was closed (they open a fresh track without `stop_requested`): it must
            // not be reported as the VM's exit, or the VM would not start again after the fence.
            if t.stop_requested || self.fenced {
                tracing::info!(vm = %vm, host = %self.host, fenced = self.fenced, "VM stopped");
                continue;
            }
            let (state, reason) = match (&t.result, &t.failed_job) {
                (Some(result), _) => describe_end(
                    result,
                    t.exec_main_code.unwrap_or(0),
                    t.exec_main_status.unwrap_or(0),
                ),
                (None, Some(job)) => (VmState::Failed, format!("start job {job}")),
                (None, None) => (
                    VmState::Failed,
                    "the unit ended without a recorded result".to_string(),
                ),
            };
            // A failed start job says less than the service's own result.
            let (state, reason) = match (&t.failed_job, state) {
                (Some(job), VmState::Stopped) => (VmState::Failed, format!("start job {job}")),
                _ => (state, reason),
            };
            if state == VmState::Failed {
                tracing::warn!(vm = %vm, host = %self.host, reason = %reason, "VM failed");
            } else {
                tracing::info!(vm = %vm, host = %self.host, reason = %reason, "VM exited");
            }
            if self.hypervisor_of(&vm) == Some(Hypervisor::Qemu) {
                self.unexplained.insert(vm.clone(), t.started_at);
            }
            self.ended.insert(
                vm,
                Ended {
                    generation: generation.max(t.generation),
                    state,
                    reason,
                },
            );
        }
        ending
    }

    fn hypervisor_of(&self, vm: &str) -> Option<Hypervisor> {
        self.assignments
            .as_ref()
            .and_then(|a| a.vms.iter().find(|x| x.spec.name == vm))
            .map(|a| a.spec.hypervisor)
    }

    /// Refines the reason of QEMU VMs that just ended with what their console says (guest
    /// power-off, kernel panic, QEMU's own error). The unit's last lines may reach the journal
    /// a little after its end, so a run without a telling line is read again a few times.
    async fn explain_ends(&mut self) {
        for (vm, since) in std::mem::take(&mut self.unexplained) {
            let Some(end) = self.ended.get(&vm).cloned() else {
                continue;
            };
            let unit = unit_name(&vm);
            let mut console = None;
            for attempt in 0..JOURNAL_TRIES {
                if attempt > 0 {
                    tokio::time::sleep(JOURNAL_RETRY).await;
                }
                match last_run_log::unit_last_run(&self.config.journalctl, &unit, since).await {
                    Ok(lines) => {
                        console = guest_end::classify(&lines);
                        if console.is_some() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm, error = %crate::error_chain(&e), "cannot read the VM's journal");
                        break;
                    }
                }
            }
            let (state, reason) = guest_end::explain(end.state, &end.reason, console.as_ref());
            tracing::info!(vm = %vm, host = %self.host, state = state.as_str(), reason = %reason, "VM end explained");
            self.ended.insert(
                vm,
                Ended {
                    state,
                    reason,
                    ..end
                },
            );
        }
    }

    /// One reconcile pass; `true` when something should be retried soon.
    async fn pass(&mut self) -> bool {
        let observed = match self.systemd.list_vm_units().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(host = %self.host, error = %crate::error_chain(&e), "cannot list VM units");
                return true;
            }
        };
        self.observed_running = observed.iter().filter(|u| u.active.is_up()).count();
        let ending = self.record_ends(&observed);
        self.explain_ends().await;
        let assignments = match self.assignments.clone() {
            Some(a) => a,
            // Fenced: everything is to stop, whatever was assigned.
            None if self.fenced => Assignments {
                host: self.host.clone(),
                index: 0,
                vms: Vec::new(),
            },
            // The desired state is unknown: touch nothing.
            None => return false,
        };
        // Fenced: nothing is desired here until the control plane answers again.
        let desired: &[_] = if self.fenced { &[] } else { &assignments.vms };
        let assigned: BTreeSet<&str> = assignments
            .vms
            .iter()
            .map(|a| a.spec.name.as_str())
            .collect();
        self.ended.retain(|vm, _| assigned.contains(vm.as_str()));
        // Forget units that are gone without a word (their signals were missed).
        let seen: BTreeSet<&str> = observed.iter().map(|u| u.vm.as_str()).collect();
        self.tracks.retain(|vm, t| {
            t.end_pending || seen.contains(vm.as_str()) || assigned.contains(vm.as_str())
        });
        self.reported.retain(|vm, _| assigned.contains(vm.as_str()));
        let actions = reconcile(&Input {
            desired,
            observed: &observed,
            ended: &self.ended,
            reported: &self.reported,
            ending: &ending,
        });
        // An ending unit's signals are due any moment; look again soon in any case.
        let mut retry = !ending.is_empty();
        for action in actions {
            // One undeliverable report is enough to know the link is down: the others wait
            // for the retry, so a hanging control plane cannot hold the loop (and the
            // watchdog) for one timeout per VM.
            if retry && matches!(action, Action::Report { .. }) && !self.link_ok {
                continue;
            }
            retry |= self.execute(action).await;
        }
        retry
    }

    /// Carries out one action; `true` when it should be retried.
    async fn execute(&mut self, action: Action) -> bool {
        match action {
            Action::Start(a) => {
                let vm = a.spec.name.clone();
                let spec = match unit_spec::build(&a.spec, &self.builders, &self.config.vm_unit) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(vm = %vm, host = %self.host, error = %e, "cannot build the VM unit");
                        self.ended.insert(
                            vm,
                            Ended {
                                generation: a.generation,
                                state: VmState::Failed,
                                reason: e.to_string(),
                            },
                        );
                        return true;
                    }
                };
                match self.systemd.start_transient_unit(&spec).await {
                    Ok(StartOutcome::Started { job }) => {
                        tracing::info!(vm = %vm, host = %self.host, generation = a.generation, job = %job, "starting VM");
                        self.tracks.insert(
                            vm,
                            Track {
                                generation: a.generation,
                                live: true,
                                started_at: Some(std::time::SystemTime::now()),
                                ..Track::default()
                            },
                        );
                        false
                    }
                    Ok(StartOutcome::AlreadyExists) => false,
                    Err(e) => {
                        let reason = match e.dbus_message() {
                            Some(m) => format!("cannot start the unit: {m}"),
                            None => format!("cannot start the unit: {e}"),
                        };
                        tracing::warn!(vm = %vm, host = %self.host, reason = %reason, "VM start failed");
                        self.ended.insert(
                            vm,
                            Ended {
                                generation: a.generation,
                                state: VmState::Failed,
                                reason,
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
                        // Fencing: the cluster gave this VM to another host, or deleted it.
                        tracing::warn!(vm = %vm, host = %self.host, error = %e, "VM no longer assigned here; stopping it");
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
        self.tracks
            .entry(vm.to_string())
            .or_default()
            .stop_requested = true;
        match self.systemd.stop_unit(&unit_name(vm)).await {
            Ok(outcome) => {
                tracing::info!(vm = %vm, host = %self.host, outcome = ?outcome, "stopping VM");
                false
            }
            Err(e) => {
                tracing::warn!(vm = %vm, host = %self.host, error = %crate::error_chain(&e), "cannot stop VM");
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
        let fenced = if self.fenced { "fenced, " } else { "" };
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
