//! Figure `size` (issue 19): costs that must not grow with the cluster.
//!
//! In process (the pure state machine and scheduler the control node runs, no IO): the apply
//! time of one create into a state with 0 and with 100,000 VMs; one placement round (a window
//! of 1,000 pending VMs, 1,000 hosts) with 10,000 and with 100,000 VMs pending; and the parts
//! of a snapshot of 100,000 VMs and 10,000 hosts: the encoding (done while applies wait),
//! its size, and the decoding plus index build a follower's install does.
//!
//! End to end: a fresh 3-node cluster with no hosts (every VM stays pending), creates from 64
//! clients in rounds of a few seconds until 100,000 VMs are in the state; the create rate of
//! each round, then each node's RSS. Bounded: at most 8 rounds, each at most 60,000 creates.
//! Then a snapshot installed for real: a follower down while 100,000 VMs are created, then
//! restarted, until it has caught up; one sequential client's slowest create meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_control::scheduler::{self, Overcommit};
use blixard_control::state_machine::{apply, ClusterState, Command};
use blixard_control::store::state::{decode_snapshot, encode_snapshot};
use serde_json::{json, Value};

use crate::load::{self, vm_body, LoadSpec, Target};
use crate::placement::host_body;
use crate::procs::BlixardCluster;
use crate::stats::round;
use crate::Opts;

const BIG_VMS: u64 = 100_000;
const SNAPSHOT_HOSTS: u64 = 10_000;
const ROUND_HOSTS: u64 = 1_000;
const WINDOW: usize = 1_000;

/// Applies `cmd` (JSON) at the next index.
fn apply_json(s: &mut ClusterState, index: &mut u64, cmd: &str) -> anyhow::Result<()> {
    *index += 1;
    let cmd: Command = serde_json::from_str(cmd)?;
    apply(s, *index, &cmd);
    Ok(())
}

fn register(s: &mut ClusterState, index: &mut u64, i: u64) -> anyhow::Result<()> {
    apply_json(
        s,
        index,
        &format!(
            r#"{{"type":"register_host","registration":{},"now_ms":1}}"#,
            host_body(i)
        ),
    )
}

fn create_cmd(name: &str, now: u64) -> String {
    format!(
        r#"{{"type":"create_vm","spec":{},"now_ms":{now}}}"#,
        vm_body(name)
    )
}

/// A state with `hosts` hosts and `vms` pending VMs.
fn state(hosts: u64, vms: u64) -> anyhow::Result<(ClusterState, u64)> {
    let mut s = ClusterState::default();
    let mut index = 0;
    for i in 0..hosts {
        register(&mut s, &mut index, i)?;
    }
    for i in 0..vms {
        apply_json(&mut s, &mut index, &create_cmd(&format!("s-{i}"), 1 + i))?;
    }
    Ok((s, index))
}

/// Mean microseconds of applying 1,000 more creates to `s`.
fn create_apply_us(s: &mut ClusterState, mut index: u64) -> anyhow::Result<f64> {
    let cmds: Vec<Command> = (0..1_000)
        .map(|i| serde_json::from_str(&create_cmd(&format!("x-{i}"), 10_000_000 + i)))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    for c in &cmds {
        index += 1;
        apply(s, index, c);
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / cmds.len() as f64)
}

/// Median milliseconds of one placement round over `s`.
fn round_ms(s: &ClusterState) -> f64 {
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let _ = scheduler::schedule_window(
            s,
            Overcommit::default(),
            &scheduler::Cursor::default(),
            WINDOW,
        );
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    crate::stats::Range::of(&v).median
}

fn in_process() -> anyhow::Result<Value> {
    // Apply cost of a create: empty state vs 100,000 VMs.
    let (mut empty, i0) = state(ROUND_HOSTS, 0)?;
    let apply_empty = create_apply_us(&mut empty, i0)?;
    let (mut big, i1) = state(ROUND_HOSTS, BIG_VMS)?;
    let round_big = round_ms(&big);
    let apply_big = create_apply_us(&mut big, i1)?;
    let (small, _) = state(ROUND_HOSTS, 10_000)?;
    let round_small = round_ms(&small);
    drop((empty, big, small));

    // A snapshot at 100,000 VMs and 10,000 hosts, part by part.
    let (snap, index) = state(SNAPSHOT_HOSTS, BIG_VMS)?;
    // What a copy of the rows would cost, against encoding them in place (what the store
    // does while applies wait).
    let t = Instant::now();
    let rows = (snap.hosts.clone(), snap.vms.clone());
    let copy_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(rows);
    let t = Instant::now();
    let data = encode_snapshot(&snap)?;
    let encode_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let back = decode_snapshot(&data, index)?;
    let install_ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(back.vms.len() == snap.vms.len(), "snapshot lost VMs");
    Ok(json!({
        "create_apply_us": { "vms_0": round(apply_empty), "vms_100000": round(apply_big) },
        "placement_round_ms": {
            "hosts": ROUND_HOSTS, "window": WINDOW,
            "pending_10000": round(round_small), "pending_100000": round(round_big),
        },
        "snapshot": {
            "vms": BIG_VMS, "hosts": SNAPSHOT_HOSTS,
            "applies_wait_ms": round(encode_ms),
            "a_copy_would_take_ms": round(copy_ms),
            "bytes": data.len(),
            "decode_and_index_ms": round(install_ms),
        },
    }))
}

async fn end_to_end(o: &Opts) -> anyhow::Result<Value> {
    let c = BlixardCluster::start(&o.bin_dir, 3, &o.control_flags(&[])).await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let url = c.nodes[leader].url.clone();
    let secs = if o.quick { 3.0 } else { 6.0 };
    let mut rounds = Vec::new();
    let mut total = 0u64;
    for r in 0..8 {
        if total >= BIG_VMS {
            break;
        }
        let spec = LoadSpec {
            target: Target::Blixard,
            urls: vec![url.clone()],
            clients: 64,
            duration: Duration::from_secs_f64(secs),
            max_ops: 60_000,
            tag: format!("z{r}"),
        };
        let res = load::run(&spec).await;
        eprintln!(
            "  size round {r}: {total} VMs before, {:.0} creates/s, p99 {:.1} ms ({} errors)",
            res.ops_per_sec(),
            res.pct_ms(99.0),
            res.errors
        );
        rounds.push(json!({
            "vms_before": total,
            "creates_per_s": round(res.ops_per_sec()),
            "p99_ms": round(res.pct_ms(99.0)),
            "errors": res.errors,
        }));
        total += res.ops;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut nodes = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let Some(pid) = c.pid(i) else { continue };
        let (rss, _) = crate::procs::footprint(pid, Duration::from_millis(200)).await?;
        nodes.push(json!({ "node": n.id, "leader": i == leader, "rss_mib": round(rss) }));
    }
    Ok(json!({ "clients": 64, "round_s": secs, "rounds": rounds, "vms": total, "nodes": nodes }))
}

/// Sequential creates until `stop`: the longest one, in ms, and how many were made.
async fn probe(url: String, stop: Arc<AtomicBool>) -> (f64, u64) {
    let http = load::client();
    let (mut worst, mut n) = (0.0f64, 0u64);
    while !stop.load(Ordering::Relaxed) && n < 100_000 {
        let t = Instant::now();
        let ok = http
            .post(format!("{url}/v1/vms"))
            .header("content-type", "application/json")
            .body(vm_body(&format!("probe-{n}")))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            worst = worst.max(t.elapsed().as_secs_f64() * 1e3);
        }
        n += 1;
    }
    (worst, n)
}

fn index_of(status: &Option<Value>, field: &str) -> u64 {
    status.as_ref().and_then(|s| s[field].as_u64()).unwrap_or(0)
}

/// A follower down while 100,000 VMs are created (the leader snapshots every 1,000 entries and
/// purges its log), then restarted: it must install a snapshot to catch up. Meanwhile one
/// sequential client's slowest create is the longest pause writers saw (snapshot builds
/// included).
async fn snapshot_install(o: &Opts) -> anyhow::Result<Value> {
    let mut c = BlixardCluster::start(
        &o.bin_dir,
        3,
        &o.control_flags(&["--snapshot-every", "1000"]),
    )
    .await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let url = c.nodes[leader].url.clone();
    let follower = (leader + 1) % c.nodes.len();
    c.kill(follower);
    let stop = Arc::new(AtomicBool::new(false));
    let probe_task = tokio::spawn(probe(url.clone(), stop.clone()));
    let (fill_s, errors) = load::burst(&url, BIG_VMS, 64, |i| {
        ("/v1/vms".into(), vm_body(&format!("i-{i}")))
    })
    .await;
    let target = index_of(&c.status(leader).await, "applied_index");
    let snapshot_index = index_of(&c.status(leader).await, "snapshot_index");
    let t = Instant::now();
    c.restart(follower)?;
    let caught_up = crate::procs::wait_for(
        "the restarted follower to catch up",
        Duration::from_secs(180),
        || {
            let c = &c;
            async move {
                let st = c.status(follower).await;
                (index_of(&st, "applied_index") >= target)
                    .then(|| (t.elapsed().as_secs_f64(), index_of(&st, "snapshot_index")))
            }
        },
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    let (worst_ms, probes) = probe_task.await?;
    Ok(json!({
        "vms": BIG_VMS,
        "fill_s": round(fill_s),
        "fill_errors": errors,
        "leader_snapshot_index": snapshot_index,
        "follower_caught_up_s": round(caught_up.0),
        "follower_snapshot_index": caught_up.1,
        "longest_create_ms_during_fill_and_install": round(worst_ms),
        "probe_creates": probes,
    }))
}

pub async fn run(o: &Opts, summary: &mut Vec<String>) -> anyhow::Result<Value> {
    let pure = tokio::task::spawn_blocking(in_process).await??;
    summary.push(format!(
        "size, in process: create apply {} µs at 0 VMs, {} µs at 100,000; placement round {} ms with 10,000 pending, {} ms with 100,000; snapshot of 100,000 VMs / 10,000 hosts: {} bytes, applies wait {} ms (encoding in place; a copy would take {} ms), decode+index {} ms",
        pure["create_apply_us"]["vms_0"],
        pure["create_apply_us"]["vms_100000"],
        pure["placement_round_ms"]["pending_10000"],
        pure["placement_round_ms"]["pending_100000"],
        pure["snapshot"]["bytes"],
        pure["snapshot"]["applies_wait_ms"],
        pure["snapshot"]["a_copy_would_take_ms"],
        pure["snapshot"]["decode_and_index_ms"],
    ));
    let e2e = end_to_end(o).await?;
    let rates: Vec<String> = e2e["rounds"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| format!("{} ({} VMs before)", r["creates_per_s"], r["vms_before"]))
                .collect()
        })
        .unwrap_or_default();
    summary.push(format!(
        "size, end to end (64 clients, no hosts): creates/s by round {}; RSS with {} VMs: {}",
        rates.join(" → "),
        e2e["vms"],
        e2e["nodes"]
            .as_array()
            .map(|n| n
                .iter()
                .map(|x| format!("{} MiB", x["rss_mib"]))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    ));
    let snap = snapshot_install(o).await?;
    summary.push(format!(
        "size, snapshot install: a follower down while {} VMs were created ({} s) caught up {} s after its restart (installed the snapshot at index {}); longest sequential create meanwhile {} ms",
        snap["vms"],
        snap["fill_s"],
        snap["follower_caught_up_s"],
        snap["follower_snapshot_index"],
        snap["longest_create_ms_during_fill_and_install"],
    ));
    Ok(json!({ "in_process": pure, "end_to_end": e2e, "snapshot_install": snap }))
}
