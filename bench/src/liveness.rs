//! Figure `liveness`: what host liveness costs with 10,000 hosts, and how fast one silent
//! host is noticed among them.
//!
//! The hosts are lightweight heartbeaters inside the benchmark, not systemd managers: each is
//! registered through the API (`POST /v1/hosts` with fence timing `{lease_ms: 2000,
//! grace_ms: 500}`, as a default agent reports), then heartbeats (`POST
//! /v1/hosts/{id}/heartbeat`) every 500 ms (the agent's default interval), the hosts' beats
//! spread evenly over the interval. Host `j` sends to node `j % 3` and moves to the next node
//! after a transport error, as an agent configured with every endpoint does (a follower
//! forwards to the leader). At most `--liveness-conns` requests are in flight at once, over a
//! shared keep-alive client, so the connections are bounded too. A beat that could not be
//! sent within one interval of its due time (every sender busy) is skipped and counted: the
//! achieved rate is reported next to the target.
//!
//! Measured, in one run:
//! - create p99 without the heartbeat load (before any host registers) and with it: one
//!   closed-loop client creating VMs with a constraint no host has (so they stay pending),
//!   each deleted again untimed (a pending VM costs every placement round a check per host);
//! - over a steady window once every host is registered and leased: Raft log entries/s (the
//!   leader's `blixard_raft_last_log_index`, and the proposals by kind), heartbeats answered
//!   per second with their p50/p99 latency, failed and skipped heartbeats, the leader's CPU
//!   (utime+stime from `/proc`) and RSS, the followers' and the benchmark's own CPU;
//! - detection: a few hosts stop heartbeating; the time from the arrival of each one's last
//!   answered heartbeat until `GET /v1/hosts/{id}` on the leader says `down`.
//!
//! The control nodes run with `--rate-limit-per-sec 0`: every simulated host sends from
//! 127.0.0.1, which the per-address limit would otherwise count as one client.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::load::percentile_us;
use crate::procs::{self, BlixardCluster};
use crate::stats::round;
use crate::Opts;

const LEASE_MS: u64 = 2_000;
const GRACE_MS: u64 = 500;
/// The agent's default heartbeat interval.
const INTERVAL: Duration = Duration::from_millis(500);
/// No phase of the figure runs longer than this; the senders stop by themselves after it.
const HARD_LIMIT: Duration = Duration::from_secs(600);

/// Phases whose heartbeats are counted apart.
const WARMUP: usize = 0;
const STEADY: usize = 1;
const AFTER: usize = 2;

fn host_id(j: usize) -> String {
    format!("lv-{j:05}")
}

fn registration(j: usize) -> String {
    format!(
        r#"{{"id":"{}","address":"","capacity":{{"vcpus":64,"memory_mib":262144,"disk_gib":1000}},"labels":{{}},"hypervisors":["process"],"fence":{{"lease_ms":{LEASE_MS},"grace_ms":{GRACE_MS}}}}}"#,
        host_id(j)
    )
}

/// What the heartbeat senders share.
struct Shared {
    n: usize,
    urls: Vec<String>,
    t0: Instant,
    stop: AtomicBool,
    phase: AtomicUsize,
    registered: Vec<AtomicBool>,
    silent: Vec<AtomicBool>,
    /// Added to `j` to pick host `j`'s node; bumped after a transport error.
    node_offset: Vec<AtomicU8>,
    /// Microseconds after `t0` when host `j`'s last 200 arrived back here.
    last_ack_us: Vec<AtomicU64>,
    /// The next beat: host `seq % n`, due at `t0 + seq × interval / n`.
    next: AtomicU64,
    ok: [AtomicU64; 3],
    failed: [AtomicU64; 3],
    skipped: [AtomicU64; 3],
    /// Failures by cause (status code or transport error), all phases.
    causes: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn bump(&self, which: &[AtomicU64; 3]) {
        which[self.phase.load(Ordering::Relaxed).min(2)].fetch_add(1, Ordering::Relaxed);
    }
    fn cause(&self, c: String) {
        if let Ok(mut m) = self.causes.lock() {
            *m.entry(c).or_default() += 1;
        }
    }
}

/// One sender: takes the next due beat, waits for its time, sends it. Returns the latencies
/// (µs) of the beats answered during the steady phase.
async fn sender(s: Arc<Shared>, http: reqwest::Client) -> Vec<u32> {
    let mut lat = Vec::new();
    let step_ns = INTERVAL.as_nanos() as u64 / s.n.max(1) as u64;
    let bodyless = reqwest::header::HeaderValue::from_static("0");
    while !s.stop.load(Ordering::Relaxed) && s.t0.elapsed() < HARD_LIMIT {
        let seq = s.next.fetch_add(1, Ordering::Relaxed);
        let j = (seq % s.n as u64) as usize;
        let due = s.t0 + Duration::from_nanos(seq.saturating_mul(step_ns));
        // Wait for the beat's time even when it is not sent, so the sequence keeps pace
        // with the clock (unregistered and silent hosts hold their slots empty).
        let late = Instant::now() > due + INTERVAL;
        tokio::time::sleep_until(due.into()).await;
        if !s.registered[j].load(Ordering::Relaxed) || s.silent[j].load(Ordering::Relaxed) {
            continue;
        }
        if late {
            s.bump(&s.skipped);
            continue;
        }
        let node = (j + s.node_offset[j].load(Ordering::Relaxed) as usize) % s.urls.len();
        let sent = Instant::now();
        let r = http
            .post(format!(
                "{}/v1/hosts/{}/heartbeat",
                s.urls[node],
                host_id(j)
            ))
            .header(reqwest::header::CONTENT_LENGTH, bodyless.clone())
            .send()
            .await;
        match r {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let _ = resp.bytes().await;
                if status == 200 {
                    let done = Instant::now();
                    s.bump(&s.ok);
                    s.last_ack_us[j].store(
                        done.duration_since(s.t0).as_micros() as u64,
                        Ordering::Relaxed,
                    );
                    if s.phase.load(Ordering::Relaxed) == STEADY {
                        lat.push(done.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
                    }
                } else {
                    s.bump(&s.failed);
                    s.cause(format!("HTTP {status}"));
                }
            }
            Err(e) => {
                s.bump(&s.failed);
                s.cause(if e.is_timeout() {
                    "timeout".into()
                } else {
                    "transport".into()
                });
                s.node_offset[j].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    lat
}

/// Registers every host from 64 workers, marking each registered as soon as it is.
async fn register_all(s: Arc<Shared>, leader: String) -> (f64, u64) {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (s, next, errors, leader) = (s.clone(), next.clone(), errors.clone(), leader.clone());
        tasks.push(tokio::spawn(async move {
            let http = crate::load::client();
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= s.n || s.stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut ok = false;
                for _ in 0..5 {
                    match http
                        .post(format!("{leader}/v1/hosts"))
                        .header("content-type", "application/json")
                        .body(registration(j))
                        .send()
                        .await
                    {
                        Ok(r) => {
                            ok = r.status().is_success();
                            let _ = r.bytes().await;
                            // An HTTP answer (even a refusal) is not retried.
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                if ok {
                    s.registered[j].store(true, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (t.elapsed().as_secs_f64(), errors.load(Ordering::Relaxed))
}

/// `/metrics` of `url` as `name{labels}` → value.
async fn scrape(http: &reqwest::Client, url: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let Ok(r) = http.get(format!("{url}/metrics")).send().await else {
        return m;
    };
    let Ok(text) = r.text().await else { return m };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((k, v)) = line.rsplit_once(' ') {
            if let Ok(v) = v.parse::<f64>() {
                m.insert(k.to_string(), v);
            }
        }
    }
    m
}

fn metric_sum(m: &BTreeMap<String, f64>, name: &str) -> Option<f64> {
    let vals: Vec<f64> = m
        .iter()
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| *v)
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum())
}

/// Busy and total jiffies of the whole machine (`/proc/stat`).
fn machine_cpu() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// One closed-loop client creating pending VMs on `url` for `secs`: create latencies in µs,
/// sorted, and the count of failed creates. Each VM is deleted again (untimed).
async fn creates(url: &str, tag: &str, secs: f64) -> (Vec<u64>, u64) {
    let http = crate::load::client();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut lat, mut failed) = (Vec::new(), 0);
    let mut i = 0u64;
    // Bounded by time and by count.
    while Instant::now() < end && i < 100_000 {
        i += 1;
        let name = format!("{tag}-{i}");
        let body = format!(
            r#"{{"name":"{name}","vcpus":1,"memory_mib":64,"hypervisor":"process","constraints":{{"bench-liveness":"nowhere"}}}}"#
        );
        let t = Instant::now();
        let r = http
            .post(format!("{url}/v1/vms"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().as_u16() == 201 => {
                let _ = resp.bytes().await;
                lat.push(t.elapsed().as_micros() as u64);
                if let Ok(d) = http.delete(format!("{url}/v1/vms/{name}")).send().await {
                    let _ = d.bytes().await;
                }
            }
            Ok(resp) => {
                let _ = resp.bytes().await;
                failed += 1;
            }
            Err(_) => failed += 1,
        }
    }
    lat.sort_unstable();
    (lat, failed)
}

fn pct_ms(sorted_us: &[u64], p: f64) -> f64 {
    percentile_us(sorted_us, p) / 1000.0
}

pub async fn run(o: &Opts, summary: &mut Vec<String>) -> anyhow::Result<Value> {
    let n = o.liveness_hosts.max(1);
    let conns = o.liveness_conns.max(1);
    let window = Duration::from_secs(if o.quick { 8 } else { 20 });
    let create_secs = if o.quick { 3.0 } else { 5.0 };
    let detect_hosts = if o.quick { 1 } else { 5 }.min(n);
    let c = BlixardCluster::start(
        &o.bin_dir,
        3,
        &o.control_flags(&["--rate-limit-per-sec", "0"]),
    )
    .await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let lurl = c.nodes[leader].url.clone();
    let http = procs::http();

    // Create p99 before any host exists: no heartbeat load.
    let (base_lat, base_failed) = creates(&lurl, "lvc-base", create_secs).await;
    eprintln!(
        "  liveness: creates without heartbeat load: {} in {create_secs} s, p50 {:.2} ms, p99 {:.2} ms",
        base_lat.len(),
        pct_ms(&base_lat, 50.0),
        pct_ms(&base_lat, 99.0)
    );

    let s = Arc::new(Shared {
        n,
        urls: c.urls(),
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        phase: AtomicUsize::new(WARMUP),
        registered: (0..n).map(|_| AtomicBool::new(false)).collect(),
        silent: (0..n).map(|_| AtomicBool::new(false)).collect(),
        node_offset: (0..n).map(|_| AtomicU8::new(0)).collect(),
        last_ack_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
        next: AtomicU64::new(0),
        ok: Default::default(),
        failed: Default::default(),
        skipped: Default::default(),
        causes: Mutex::new(BTreeMap::new()),
    });
    let hb_client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_millis(LEASE_MS))
        .build()?;
    let senders: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(sender(s.clone(), hb_client.clone())))
        .collect();
    let result = measure(
        o,
        &c,
        leader,
        &lurl,
        &http,
        &s,
        window,
        create_secs,
        detect_hosts,
    )
    .await;
    s.stop.store(true, Ordering::Relaxed);
    let mut steady_lat: Vec<u64> = Vec::new();
    for t in senders {
        if let Ok(l) = t.await {
            steady_lat.extend(l.into_iter().map(u64::from));
        }
    }
    steady_lat.sort_unstable();
    let m = result?;
    let (with_lat, with_failed) = (&m.with_lat, m.with_failed);

    let target = n as f64 / INTERVAL.as_secs_f64();
    let secs = m.window_s;
    let ok_rate = m.steady_ok as f64 / secs;
    let entries_rate = m.log_entries.map_or(f64::NAN, |e| e as f64 / secs);
    let base_p99 = pct_ms(&base_lat, 99.0);
    let with_p99 = pct_ms(with_lat, 99.0);
    let ratio = with_p99 / base_p99;
    let detect_ms: Vec<f64> = m.detect.iter().filter_map(|d| d.1).collect();
    let detect_ev: Vec<f64> = m.detect.iter().filter_map(|d| d.2).collect();
    summary.push(format!(
        "liveness ({n} hosts, heartbeat every {} ms, TTL {} ms, {conns} senders): {ok_rate:.0} of {target:.0} heartbeats/s answered (p50 {:.1} ms, p99 {:.1} ms; {} failed, {} skipped in {secs:.0} s); {entries_rate:.2} log entries/s; leader {:.0}% CPU, {:.0} MiB RSS",
        INTERVAL.as_millis(),
        LEASE_MS + GRACE_MS + 500,
        pct_ms(&steady_lat, 50.0),
        pct_ms(&steady_lat, 99.0),
        m.steady_failed,
        m.steady_skipped,
        m.leader_cpu,
        m.leader_rss_mib
    ));
    summary.push(format!(
        "liveness: create p99 {with_p99:.2} ms with the heartbeat load vs {base_p99:.2} ms without ({ratio:.2}x; p50 {:.2} vs {:.2} ms); one silent host among {n} down after {} ms (GET), {} ms (event)",
        pct_ms(with_lat, 50.0),
        pct_ms(&base_lat, 50.0),
        crate::stats::Range::of(&detect_ms).show(0),
        crate::stats::Range::of(&detect_ev).show(0)
    ));
    let causes = s.causes.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(json!({
        "hosts": n,
        "interval_ms": INTERVAL.as_millis() as u64,
        "fence": { "lease_ms": LEASE_MS, "grace_ms": GRACE_MS },
        "senders": conns,
        "registration": { "seconds": round(m.reg_s), "errors": m.reg_errors },
        "steady": {
            "window_s": round(secs),
            "heartbeats_target_per_s": round(target),
            "heartbeats_answered_per_s": round(ok_rate),
            "heartbeats_counted_by_leader_per_s": m.leader_hb.map(|h| round(h / secs)),
            "heartbeat_latency_ms": {
                "p50": round(pct_ms(&steady_lat, 50.0)),
                "p99": round(pct_ms(&steady_lat, 99.0)),
                "max": round(steady_lat.last().copied().unwrap_or(0) as f64 / 1000.0),
            },
            "heartbeats_failed": m.steady_failed,
            "heartbeats_skipped_late": m.steady_skipped,
            "log_entries": m.log_entries,
            "log_entries_per_s": round(entries_rate),
            "proposals": m.proposals,
            "leased_hosts": m.leased,
            "leader_cpu_percent": round(m.leader_cpu),
            "leader_rss_mib": round(m.leader_rss_mib),
            "follower_cpu_percent": m.follower_cpu.iter().map(|c| round(*c)).collect::<Vec<_>>(),
            "bench_cpu_percent": round(m.bench_cpu),
            "machine_busy_percent": round(m.machine_busy),
            "leader_changed": m.leader_changed,
        },
        "create": {
            "without_load": { "creates": base_lat.len(), "failed": base_failed, "p50_ms": round(pct_ms(&base_lat, 50.0)), "p99_ms": round(base_p99) },
            "with_load": { "creates": with_lat.len(), "failed": with_failed, "p50_ms": round(pct_ms(with_lat, 50.0)), "p99_ms": round(with_p99) },
            "p99_ratio": round(ratio),
            "seconds_each": create_secs,
        },
        "detect_down_ms": {
            "ttl_ms": LEASE_MS + GRACE_MS + 500,
            "samples": m.detect.iter().map(|(h, d, e)| json!({ "host": h, "get_ms": d.map(round), "event_ms": e.map(round) })).collect::<Vec<_>>(),
            "range": crate::stats::Range::of(&detect_ms),
            "event_range": crate::stats::Range::of(&detect_ev),
        },
        "heartbeats_after_window": {
            "answered": s.ok[AFTER].load(Ordering::Relaxed),
            "failed": s.failed[AFTER].load(Ordering::Relaxed),
            "skipped_late": s.skipped[AFTER].load(Ordering::Relaxed),
        },
        "heartbeats_warmup": {
            "answered": s.ok[WARMUP].load(Ordering::Relaxed),
            "failed": s.failed[WARMUP].load(Ordering::Relaxed),
            "skipped_late": s.skipped[WARMUP].load(Ordering::Relaxed),
        },
        "failure_causes": causes,
    }))
}

/// What the phases after the senders started measured.
struct Measured {
    reg_s: f64,
    reg_errors: u64,
    window_s: f64,
    steady_ok: u64,
    steady_failed: u64,
    steady_skipped: u64,
    log_entries: Option<u64>,
    proposals: BTreeMap<String, f64>,
    leader_hb: Option<f64>,
    leased: Option<f64>,
    leader_cpu: f64,
    leader_rss_mib: f64,
    follower_cpu: Vec<f64>,
    bench_cpu: f64,
    machine_busy: f64,
    leader_changed: bool,
    with_lat: Vec<u64>,
    with_failed: u64,
    detect: Vec<(String, Option<f64>, Option<f64>)>,
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    o: &Opts,
    c: &BlixardCluster,
    leader: usize,
    lurl: &str,
    http: &reqwest::Client,
    s: &Arc<Shared>,
    window: Duration,
    create_secs: f64,
    detect_hosts: usize,
) -> anyhow::Result<Measured> {
    let (reg_s, reg_errors) = register_all(s.clone(), lurl.to_string()).await;
    eprintln!(
        "  liveness: {} hosts registered in {reg_s:.1} s ({reg_errors} refused)",
        s.n
    );
    // Settle: every host leased on the leader (when the metric exists), then a little more.
    let want = (s.n as u64 - reg_errors) as f64;
    let settle = Instant::now();
    let mut leased_seen = None;
    while settle.elapsed() < Duration::from_secs(20) {
        let m = scrape(http, lurl).await;
        leased_seen = m.get("blixard_leased_hosts").copied();
        match leased_seen {
            Some(l) if l >= want => break,
            None if settle.elapsed() > Duration::from_secs(3) => break,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    tokio::time::sleep(Duration::from_secs(if o.quick { 1 } else { 3 })).await;

    // The steady window.
    let lpid = c
        .pid(leader)
        .ok_or_else(|| anyhow::anyhow!("no leader pid"))?;
    let fpids: Vec<u32> = (0..c.nodes.len())
        .filter(|i| *i != leader)
        .filter_map(|i| c.pid(i))
        .collect();
    let me = std::process::id();
    let m0 = scrape(http, lurl).await;
    let (l0, f0, b0, mc0) = (
        procs::sample(lpid)?,
        fpids
            .iter()
            .map(|p| procs::sample(*p).ok())
            .collect::<Vec<_>>(),
        procs::sample(me)?,
        machine_cpu(),
    );
    s.phase.store(STEADY, Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(window).await;
    s.phase.store(AFTER, Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    let ok = s.ok[STEADY].load(Ordering::Relaxed);
    let failed = s.failed[STEADY].load(Ordering::Relaxed);
    let skipped = s.skipped[STEADY].load(Ordering::Relaxed);
    let m1 = scrape(http, lurl).await;
    let (l1, b1, mc1) = (procs::sample(lpid)?, procs::sample(me)?, machine_cpu());
    let cpu = |a: u64, b: u64| b.saturating_sub(a) as f64 / procs::TICKS_PER_SEC / secs * 100.0;
    let follower_cpu: Vec<f64> = fpids
        .iter()
        .zip(f0)
        .filter_map(|(p, a)| Some(cpu(a?.cpu_ticks, procs::sample(*p).ok()?.cpu_ticks)))
        .collect();
    let idx = |m: &BTreeMap<String, f64>| m.get("blixard_raft_last_log_index").copied();
    let log_entries = match (idx(&m0), idx(&m1)) {
        (Some(a), Some(b)) => Some((b - a).max(0.0) as u64),
        _ => None,
    };
    let mut proposals = BTreeMap::new();
    for (k, v) in m1
        .iter()
        .filter(|(k, _)| k.starts_with("blixard_raft_proposals_total"))
    {
        let d = v - m0.get(k).copied().unwrap_or(0.0);
        if d > 0.0 {
            proposals.insert(k.clone(), d);
        }
    }
    let leader_hb = match (
        metric_sum(&m0, "blixard_host_heartbeats_total"),
        metric_sum(&m1, "blixard_host_heartbeats_total"),
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let machine_busy = {
        let (busy, total) = (mc1.0.saturating_sub(mc0.0), mc1.1.saturating_sub(mc0.1));
        if total > 0 {
            busy as f64 / total as f64 * 100.0
        } else {
            f64::NAN
        }
    };
    eprintln!(
        "  liveness steady {secs:.1} s: {:.0} heartbeats/s answered ({failed} failed, {skipped} skipped), {} log entries, leader {:.0}% CPU",
        ok as f64 / secs,
        log_entries.map_or("?".into(), |e| e.to_string()),
        cpu(l0.cpu_ticks, l1.cpu_ticks)
    );

    // Create p99 under the heartbeat load.
    let (with_lat, with_failed) = creates(lurl, "lvc-load", create_secs).await;
    eprintln!(
        "  liveness: creates with heartbeat load: {} in {create_secs} s, p50 {:.2} ms, p99 {:.2} ms",
        with_lat.len(),
        pct_ms(&with_lat, 50.0),
        pct_ms(&with_lat, 99.0)
    );

    // Detection: some hosts go silent.
    let silent: Vec<usize> = (0..detect_hosts)
        .map(|k| (s.n / 2 + k * 997) % s.n)
        .filter(|j| s.registered[*j].load(Ordering::Relaxed))
        .collect();
    for j in &silent {
        s.silent[*j].store(true, Ordering::Relaxed);
    }
    // Any beat in flight when the silence began has come back by now.
    tokio::time::sleep(Duration::from_millis(LEASE_MS / 4)).await;
    let ids: Vec<String> = silent.iter().map(|j| host_id(*j)).collect();
    let lasts: Vec<Instant> = silent
        .iter()
        .map(|j| s.t0 + Duration::from_micros(s.last_ack_us[*j].load(Ordering::Relaxed)))
        .collect();
    let polls = futures::future::join_all(ids.iter().zip(&lasts).map(|(id, last)| {
        let http = http.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut seen = String::new();
            while Instant::now() < deadline {
                let st = async {
                    let r = http
                        .get(format!("{lurl}/v1/hosts/{id}"))
                        .timeout(Duration::from_secs(3))
                        .send()
                        .await
                        .map_err(|e| format!("transport: {e}"))?;
                    let code = r.status().as_u16();
                    let v: Value = r.json().await.map_err(|e| format!("HTTP {code}: {e}"))?;
                    v.get("status")
                        .and_then(Value::as_str)
                        .map(String::from)
                        .ok_or(format!("HTTP {code} without a status"))
                }
                .await;
                match st {
                    Ok(st) if st == "down" => {
                        return (Some(last.elapsed().as_secs_f64() * 1000.0), seen)
                    }
                    Ok(st) => seen = st,
                    Err(e) => seen = e,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (None, seen)
        }
    }));
    // The leader's `host_status` events for the same hosts, stamped on arrival.
    let events = async {
        let mut at: Vec<Option<f64>> = vec![None; ids.len()];
        let Ok(st) = http.get(format!("{lurl}/v1/cluster/status")).send().await else {
            return at;
        };
        let st: Value = st.json().await.unwrap_or_default();
        let mut since = st.get("applied_index").and_then(Value::as_u64).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && at.iter().any(Option::is_none) {
            let Ok(r) = http
                .get(format!("{lurl}/v1/events?since={since}&wait_ms=1000"))
                .send()
                .await
            else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let Ok(v) = r.json::<Value>().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            since = v
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(since)
                .max(since);
            for e in v
                .get("events")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let f = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
                if f("kind") == "host_status" && f("host_status") == "down" {
                    if let Some(i) = ids.iter().position(|id| id == f("host")) {
                        at[i].get_or_insert(lasts[i].elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
        }
        at
    };
    let (polls, events) = tokio::join!(polls, events);
    let mut detect = Vec::new();
    for ((id, (d, seen)), ev) in ids.iter().zip(polls).zip(events) {
        eprintln!(
            "  liveness: {id} silent, GET shows down after {} ms (last seen {seen:?}), down event after {} ms",
            d.map_or("—".into(), |d| format!("{d:.0}")),
            ev.map_or("—".into(), |d| format!("{d:.0}"))
        );
        detect.push((id.clone(), d, ev));
    }
    let leader_changed = c.wait_leader(Duration::from_secs(5)).await.ok() != Some(leader);
    Ok(Measured {
        reg_s,
        reg_errors,
        window_s: secs,
        steady_ok: ok,
        steady_failed: failed,
        steady_skipped: skipped,
        log_entries,
        proposals,
        leader_hb,
        leased: m1.get("blixard_leased_hosts").copied().or(leased_seen),
        leader_cpu: cpu(l0.cpu_ticks, l1.cpu_ticks),
        leader_rss_mib: l1.rss_kib as f64 / 1024.0,
        follower_cpu,
        bench_cpu: cpu(b0.cpu_ticks, b1.cpu_ticks),
        machine_busy,
        leader_changed,
        with_lat,
        with_failed,
        detect,
    })
}
