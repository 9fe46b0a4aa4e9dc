//! Figure `hostloss`: a whole host dies; how long until its VMs run elsewhere.
//!
//! A 3-node control plane and [`HOSTS`] simulated hosts (real `systemd --user` managers of
//! the test suite, each with a real agent at its default settings apart from what the
//! fixture sets), [`VMS`] `process` VMs with restart policy `always` (so `on_host_loss =
//! move`). Each round kills the host running the most VMs with `SimHost::kill()` (`cgroup.kill`
//! of its whole subtree: manager, journald, bus, units, agent); the clock runs from just
//! before the kill until every VM that was on it is reported `running` on another host. The
//! benchmark watches `GET /v1/events` (a long poll on the leader, stamped on arrival) and
//! also reads when the host was declared `down` (the `host_status` event). The killed host
//! is then started again under the same name, with a fresh agent, before the next round.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blixard_tests::host::SimHost;
use serde_json::{json, Value};

use crate::procs::{self, BlixardCluster};
use crate::stats::{round, Range};
use crate::Opts;

/// Simulated hosts.
pub const HOSTS: usize = 3;
/// VMs spread over them (the agent probes 2 vCPUs: 8 one-vCPU VMs fit a host).
pub const VMS: usize = 6;
/// How long one round may take before it counts as not recovered.
const ROUND_DEADLINE: Duration = Duration::from_secs(30);

pub fn host_name(i: usize) -> String {
    format!("loss-h{}", i + 1)
}

pub fn vm_body(name: &str) -> String {
    format!(
        r#"{{"name":"{name}","vcpus":1,"memory_mib":64,"hypervisor":"process","restart_policy":"always"}}"#
    )
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `(name, host, state)` of every VM, from a linearizable `GET /v1/vms`.
async fn vms(http: &reqwest::Client, url: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let r = http.get(format!("{url}/v1/vms")).send().await?;
    anyhow::ensure!(r.status().is_success(), "GET /v1/vms: HTTP {}", r.status());
    let v: Vec<Value> = r.json().await?;
    Ok(v.iter()
        .map(|vm| {
            let s = |p: &str| {
                vm.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            (s("/spec/name"), s("/host"), s("/state"))
        })
        .collect())
}

async fn host_status(http: &reqwest::Client, url: &str, id: &str) -> Option<String> {
    let r = http.get(format!("{url}/v1/hosts/{id}")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    v.get("status")?.as_str().map(String::from)
}

/// The current log index of node `url` (events after it are new).
async fn applied_index(http: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let r = http.get(format!("{url}/v1/cluster/status")).send().await?;
    let v: Value = r.json().await?;
    v.get("applied_index")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow::anyhow!("no applied_index in the cluster status"))
}

/// Starts host `i` with its agent and waits until the cluster shows it `up`.
pub async fn start_host(
    i: usize,
    c: &BlixardCluster,
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<SimHost> {
    let name = host_name(i);
    let mut h = SimHost::start(&name).await?;
    // As production runs it: a unit of the host's manager, with its fence switch.
    h.agent_as_unit = true;
    h.spawn_agent(&c.urls(), "")?;
    procs::wait_for(
        &format!("host {name} to be up"),
        Duration::from_secs(30),
        || async { (host_status(http, url, &name).await.as_deref() == Some("up")).then_some(()) },
    )
    .await?;
    Ok(h)
}

/// Creates the [`VMS`] `process` VMs `loss-N`, restart policy `always`.
pub async fn create_vms(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    for v in 0..VMS {
        let r = http
            .post(format!("{url}/v1/vms"))
            .header("content-type", "application/json")
            .body(vm_body(&format!("loss-{v}")))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().as_u16() == 201,
            "creating loss-{v}: HTTP {}",
            r.status()
        );
    }
    Ok(())
}

/// Every VM running before the kill.
pub async fn wait_all_running(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<Vec<(String, String, String)>> {
    procs::wait_for("every VM to be running", ROUND_DEADLINE, || async {
        let mut v = vms(http, url).await.ok()?;
        // Only this figure's VMs (another figure's load may have created others).
        v.retain(|(n, _, _)| n.starts_with("loss-"));
        (v.len() == VMS && v.iter().all(|(_, h, s)| s == "running" && !h.is_empty())).then_some(v)
    })
    .await
}

/// What one kill measured.
struct Round {
    victim: String,
    moved: usize,
    replaced_ms: Option<f64>,
    down_seen_ms: Option<f64>,
    down_event_ms: Option<f64>,
}

pub async fn run(o: &Opts, summary: &mut Vec<String>) -> anyhow::Result<Value> {
    let kills = o.host_kills;
    let c = BlixardCluster::start(&o.bin_dir, 3, &o.control_flags(&[])).await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let url = c.nodes[leader].url.clone();
    let http = procs::http();
    let mut hosts: Vec<Option<SimHost>> = Vec::new();
    for i in 0..HOSTS {
        hosts.push(Some(start_host(i, &c, &http, &url).await?));
    }
    create_vms(&http, &url).await?;

    let mut rounds = Vec::new();
    for k in 0..kills {
        let before = wait_all_running(&http, &url).await?;
        let mut per_host: HashMap<&str, usize> = HashMap::new();
        for (_, h, _) in &before {
            *per_host.entry(h.as_str()).or_default() += 1;
        }
        // The host with the most VMs (ties: the lowest index).
        let Some(victim_i) = (0..HOSTS).max_by_key(|i| {
            (
                per_host.get(host_name(*i).as_str()).copied().unwrap_or(0),
                HOSTS - i,
            )
        }) else {
            anyhow::bail!("no hosts")
        };
        let victim = host_name(victim_i);
        let lost: Vec<String> = before
            .iter()
            .filter(|(_, h, _)| *h == victim)
            .map(|(n, _, _)| n.clone())
            .collect();
        let since = applied_index(&http, &url).await?;

        let t_kill = Instant::now();
        let kill_wall = wall_ms();
        if let Some(h) = hosts[victim_i].as_mut() {
            tokio::task::block_in_place(|| h.kill())?;
        }
        let kill_took = t_kill.elapsed();
        let r = watch_recovery(&http, &url, since, &victim, &lost, t_kill, kill_wall).await;
        eprintln!(
            "  hostloss kill {k}: {victim} ({} VMs, cgroup.kill {:.0} ms): down after {} ms, all running elsewhere after {} ms",
            lost.len(),
            kill_took.as_secs_f64() * 1000.0,
            r.down_seen_ms.map_or("?".into(), |d| format!("{d:.0}")),
            r.replaced_ms.map_or("—".into(), |d| format!("{d:.0}")),
        );
        rounds.push(r);
        // Replace the host: same name, fresh manager and agent.
        drop(hosts[victim_i].take());
        hosts[victim_i] = Some(start_host(victim_i, &c, &http, &url).await?);
    }
    drop(hosts);

    let ok: Vec<f64> = rounds.iter().filter_map(|r| r.replaced_ms).collect();
    let mut sorted = ok.clone();
    sorted.sort_by(f64::total_cmp);
    let us: Vec<u64> = sorted.iter().map(|ms| (ms * 1000.0) as u64).collect();
    let p50 = crate::load::percentile_us(&us, 50.0) / 1000.0;
    let p99 = crate::load::percentile_us(&us, 99.0) / 1000.0;
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    let down: Vec<f64> = rounds.iter().filter_map(|r| r.down_seen_ms).collect();
    let down_ev: Vec<f64> = rounds.iter().filter_map(|r| r.down_event_ms).collect();
    let failed = rounds.len() - ok.len();
    summary.push(format!(
        "host loss ({} kills of a whole host, {HOSTS} hosts, {VMS} VMs, default settings): its VMs running elsewhere after p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms; host declared down after {} ms{}",
        rounds.len(),
        Range::of(&down).show(0),
        if failed > 0 { format!("; {failed} rounds not recovered within 30 s") } else { String::new() }
    ));
    Ok(json!({
        "kills": rounds.len(),
        "hosts": HOSTS,
        "vms": VMS,
        "replaced_ms": {
            "p50": round(p50),
            "p99": round(p99),
            "max": round(max),
            "range": Range::of(&ok),
        },
        "declared_down_ms": {
            "seen": Range::of(&down),
            "event_time": Range::of(&down_ev),
        },
        "not_recovered_within_30s": failed,
        "rounds": rounds.iter().map(|r| json!({
            "host": r.victim,
            "vms_moved": r.moved,
            "replaced_ms": r.replaced_ms.map(round),
            "down_seen_ms": r.down_seen_ms.map(round),
            "down_event_ms": r.down_event_ms.map(round),
        })).collect::<Vec<_>>(),
    }))
}

/// Follows the leader's events from `since` until every VM of `lost` runs on another host.
async fn watch_recovery(
    http: &reqwest::Client,
    url: &str,
    mut since: u64,
    victim: &str,
    lost: &[String],
    t_kill: Instant,
    kill_wall: u64,
) -> Round {
    let ms = |t: Instant| t.duration_since(t_kill).as_secs_f64() * 1000.0;
    let mut r = Round {
        victim: victim.to_string(),
        moved: lost.len(),
        replaced_ms: None,
        down_seen_ms: None,
        down_event_ms: None,
    };
    // Where each lost VM last ran, per the events.
    let mut at: HashMap<String, (String, String)> = HashMap::new();
    let deadline = t_kill + ROUND_DEADLINE;
    while Instant::now() < deadline {
        let resp = http
            .get(format!("{url}/v1/events?since={since}&wait_ms=1000"))
            .send()
            .await;
        let now = Instant::now();
        let body: Option<Value> = match resp {
            Ok(x) if x.status().is_success() => x.json().await.ok(),
            _ => None,
        };
        let Some(body) = body else {
            // Events unavailable (e.g. trimmed): fall back to polling the VM list.
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Ok(v) = vms(http, url).await {
                let now = Instant::now();
                for (n, h, s) in v {
                    at.insert(n, (h, s));
                }
                if all_moved(&at, lost, victim) {
                    r.replaced_ms = Some(ms(now));
                    return r;
                }
            }
            continue;
        };
        since = body
            .get("index")
            .and_then(Value::as_u64)
            .unwrap_or(since)
            .max(since);
        for e in body
            .get("events")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            if s("kind") == "host_status" && s("host") == victim && s("host_status") == "down" {
                if r.down_seen_ms.is_none() {
                    r.down_seen_ms = Some(ms(now));
                }
                if let Some(t) = e.get("time_ms").and_then(Value::as_u64) {
                    r.down_event_ms
                        .get_or_insert(t.saturating_sub(kill_wall) as f64);
                }
            }
            let vm = s("vm");
            if !vm.is_empty() && !s("state").is_empty() {
                at.insert(vm, (s("host"), s("state")));
            }
        }
        if all_moved(&at, lost, victim) {
            r.replaced_ms = Some(ms(now));
            return r;
        }
    }
    r
}

fn all_moved(at: &HashMap<String, (String, String)>, lost: &[String], victim: &str) -> bool {
    lost.iter().all(|n| {
        at.get(n)
            .is_some_and(|(h, s)| s == "running" && !h.is_empty() && h != victim)
    })
}
