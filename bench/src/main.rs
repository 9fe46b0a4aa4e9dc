//! `blixard-bench`: the benchmark of issue 7. It starts everything it measures itself, on
//! loopback (temporary directories, free ports), runs each figure several times and prints
//! one JSON object of figures on stdout and a short human summary on stderr.
//!
//! Figures: `writes` (durable writes at 1/16/64/256 clients, next to a 3-member etcd),
//! `placement` (1,000 hosts + 10,000 VMs in a burst; the pure scheduler alone), `start`
//! (placement → unit active with a real agent and systemd), `failover` (kill -9 the leader
//! under load), `footprint` (RSS/CPU of an idle agent and of a control node with 10,000 VMs),
//! `hostloss` (kill a whole simulated host; time until its VMs run elsewhere) and `liveness`
//! (10,000 heartbeating hosts: log entries, heartbeat rate and latency, leader CPU, create p99
//! with and without the load, time to detect a silent host) and `stall` (1 s fsync stalls on
//! one follower under write load: leader changes, the goal being none) and `size` (costs at
//! 100,000 VMs: create rate round by round as VMs pile up, placement round time, snapshot
//! parts, RSS).
//!
//! Build with `bench/setup.sh` (etcd, then `cargo build --release` of this and the daemons);
//! run `target/release/blixard-bench` as root (the agent figures need cgroups and namespaces).
//! Every load is bounded in count and time and sends only to 127.0.0.1.
//! `BLIXARD_BENCH_LOG=<filter>` runs the control nodes at that log level and keeps their logs
//! in `/tmp/blixard-bench-n<id>.log` (to see, e.g., the election rounds of a failover).

mod agent;
mod failover;
mod hostloss;
mod liveness;
mod load;
mod placement;
mod procs;
mod size;
mod stall;
mod stats;
mod writes;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

const FIGURES: [&str; 9] = [
    "writes",
    "placement",
    "start",
    "failover",
    "footprint",
    "hostloss",
    "liveness",
    "stall",
    "size",
];

#[derive(Parser, Debug)]
#[command(
    about = "Blixard's benchmark: writes vs etcd, placement, start latency, failover, footprint, host loss, liveness at scale"
)]
struct Args {
    /// Fewer runs and shorter loads (about 3 minutes instead of 7).
    #[arg(long)]
    quick: bool,
    /// Only these figures (comma-separated): writes, placement, start, failover, footprint,
    /// hostloss, liveness, stall, size.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Runs per figure (default 3, quick 2).
    #[arg(long)]
    runs: Option<usize>,
    /// Seconds of load per concurrency level in `writes` (default 5, quick 2).
    #[arg(long)]
    write_secs: Option<f64>,
    /// Concurrency levels of `writes`.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    clients: Vec<usize>,
    /// Leader kills in `failover` (default 20, quick 6).
    #[arg(long)]
    kills: Option<usize>,
    /// Whole-host kills in `hostloss` (default 10, quick 4).
    #[arg(long)]
    host_kills: Option<usize>,
    /// Simulated hosts in `liveness` (default 10000).
    #[arg(long, default_value_t = 10_000)]
    liveness_hosts: usize,
    /// Heartbeats in flight at most in `liveness` (and so connections; default 400).
    #[arg(long, default_value_t = 400)]
    liveness_conns: usize,
    /// Skip etcd in `writes` (Blixard only).
    #[arg(long)]
    no_etcd: bool,
    /// Extra flags for every blixard-control node, e.g. "--election-timeout-min-ms 250".
    #[arg(long, allow_hyphen_values = true)]
    control_flags: Option<String>,
    /// Where blixard-control and blixard-agent are (default: beside this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Also write the JSON object to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Settings every figure reads.
#[derive(Debug, Clone)]
pub struct Opts {
    pub quick: bool,
    pub runs: usize,
    pub write_secs: f64,
    pub clients: Vec<usize>,
    pub kills: usize,
    pub host_kills: usize,
    pub liveness_hosts: usize,
    pub liveness_conns: usize,
    pub no_etcd: bool,
    pub bin_dir: PathBuf,
    pub start_vms: usize,
    pub extra_control_flags: Vec<String>,
}

impl Opts {
    /// `figure`'s own flags for the control nodes, then `--control-flags`.
    pub fn control_flags(&self, figure: &[&str]) -> Vec<String> {
        figure
            .iter()
            .map(|s| s.to_string())
            .chain(self.extra_control_flags.iter().cloned())
            .collect()
    }

    /// How long an idle process is watched for its CPU use.
    pub fn idle_window(&self) -> Duration {
        Duration::from_secs(if self.quick { 3 } else { 5 })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for f in &args.only {
        anyhow::ensure!(
            FIGURES.contains(&f.as_str()),
            "unknown figure {f:?}; known: {}",
            FIGURES.join(", ")
        );
    }
    let bin_dir = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default(),
    };
    // The agent figures find blixard-agent through the test fixtures' lookup.
    std::env::set_var("BLIXARD_BIN_DIR", &bin_dir);
    let opts = Opts {
        quick: args.quick,
        runs: args.runs.unwrap_or(if args.quick { 2 } else { 3 }).max(1),
        write_secs: args
            .write_secs
            .unwrap_or(if args.quick { 2.0 } else { 5.0 }),
        clients: args.clients.clone(),
        kills: args.kills.unwrap_or(if args.quick { 6 } else { 20 }),
        host_kills: args
            .host_kills
            .unwrap_or(if args.quick { 4 } else { 10 })
            .max(1),
        liveness_hosts: args.liveness_hosts,
        liveness_conns: args.liveness_conns,
        no_etcd: args.no_etcd,
        bin_dir,
        start_vms: 100,
        extra_control_flags: args
            .control_flags
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(String::from)
            .collect(),
    };
    let selected = |f: &str| args.only.is_empty() || args.only.iter().any(|o| o == f);
    // reqwest is built without a default TLS provider; every client needs one installed.
    blixard_api::tls::install_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let (figures, summary) = rt.block_on(async {
        let mut out = serde_json::Map::new();
        let mut summary = Vec::new();
        let mut footprint = serde_json::Map::new();
        let record = |name: &str, r: anyhow::Result<Value>, out: &mut serde_json::Map<_, _>| {
            let v = r.unwrap_or_else(|e| {
                eprintln!("{name}: {e:#}");
                json!({ "error": format!("{e:#}") })
            });
            out.insert(name.to_string(), v);
        };
        if selected("writes") {
            eprintln!("== writes");
            let r = writes::run(&opts, &mut summary).await;
            record("writes", r, &mut out);
        }
        if selected("placement") || selected("footprint") {
            eprintln!("== placement");
            let r = placement::run(
                &opts,
                selected("placement"),
                selected("footprint"),
                &mut summary,
            )
            .await;
            match r {
                Ok(p) => {
                    if selected("placement") {
                        out.insert("placement".into(), p.json);
                    }
                    if let Some(f) = p.footprint {
                        footprint.insert("control_node".into(), f);
                    }
                }
                Err(e) => record("placement", Err(e), &mut out),
            }
        }
        if selected("start") || selected("footprint") {
            eprintln!("== start latency (real agent, real systemd)");
            match agent::run(&opts, &mut summary).await {
                Ok(a) => {
                    if selected("start") {
                        out.insert("start_latency".into(), a.json);
                    }
                    footprint.insert("agent".into(), a.footprint);
                }
                Err(e) => record("start_latency", Err(e), &mut out),
            }
        }
        if selected("failover") {
            eprintln!("== failover");
            let r = failover::run(&opts, &mut summary).await;
            record("failover", r, &mut out);
        }
        if selected("hostloss") {
            eprintln!("== hostloss (kill a whole host, real agents, real systemd)");
            let r = hostloss::run(&opts, &mut summary).await;
            record("hostloss", r, &mut out);
        }
        if selected("liveness") {
            eprintln!("== liveness ({} simulated hosts)", opts.liveness_hosts);
            let r = liveness::run(&opts, &mut summary).await;
            record("liveness", r, &mut out);
        }
        if selected("stall") {
            eprintln!("== stall (fsync stalls on one follower)");
            let r = stall::run(&opts, &mut summary).await;
            record("stall", r, &mut out);
        }
        if selected("size") {
            eprintln!("== size (100,000 VMs)");
            let r = size::run(&opts, &mut summary).await;
            record("size", r, &mut out);
        }
        if selected("footprint") {
            summarise_footprint(&footprint, &mut summary);
            out.insert("footprint".into(), Value::Object(footprint));
        }
        (out, summary)
    });
    let doc = json!({
        "benchmark": "blixard-bench",
        "quick": opts.quick,
        "runs": opts.runs,
        "machine": machine(),
        "control_flags": opts.extra_control_flags,
        "elapsed_s": stats::round(started.elapsed().as_secs_f64()),
        "figures": figures,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    println!("{text}");
    if let Some(p) = &args.out {
        std::fs::write(p, format!("{text}\n"))?;
    }
    eprintln!("\n== summary ({:.0} s)", started.elapsed().as_secs_f64());
    for l in summary {
        eprintln!("{l}");
    }
    Ok(())
}

fn summarise_footprint(f: &serde_json::Map<String, Value>, summary: &mut Vec<String>) {
    if let Some(a) = f.get("agent") {
        summary.push(format!(
            "agent idle: {} MiB RSS / {}% CPU with 0 VMs, {} MiB / {}% with 50 VMs",
            a["vms_0"]["rss_mib"],
            a["vms_0"]["cpu_percent"],
            a["vms_50"]["rss_mib"],
            a["vms_50"]["cpu_percent"]
        ));
    }
    if let Some(Value::Array(nodes)) = f.get("control_node").map(|c| &c["nodes"]) {
        let parts: Vec<String> = nodes
            .iter()
            .map(|n| {
                format!(
                    "node {}{} {} MiB / {}%",
                    n["node"],
                    if n["leader"] == json!(true) {
                        " (leader)"
                    } else {
                        ""
                    },
                    n["rss_mib"],
                    n["cpu_percent"]
                )
            })
            .collect();
        summary.push(format!(
            "control nodes holding 10,000 VMs and 1,000 hosts, idle: {}",
            parts.join(", ")
        ));
    }
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| stats::round(kib / 1024.0 / 1024.0));
    json!({ "cpus": cpus, "kernel": kernel, "mem_gib": mem_gib })
}
