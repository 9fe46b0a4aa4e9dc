//! The fault suite with hosts: "a VM runs on exactly one host" (issue 14).
//!
//! Three real control nodes (`--fault-injection`) and three simulated hosts (real
//! `systemd --user` managers, each with the real agent as a unit of the manager, as in
//! production, and its fence switch), running `process` VMs with restart
//! policy `always`, while a client creates, updates (a spec change: the VM is stopped and
//! placed again), deletes VMs and drains and undrains hosts (moves). Each round the nemesis
//! picks one fault: kill -9 a control node and restart it; kill -9 an agent and respawn it
//! later; kill a whole host (`cgroup.kill`) and bring up a replacement (the same name, as
//! after a reboot, or a new one); cut a host off from the control plane both ways or one way
//! (every agent talks to each control node through its own [`Proxy`], so a cut stops all of
//! that host's traffic, long-polls included); partition the control nodes from each other,
//! both ways or one way (`Cluster::set_isolated`). Then it heals.
//!
//! Every host's VM units are recorded from its systemd manager over D-Bus ([`UnitLog`]), with
//! systemd's own timestamps (CLOCK_REALTIME). After the last round, with every fault healed,
//! [`exactly_once`] fails the run when a VM's active intervals on two hosts ever overlapped,
//! when a VM desired running does not run on exactly one host within [`CONVERGE_BOUND`], or
//! when an acknowledged create that was never deleted is lost.
//!
//! `BLIXARD_HOSTFAULT_ROUNDS` sets the rounds (default 20, the CI run; the long run is
//! `BLIXARD_HOSTFAULT_ROUNDS=100 cargo nextest run -p blixard-tests --test hostfaults`);
//! `BLIXARD_HOSTFAULT_SEED` replays the nemesis' and the client's choices (the seed is
//! printed). `BLIXARD_KEEP_HOSTS=1` keeps the hosts' directories (journals, agent logs) and the
//! control nodes' (logs, data).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blixard_api::{Client, ClientError, DesiredState, UpdateVm, VmSpec, VmState};
use blixard_tests::cluster::{Cluster, ClusterOptions};
use blixard_tests::exactly_once::{self, Interval};
use blixard_tests::host::SimHost;
use blixard_tests::nemesis::{env_u64, leader, wait_answers, Rng};
use blixard_tests::proxy::{Mode, Proxy};
use blixard_tests::unit_log::{now_us, Record, UnitLog, Watch};
use blixard_tests::wait;

const NODES: usize = 3;
const HOSTS: usize = 3;
/// VMs the client keeps at most (created and not deleted).
const MAX_LIVE_VMS: usize = 9;
/// After the faults heal, every VM desired running runs on exactly one host within this.
const CONVERGE_BOUND: Duration = Duration::from_secs(30);

/// A `process` VM, restart policy `always`, with `value` in its cmdline (which the `process`
/// hypervisor ignores: changing it is a spec change and nothing else). From JSON, so fields
/// the API adds later need no change here.
fn vm_spec(name: &str, value: u64) -> anyhow::Result<VmSpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 64,
        "hypervisor": "process",
        "cmdline": format!("v{value}"),
        "restart_policy": "always",
        // Fences and host losses stop VMs many times in a run: never give up on one.
        "max_restarts": 1000,
    }))?)
}

/// One simulated host: its manager and agent, its proxies (one per control node, in node
/// order) and the recording of its units.
struct Host {
    sim: SimHost,
    proxies: Vec<Proxy>,
    watch: Watch,
}

impl Host {
    async fn start(name: &str, upstreams: &[SocketAddr], log: &UnitLog) -> anyhow::Result<Host> {
        let mut sim = SimHost::start(name).await?;
        // The agent runs as production runs it, a unit of the host's manager, so a kill -9
        // is of that unit's main process, and its fence switch (a unit the agent starts) is
        // the real mechanism.
        sim.agent_as_unit = true;
        // Recording starts before the agent can start anything.
        let watch = log.watch(&sim).await?;
        let mut proxies = Vec::new();
        for u in upstreams {
            proxies.push(Proxy::start(*u).await?);
        }
        let mut h = Host {
            sim,
            proxies,
            watch,
        };
        h.spawn_agent()?;
        Ok(h)
    }

    fn name(&self) -> &str {
        self.sim.name()
    }

    fn spawn_agent(&mut self) -> anyhow::Result<()> {
        let endpoints: Vec<String> = self.proxies.iter().map(Proxy::url).collect();
        self.sim.spawn_agent(&endpoints, "")
    }

    fn set_link(&self, mode: Mode) {
        for p in &self.proxies {
            p.set(mode);
        }
    }
}

/// What the nemesis did, by kind.
#[derive(Debug, Default)]
struct Tally {
    control_kills: usize,
    leader_kills: usize,
    agent_kills: usize,
    host_kills: usize,
    /// Replacements under a new name (the others came back under the same name).
    new_names: usize,
    cuts_both: usize,
    cuts_one_way: usize,
    partitions_both: usize,
    partitions_one_way: usize,
}

/// What the client was told.
#[derive(Debug, Default)]
struct Work {
    /// Creates answered with success.
    acknowledged: BTreeSet<String>,
    /// VMs a delete was sent for (whatever the answer).
    delete_sent: BTreeSet<String>,
    /// Hosts a drain was sent for.
    drained: BTreeSet<String>,
    creates: usize,
    updates: usize,
    deletes: usize,
    drains: usize,
    undrains: usize,
    /// Operations that failed or whose outcome is unknown.
    failed: usize,
}

/// What the nemesis and the client share.
struct Shared {
    stop: AtomicBool,
    /// Names of the hosts that are up now (drain targets).
    hosts: Mutex<Vec<String>>,
    /// Timestamped log of what happened, for the report of an overlap.
    events: Mutex<Vec<(u64, String)>>,
}

impl Shared {
    fn event(&self, what: String) {
        eprintln!("[{}] {what}", now_us());
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((now_us(), what));
    }
}

fn is_definite_failure(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { .. })
}

/// The client: creates, updates, deletes VMs and drains and undrains hosts, until told to
/// stop or `hard`.
async fn workload(client: Client, sh: Arc<Shared>, seed: u64, hard: Instant) -> Work {
    let mut rng = Rng::new(seed);
    let mut w = Work::default();
    let mut live: Vec<String> = Vec::new();
    let mut next = 0u64;
    let mut draining: Option<String> = None;
    while !sh.stop.load(Ordering::SeqCst) && Instant::now() < hard {
        tokio::time::sleep(rng.millis(150, 600)).await;
        let pick = rng.below(100);
        if (pick < 35 || live.len() < 3) && live.len() < MAX_LIVE_VMS {
            next += 1;
            let name = format!("vm-{next}");
            let Ok(spec) = vm_spec(&name, next) else {
                continue;
            };
            w.creates += 1;
            match client.create_vm(&spec).await {
                Ok(_) => {
                    w.acknowledged.insert(name.clone());
                }
                Err(e) if e.status() == Some(409) => {
                    w.acknowledged.insert(name.clone());
                }
                Err(_) => w.failed += 1,
            }
            // Unknown outcomes may have created it: updates and deletes may go to it.
            live.push(name);
        } else if pick < 60 && !live.is_empty() {
            let name = live[rng.below(live.len() as u64) as usize].clone();
            next += 1;
            let Ok(spec) = vm_spec(&name, next) else {
                continue;
            };
            w.updates += 1;
            let r = client
                .update_vm(&UpdateVm {
                    spec,
                    expected_generation: None,
                })
                .await;
            if r.is_err() {
                w.failed += 1;
            }
        } else if pick < 75 && live.len() > 3 {
            let name = live.remove(rng.below(live.len() as u64) as usize);
            w.delete_sent.insert(name.clone());
            w.deletes += 1;
            if client.delete_vm(&name).await.is_err() {
                w.failed += 1;
            }
        } else if let Some(h) = draining.clone() {
            w.undrains += 1;
            match client.undrain_host(&h).await {
                Ok(_) => {
                    sh.event(format!("client: undrained {h}"));
                    draining = None;
                }
                // The host is gone (replaced under a new name) or not draining.
                Err(e) if e.is_not_found() || e.status() == Some(409) => draining = None,
                Err(_) => w.failed += 1,
            }
        } else {
            let hosts = sh.hosts.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if hosts.is_empty() {
                continue;
            }
            let h = hosts[rng.below(hosts.len() as u64) as usize].clone();
            w.drains += 1;
            w.drained.insert(h.clone());
            match client.drain_host(&h, Some(10)).await {
                Ok(_) => {
                    sh.event(format!("client: draining {h}"));
                    draining = Some(h);
                }
                Err(e) if is_definite_failure(&e) => w.failed += 1,
                Err(_) => {
                    // Maybe drained: undrain it next time.
                    w.failed += 1;
                    draining = Some(h);
                }
            }
        }
    }
    w
}

/// Kills host `i` with `cgroup.kill`, ends its recording, and returns it (kept until the end
/// of the run, so its directory stays for a post-mortem).
async fn kill_host(hosts: &mut Vec<Host>, i: usize, log: &UnitLog) -> anyhow::Result<Host> {
    // A barrier: every signal the host sent so far is in the recorder's queue.
    let _ = hosts[i].watch.active_vms().await;
    let mut dead = hosts.remove(i);
    tokio::task::block_in_place(|| dead.sim.kill())?;
    let at = now_us();
    dead.watch.finish(Duration::from_secs(5)).await;
    log.host_ended(dead.name(), at);
    Ok(dead)
}

/// Every VM unit up on each live host, by host.
async fn running(hosts: &[Host]) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let mut out = BTreeMap::new();
    for h in hosts {
        let vms = h
            .watch
            .active_vms()
            .await
            .map_err(|e| format!("{}: {e:#}", h.name()))?;
        out.insert(h.name().to_string(), vms);
    }
    Ok(out)
}

fn fmt_interval(i: &Interval) -> String {
    match i.end_us {
        Some(e) => format!("{} on {} [{}, {}]", i.vm, i.host, i.start_us, e),
        None => format!("{} on {} [{}, active]", i.vm, i.host, i.start_us),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostfaults_a_vm_runs_on_exactly_one_host() -> anyhow::Result<()> {
    let rounds = env_u64("BLIXARD_HOSTFAULT_ROUNDS").unwrap_or(20) as usize;
    let seed = env_u64("BLIXARD_HOSTFAULT_SEED").unwrap_or_else(now_us);
    eprintln!(
        "host fault run: {rounds} rounds, seed {seed} (BLIXARD_HOSTFAULT_SEED={seed} replays it)"
    );
    let mut rng = Rng::new(seed);
    let mut c = Cluster::start_with(
        NODES,
        ClusterOptions {
            fault_injection: true,
            ..Default::default()
        },
    )
    .await?;
    let upstreams: Vec<SocketAddr> = c
        .nodes
        .iter()
        .map(|n| n.listen.parse())
        .collect::<Result<_, _>>()?;
    let log = UnitLog::new();
    let mut hosts = Vec::new();
    for i in 1..=HOSTS {
        hosts.push(Host::start(&format!("h{i}"), &upstreams, &log).await?);
    }
    let mut next_host = HOSTS + 1;
    let mut dead: Vec<Host> = Vec::new();
    let client = c.client();
    for h in &hosts {
        blixard_tests::vms::wait_registered(&client, h.name(), 1).await?;
    }
    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        hosts: Mutex::new(hosts.iter().map(|h| h.name().to_string()).collect()),
        events: Mutex::new(Vec::new()),
    });
    let set_hosts = |hosts: &[Host]| {
        *sh.hosts.lock().unwrap_or_else(|e| e.into_inner()) =
            hosts.iter().map(|h| h.name().to_string()).collect();
    };
    let hard = Instant::now() + Duration::from_secs(60 + 20 * rounds as u64);
    let worker = tokio::spawn(workload(c.client(), sh.clone(), rng.next_u64(), hard));

    let mut tally = Tally::default();
    let run_start = Instant::now();
    for round in 0..rounds {
        tokio::time::sleep(rng.millis(300, 1000)).await;
        // Some faults outlast the lease (2 s) and the time to declare a host down (3 s by
        // default, 6 s before leases) and some do not.
        let hold = rng.millis(500, 8000);
        let h = rng.below(hosts.len() as u64) as usize;
        let hname = hosts[h].name().to_string();
        match rng.below(7) {
            0 => {
                let target = match (rng.below(2), leader(&c).await) {
                    (0, Some(l)) => {
                        tally.leader_kills += 1;
                        l
                    }
                    _ => rng.below(NODES as u64) as usize,
                };
                tally.control_kills += 1;
                let hold = hold.min(Duration::from_secs(3));
                sh.event(format!(
                    "round {round}: kill -9 control node {} for {hold:?}",
                    target + 1
                ));
                c.kill(target);
                tokio::time::sleep(hold).await;
                c.restart(target)?;
                wait_answers(&c, target).await?;
                sh.event(format!("round {round}: control node {} back", target + 1));
            }
            1 => {
                tally.agent_kills += 1;
                sh.event(format!(
                    "round {round}: kill -9 the agent of {hname} for {hold:?}"
                ));
                hosts[h].sim.kill_agent()?;
                tokio::time::sleep(hold).await;
                hosts[h].spawn_agent()?;
                sh.event(format!("round {round}: agent of {hname} respawned"));
            }
            2 => {
                tally.host_kills += 1;
                sh.event(format!("round {round}: kill host {hname} (cgroup.kill)"));
                let gone = kill_host(&mut hosts, h, &log).await?;
                set_hosts(&hosts);
                sh.event(format!("round {round}: host {hname} killed"));
                dead.push(gone);
                tokio::time::sleep(hold).await;
                let name = if rng.below(2) == 0 {
                    hname.clone()
                } else {
                    tally.new_names += 1;
                    next_host += 1;
                    format!("h{}", next_host - 1)
                };
                hosts.push(Host::start(&name, &upstreams, &log).await?);
                set_hosts(&hosts);
                sh.event(format!("round {round}: host {name} up (replacing {hname})"));
            }
            3 => {
                tally.cuts_both += 1;
                let mode = if rng.below(2) == 0 {
                    Mode::Blackhole
                } else {
                    Mode::Refuse
                };
                sh.event(format!(
                    "round {round}: cut {hname} off the control plane ({mode:?}) for {hold:?}"
                ));
                hosts[h].set_link(mode);
                tokio::time::sleep(hold).await;
                hosts[h].set_link(Mode::Open);
                sh.event(format!("round {round}: {hname} reconnected"));
            }
            4 => {
                tally.cuts_one_way += 1;
                let mode = if rng.below(2) == 0 {
                    Mode::OnlyToControl
                } else {
                    Mode::OnlyToAgent
                };
                sh.event(format!(
                    "round {round}: cut {hname} one way ({mode:?}) for {hold:?}"
                ));
                hosts[h].set_link(mode);
                tokio::time::sleep(hold).await;
                hosts[h].set_link(Mode::Open);
                sh.event(format!("round {round}: {hname} reconnected"));
            }
            kind => {
                let target = match (rng.below(2), leader(&c).await) {
                    (0, Some(l)) => l,
                    _ => rng.below(NODES as u64) as usize,
                };
                let hold = hold.min(Duration::from_secs(3));
                let ids: Vec<u64> = c.nodes.iter().map(|n| n.id).collect();
                let me = ids[target];
                let others: Vec<u64> = ids.iter().copied().filter(|i| *i != me).collect();
                if kind == 5 {
                    tally.partitions_both += 1;
                    sh.event(format!(
                        "round {round}: partition control node {me} from the others for {hold:?}"
                    ));
                    c.set_isolated(target, &others).await?;
                    for i in (0..NODES).filter(|i| *i != target) {
                        c.set_isolated(i, &[me]).await?;
                    }
                } else if rng.below(2) == 0 {
                    tally.partitions_one_way += 1;
                    sh.event(format!(
                        "round {round}: control node {me} reaches nobody (one way) for {hold:?}"
                    ));
                    c.set_isolated(target, &others).await?;
                } else {
                    tally.partitions_one_way += 1;
                    sh.event(format!(
                        "round {round}: nobody reaches control node {me} (one way) for {hold:?}"
                    ));
                    for i in (0..NODES).filter(|i| *i != target) {
                        c.set_isolated(i, &[me]).await?;
                    }
                }
                tokio::time::sleep(hold).await;
                for i in 0..NODES {
                    c.set_isolated(i, &[]).await?;
                }
                sh.event(format!("round {round}: control partition healed"));
            }
        }
        c.wait_converged(Duration::from_secs(30)).await?;
    }
    let fault_time = run_start.elapsed();
    sh.stop.store(true, Ordering::SeqCst);
    let work = worker.await?;

    // Everything is healed (each fault healed in its round); undo the drains.
    let healed = Instant::now();
    c.wait_converged(Duration::from_secs(30)).await?;
    let live_names: BTreeSet<String> = hosts.iter().map(|h| h.name().to_string()).collect();
    for h in work.drained.iter().filter(|h| live_names.contains(*h)) {
        wait::until(&format!("undrain {h}"), CONVERGE_BOUND, || async {
            match client.undrain_host(h).await {
                Ok(_) => Ok(Some(())),
                // Gone, or not draining (a drain that never landed, or one undone already).
                Err(e) if e.is_not_found() || e.status() == Some(409) => Ok(Some(())),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
    }
    sh.event("faults healed, drains undone".to_string());

    let mut violations: Vec<String> = Vec::new();
    // (2) Every VM desired running runs on exactly one live host, the one the cluster says.
    let converged = wait::until(
        "every VM desired running to run on exactly one host",
        CONVERGE_BOUND.saturating_sub(healed.elapsed()),
        || async {
            let vms = client.list_vms().await.map_err(|e| e.to_string())?;
            let desired: BTreeSet<String> = vms
                .iter()
                .filter(|v| v.desired == DesiredState::Running)
                .map(|v| v.spec.name.clone())
                .collect();
            let existing: BTreeSet<String> = vms.iter().map(|v| v.spec.name.clone()).collect();
            let run = running(&hosts).await?;
            let mut problems = exactly_once::convergence(&desired, &existing, &run);
            for v in vms.iter().filter(|v| v.desired == DesiredState::Running) {
                let on = v.host.as_deref().and_then(|h| run.get(h));
                if v.state != VmState::Running || !on.is_some_and(|s| s.contains(&v.spec.name)) {
                    problems.push(format!(
                        "{} is {} on {:?} in the API ({:?})",
                        v.spec.name,
                        v.state.as_str(),
                        v.host,
                        v.reason
                    ));
                }
            }
            if problems.is_empty() {
                Ok(Some(existing))
            } else {
                Err(problems.join("; "))
            }
        },
    )
    .await;
    let existing = match converged {
        Ok(e) => {
            eprintln!("converged {:?} after the faults healed", healed.elapsed());
            e
        }
        Err(e) => {
            violations.push(format!("{e:#}"));
            client
                .list_vms()
                .await
                .map(|vms| vms.into_iter().map(|v| v.spec.name).collect())
                .unwrap_or_default()
        }
    };

    // The recorder agrees with each manager about what is up now (or the check is void).
    let agree = wait::until(
        "the unit log to agree with every manager",
        Duration::from_secs(10),
        || async {
            let run = running(&hosts).await?;
            let ivs = log.intervals();
            let mut diffs = Vec::new();
            for (host, vms) in &run {
                let open: BTreeSet<String> = ivs
                    .iter()
                    .filter(|i| &i.host == host && i.end_us.is_none())
                    .map(|i| i.vm.clone())
                    .collect();
                if &open != vms {
                    diffs.push(format!("{host}: recorded {open:?}, systemd {vms:?}"));
                }
            }
            if diffs.is_empty() {
                Ok(Some(()))
            } else {
                Err(diffs.join("; "))
            }
        },
    )
    .await;
    if let Err(e) = agree {
        violations.push(format!("the recording is incomplete: {e:#}"));
    }

    // (1) No VM ever ran on two hosts at once.
    let intervals = log.intervals();
    let overlaps = exactly_once::overlaps(&intervals, now_us());
    let events = sh.events.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for o in &overlaps {
        let from = o
            .first
            .start_us
            .min(o.second.start_us)
            .saturating_sub(15_000_000);
        let around: Vec<String> = events
            .iter()
            .filter(|(t, _)| *t >= from && *t <= o.to_us + 1_000_000)
            .map(|(t, e)| format!("    [{t}] {e}"))
            .collect();
        let history: Vec<String> = intervals
            .iter()
            .filter(|i| i.vm == o.vm)
            .map(|i| format!("    {}", fmt_interval(i)))
            .collect();
        violations.push(format!(
            "overlap: {o}\n  the VM's intervals:\n{}\n  what happened around it:\n{}",
            history.join("\n"),
            around.join("\n")
        ));
    }
    // (3) No acknowledged create is lost.
    violations.extend(exactly_once::lost_creates(
        &work.acknowledged,
        &work.delete_sent,
        &existing,
    ));

    let moves = exactly_once::moves(&intervals);
    let records = log.records();
    let changes: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            Record::Changed {
                inactive_exit_us, ..
            } => Some(inactive_exit_us.is_some()),
            _ => None,
        })
        .collect();
    // States of the changes that came without systemd's timestamps (arrival times stood in).
    let mut untimed: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        if let Record::Changed {
            active_state,
            inactive_exit_us: None,
            ..
        } = r
        {
            *untimed
                .entry(active_state.clone().unwrap_or_default())
                .or_default() += 1;
        }
    }
    eprintln!("unit changes without timestamps, by state: {untimed:?}");
    eprintln!(
        "host fault run done: seed {seed}, {rounds} rounds in {fault_time:.1?}\n\
         nemesis: {} control kills ({} of the leader), {} agent kills, {} host kills ({} \
         replaced under a new name), {} host cuts both ways, {} host cuts one way, {} control \
         partitions both ways, {} one way\n\
         client: {} creates ({} acknowledged), {} updates, {} deletes, {} drains, {} undrains, \
         {} failed or unknown\n\
         recorded: {} unit changes ({} with systemd's timestamps), {} unit intervals over {} \
         VMs, {} VM moves seen, {} overlaps, {} violations",
        tally.control_kills,
        tally.leader_kills,
        tally.agent_kills,
        tally.host_kills,
        tally.new_names,
        tally.cuts_both,
        tally.cuts_one_way,
        tally.partitions_both,
        tally.partitions_one_way,
        work.creates,
        work.acknowledged.len(),
        work.updates,
        work.deletes,
        work.drains,
        work.undrains,
        work.failed,
        changes.len(),
        changes.iter().filter(|t| **t).count(),
        intervals.len(),
        intervals
            .iter()
            .map(|i| i.vm.as_str())
            .collect::<BTreeSet<_>>()
            .len(),
        moves,
        overlaps.len(),
        violations.len(),
    );
    if !violations.is_empty() {
        for h in hosts.iter().chain(dead.iter()) {
            let log = h.sim.agent_log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- agent log of {} ({}; last 40 lines) ----\n{}",
                h.name(),
                h.sim.base_dir().display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
    anyhow::ensure!(
        violations.is_empty(),
        "seed {seed}: {} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
    anyhow::ensure!(
        !work.acknowledged.is_empty() && !intervals.is_empty(),
        "the run did nothing: no acknowledged create or no unit ever ran"
    );
    Ok(())
}

/// Runs `systemd-run ARGS…` on `host` (as a user of its manager) and checks it succeeded.
fn systemd_run(host: &SimHost, args: &[&str]) -> anyhow::Result<()> {
    let out = host
        .command("systemd-run")?
        .arg("--user")
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "systemd-run {args:?} on {}: {}",
        host.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The recorder and the checker, end to end, without a cluster: a unit of one VM planted on
/// two hosts by hand is an overlap from the second start to the first stop (systemd's
/// timestamps), and killing a host ends what ran there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostfaults_recorder_sees_a_planted_duplicate() -> anyhow::Result<()> {
    let log = UnitLog::new();
    let a = SimHost::start("dup-a").await?;
    let mut b = SimHost::start("dup-b").await?;
    let wa = log.watch(&a).await?;
    let wb = log.watch(&b).await?;
    let unit = [
        "--unit",
        "blixard-vm-dup",
        "-p",
        "Type=exec",
        "/bin/sleep",
        "infinity",
    ];
    let t0 = now_us();
    systemd_run(&a, &unit)?;
    systemd_run(&b, &unit)?;
    let mid = now_us();
    // Stop it on a: `systemctl --user stop`.
    let out = a
        .command("systemctl")?
        .args(["--user", "stop", "blixard-vm-dup.service"])
        .output()?;
    anyhow::ensure!(out.status.success(), "systemctl stop failed");
    wait::until(
        "the stop on dup-a to be recorded",
        Duration::from_secs(10),
        || async {
            let up = wa.active_vms().await.map_err(|e| e.to_string())?;
            let closed = log
                .intervals()
                .iter()
                .any(|i| i.host == "dup-a" && i.end_us.is_some());
            Ok((up.is_empty() && closed).then_some(()))
        },
    )
    .await?;
    let stopped = now_us();
    let ivs = log.intervals();
    let found = exactly_once::overlaps(&ivs, now_us());
    anyhow::ensure!(
        found.len() == 1,
        "one overlap expected: {found:?} from {ivs:?}"
    );
    let o = &found[0];
    anyhow::ensure!(
        o.vm == "dup" && o.first.host == "dup-a" && o.second.host == "dup-b",
        "{o}"
    );
    anyhow::ensure!(
        t0 <= o.from_us && o.from_us <= mid && o.to_us <= stopped && o.from_us < o.to_us,
        "overlap times {o} outside [{t0}, {mid}] .. {stopped}"
    );
    // A host kill ends the interval still open on dup-b at the kill.
    let _ = wb.active_vms().await?;
    let mut wb = wb;
    tokio::task::block_in_place(|| b.kill())?;
    let killed = now_us();
    wb.finish(Duration::from_secs(5)).await;
    log.host_ended("dup-b", killed);
    let ivs = log.intervals();
    let on_b: Vec<&Interval> = ivs.iter().filter(|i| i.host == "dup-b").collect();
    anyhow::ensure!(
        on_b.len() == 1 && on_b[0].end_us.is_some_and(|e| e <= killed && e > o.from_us),
        "dup-b's interval ends by the kill: {on_b:?}"
    );
    drop(wa);
    Ok(())
}
