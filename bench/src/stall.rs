//! Figure: a follower with a stalling disk under write load. One follower of a 3-node cluster
//! (started with `--fault-injection`) has every commit of its Raft log delayed by
//! [`STALL_MS`] (`POST /raft/faults {"fsync_stall_ms": …}`) while eight closed-loop writers
//! create VMs on the leader and the healthy follower. Counted: leader changes and term
//! changes seen by any node (the goal is 0 of each), writes acknowledged, and how long the
//! stalled follower takes to catch up once its disk is healthy again.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::load::{self, Target};
use crate::procs::{self, BlixardCluster};
use crate::Opts;

/// How long each log commit of the stalled follower is delayed.
pub const STALL_MS: u64 = 1_000;
const WRITERS: usize = 8;

pub async fn run(o: &Opts, summary: &mut Vec<String>) -> anyhow::Result<Value> {
    let secs = if o.quick { 15 } else { 60 };
    let c = BlixardCluster::start(&o.bin_dir, 3, &o.control_flags(&["--fault-injection"])).await?;
    let urls = c.urls();
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let term_before = term(&c, leader).await.unwrap_or(0);
    let stalled = (leader + 1) % 3;
    let healthy = (leader + 2) % 3;
    set_stall(&urls[stalled], STALL_MS).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let url = urls[if w % 2 == 0 { leader } else { healthy }].clone();
        let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
        writers.push(tokio::spawn(async move {
            let http = load::client();
            let mut seq = 0u64;
            // Bounded: the run stops it, and so does this count.
            while !stop.load(Ordering::Relaxed) && seq < 2_000_000 {
                seq += 1;
                match load::write_once(&http, Target::Blixard, &url, &format!("s{w}-{seq}")).await {
                    Ok(()) => acked.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let start = Instant::now();
    let mut seen: BTreeSet<(u64, Option<u64>)> = BTreeSet::new();
    while start.elapsed() < Duration::from_secs(secs) {
        for i in 0..3 {
            let poll = tokio::time::timeout(Duration::from_millis(300), c.status(i));
            if let Ok(Some(s)) = poll.await {
                let t = s.get("term").and_then(Value::as_u64).unwrap_or(0);
                let l = s.get("leader").and_then(Value::as_u64);
                seen.insert((t, l));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    set_stall(&urls[stalled], 0).await?;
    let healed = Instant::now();
    let caught_up = procs::wait_for(
        "the stalled follower to catch up",
        Duration::from_secs(60),
        || async {
            let l = c.status(leader).await?;
            let s = c.status(stalled).await?;
            let commit = l.get("commit_index")?.as_u64()?;
            (s.get("applied_index")?.as_u64()? >= commit).then_some(())
        },
    )
    .await
    .is_ok();
    let catch_up_ms = healed.elapsed().as_secs_f64() * 1000.0;
    let term_after = term(&c, leader).await.unwrap_or(0);
    // Every (term, leader) pair seen, minus the one the run started with.
    let leaders: BTreeSet<u64> = seen.iter().filter_map(|(_, l)| *l).collect();
    let leader_changes = seen
        .iter()
        .filter(|(_, l)| l.is_some())
        .count()
        .saturating_sub(1);
    let acked = acked.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    summary.push(format!(
        "stall ({secs} s of {STALL_MS} ms fsync stalls on one follower, {WRITERS} writers): {leader_changes} leader changes, term {term_before} → {term_after}, {:.0} writes/s acknowledged, {failed} refused; follower caught up {}",
        acked as f64 / elapsed,
        if caught_up {
            format!("{catch_up_ms:.0} ms after the stall ended")
        } else {
            "NOT within 60 s".into()
        }
    ));
    Ok(json!({
        "seconds": secs,
        "stall_ms": STALL_MS,
        "writers": WRITERS,
        "leader_changes": leader_changes,
        "leaders_seen": leaders,
        "term_before": term_before,
        "term_after": term_after,
        "writes_acked": acked,
        "writes_per_sec": crate::stats::round(acked as f64 / elapsed),
        "writes_refused": failed,
        "catch_up_ms": caught_up.then(|| crate::stats::round(catch_up_ms)),
    }))
}

async fn term(c: &BlixardCluster, i: usize) -> Option<u64> {
    c.status(i).await?.get("term")?.as_u64()
}

async fn set_stall(url: &str, ms: u64) -> anyhow::Result<()> {
    let r = procs::http()
        .post(format!("{url}/raft/faults"))
        .json(&json!({ "fsync_stall_ms": ms }))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "{url}/raft/faults: HTTP {}",
        r.status()
    );
    Ok(())
}
