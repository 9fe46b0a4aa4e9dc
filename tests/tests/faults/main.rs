//! Fault injection: a 3-node cluster of real `blixard-control` processes under concurrent
//! creates, updates, deletes and reads from several clients, while a nemesis kill -9s and
//! restarts nodes and partitions them, both ways or one way only (the transport's fault switches, `--fault-injection`).
//! Every operation is recorded with its invocation and completion; afterwards the history
//! must be linearizable for each VM key, and every acknowledged create that no delete could
//! have removed must still exist, exactly once, on every node.
//!
//! A second run does the same with every node's data directory on `blixard-lazyfs` (FUSE):
//! each kill is a power cut, losing whatever the node wrote but had not fsynced.
//!
//! `BLIXARD_FAULT_ROUNDS` sets the number of nemesis rounds (default 20, the CI run; the long
//! run is `BLIXARD_FAULT_ROUNDS=100 cargo nextest run -p blixard-tests --test faults -E
//! 'test(kills)'`), `BLIXARD_POWERCUT_ROUNDS` those of the power-cut run (default 10; long:
//! `BLIXARD_POWERCUT_ROUNDS=100 cargo nextest run -p blixard-tests --test faults -E
//! 'test(power_cuts_and)'`), and `BLIXARD_FAULT_SEED` replays the nemesis' choices of a run (its
//! seed is printed).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blixard_api::{Client, ClientError, Hypervisor, UpdateVm, Vm, VmSpec};
use blixard_tests::cluster::{Cluster, ClusterOptions};
use blixard_tests::lazyfs::LazyMount;
use blixard_tests::linearizability::{self, Call, Op, Outcome, Verdict};
use blixard_tests::nemesis::{env_u64, leader, wait_answers, Rng};
use blixard_tests::wait;

const NODES: usize = 3;
const CLIENTS: usize = 5;
const KEYS_PER_ROUND: usize = 3;

/// What every task shares.
struct Shared {
    start: Instant,
    /// Nodes a client may send to (down while killed or restarting).
    up: Vec<AtomicBool>,
    round: AtomicUsize,
    stop: AtomicBool,
    next_value: AtomicU64,
    history: Mutex<Vec<Op>>,
    /// Answers the model has no place for (e.g. a 400): each one fails the test.
    unexpected: Mutex<Vec<String>>,
    /// Why operations ended unknown, for the summary.
    unknown_why: Mutex<BTreeMap<String, usize>>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

fn key(round: usize, k: usize) -> String {
    format!("r{round}-k{k}")
}

fn spec(name: &str, value: u64) -> VmSpec {
    VmSpec {
        on_host_loss: None,
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        hypervisor: Hypervisor::Process,
        kernel: None,
        initrd: None,
        cmdline: Some(format!("v{value}")),
        disks: vec![],
        nics: vec![],
        restart_policy: Default::default(),
        constraints: Default::default(),
        labels: Default::default(),
        anti_affinity: None,
        strategy: Default::default(),
        max_restarts: None,
        restart_window_secs: None,
        task: None,
    }
}

/// The value a stored VM carries (0, which no write uses, if it carries none).
fn value_of(vm: &Vm) -> u64 {
    vm.spec
        .cmdline
        .as_deref()
        .and_then(|c| c.strip_prefix('v'))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Maps a client result onto the model's outcomes.
fn outcome(call: Call, r: &Result<Vm, ClientError>) -> Result<Outcome, String> {
    Ok(match r {
        Ok(vm) => Outcome::Ok(value_of(vm)),
        Err(ClientError::Api { status, code, .. }) => match (*status, code.as_str(), call) {
            (404, _, _) => Outcome::NotFound,
            (409, "already_exists", Call::Create(_)) => Outcome::AlreadyExists,
            // The server promises these had no effect (no leader, leader unreachable).
            (503, _, _) => Outcome::Failed,
            // An internal error, or the leader died holding a forwarded write (504
            // outcome_unknown): it may or may not have been applied.
            (500 | 504, _, _) => Outcome::Unknown,
            (s, c, _) => return Err(format!("{call:?}: unexpected HTTP {s} {c}")),
        },
        // Timeouts and transport errors after the request may have been sent.
        Err(ClientError::Unreachable(_) | ClientError::Decode { .. }) => Outcome::Unknown,
        Err(e @ ClientError::Config(_)) => return Err(format!("{call:?}: {e}")),
    })
}

/// One client: random operations on the current round's keys through random live nodes.
async fn client(id: usize, clients: Arc<Vec<Client>>, sh: Arc<Shared>, seed: u64, hard: Instant) {
    let mut rng = Rng::new(seed);
    while !sh.stop.load(Ordering::SeqCst) && Instant::now() < hard {
        let up: Vec<usize> = (0..NODES)
            .filter(|i| sh.up[*i].load(Ordering::SeqCst))
            .collect();
        if up.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let node = up[rng.below(up.len() as u64) as usize];
        // The last client uses every endpoint, as blixardctl does, and fails over by itself.
        let c = if id + 1 == CLIENTS {
            &clients[NODES]
        } else {
            &clients[node]
        };
        let k = key(
            sh.round.load(Ordering::SeqCst),
            rng.below(KEYS_PER_ROUND as u64) as usize,
        );
        let v = sh.next_value.fetch_add(1, Ordering::SeqCst);
        let call = match rng.below(100) {
            0..30 => Call::Create(v),
            30..55 => Call::Update(v),
            55..75 => Call::Delete,
            _ => Call::Read,
        };
        let invoked = sh.now();
        let r = match call {
            Call::Create(v) => c.create_vm(&spec(&k, v)).await,
            Call::Update(v) => {
                c.update_vm(&UpdateVm {
                    spec: spec(&k, v),
                    expected_generation: None,
                })
                .await
            }
            Call::Delete => c.delete_vm(&k).await,
            Call::Read => c.get_vm(&k).await,
        };
        let completed = sh.now();
        let o = match outcome(call, &r) {
            Ok(o) => o,
            Err(e) => {
                sh.unexpected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e);
                Outcome::Unknown
            }
        };
        sh.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Op {
                key: k,
                client: id,
                call,
                outcome: o,
                invoked,
                completed: (o != Outcome::Unknown).then_some(completed),
            });
        if let (Outcome::Unknown, Err(e)) = (o, &r) {
            let secs = (completed - invoked) / 1_000_000_000;
            let what = match e {
                ClientError::Unreachable(_) => "transport error or timeout".to_string(),
                other => other.to_string(),
            };
            *sh.unknown_why
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(format!("{what} (after ~{secs}s)"))
                .or_default() += 1;
        }
        if matches!(o, Outcome::Unknown | Outcome::Failed) {
            // Do not hammer a node that is going away.
            tokio::time::sleep(Duration::from_millis(10 + rng.below(40))).await;
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    kills: usize,
    partitions: usize,
    /// Partitions in one direction only (counted in `partitions` too).
    asymmetric: usize,
    leader_faults: usize,
    quorum_losses: usize,
    leader_changes: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_history_is_linearizable_under_kills_and_partitions() -> anyhow::Result<()> {
    let rounds = env_u64("BLIXARD_FAULT_ROUNDS").unwrap_or(20) as usize;
    run(rounds, false).await
}

/// The same nemesis, but every node's data directory is on `blixard-lazyfs` and every kill is
/// a power cut: the node is killed and its file system loses whatever was not fsynced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_history_is_linearizable_under_power_cuts_and_partitions() -> anyhow::Result<()> {
    let rounds = env_u64("BLIXARD_POWERCUT_ROUNDS").unwrap_or(10) as usize;
    run(rounds, true).await
}

/// Power cuts at the hard moments: a node on `blixard-lazyfs` is told to die while it builds a
/// snapshot, right after writing one (before the log is purged), while committing a log purge,
/// and while saving a vote (during an election after the leader's power was cut); its file
/// system then loses what was not synced. Every acknowledged create must be on every node
/// afterwards, and every node must restart and catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cuts_at_snapshot_builds_log_purges_and_votes() -> anyhow::Result<()> {
    let disks = tempfile::tempdir()?;
    let mut mounts = lazy_disks(disks.path())?;
    let mut c = fault_cluster(&mounts).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let hard = Instant::now() + Duration::from_secs(240);
    let mut writers = Vec::new();
    for w in 0..3 {
        let client = c.client();
        let (stop, acked) = (stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            // Bounded: stops when told, at the hard deadline, or after this many.
            while !stop.load(Ordering::SeqCst) && Instant::now() < hard && n < 50_000 {
                n += 1;
                let name = format!("p{w}-{n}");
                if client.create_vm(&spec(&name, n)).await.is_ok() {
                    acked.lock().unwrap_or_else(|e| e.into_inner()).push(name);
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let points = [
        ("snapshot_build", false),
        ("snapshot_written", true),
        ("log_purge", false),
        ("log_purge", true),
        ("save_vote", false),
    ];
    for (point, on_leader) in points {
        let leader = c.wait_converged(Duration::from_secs(30)).await?;
        let victim = if on_leader {
            leader
        } else {
            (leader + 1) % NODES
        };
        c.set_crash_point(victim, point).await?;
        let mut also_cut = None;
        if point == "save_vote" {
            // An election: cut the leader's power; the victim dies saving its vote.
            down(&mut c, &mut mounts, leader);
            also_cut = Some(leader);
        }
        let died = c.wait_exit(victim, Duration::from_secs(60)).await;
        anyhow::ensure!(
            died.is_some(),
            "node {} did not reach {point} within 60 s",
            victim + 1
        );
        eprintln!(
            "node {} died at {point} ({}), power cut",
            victim + 1,
            if on_leader { "leader" } else { "follower" }
        );
        down(&mut c, &mut mounts, victim);
        for i in [Some(victim), also_cut].into_iter().flatten() {
            up(&mut c, &mut mounts, i)?;
        }
        for i in [Some(victim), also_cut].into_iter().flatten() {
            wait_answers(&c, i).await?;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await?;
    }
    let leader = c.wait_converged(Duration::from_secs(30)).await?;
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let commit = c.status(leader).await.map(|s| s.commit_index).unwrap_or(0);
    for i in 0..NODES {
        wait::until(
            &format!("node {} to catch up", i + 1),
            Duration::from_secs(30),
            || async {
                let s = c.status(i).await.ok_or("not answering")?;
                Ok((s.applied_index >= commit).then_some(()))
            },
        )
        .await?;
        let names: std::collections::BTreeSet<String> = c
            .node_client(i)
            .list_vms()
            .await?
            .into_iter()
            .map(|v| v.spec.name)
            .collect();
        let lost: Vec<&String> = acked.iter().filter(|a| !names.contains(*a)).collect();
        anyhow::ensure!(
            lost.is_empty(),
            "node {} lost {} acknowledged creates, e.g. {:?}",
            i + 1,
            lost.len(),
            lost.iter().take(5).collect::<Vec<_>>()
        );
    }
    eprintln!(
        "{} acknowledged creates across {} power cuts at hard points, all on every node",
        acked.len(),
        points.len()
    );
    Ok(())
}

/// One `blixard-lazyfs` data directory per node under `dir`.
fn lazy_disks(dir: &std::path::Path) -> anyhow::Result<Vec<LazyMount>> {
    (0..NODES)
        .map(|i| LazyMount::mount(&dir.join(format!("disk{i}")), &dir.join(format!("n{i}"))))
        .collect()
}

/// The cluster the fault tests run: fault switches on, snapshots often (so restarted nodes
/// also catch up through snapshots, and power cuts land during snapshot builds and log
/// purges), data directories on `mounts` when there are any.
async fn fault_cluster(mounts: &[LazyMount]) -> anyhow::Result<Cluster> {
    Cluster::start_with(
        NODES,
        ClusterOptions {
            fault_injection: true,
            snapshot_every: 100,
            data_dirs: mounts
                .iter()
                .map(|m| m.mountpoint().to_path_buf())
                .collect(),
            ..Default::default()
        },
    )
    .await
}

/// Kills node `i`; with `mounts`, cuts the power of its file system too.
fn down(c: &mut Cluster, mounts: &mut [LazyMount], i: usize) {
    c.kill(i);
    if let Some(m) = mounts.get_mut(i) {
        m.cut();
    }
}

/// Restarts node `i` (remounting what its file system kept, with `mounts`).
fn up(c: &mut Cluster, mounts: &mut [LazyMount], i: usize) -> anyhow::Result<()> {
    if let Some(m) = mounts.get_mut(i) {
        m.remount()?;
    }
    c.restart(i)
}

/// Runs `rounds` of the nemesis; with `power_cuts`, on `blixard-lazyfs` data directories.
async fn run(rounds: usize, power_cuts: bool) -> anyhow::Result<()> {
    let seed = env_u64("BLIXARD_FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!(
        "fault run: {rounds} rounds, seed {seed} (BLIXARD_FAULT_SEED={seed} replays the nemesis)"
    );
    let mut rng = Rng::new(seed);
    // Declared before the cluster, so its nodes are killed before the mounts go.
    let disks = tempfile::tempdir()?;
    let mut mounts = if power_cuts {
        lazy_disks(disks.path())?
    } else {
        Vec::new()
    };
    let mut c = fault_cluster(&mounts).await?;
    let sh = Arc::new(Shared {
        start: Instant::now(),
        up: (0..NODES).map(|_| AtomicBool::new(true)).collect(),
        round: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        next_value: AtomicU64::new(1),
        history: Mutex::new(Vec::new()),
        unexpected: Mutex::new(Vec::new()),
        unknown_why: Mutex::new(BTreeMap::new()),
    });
    // One client per node, then one over all of them.
    let clients: Arc<Vec<Client>> = Arc::new(
        (0..NODES)
            .map(|i| c.node_client(i))
            .chain([c.client()])
            .collect(),
    );
    // Every loop here stops by itself: the clients at this hard deadline at the latest.
    let hard = Instant::now() + Duration::from_secs(60 + 15 * rounds as u64);
    let workers: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client(
                id,
                clients.clone(),
                sh.clone(),
                rng.next_u64(),
                hard,
            ))
        })
        .collect();

    let mut tally = Tally::default();
    let mut last_leader = leader(&c).await;
    let run_start = Instant::now();
    for round in 0..rounds {
        sh.round.store(round, Ordering::SeqCst);
        // A quiet spell on the new keys, then the fault.
        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
        // Elections take 1-2 s here (leader lease and election timeout), so some faults outlast
        // them and some do not.
        let hold = Duration::from_millis(800 + rng.below(2200));
        let ids: Vec<u64> = c.nodes.iter().map(|n| n.id).collect();
        let target = match (rng.below(2), leader(&c).await) {
            (0, Some(l)) => {
                tally.leader_faults += 1;
                l
            }
            _ => rng.below(NODES as u64) as usize,
        };
        match rng.below(10) {
            // Kill -9 one node, then restart it with its data.
            0..4 => {
                tally.kills += 1;
                sh.up[target].store(false, Ordering::SeqCst);
                down(&mut c, &mut mounts, target);
                tokio::time::sleep(hold).await;
                up(&mut c, &mut mounts, target)?;
                wait_answers(&c, target).await?;
                sh.up[target].store(true, Ordering::SeqCst);
            }
            // Kill two: no quorum until they are back.
            4 => {
                tally.kills += 2;
                tally.quorum_losses += 1;
                let other = (target + 1 + rng.below(NODES as u64 - 1) as usize) % NODES;
                for i in [target, other] {
                    sh.up[i].store(false, Ordering::SeqCst);
                    down(&mut c, &mut mounts, i);
                }
                tokio::time::sleep(hold).await;
                for i in [target, other] {
                    up(&mut c, &mut mounts, i)?;
                }
                for i in [target, other] {
                    wait_answers(&c, i).await?;
                    sh.up[i].store(true, Ordering::SeqCst);
                }
            }
            // One-way: traffic from one side fails, the other way works (a request and its
            // answer are one exchange, so "A reaches B" means A's RPCs to B succeed).
            8..10 => {
                tally.partitions += 1;
                tally.asymmetric += 1;
                let me = ids[target];
                let others: Vec<u64> = ids.iter().copied().filter(|i| *i != me).collect();
                if rng.below(2) == 0 {
                    // It cannot reach anyone; everyone reaches it.
                    c.set_isolated(target, &others).await?;
                } else {
                    // It reaches everyone; nobody reaches it.
                    for i in (0..NODES).filter(|i| *i != target) {
                        c.set_isolated(i, &[me]).await?;
                    }
                }
                tokio::time::sleep(hold).await;
                for i in 0..NODES {
                    c.set_isolated(i, &[]).await?;
                }
            }
            // Cut one node off from the others, both ways, then heal.
            _ => {
                tally.partitions += 1;
                let me = ids[target];
                let others: Vec<u64> = ids.iter().copied().filter(|i| *i != me).collect();
                c.set_isolated(target, &others).await?;
                for i in (0..NODES).filter(|i| *i != target) {
                    c.set_isolated(i, &[me]).await?;
                }
                tokio::time::sleep(hold).await;
                for i in 0..NODES {
                    c.set_isolated(i, &[]).await?;
                }
            }
        }
        let now_leader = c.wait_converged(Duration::from_secs(30)).await?;
        if last_leader != Some(now_leader) {
            tally.leader_changes += 1;
        }
        last_leader = Some(now_leader);
    }
    let fault_time = run_start.elapsed();
    sh.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await?;
    }

    // The end state: every key read once more, and every node's list compared.
    c.wait_converged(Duration::from_secs(30)).await?;
    let keys: Vec<String> = (0..rounds)
        .flat_map(|r| (0..KEYS_PER_ROUND).map(move |k| key(r, k)))
        .collect();
    let any = c.client();
    for k in &keys {
        let (invoked, r) = wait::until(
            &format!("a definite read of {k}"),
            Duration::from_secs(30),
            || async {
                let invoked = sh.now();
                let r = any.get_vm(k).await;
                match outcome(Call::Read, &r) {
                    Ok(Outcome::Ok(_) | Outcome::NotFound) => Ok(Some((invoked, r))),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await?;
        let o = outcome(Call::Read, &r).map_err(anyhow::Error::msg)?;
        sh.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Op {
                key: k.clone(),
                client: usize::MAX,
                call: Call::Read,
                outcome: o,
                invoked,
                completed: Some(sh.now()),
            });
    }
    let mut lists = Vec::new();
    for i in 0..NODES {
        let vms = c.node_client(i).list_vms().await?;
        let names: Vec<(String, u64, u64)> = vms
            .iter()
            .map(|v| (v.spec.name.clone(), value_of(v), v.generation))
            .collect();
        lists.push(names);
    }
    let mut violations: Vec<String> = Vec::new();
    for (i, l) in lists.iter().enumerate() {
        if *l != lists[0] {
            violations.push(format!("node {} lists {l:?}, node 1 {:?}", i + 1, lists[0]));
        }
        let mut names: Vec<&String> = l.iter().map(|(n, _, _)| n).collect();
        names.dedup();
        if names.len() != l.len() {
            violations.push(format!("node {} lists a VM twice: {l:?}", i + 1));
        }
    }
    let final_state: BTreeMap<String, u64> =
        lists[0].iter().map(|(n, v, _)| (n.clone(), *v)).collect();

    let history = sh.history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let check_start = Instant::now();
    let verdicts = linearizability::check(&history, linearizability::DEFAULT_BUDGET);
    let mut inconclusive = 0;
    for (k, v) in &verdicts {
        match v {
            Verdict::Linearizable => {}
            Verdict::Inconclusive { .. } => inconclusive += 1,
            Verdict::Violation { .. } => {
                let mut ops: Vec<&Op> = history.iter().filter(|o| &o.key == k).collect();
                ops.sort_by_key(|o| o.invoked);
                let lines: Vec<String> = ops.iter().map(|o| format!("  {o:?}")).collect();
                violations.push(format!(
                    "{k} is not linearizable: {v:?}\nits history:\n{}",
                    lines.join("\n")
                ));
            }
        }
    }
    violations.extend(linearizability::check_acknowledged_creates(
        &history,
        &final_state,
    ));
    let unexpected = sh
        .unexpected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();

    let count = |f: &dyn Fn(&Op) -> bool| history.iter().filter(|o| f(o)).count();
    eprintln!(
        "fault run done: seed {seed}, {rounds} rounds in {:.1?} ({} kills{}, {} of them quorum losses; \
         {} partitions, {} of them one-way; {} faults aimed at the leader, {} leader changes)\n\
         operations: {} ({} creates, {} updates, {} deletes, {} reads) over {} keys; \
         {} ok, {} not found, {} already exists, {} failed (503), {} unknown\n\
         checker: {:.1?}, {} keys linearizable, {} inconclusive, {} violations, {} unexpected answers",
        fault_time,
        tally.kills,
        if power_cuts { " (power cuts)" } else { "" },
        tally.quorum_losses,
        tally.partitions,
        tally.asymmetric,
        tally.leader_faults,
        tally.leader_changes,
        history.len(),
        count(&|o| matches!(o.call, Call::Create(_))),
        count(&|o| matches!(o.call, Call::Update(_))),
        count(&|o| o.call == Call::Delete),
        count(&|o| o.call == Call::Read),
        verdicts.len(),
        count(&|o| matches!(o.outcome, Outcome::Ok(_))),
        count(&|o| o.outcome == Outcome::NotFound),
        count(&|o| o.outcome == Outcome::AlreadyExists),
        count(&|o| o.outcome == Outcome::Failed),
        count(&|o| o.outcome == Outcome::Unknown),
        check_start.elapsed(),
        verdicts.values().filter(|v| **v == Verdict::Linearizable).count(),
        inconclusive,
        violations.len(),
        unexpected.len(),
    );
    let mut lat: Vec<u64> = history
        .iter()
        .filter_map(|o| o.completed.map(|c| (c - o.invoked) / 1_000_000))
        .collect();
    lat.sort_unstable();
    let pct = |p: usize| {
        lat.get(lat.len().saturating_sub(1) * p / 100)
            .copied()
            .unwrap_or(0)
    };
    eprintln!(
        "latency of answered operations (ms): p50 {}, p90 {}, p99 {}, max {}",
        pct(50),
        pct(90),
        pct(99),
        pct(100)
    );
    eprintln!(
        "unknown outcomes: {:?}",
        sh.unknown_why.lock().unwrap_or_else(|e| e.into_inner())
    );
    anyhow::ensure!(
        violations.is_empty(),
        "{} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
    anyhow::ensure!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
    anyhow::ensure!(inconclusive == 0, "{inconclusive} keys inconclusive");
    // The run did something under faults, not just fail everything.
    anyhow::ensure!(
        count(&|o| matches!(o.outcome, Outcome::Ok(_))) >= rounds * 5,
        "too few successful operations"
    );
    Ok(())
}

/// The switches exist only on nodes started with `--fault-injection`.
#[tokio::test]
async fn faults_route_is_off_by_default() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    let resp = reqwest::Client::new()
        .post(format!("{}/raft/faults", c.nodes[0].url))
        .json(&serde_json::json!({ "isolate": [2] }))
        .send()
        .await?;
    assert_eq!(resp.status(), 404);
    Ok(())
}
