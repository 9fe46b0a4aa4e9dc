//! Control-plane cluster tests: real `blixard-control` processes on loopback.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use blixard_api::{AddMember, Client, Hypervisor, PlacementStrategy, RestartPolicy, VmSpec};
use blixard_tests::cluster::{Cluster, ClusterOptions};
use blixard_tests::{vms, wait};

const DEADLINE: Duration = Duration::from_secs(30);

fn spec(name: &str) -> VmSpec {
    VmSpec {
        on_host_loss: None,
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        hypervisor: Hypervisor::Process,
        kernel: None,
        initrd: None,
        cmdline: None,
        disks: vec![],
        nics: vec![],
        restart_policy: RestartPolicy::Always,
        constraints: Default::default(),
        labels: Default::default(),
        anti_affinity: None,
        strategy: PlacementStrategy::Spread,
        max_restarts: None,
        restart_window_secs: None,
        task: None,
    }
}

#[tokio::test]
async fn t10_formation_and_membership_on_every_node() -> anyhow::Result<()> {
    let start = Instant::now();
    let c = Cluster::start(3).await?;
    eprintln!("formation took {:?}", start.elapsed());
    for i in 0..3 {
        let s = c
            .status(i)
            .await
            .ok_or_else(|| anyhow::anyhow!("node {i} silent"))?;
        let ids: BTreeSet<u64> = s.members.iter().map(|m| m.id).collect();
        assert_eq!(ids, BTreeSet::from([1, 2, 3]), "node {}", i + 1);
        assert!(s.members.iter().all(|m| m.role == "voter"));
        assert!(s.term >= 1);
    }
    let h = c.node_client(0).health().await?;
    assert_eq!(h.status, "ok");
    Ok(())
}

#[tokio::test]
async fn t11_write_on_follower_reads_back_on_every_node() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let leader = c.wait_converged(DEADLINE).await?;
    let follower = (leader + 1) % 3;
    let vm = c.node_client(follower).create_vm(&spec("web-1")).await?;
    assert_eq!(vm.spec.name, "web-1");
    // Read-after-write, on every node at once.
    let reads = (0..3).map(|i| {
        let client = c.node_client(i);
        async move { client.get_vm("web-1").await }
    });
    for (i, r) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(r?.spec.name, "web-1", "node {}", i + 1);
    }
    for i in 0..3 {
        let names: Vec<String> = c
            .node_client(i)
            .list_vms()
            .await?
            .into_iter()
            .map(|v| v.spec.name)
            .collect();
        assert_eq!(names, vec!["web-1"]);
    }
    Ok(())
}

#[tokio::test]
async fn t12_leader_kill_elects_new_leader_and_old_one_catches_up() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let client = c.client();
    vms::create(&client, &spec("before")).await?;
    let old = c.wait_converged(DEADLINE).await?;
    let killed_at = Instant::now();
    c.kill(old);
    let new = c.wait_converged(DEADLINE).await?;
    assert_ne!(new, old);
    vms::create(&client, &spec("after")).await?;
    eprintln!(
        "leader kill → write accepted again: {:?}",
        killed_at.elapsed()
    );
    c.restart(old)?;
    // The old leader rejoins and serves both writes from its own state.
    wait::until("old leader to catch up", DEADLINE, || async {
        let s = c.status(old).await.ok_or("not answering")?;
        let leader = c.status(new).await.ok_or("leader not answering")?;
        Ok((s.leader.is_some() && s.applied_index >= leader.commit_index).then_some(()))
    })
    .await?;
    let names: Vec<String> = c
        .node_client(old)
        .list_vms()
        .await?
        .into_iter()
        .map(|v| v.spec.name)
        .collect();
    assert_eq!(names, vec!["after", "before"]);
    Ok(())
}

#[tokio::test]
async fn t13_remove_and_add_members() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let client = c.client();
    let leader = c.wait_converged(DEADLINE).await?;
    let victim = (leader + 2) % 3;
    let victim_id = c.nodes[victim].id;
    let members = client.remove_member(victim_id).await?;
    assert_eq!(members.len(), 2);
    c.kill(victim);
    for i in (0..3).filter(|i| *i != victim) {
        wait::until("membership without the removed node", DEADLINE, || async {
            let s = c.status(i).await.ok_or("silent")?;
            let ids: BTreeSet<u64> = s.members.iter().map(|m| m.id).collect();
            Ok((!ids.contains(&victim_id) && ids.len() == 2).then_some(()))
        })
        .await?;
    }
    // Writes still work with two voters.
    vms::create(&client, &spec("two-voters")).await?;

    // A new node started with --join becomes a voter.
    let j = c.spawn_joiner()?;
    let (id, url) = (c.nodes[j].id, c.nodes[j].url.clone());
    let members = client.add_member(&AddMember { id, addr: url }).await?;
    assert!(
        members.iter().any(|m| m.id == id && m.role == "voter"),
        "{members:?}"
    );
    wait::until(
        "the joiner to report 3 members and the data",
        DEADLINE,
        || async {
            let s = c.status(j).await.ok_or("silent")?;
            Ok((s.members.len() == 3 && s.leader.is_some()).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        c.node_client(j).get_vm("two-voters").await?.spec.name,
        "two-voters"
    );
    // Refusals.
    assert_eq!(
        client
            .remove_member(99)
            .await
            .err()
            .and_then(|e| e.status()),
        Some(404)
    );
    let dup = client
        .add_member(&AddMember {
            id,
            addr: "http://127.0.0.1:1".into(),
        })
        .await;
    assert_eq!(dup.err().and_then(|e| e.status()), Some(409));
    Ok(())
}

#[tokio::test]
async fn t14_node_down_across_snapshots_catches_up() -> anyhow::Result<()> {
    let mut c = Cluster::start_with(
        3,
        ClusterOptions {
            snapshot_every: 20,
            ..Default::default()
        },
    )
    .await?;
    let leader = c.wait_converged(DEADLINE).await?;
    let down = (leader + 1) % 3;
    c.kill(down);
    let client = c.client();
    for i in 0..120 {
        vms::create(&client, &spec(&format!("vm-{i}"))).await?;
    }
    let s = c
        .status(leader)
        .await
        .ok_or_else(|| anyhow::anyhow!("leader silent"))?;
    assert!(s.snapshot_index > 0, "the leader took no snapshot: {s:?}");
    c.restart(down)?;
    wait::until(
        "the restarted node to catch up",
        Duration::from_secs(60),
        || async {
            let s = c.status(down).await.ok_or("silent")?;
            let l = c.status(leader).await.ok_or("leader silent")?;
            Ok((s.applied_index >= l.commit_index && s.snapshot_index > 0).then_some(()))
        },
    )
    .await?;
    assert_eq!(c.node_client(down).list_vms().await?.len(), 120);
    Ok(())
}

/// Kills the leader again and again while clients write; every acknowledged create must exist
/// exactly once afterwards, and every killed node must reopen its store and rejoin.
#[tokio::test]
async fn t15_kill_during_writes_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let endpoints = c.endpoints();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = Client::new(&endpoints)?;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0;
            // Bounded: at most 400 attempts per writer, and stops when told.
            while n < 400 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("w{w}-{n}");
                n += 1;
                if client.create_vm(&spec(&name)).await.is_ok() {
                    acked.push(name);
                }
            }
            acked
        }));
    }
    for _round in 0..3 {
        let leader = c.wait_converged(DEADLINE).await?;
        // Let some writes land on this leader first.
        let before = c.status(leader).await.map(|s| s.commit_index).unwrap_or(0);
        wait::until("writes to progress", DEADLINE, || async {
            let s = c.status(leader).await.ok_or("silent")?;
            Ok((s.commit_index > before + 20).then_some(()))
        })
        .await?;
        c.kill(leader);
        c.wait_converged(DEADLINE).await?;
        c.restart(leader)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await?);
    }
    c.wait_converged(DEADLINE).await?;
    let names: BTreeSet<String> = c
        .client()
        .list_vms()
        .await?
        .into_iter()
        .map(|v| v.spec.name)
        .collect();
    for a in &acked {
        assert!(names.contains(a), "acknowledged create {a} was lost");
    }
    eprintln!("{} acknowledged creates, all present", acked.len());
    Ok(())
}

/// A follower whose disk stalls every log commit for a second (under write load) must not
/// depose the healthy leader: it hears the leader on arrival, not after its fsync, and it asks
/// the others before it campaigns (a pre-vote), who still hear the leader and say no.
#[tokio::test]
async fn t18_fsync_stalls_on_a_follower_never_depose_the_leader() -> anyhow::Result<()> {
    let c = Cluster::start_with(
        3,
        ClusterOptions {
            fault_injection: true,
            ..Default::default()
        },
    )
    .await?;
    let leader = c.wait_converged(DEADLINE).await?;
    let term = c.status(leader).await.map(|s| s.term).unwrap_or(0);
    let stalled = (leader + 1) % 3;
    c.set_faults(stalled, &[], 1_000).await?;
    // Load on the leader for a bounded time and count, while the follower's disk stalls.
    let load_for = Duration::from_secs(6);
    let leader_url = c.nodes[leader].url.clone();
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = Client::new(std::slice::from_ref(&leader_url))?;
        writers.push(tokio::spawn(async move {
            let start = Instant::now();
            let (mut ok, mut n) = (0u32, 0u32);
            while n < 5_000 && start.elapsed() < load_for {
                n += 1;
                if client.create_vm(&spec(&format!("s{w}-{n}"))).await.is_ok() {
                    ok += 1;
                }
            }
            (ok, n)
        }));
    }
    let mut changes = Vec::new();
    let watch_start = Instant::now();
    let mut polls = 0;
    while watch_start.elapsed() < load_for {
        polls += 1;
        for i in 0..3 {
            // The stalled node answers slowly: a poll that takes too long is skipped.
            let poll = tokio::time::timeout(Duration::from_millis(300), c.status(i));
            if let Ok(Some(s)) = poll.await {
                if s.term != term || s.leader != Some(c.nodes[leader].id) {
                    changes.push(format!(
                        "node {} at {:?}: term {} leader {:?}",
                        i + 1,
                        watch_start.elapsed(),
                        s.term,
                        s.leader
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ok, mut tried) = (0, 0);
    for w in writers {
        let (o, n) = w.await?;
        ok += o;
        tried += n;
    }
    c.set_faults(stalled, &[], 0).await?;
    eprintln!(
        "{ok} of {tried} creates acknowledged with node {} stalled; term {term}, {polls} polls",
        stalled + 1
    );
    assert!(
        changes.is_empty(),
        "the leader was deposed or a term changed: {changes:?}\n{}",
        c.log_tail(stalled)
    );
    assert_eq!(ok, tried, "every create on the healthy leader succeeds");
    // The stalled follower catches up once its disk is healthy again.
    wait::until("the stalled follower to catch up", DEADLINE, || async {
        let s = c.status(stalled).await.ok_or("not answering")?;
        let l = c.status(leader).await.ok_or("leader not answering")?;
        if s.applied_index >= l.commit_index && s.term == term {
            Ok(Some(()))
        } else {
            Err(format!("follower {s:?}, leader {l:?}"))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn t16_api_rejects_bad_input() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let base = &c.endpoints()[1];
    let http = reqwest::Client::new();
    let good = r#"{"name":"ok-1","vcpus":1,"memory_mib":64,"hypervisor":"process"}"#;
    let res = http
        .post(format!("{base}/v1/vms"))
        .header("content-type", "application/json")
        .body(good)
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let big = format!(
        r#"{{"name":"x","vcpus":1,"memory_mib":64,"cmdline":"{}"}}"#,
        "a".repeat(100_000)
    );
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "POST",
            "/v1/vms",
            r#"{"name":"Bad_Name","vcpus":1,"memory_mib":64,"hypervisor":"process"}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"a","vcpus":0,"memory_mib":64,"hypervisor":"process"}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"a","vcpus":1,"memory_mib":999999999999,"hypervisor":"process"}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"a","vcpus":1,"memory_mib":64,"hypervisor":"process","x":1}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"a","vcpus":-1,"memory_mib":64}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"a", "#.into(),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"t","vcpus":1,"memory_mib":64,"hypervisor":"process","task":{"timeout_secs":0}}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"t","vcpus":1,"memory_mib":64,"hypervisor":"process","task":{"retries":1}}"#.into(),
            400,
            "invalid_argument",
        ),
        ("POST", "/v1/vms", big, 413, "payload_too_large"),
        ("POST", "/v1/vms", good.into(), 409, "already_exists"),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"k","vcpus":1,"memory_mib":64,"kernel":"../../etc/shadow"}"#.into(),
            400,
            "invalid_argument",
        ),
        ("GET", "/v1/vms/nope", String::new(), 404, "not_found"),
        (
            "GET",
            "/v1/vms/NOPE..",
            String::new(),
            400,
            "invalid_argument",
        ),
        ("DELETE", "/v1/vms/nope", String::new(), 404, "not_found"),
        ("POST", "/v1/vms/nope/stop", String::new(), 404, "not_found"),
        ("GET", "/v1/hosts/nope", String::new(), 404, "not_found"),
        (
            "POST",
            "/v1/hosts",
            r#"{"id":"h1","capacity":{"vcpus":0,"memory_mib":1,"disk_gib":1}}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/hosts/nope/heartbeat",
            String::new(),
            404,
            "not_found",
        ),
        (
            "GET",
            "/v1/hosts/h1/assignments?wait_index=x",
            String::new(),
            400,
            "invalid_argument",
        ),
        (
            "DELETE",
            "/v1/cluster/members/abc",
            String::new(),
            400,
            "invalid_argument",
        ),
        ("GET", "/v1/no-such-route", String::new(), 404, "not_found"),
        ("PATCH", "/v1/vms", String::new(), 405, "invalid_argument"),
    ];
    for (method, path, body, status, code) in cases {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = http.request(m, format!("{base}{path}"));
        if !body.is_empty() {
            req = req.header("content-type", "application/json").body(body);
        }
        let res = req.send().await?;
        let got = res.status().as_u16();
        let v: serde_json::Value = res.json().await.unwrap_or_default();
        assert_eq!(got, status, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], code, "{method} {path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{method} {path}: {v}"
        );
    }
    // The cluster is still healthy after all that.
    assert_eq!(c.node_client(0).health().await?.status, "ok");
    Ok(())
}

/// `blixardctl` writing to a pipe whose reader has gone (`blixardctl vm list | head -1`)
/// exits 0 without a word, and `--wait` into a file (not a terminal) prints plain lines.
#[tokio::test]
async fn t17_cli_output_to_a_closed_pipe_and_to_a_file() -> anyhow::Result<()> {
    use std::process::{Command, Stdio};
    let c = Cluster::start(1).await?;
    let client = c.client();
    vms::create(&client, &spec("cli-1")).await?;
    let ctl = blixard_tests::binaries::binary("blixardctl");
    let endpoints = c.endpoints().join(",");
    for args in [
        &["vm", "list"][..],
        &["vm", "list", "-o", "json"],
        &["vm", "show", "cli-1"],
    ] {
        // the read end is closed before the CLI starts: its first write gets EPIPE
        let (read, write) = nix::unistd::pipe()?;
        drop(read);
        let out = Command::new(&ctl)
            .env("BLIXARD_ENDPOINTS", &endpoints)
            .args(args)
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "blixardctl {} into a closed pipe: {} {stderr}",
            args.join(" "),
            out.status
        );
    }
    // no host runs VMs, so this waits out its timeout: exit 6, progress on stderr
    let out = Command::new(&ctl)
        .env("BLIXARD_ENDPOINTS", &endpoints)
        .args(["vm", "create", "cli-2", "--vcpus", "1", "--memory", "64"])
        .args(["--hypervisor", "process", "--wait", "--timeout", "1"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(6),
        "--wait should time out: {stderr}"
    );
    assert!(
        stderr.contains("cli-2: pending") && !stderr.contains('\r') && !stderr.contains('\u{1b}'),
        "--wait into a non-terminal must print plain lines: {stderr:?}"
    );
    Ok(())
}

/// A follower forwards a create and the leader dies after running it, before answering: the
/// client gets 504 `outcome_unknown` (not 500 "internal", not a success it cannot prove), and
/// the create it was told may have happened did happen.
#[tokio::test]
async fn t19_leader_dying_with_a_forwarded_write_answers_outcome_unknown() -> anyhow::Result<()> {
    let mut c = Cluster::start_with(
        3,
        ClusterOptions {
            fault_injection: true,
            ..Default::default()
        },
    )
    .await?;
    let leader = c.wait_converged(DEADLINE).await?;
    let follower = (leader + 1) % 3;
    c.set_crash_point(leader, "forward_answered").await?;
    let via_follower = c.node_client(follower);
    let err = via_follower
        .create_vm(&spec("in-flight"))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the create succeeded although the leader died"))?;
    assert_eq!(
        (err.status(), err.code()),
        (Some(504), Some(blixard_api::codes::OUTCOME_UNKNOWN)),
        "{err}"
    );
    c.kill(leader);
    let new = c.wait_converged(DEADLINE).await?;
    assert_ne!(new, leader);
    let vm = wait::until("the in-flight create to be readable", DEADLINE, || async {
        Ok(via_follower.get_vm("in-flight").await.ok())
    })
    .await?;
    assert_eq!(vm.spec.name, "in-flight");
    Ok(())
}
