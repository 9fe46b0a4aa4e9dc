//! Figure 1: durable write throughput and latency, Blixard next to etcd.
//!
//! Each run starts a fresh 3-node Blixard control plane, drives it at every concurrency level,
//! stops it, then does the same with a fresh 3-member etcd, so both see the same machine
//! state and noise. Writes go to the leader of each (a client that follows redirects ends up
//! there too); every acknowledged write was fsynced by a quorum.

use std::time::Duration;

use serde_json::{json, Value};

use crate::load::{self, LoadSpec, Target};
use crate::procs::{BlixardCluster, EtcdCluster};
use crate::stats::Range;
use crate::Opts;

#[derive(Default, Clone)]
struct Series {
    ops: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    errors: u64,
}

impl Series {
    fn add(&mut self, r: &load::LoadResult) {
        self.ops.push(r.ops_per_sec());
        self.p50.push(r.pct_ms(50.0));
        self.p99.push(r.pct_ms(99.0));
        self.errors += r.errors;
    }

    fn json(&self) -> Value {
        json!({
            "ops_per_s": Range::of(&self.ops),
            "p50_ms": Range::of(&self.p50),
            "p99_ms": Range::of(&self.p99),
            "errors": self.errors,
        })
    }
}

pub async fn run(o: &Opts, summary: &mut Vec<String>) -> anyhow::Result<Value> {
    let levels = &o.clients;
    let mut blix = vec![Series::default(); levels.len()];
    let mut etcd = vec![Series::default(); levels.len()];
    for run in 0..o.runs {
        {
            let c = BlixardCluster::start(&o.bin_dir, 3, &o.control_flags(&[])).await?;
            let leader = c.wait_leader(Duration::from_secs(30)).await?;
            let url = c.nodes[leader].url.clone();
            for (li, &clients) in levels.iter().enumerate() {
                let r = load::run(&spec(Target::Blixard, &url, clients, o, run)).await;
                eprintln!(
                    "  writes run {run} blixard c={clients}: {:.0} ops/s p50 {:.2} ms p99 {:.2} ms ({} errors)",
                    r.ops_per_sec(),
                    r.pct_ms(50.0),
                    r.pct_ms(99.0),
                    r.errors
                );
                blix[li].add(&r);
            }
        }
        if o.no_etcd {
            continue;
        }
        let e = EtcdCluster::start(3).await?;
        let url = e.leader(Duration::from_secs(30)).await?;
        for (li, &clients) in levels.iter().enumerate() {
            let r = load::run(&spec(Target::Etcd, &url, clients, o, run)).await;
            eprintln!(
                "  writes run {run} etcd    c={clients}: {:.0} ops/s p50 {:.2} ms p99 {:.2} ms ({} errors)",
                r.ops_per_sec(),
                r.pct_ms(50.0),
                r.pct_ms(99.0),
                r.errors
            );
            etcd[li].add(&r);
        }
    }
    let mut rows = Vec::new();
    summary.push(format!(
        "writes ({} s per level, {} runs; ops/s median (min–max), p50/p99 ms):",
        o.write_secs, o.runs
    ));
    for (li, &clients) in levels.iter().enumerate() {
        let b = Range::of(&blix[li].ops);
        let ratio = if o.no_etcd {
            f64::NAN
        } else {
            crate::stats::round(b.median / Range::of(&etcd[li].ops).median)
        };
        summary.push(format!(
            "  {clients:>3} clients  blixard {} ops/s, {:.1}/{:.1} ms   etcd {}   ratio {ratio:.2}",
            b.show(0),
            Range::of(&blix[li].p50).median,
            Range::of(&blix[li].p99).median,
            if o.no_etcd {
                "-".to_string()
            } else {
                format!(
                    "{} ops/s, {:.1}/{:.1} ms",
                    Range::of(&etcd[li].ops).show(0),
                    Range::of(&etcd[li].p50).median,
                    Range::of(&etcd[li].p99).median
                )
            }
        ));
        rows.push(json!({
            "clients": clients,
            "blixard": blix[li].json(),
            "etcd": if o.no_etcd { Value::Null } else { etcd[li].json() },
            "ratio_blixard_over_etcd": if ratio.is_finite() { json!(ratio) } else { Value::Null },
        }));
    }
    Ok(json!({
        "seconds_per_level": o.write_secs,
        "payload": "VM spec JSON, 78-82 bytes (etcd: same bytes as the value, key /bench/vms/NAME)",
        "levels": rows,
    }))
}

fn spec(target: Target, url: &str, clients: usize, o: &Opts, run: usize) -> LoadSpec {
    LoadSpec {
        target,
        urls: vec![url.to_string()],
        clients,
        duration: Duration::from_secs_f64(o.write_secs),
        max_ops: 200_000,
        tag: format!("w{run}c{clients}"),
    }
}
