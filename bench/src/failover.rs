//! Figure 4: failover under load. Eight closed-loop writers spread over every node (each
//! moves to the next node when its own refuses connections); the leader is killed with
//! SIGKILL; the gap is the time from the kill until a write *sent after the kill* is
//! acknowledged. The killed node is restarted and rejoins before the next kill.
//!
//! Hosts are attached throughout: [`hostloss::HOSTS`] simulated hosts (real `systemd --user`
//! managers, each with the real agent as a unit at its default lease, 2 s) running
//! [`hostloss::VMS`] `process` VMs. An ordinary failover must cost them nothing: the figure
//! counts the VMs the agents fenced (`fencing VM` in their logs), the hosts any leader
//! declared down (its log), and the VMs whose generation moved (restarted or re-placed).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::hostloss;
use crate::load::{self, Target};
use crate::procs::{self, BlixardCluster};
use crate::stats::Range;
use crate::Opts;

const WRITERS: usize = 8;

/// The first acknowledgement of a write sent at or after `mark`.
#[derive(Default)]
struct Probe {
    mark: Option<Instant>,
    first_ack: Option<Instant>,
}

pub async fn run(o: &Opts, summary: &mut Vec<String>) -> anyhow::Result<Value> {
    let mut c = BlixardCluster::start(&o.bin_dir, 3, &o.control_flags(&[])).await?;
    let urls = c.urls();
    let http = procs::http();
    let first = c.wait_leader(Duration::from_secs(30)).await?;
    let mut hosts = Vec::new();
    for i in 0..hostloss::HOSTS {
        hosts.push(hostloss::start_host(i, &c, &http, &urls[first]).await?);
    }
    hostloss::create_vms(&http, &urls[first]).await?;
    hostloss::wait_all_running(&http, &urls[first]).await?;
    let generations_before = generations(&http, &urls[first]).await?;
    let probe = Arc::new(Mutex::new(Probe::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (urls, probe, stop, acked) = (urls.clone(), probe.clone(), stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut target = w % urls.len();
            let mut http = load::client();
            let mut seq = 0u64;
            // Bounded: the run stops it, and so does this count.
            while !stop.load(Ordering::Relaxed) && seq < 2_000_000 {
                seq += 1;
                let sent = Instant::now();
                let r = load::write_once(
                    &http,
                    Target::Blixard,
                    &urls[target],
                    &format!("f{w}-{seq}"),
                )
                .await;
                match r {
                    Ok(()) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        let now = Instant::now();
                        if let Ok(mut p) = probe.lock() {
                            if p.mark.is_some_and(|m| sent >= m)
                                && p.first_ack.is_none_or(|f| now < f)
                            {
                                p.first_ack = Some(now);
                            }
                        }
                    }
                    Err(_) => {
                        // Refused or reset: try the next node on a fresh connection.
                        target = (target + 1) % urls.len();
                        http = load::client();
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
        }));
    }

    let mut gaps = Vec::new();
    let mut failures = 0;
    for k in 0..o.kills {
        let leader = c.wait_leader(Duration::from_secs(30)).await?;
        // Make sure writes are flowing before the kill.
        let before = acked.load(Ordering::Relaxed);
        let flowing = Instant::now();
        while acked.load(Ordering::Relaxed) < before + 20 {
            if flowing.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("writes are not flowing before kill {k}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t_kill = Instant::now();
        if let Ok(mut p) = probe.lock() {
            *p = Probe {
                mark: Some(t_kill),
                first_ack: None,
            };
        }
        c.kill(leader);
        let deadline = Instant::now() + Duration::from_secs(15);
        let gap = loop {
            let first = probe.lock().ok().and_then(|p| p.first_ack);
            if let Some(f) = first {
                break Some(f.duration_since(t_kill).as_secs_f64() * 1000.0);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        match gap {
            Some(ms) => {
                eprintln!(
                    "  failover kill {k}: node {} down, writes back after {ms:.0} ms",
                    leader + 1
                );
                gaps.push(ms);
            }
            None => {
                eprintln!("  failover kill {k}: no write succeeded within 15 s");
                failures += 1;
            }
        }
        c.restart(leader)?;
        c.wait_leader(Duration::from_secs(30)).await?;
        // Let the restarted node catch up so the next kill starts from a healthy cluster.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let running_after = hostloss::wait_all_running(&http, &urls[leader])
        .await
        .is_ok();
    let generations_after = generations(&http, &urls[leader]).await?;
    let vms_moved = generations_before
        .iter()
        .filter(|(vm, g)| generations_after.get(*vm) != Some(g))
        .count();
    let fenced: usize = hosts
        .iter()
        .map(|h| h.agent_log().matches("fencing VM").count())
        .sum();
    let downs: usize = (0..c.nodes.len())
        .map(|i| c.log_text(i).matches("declaring the host down").count())
        .sum();
    drop(hosts);
    summary.push(format!(
        "failover with {} hosts and {} VMs attached: {fenced} VMs fenced, {downs} hosts declared down, {vms_moved} VMs restarted or moved{}",
        hostloss::HOSTS,
        hostloss::VMS,
        if running_after { "" } else { "; NOT every VM running afterwards" }
    ));
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let us: Vec<u64> = sorted.iter().map(|ms| (ms * 1000.0) as u64).collect();
    let p50 = load::percentile_us(&us, 50.0) / 1000.0;
    let p99 = load::percentile_us(&us, 99.0) / 1000.0;
    summary.push(format!(
        "failover ({} kills, {}): writes back after p50 {p50:.0} ms, p99 {p99:.0} ms, max {:.0} ms",
        gaps.len(),
        if o.extra_control_flags.is_empty() {
            "default timeouts: heartbeat 50 ms, election 250-500 ms".to_string()
        } else {
            o.extra_control_flags.join(" ")
        },
        sorted.last().copied().unwrap_or(f64::NAN)
    ));
    Ok(json!({
        "kills": o.kills,
        "writers": WRITERS,
        "gap_ms": {
            "p50": crate::stats::round(p50),
            "p99": crate::stats::round(p99),
            "range": Range::of(&gaps),
        },
        "samples_ms": gaps.iter().map(|g| crate::stats::round(*g)).collect::<Vec<_>>(),
        "no_recovery_within_15s": failures,
        "writes_acked": acked.load(Ordering::Relaxed),
        "hosts_attached": {
            "hosts": hostloss::HOSTS,
            "vms": hostloss::VMS,
            "vms_fenced": fenced,
            "hosts_declared_down": downs,
            "vms_restarted_or_moved": vms_moved,
            "all_running_after": running_after,
        },
    }))
}

/// Each VM's generation, from a linearizable `GET /v1/vms`.
async fn generations(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let r = http.get(format!("{url}/v1/vms")).send().await?;
    anyhow::ensure!(r.status().is_success(), "GET /v1/vms: HTTP {}", r.status());
    let v: Vec<Value> = r.json().await?;
    Ok(v.iter()
        .filter_map(|vm| {
            let name = vm.pointer("/spec/name")?.as_str()?.to_string();
            Some((name, vm.get("generation")?.as_u64()?))
        })
        .collect())
}
