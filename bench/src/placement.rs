//! Figure 2: placement rate, end to end and the pure scheduler alone; figure 5 (control
//! node): the footprint of a node holding the 10,000 VMs afterwards.
//!
//! End to end: a fresh 3-node control plane, 1,000 host registrations (simulated: plain
//! `POST /v1/hosts`, no agents), then 10,000 VM creates in one burst from 256 clients. The
//! clock runs from the first create to the moment a follower's linearizable `GET /v1/vms`
//! shows every VM with a host: created, placed by the leader's scheduler, and committed.
//! The simulated hosts never heartbeat, so the nodes run with a one-hour host TTL.

use std::time::{Duration, Instant};

use blixard_control::scheduler::{self, Overcommit};
use blixard_control::state_machine::{apply, ClusterState, Command};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::load::{self, vm_body};
use crate::procs::{self, BlixardCluster};
use crate::stats::Range;
use crate::Opts;

pub const HOSTS: u64 = 1_000;
pub const VMS: u64 = 10_000;

pub fn host_body(i: u64) -> String {
    format!(
        r#"{{"id":"sim-{i:04}","address":"","capacity":{{"vcpus":64,"memory_mib":262144,"disk_gib":1000}},"labels":{{}},"hypervisors":["process"]}}"#
    )
}

#[derive(Deserialize)]
struct VmHost {
    #[serde(default)]
    host: Option<String>,
}

/// How many VMs node `url` shows, and how many of them have a host.
async fn placed(http: &reqwest::Client, url: &str) -> Option<(usize, usize)> {
    let r = http
        .get(format!("{url}/v1/vms"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let vms: Vec<VmHost> = r.json().await.ok()?;
    Some((vms.len(), vms.iter().filter(|v| v.host.is_some()).count()))
}

pub struct Outcome {
    pub json: Value,
    pub footprint: Option<Value>,
}

pub async fn run(
    o: &Opts,
    end_to_end: bool,
    footprint: bool,
    summary: &mut Vec<String>,
) -> anyhow::Result<Outcome> {
    let runs = if end_to_end { o.runs } else { 1 };
    let (mut reg_s, mut create_s, mut placed_s, mut rate) = (vec![], vec![], vec![], vec![]);
    let mut errors = 0;
    let mut fp = None;
    for run in 0..runs {
        let c = BlixardCluster::start(
            &o.bin_dir,
            3,
            &o.control_flags(&["--host-ttl-ms", "3600000"]),
        )
        .await?;
        let leader = c.wait_leader(Duration::from_secs(30)).await?;
        let url = c.nodes[leader].url.clone();
        let follower = c.nodes[(leader + 1) % c.nodes.len()].url.clone();

        let (secs, e1) = load::burst(&url, HOSTS, 64, |i| ("/v1/hosts".into(), host_body(i))).await;
        reg_s.push(secs);
        let t0 = Instant::now();
        let (secs, e2) = load::burst(&url, VMS, 256, move |i| {
            ("/v1/vms".into(), vm_body(&format!("p{run}-{i}")))
        })
        .await;
        create_s.push(secs);
        errors += e1 + e2;
        let http = procs::http();
        let want = (VMS - e2) as usize;
        let done = procs::wait_for("every VM to be placed", Duration::from_secs(120), || {
            let (http, follower) = (&http, &follower);
            async move {
                match placed(http, follower).await {
                    Some((n, p)) if n >= want && p >= n => Some(t0.elapsed().as_secs_f64()),
                    _ => {
                        tokio::time::sleep(Duration::from_millis(80)).await;
                        None
                    }
                }
            }
        })
        .await?;
        placed_s.push(done);
        rate.push(VMS as f64 / done);
        eprintln!(
            "  placement run {run}: {HOSTS} registrations {:.2} s, {VMS} creates acked {secs:.2} s, all placed {done:.2} s ({:.0}/s)",
            reg_s[run],
            VMS as f64 / done
        );
        if footprint && fp.is_none() {
            // Let the last placement round and snapshots settle, then measure idle.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut nodes = Vec::new();
            for (i, n) in c.nodes.iter().enumerate() {
                let Some(pid) = c.pid(i) else { continue };
                let (rss, cpu) = procs::footprint(pid, o.idle_window()).await?;
                nodes.push(json!({
                    "node": n.id,
                    "leader": i == leader,
                    "rss_mib": crate::stats::round(rss),
                    "cpu_percent": crate::stats::round(cpu),
                }));
            }
            fp = Some(json!({
                "vms": VMS,
                "hosts": HOSTS,
                "window_s": o.idle_window().as_secs_f64(),
                "nodes": nodes,
            }));
        }
    }
    let sched = scheduler_alone(o);
    let mut json = json!({
        "hosts": HOSTS,
        "vms": VMS,
        "scheduler_alone": sched.0,
    });
    summary.push(format!(
        "scheduler alone ({HOSTS} hosts, {VMS} pending VMs): {} placements/s",
        sched.1.show(0)
    ));
    if end_to_end {
        let r = Range::of(&rate);
        json["end_to_end"] = json!({
            "registrations_s": Range::of(&reg_s),
            "creates_acked_s": Range::of(&create_s),
            "all_placed_s": Range::of(&placed_s),
            "placements_per_s": r,
            "errors": errors,
        });
        summary.push(format!(
            "placement end to end: all {VMS} placed in {} s = {} placements/s (creates acked in {} s)",
            Range::of(&placed_s).show(2),
            r.show(0),
            Range::of(&create_s).show(2)
        ));
    }
    Ok(Outcome {
        json,
        footprint: fp,
    })
}

/// The cluster state the scheduler sees after the burst: every host up, every VM pending.
fn burst_state() -> anyhow::Result<ClusterState> {
    let mut s = ClusterState::default();
    let mut index = 0;
    for i in 0..HOSTS {
        index += 1;
        let cmd: Command = serde_json::from_str(&format!(
            r#"{{"type":"register_host","registration":{},"now_ms":1}}"#,
            host_body(i)
        ))?;
        apply(&mut s, index, &cmd);
    }
    for i in 0..VMS {
        index += 1;
        let cmd: Command = serde_json::from_str(&format!(
            r#"{{"type":"create_vm","spec":{},"now_ms":{}}}"#,
            vm_body(&format!("s-{i}")),
            1 + i
        ))?;
        apply(&mut s, index, &cmd);
    }
    Ok(s)
}

fn scheduler_alone(o: &Opts) -> (Value, Range) {
    let state = match burst_state() {
        Ok(s) => s,
        Err(e) => return (json!({ "error": e.to_string() }), Range::of(&[])),
    };
    let mut rates = Vec::new();
    let mut secs = Vec::new();
    let mut placed = 0;
    for _ in 0..o.runs.max(3) {
        let t = Instant::now();
        let (p, _) = scheduler::schedule(&state, Overcommit::default());
        let s = t.elapsed().as_secs_f64();
        placed = p.len();
        secs.push(s);
        rates.push(p.len() as f64 / s);
    }
    let r = Range::of(&rates);
    (
        json!({ "placed": placed, "seconds": Range::of(&secs), "placements_per_s": r }),
        r,
    )
}
