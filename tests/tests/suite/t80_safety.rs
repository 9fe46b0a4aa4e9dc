//! Abuse and damage, against real control nodes: per-client rate limits, a corrupted node
//! rebuilt from its peers, a full disk.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blixard_api::VmSpec;
use blixard_tests::binaries::binary;
use blixard_tests::cluster::{Cluster, ClusterOptions, AGENT_TOKENS, OPERATOR_TOKEN};
use blixard_tests::vms::{self, process_host};
use blixard_tests::wait;

/// Sends `n` requests at once from `client`; returns (succeeded, refused with 429).
async fn burst(client: &blixard_api::Client, n: usize) -> (usize, usize) {
    let calls = (0..n).map(|_| client.cluster_status());
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let limited = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .err()
                .is_some_and(|e| e.status() == Some(429) && e.code() == Some("rate_limited"))
        })
        .count();
    (ok, limited)
}

/// A low per-client limit: a burst from one operator gets 429s with `Retry-After` and the
/// error JSON, another principal (an agent) and the health probe are not affected, the
/// operator passes again once its bucket refills, refusals are counted in /metrics, and
/// `blixardctl` says what happened and exits 7.
#[tokio::test]
async fn t80_rate_limit_is_per_client() -> anyhow::Result<()> {
    let c = Cluster::start_with(
        3,
        ClusterOptions {
            secure: true,
            extra_args: ["--rate-limit-per-sec", "10", "--rate-limit-burst", "20"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        },
    )
    .await?;
    let eps = c.endpoints();
    let node0 = [eps[0].clone()];
    let op = c.client_with(&node0, Some(OPERATOR_TOKEN));

    // 100 requests at once against a burst of 20 and 10/s: most are refused.
    let (ok, limited) = burst(&op, 100).await;
    eprintln!("operator burst: {ok} passed, {limited} refused");
    assert!(ok >= 1 && limited >= 30, "{ok} passed, {limited} refused");

    // The refusal itself: 429, Retry-After, the usual error body.
    let ca = c.ca_file().ok_or_else(|| anyhow::anyhow!("no CA"))?;
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&std::fs::read(&ca)?)?)
        .build()?;
    let mut refused = None;
    for _ in 0..300 {
        let r = http
            .get(format!("{}/v1/cluster/status", eps[0]))
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await?;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.ok_or_else(|| anyhow::anyhow!("300 requests in a row and no 429"))?;
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Retry-After in {:?}", r.headers()))?;
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    let body: serde_json::Value = r.json().await?;
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("too many requests")),
        "{body}"
    );

    // Another principal, right away: an agent is not throttled by the operator's flood, and
    // neither is the (exempt) health probe.
    let (h1, t1) = AGENT_TOKENS[0];
    let agent = c.client_with(&node0, Some(t1));
    agent.register_host(&process_host(h1)).await?;
    agent.heartbeat(h1).await?;
    for _ in 0..30 {
        c.client_with(&node0, None).health().await?;
    }

    // Once the bucket refills, the operator passes again.
    wait::until(
        "the operator to be served again",
        Duration::from_secs(30),
        || async {
            match op.cluster_status().await {
                Ok(_) => Ok(Some(())),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;

    // Refusals are counted by kind of client.
    let metrics = wait::until("/metrics to answer", Duration::from_secs(30), || async {
        let r = http
            .get(format!("{}/metrics", eps[0]))
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("HTTP {}", r.status()));
        }
        r.text().await.map(Some).map_err(|e| e.to_string())
    })
    .await?;
    let counted: f64 = metrics
        .lines()
        .find(|l| l.starts_with("blixard_api_rate_limited_total{client=\"operator\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no rate-limit counter in /metrics:\n{metrics}"))?;
    assert!(counted >= 30.0, "counted {counted}");
    assert!(
        metrics.contains("status=\"429\""),
        "429s in the request counts"
    );

    // Callers without a token are limited by address: the CLI, sent without one while an
    // anonymous flood keeps that bucket empty, gets a 429 and says so.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, sent, http, url) = (
            stop.clone(),
            sent.clone(),
            http.clone(),
            format!("{}/v1/cluster/status", eps[0]),
        );
        tokio::spawn(async move {
            // Bounded: stops when told, or after 5000 requests.
            while !stop.load(Ordering::Relaxed) && sent.fetch_add(1, Ordering::Relaxed) < 5000 {
                let _ = http.get(&url).send().await;
            }
        })
    };
    let cli = tokio::task::spawn_blocking({
        let (ep, ca) = (eps[0].clone(), ca.clone());
        move || {
            for _ in 0..20 {
                let out = std::process::Command::new(binary("blixardctl"))
                    .env("BLIXARD_ENDPOINTS", &ep)
                    .env("BLIXARD_CA_FILE", &ca)
                    .env_remove("BLIXARD_TOKEN_FILE")
                    .args(["cluster", "status"])
                    .output();
                if let Ok(o) = out {
                    if o.status.code() == Some(7) {
                        return Some(String::from_utf8_lossy(&o.stderr).into_owned());
                    }
                }
            }
            None
        }
    })
    .await?;
    // The operator, a different client, is served meanwhile (once its own bucket, emptied
    // above, has a token again).
    let served = wait::until(
        "the operator to be served during the flood",
        Duration::from_secs(10),
        || async { Ok(op.cluster_status().await.ok().map(|_| ())) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    flood.await?;
    served?;
    let stderr = cli.ok_or_else(|| anyhow::anyhow!("blixardctl never exited 7 (429)"))?;
    assert!(
        stderr.contains("too many requests") && stderr.contains("retry in"),
        "{stderr}"
    );
    Ok(())
}

fn spec(name: &str) -> anyhow::Result<VmSpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "name": name, "vcpus": 1, "memory_mib": 64, "hypervisor": "process"
    }))?)
}

const DEADLINE: Duration = Duration::from_secs(60);

/// Starts node `i` and expects it to refuse, naming `file` as damaged.
async fn expect_refusal(c: &mut Cluster, i: usize, file: &str) -> anyhow::Result<()> {
    let before = c.log_text(i).len();
    c.restart(i)?;
    let status = c
        .wait_exit(i, DEADLINE)
        .await
        .ok_or_else(|| anyhow::anyhow!("node {} started on a damaged {file}", i + 1))?;
    assert!(!status.success(), "{status}");
    let log = c.log_text(i);
    let new = &log[before.min(log.len())..];
    let path = c.nodes[i].data_dir.join(file).display().to_string();
    assert!(
        new.contains(&format!("{path} is damaged")) && new.contains("rebuild this node"),
        "the error names {path}:\n{new}"
    );
    Ok(())
}

/// A node whose database is damaged refuses to start with an error naming the file; the
/// documented procedure (remove it, move its data aside, start it with `--join`, add it)
/// rebuilds it from its peers, and it then serves every acknowledged VM.
#[tokio::test]
async fn t81_corrupted_node_is_rebuilt_from_its_peers() -> anyhow::Result<()> {
    let mut c = Cluster::start_with(
        3,
        ClusterOptions {
            // So that the rebuilt node is sent a snapshot, not only log entries.
            snapshot_every: 20,
            ..Default::default()
        },
    )
    .await?;
    let client = c.client();
    let mut acked = Vec::new();
    for i in 0..40 {
        let name = format!("before-{i}");
        vms::create(&client, &spec(&name)?).await?;
        acked.push(name);
    }
    let leader = c.wait_converged(DEADLINE).await?;
    let victim = (leader + 1) % 3;
    let victim_id = c.nodes[victim].id;
    c.kill(victim);
    // Writes go on without it.
    for i in 0..10 {
        let name = format!("during-{i}");
        vms::create(&client, &spec(&name)?).await?;
        acked.push(name);
    }

    // Move what the killed node left in its write-ahead logs into the database files, so
    // that the damage below is not masked by a newer copy of the page in the WAL.
    let dir = c.nodes[victim].data_dir.clone();
    for f in ["state.db", "raft-log.db"] {
        let db = rusqlite::Connection::open(dir.join(f))?;
        db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    // One page overwritten with garbage: the second page of state.db (a B-tree page).
    let state = dir.join("state.db");
    let mut bytes = std::fs::read(&state)?;
    anyhow::ensure!(
        bytes.len() >= 3 * 4096,
        "state.db is only {} bytes",
        bytes.len()
    );
    for (k, b) in bytes[4096..8192].iter_mut().enumerate() {
        *b = (k as u8).wrapping_mul(31) ^ 0x5a;
    }
    std::fs::write(&state, &bytes)?;
    expect_refusal(&mut c, victim, "state.db").await?;
    // Truncated: raft-log.db cut in the middle of a page.
    let log = dir.join("raft-log.db");
    let len = std::fs::metadata(&log)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)?
        .set_len((len / 2).max(1000) - 7)?;
    expect_refusal(&mut c, victim, "raft-log.db").await?;

    // The procedure of README's "Operations: rebuild a node": `blixardctl cluster rebuild`
    // removes the node and waits for it; meanwhile its data goes aside and it starts with
    // --join.
    let url = c.nodes[victim].url.clone();
    let healthy: Vec<String> = (0..3)
        .filter(|i| *i != victim)
        .map(|i| c.nodes[i].url.clone())
        .collect();
    let cli = tokio::task::spawn_blocking({
        let (eps, id, url) = (healthy.join(","), victim_id.to_string(), url.clone());
        move || {
            std::process::Command::new(binary("blixardctl"))
                .env("BLIXARD_ENDPOINTS", eps)
                .args(["cluster", "rebuild", &id, &url, "--timeout", "120"])
                .output()
        }
    });
    wait::until("the damaged node to be removed", DEADLINE, || async {
        let members = client.members().await.map_err(|e| e.to_string())?;
        Ok(members.iter().all(|m| m.id != victim_id).then_some(()))
    })
    .await?;
    let aside = dir.with_extension("damaged");
    std::fs::rename(&dir, &aside)?;
    c.set_join(victim, true);
    c.restart(victim)?;
    let out = cli.await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "blixardctl cluster rebuild: {stderr}");
    assert!(
        stderr.contains(&format!("removed node {victim_id}")),
        "{stderr}"
    );
    let members = client.members().await?;
    assert!(
        members
            .iter()
            .any(|m| m.id == victim_id && m.role == "voter"),
        "{members:?}"
    );
    wait::until(
        "the rebuilt node to know 3 members and a leader",
        DEADLINE,
        || async {
            let s = c.status(victim).await.ok_or("silent")?;
            Ok((s.members.len() == 3 && s.leader.is_some()).then_some(()))
        },
    )
    .await?;
    // A write after the rebuild, then every acknowledged VM read through the rebuilt node
    // (reads are linearizable: read index through the leader, then applied here).
    vms::create(&client, &spec("after")?).await?;
    acked.push("after".into());
    let rebuilt = c.node_client(victim);
    let vms = rebuilt.list_vms().await?;
    let names: std::collections::BTreeSet<&str> =
        vms.iter().map(|v| v.spec.name.as_str()).collect();
    for name in &acked {
        assert!(
            names.contains(name.as_str()),
            "{name} missing on the rebuilt node"
        );
        assert_eq!(rebuilt.get_vm(name).await?.spec.name, *name);
    }
    assert_eq!(vms.len(), acked.len(), "no VM twice, none invented");
    // The damaged files are kept aside for a post-mortem.
    assert!(aside.join("state.db").exists());
    Ok(())
}

/// A tmpfs mounted on a temporary directory for the length of a test, unmounted on drop.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: std::path::PathBuf, size: &str) -> anyhow::Result<SmallDisk> {
        std::fs::create_dir_all(&path)?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mounting a tmpfs on {} (the test needs root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(SmallDisk { path })
    }

    /// Fills the file system with one file until it says it is full.
    fn fill(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join("filler"))?;
        let block = vec![0u8; 64 * 1024];
        loop {
            match f.write_all(&block).and_then(|_| f.sync_data()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn free(&self) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.path.join("filler"))?)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// A create whose outcome is recorded: `Ok(true)` acknowledged, `Ok(false)` refused or
/// unknown; every call must return (no hang).
async fn try_create(client: &blixard_api::Client, spec: &VmSpec) -> bool {
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(60), client.create_vm(spec)).await;
    assert!(r.is_ok(), "a create hung for {:?}", started.elapsed());
    matches!(r, Ok(Ok(_)))
}

/// Writes VMs with a long command line until node `i` exits (its disk is full), at most
/// `max`; returns the acknowledged names.
async fn write_until_exit(
    c: &mut Cluster,
    i: usize,
    prefix: &str,
    max: usize,
) -> anyhow::Result<Vec<String>> {
    let client = c.client();
    let mut acked = Vec::new();
    for k in 0..max {
        let name = format!("{prefix}-{k}");
        let mut s = spec(&name)?;
        s.cmdline = Some("x".repeat(4000));
        if try_create(&client, &s).await {
            acked.push(name);
        }
        if k % 10 == 9 {
            if let Some(status) = c.wait_exit(i, Duration::ZERO).await {
                assert!(!status.success(), "node {} exited with {status}", i + 1);
                eprintln!(
                    "node {} exited ({status}) after {} writes, {} acknowledged",
                    i + 1,
                    k + 1,
                    acked.len()
                );
                return Ok(acked);
            }
        }
    }
    anyhow::bail!(
        "node {} never failed after {max} large writes:\n{}",
        i + 1,
        c.log_tail(i)
    )
}

/// Restarts node `i` and waits until it serves every name in `acked`.
async fn rejoin_and_check(c: &mut Cluster, i: usize, acked: &[String]) -> anyhow::Result<()> {
    c.restart(i)?;
    c.wait_converged(DEADLINE).await?;
    let node = c.node_client(i);
    wait::until(
        "the node to serve every acknowledged VM",
        DEADLINE,
        || async {
            let vms = node.list_vms().await.map_err(|e| e.to_string())?;
            let names: std::collections::BTreeSet<&str> =
                vms.iter().map(|v| v.spec.name.as_str()).collect();
            Ok(acked
                .iter()
                .all(|n| names.contains(n.as_str()))
                .then_some(()))
        },
    )
    .await
}

/// Each node's data directory on its own small tmpfs. The leader's disk fills: its Raft
/// core stops on the storage error and the process exits non-zero with a clear message;
/// clients get errors (no hang) and then a new leader. Then a follower's disk fills: it
/// exits the same way while the others go on. Each is restarted after space is freed,
/// rejoins and serves every acknowledged VM.
#[tokio::test]
async fn t82_full_disk_fails_cleanly_and_loses_nothing() -> anyhow::Result<()> {
    let base = tempfile::Builder::new()
        .prefix("blixard-disks-")
        .tempdir()?;
    let disks = (1..=3)
        .map(|i| SmallDisk::mount(base.path().join(format!("n{i}")), "24m"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut c = Cluster::start_with(
        3,
        ClusterOptions {
            data_dirs: disks.iter().map(|d| d.path.join("data")).collect(),
            ..Default::default()
        },
    )
    .await?;
    let client = c.client();
    let mut acked = Vec::new();
    for k in 0..10 {
        let name = format!("before-{k}");
        vms::create(&client, &spec(&name)?).await?;
        acked.push(name);
    }

    for role in ["leader", "follower"] {
        let leader = c.wait_converged(DEADLINE).await?;
        let full = if role == "leader" {
            leader
        } else {
            (leader + 1) % 3
        };
        eprintln!("filling the disk of node {} ({role})", full + 1);
        disks[full].fill()?;
        acked.extend(write_until_exit(&mut c, full, role, 2000).await?);
        let log = c.log_text(full);
        assert!(
            log.contains("raft stopped on a fatal error") && log.contains("full"),
            "node {} says why it stopped:\n{}",
            full + 1,
            c.log_tail(full)
        );
        // The two others go on.
        let name = format!("{role}-after");
        vms::create(&client, &spec(&name)?).await?;
        acked.push(name);
        disks[full].free()?;
        rejoin_and_check(&mut c, full, &acked).await?;
    }
    // Every acknowledged VM on every node, none twice.
    for i in 0..3 {
        let vms = c.node_client(i).list_vms().await?;
        let names: std::collections::BTreeSet<&str> =
            vms.iter().map(|v| v.spec.name.as_str()).collect();
        assert_eq!(names.len(), vms.len(), "a VM twice on node {}", i + 1);
        for n in &acked {
            assert!(names.contains(n.as_str()), "{n} lost on node {}", i + 1);
        }
    }
    drop(c);
    Ok(())
}
