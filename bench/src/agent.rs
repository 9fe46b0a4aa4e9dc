//! Figure 3: placement → unit active, with the real agent on a real systemd manager (a
//! simulated host of the test suite: `systemd --user` in its own namespaces and cgroups), and
//! figure 5 (agent): the idle agent's footprint with 0 and with 50 VMs.
//!
//! Each VM is created through the API (the leader), one at a time; the clock stops when the
//! host's manager signals `ActiveState=active` for `blixard-vm-NAME.service` (the benchmark
//! subscribes to the manager's `PropertiesChanged` signals itself). The VM is the agent's
//! `process` hypervisor, `/bin/sleep infinity`, so no hypervisor boot is measured. The host
//! registers the capacity the agent probed (2 vCPUs here, 8 one-vCPU VMs with the default
//! overcommit); the benchmark registers it again with 512 vCPUs so 100 VMs fit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use blixard_tests::host::SimHost;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use zbus::message::Type as MessageType;
use zbus::{MatchRule, MessageStream, OwnedVariant, Variant};

use crate::load::vm_body;
use crate::procs::{self, BlixardCluster};
use crate::stats::{round, Range};
use crate::Opts;

const HOST: &str = "bench-h1";

/// systemd's object path label escaping (`bus_label_escape`).
fn unit_path(unit: &str) -> String {
    let mut out = String::from("/org/freedesktop/systemd1/unit/");
    for (i, b) in unit.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

/// Object paths of units as they turn active, with the instant the signal arrived.
async fn watch_active(
    conn: &zbus::Connection,
) -> anyhow::Result<mpsc::Receiver<(String, Instant)>> {
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender("org.freedesktop.systemd1")
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .path_namespace("/org/freedesktop/systemd1/unit")
        .build()?;
    let mut stream = MessageStream::for_match_rule(rule, conn, None).await?;
    conn.call_method(
        Some("org.freedesktop.systemd1"),
        "/org/freedesktop/systemd1",
        Some("org.freedesktop.systemd1.Manager"),
        "Subscribe",
        &(),
    )
    .await?;
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let now = Instant::now();
            let header = msg.header();
            let Some(path) = header.path().map(|p| p.as_str().to_string()) else {
                continue;
            };
            let body = msg.body();
            let Ok((_iface, changed, _inv)) =
                body.deserialize::<(String, HashMap<String, OwnedVariant>, Vec<String>)>()
            else {
                continue;
            };
            let active = changed
                .get("ActiveState")
                .is_some_and(|v| matches!(&**v, Variant::Str(s) if s.as_str() == "active"));
            if active && tx.send((path, now)).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

pub struct Outcome {
    pub json: Value,
    pub footprint: Value,
}

pub async fn run(o: &Opts, summary: &mut Vec<String>) -> anyhow::Result<Outcome> {
    let c = BlixardCluster::start(&o.bin_dir, 3, &o.control_flags(&[])).await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let url = c.nodes[leader].url.clone();
    let mut host = SimHost::start(HOST).await?;
    host.spawn_agent(&c.urls(), "")?;
    let http = procs::http();
    let record: Value = procs::wait_for("the agent to register", Duration::from_secs(30), || {
        let (http, url) = (&http, &url);
        async move {
            let r = http
                .get(format!("{url}/v1/hosts/{HOST}"))
                .send()
                .await
                .ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.json().await.ok()
        }
    })
    .await?;
    let mut capacity = record["capacity"].clone();
    capacity["vcpus"] = json!(512);
    let reg = json!({
        "id": HOST,
        "address": record["address"],
        "capacity": capacity,
        "labels": record["labels"],
        "hypervisors": record["hypervisors"],
    });
    let r = http
        .post(format!("{url}/v1/hosts"))
        .json(&reg)
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "re-registering the host: HTTP {}",
        r.status()
    );

    let pid = host
        .agent_pid()
        .ok_or_else(|| anyhow::anyhow!("no agent pid"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, cpu0) = procs::footprint(pid, o.idle_window()).await?;
    eprintln!("  agent idle, 0 VMs: {rss0:.1} MiB RSS, {cpu0:.2}% CPU");

    let conn = host.connect().await?;
    let mut active = watch_active(&conn).await?;
    let mut lat = Vec::new();
    let mut fp50 = None;
    let mut missed = 0;
    for i in 0..o.start_vms {
        let name = format!("lat-{i}");
        let path = unit_path(&format!("blixard-vm-{name}.service"));
        let t0 = Instant::now();
        let r = http
            .post(format!("{url}/v1/vms"))
            .header("content-type", "application/json")
            .body(vm_body(&name))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().as_u16() == 201,
            "creating {name}: HTTP {}",
            r.status()
        );
        let deadline = t0 + Duration::from_secs(15);
        let mut got = None;
        while got.is_none() {
            match tokio::time::timeout_at(deadline.into(), active.recv()).await {
                Ok(Some((p, at))) if p == path => got = Some(at),
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
        match got {
            Some(at) => lat.push(at.duration_since(t0).as_micros() as u64),
            None => {
                missed += 1;
                eprintln!("  {name}: not active within 15 s");
            }
        }
        if i + 1 == 50 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (rss, cpu) = procs::footprint(pid, o.idle_window()).await?;
            eprintln!("  agent idle, 50 VMs: {rss:.1} MiB RSS, {cpu:.2}% CPU");
            fp50 = Some((rss, cpu));
        }
    }
    lat.sort_unstable();
    let p50 = crate::load::percentile_us(&lat, 50.0) / 1000.0;
    let p99 = crate::load::percentile_us(&lat, 99.0) / 1000.0;
    let ms: Vec<f64> = lat.iter().map(|u| *u as f64 / 1000.0).collect();
    summary.push(format!(
        "placement → unit active ({} VMs, one at a time): p50 {p50:.1} ms, p99 {p99:.1} ms (min {:.1}, max {:.1})",
        lat.len(),
        ms.first().copied().unwrap_or(f64::NAN),
        ms.last().copied().unwrap_or(f64::NAN)
    ));
    let fp = json!({
        "window_s": o.idle_window().as_secs_f64(),
        "vms_0": { "rss_mib": round(rss0), "cpu_percent": round(cpu0) },
        "vms_50": fp50.map(|(r, c)| json!({ "rss_mib": round(r), "cpu_percent": round(c) })),
    });
    drop(host);
    Ok(Outcome {
        json: json!({
            "vms": o.start_vms,
            "p50_ms": round(p50),
            "p99_ms": round(p99),
            "range_ms": Range::of(&ms),
            "not_active_within_15s": missed,
        }),
        footprint: fp,
    })
}
