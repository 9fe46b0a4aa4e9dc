//! `blixardctl` against real control nodes: every exit code its `--help` documents, the
//! top-level shape of its `-o json` output, `host drain --wait` followed to the end, and
//! `cluster status` saying whose view it prints.
//!
//! The host here is a test acting as an agent through the real API (it registers,
//! heartbeats and reports VM states): the CLI is what is tested, and a real agent would only
//! make each step slower to arrange. Exit 7 (rate limited) is covered by
//! `t80_rate_limit_is_per_client`, which needs a flood of its own.

use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::Context;
use blixard_api::{Client, TaskEnd, TaskEndReason, VmState, VmStatusReport};
use blixard_tests::binaries::binary;
use blixard_tests::cluster::{free_port, Cluster, ClusterOptions};
use blixard_tests::vms::{self, process_host, process_spec, wait_state, DEADLINE};
use blixard_tests::wait;
use tokio::io::{AsyncBufReadExt, BufReader};

/// `blixardctl ARGS…` against `endpoints`, run to its end within [`DEADLINE`].
async fn ctl(endpoints: &[String], args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = command(endpoints, args);
    tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .with_context(|| format!("blixardctl {args:?} did not finish within {DEADLINE:?}"))?
        .context("running blixardctl")
}

fn command(endpoints: &[String], args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary("blixardctl"));
    cmd.env("BLIXARD_ENDPOINTS", endpoints.join(","))
        .env_remove("BLIXARD_TOKEN_FILE")
        .env_remove("BLIXARD_CA_FILE")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Host `id` registered by the test, kept up by heartbeats until dropped.
struct FakeHost {
    beat: tokio::task::JoinHandle<()>,
}

impl FakeHost {
    async fn start(client: Client, id: &str) -> anyhow::Result<FakeHost> {
        client.register_host(&process_host(id)).await?;
        let id = id.to_string();
        let beat = tokio::spawn(async move {
            loop {
                let _ = client.heartbeat(&id).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Ok(FakeHost { beat })
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        self.beat.abort();
    }
}

/// Reports, as the host's agent would, that `vm` reached `state` (at its current generation).
async fn report(
    client: &Client,
    host: &str,
    vm: &str,
    state: VmState,
    task_end: Option<TaskEnd>,
) -> anyhow::Result<()> {
    let generation = client.get_vm(vm).await?.generation;
    let r = VmStatusReport {
        state,
        reason: None,
        generation,
        task_end,
    };
    client.report_vm_status(host, vm, &r).await?;
    Ok(())
}

/// `vm run NAME` while the test plays its host: it waits until the task is placed on `host`,
/// reports it running and then ended with `end`, and returns the CLI's exit status.
async fn run_task(
    c: &Cluster,
    client: &Client,
    host: &str,
    name: &str,
    end: TaskEnd,
) -> anyhow::Result<Option<i32>> {
    let child = command(
        &c.endpoints(),
        &[
            "vm",
            "run",
            name,
            "--hypervisor",
            "process",
            "--memory",
            "64",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    wait_state(client, name, VmState::Scheduled, Some(host)).await?;
    report(client, host, name, VmState::Running, None).await?;
    let failed = end.reason != TaskEndReason::Exited || end.exit_status != Some(0);
    let state = if failed {
        VmState::Failed
    } else {
        VmState::Stopped
    };
    report(client, host, name, state, Some(end)).await?;
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .with_context(|| format!("vm run {name} did not end"))??;
    eprintln!("vm run {name}: {}\n{}", out.status, text(&out.stderr));
    Ok(out.status.code())
}

/// Reads `lines` until one is `want`, within [`DEADLINE`]; `seen` keeps what was read.
async fn expect_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    seen: &mut Vec<String>,
    want: &str,
) -> anyhow::Result<()> {
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(l) = lines.next_line().await? {
            seen.push(l.clone());
            if l == want {
                return Ok::<_, std::io::Error>(true);
            }
        }
        Ok(false)
    })
    .await;
    anyhow::ensure!(
        matches!(found, Ok(Ok(true))),
        "no line {want:?} in {seen:?}"
    );
    Ok(())
}

fn end(reason: TaskEndReason, exit_status: Option<i32>) -> TaskEnd {
    TaskEnd {
        reason,
        exit_status,
        detail: None,
        console: vec![],
    }
}

/// Every exit code `blixardctl --help` lists, each from a real situation (7 aside: see the
/// module doc), and `vm run`'s, from task ends the test reports as the host.
#[tokio::test]
async fn t55_every_documented_exit_code() -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    let client = c.client();
    let eps = c.endpoints();
    let _h1 = FakeHost::start(c.client(), "h1").await?;
    vms::create(&client, &process_spec("cli-dup", 64)).await?;
    let nobody = vec![format!("http://127.0.0.1:{}", free_port()?)];
    // A node started with --join and never added: it answers, but knows no leader (503).
    let j = c.spawn_joiner()?;
    let joiner = vec![c.nodes[j].url.clone()];
    let joiner_client = c.node_client(j);
    wait::until("the joiner to answer", DEADLINE, || async {
        match joiner_client.health().await {
            Err(blixard_api::ClientError::Unreachable(e)) => Err(e),
            _ => Ok(Some(())),
        }
    })
    .await?;
    let cases: &[(&[String], &[&str], i32, &str)] = &[
        (&eps, &["cluster", "status"], 0, ""),
        // refused: locally (an invalid name), and by the cluster (400)
        (
            &eps,
            &["vm", "create", "Not_A_Label", "--hypervisor", "process"],
            1,
            "",
        ),
        (&eps, &["host", "show", "Not_A_Label"], 1, ""),
        // usage: an unknown command, a zero duration
        (&eps, &["vm", "frobnicate"], 2, ""),
        (
            &eps,
            &["host", "drain", "h1", "--wait", "--timeout", "0"],
            2,
            "",
        ),
        // --timeout without --wait would be ignored: refused before anything is drained
        (
            &eps,
            &["host", "drain", "h1", "--timeout", "5"],
            2,
            "--wait",
        ),
        // not found
        (&eps, &["vm", "show", "nope"], 3, "nope"),
        (&eps, &["host", "drain", "nope", "--wait"], 3, "nope"),
        // conflict: exists already
        (
            &eps,
            &["vm", "create", "cli-dup", "--hypervisor", "process"],
            4,
            "",
        ),
        // unreachable, and without a leader
        (&nobody, &["vm", "list"], 5, ""),
        (&joiner, &["vm", "list"], 5, ""),
        // --wait timed out: placed on h1, which never reports it running
        (
            &eps,
            &[
                "vm",
                "create",
                "cli-slow",
                "--hypervisor",
                "process",
                "--memory",
                "64",
                "--wait",
                "--timeout",
                "1",
            ],
            6,
            "timed out",
        ),
    ];
    for (endpoints, args, code, says) in cases {
        let out = ctl(endpoints, args).await?;
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "blixardctl {}: {stderr}{}",
            args.join(" "),
            text(&out.stdout)
        );
        if *code != 0 {
            assert!(
                !stderr.is_empty() && stderr.contains(says),
                "blixardctl {} must say why it failed ({says:?}): {stderr:?}",
                args.join(" ")
            );
        }
    }
    // `vm run` exits with its task's status.
    let runs = [
        ("task-ok", end(TaskEndReason::Exited, Some(0)), 0),
        ("task-3", end(TaskEndReason::Exited, Some(3)), 3),
        ("task-sig", end(TaskEndReason::Exited, None), 1),
        ("task-slow", end(TaskEndReason::TimedOut, None), 124),
        ("task-lost", end(TaskEndReason::HostLost, None), 125),
        ("task-bad", end(TaskEndReason::CouldNotStart, None), 126),
    ];
    for (name, e, code) in runs {
        let got = run_task(&c, &client, "h1", name, e).await?;
        assert_eq!(got, Some(code), "vm run {name}");
    }
    Ok(())
}

/// `-o json` of `vm list`, `vm show`, `host list` and `cluster status` is JSON of the
/// documented shape: lists are arrays of objects, a VM has `spec.name`, `state`, `desired`
/// and `generation`, a host `id`, `status` and `capacity`, the status its node, leader,
/// term, members and `view: "local"`.
#[tokio::test]
async fn t56_json_output_shapes() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    let client = c.client();
    let eps = c.endpoints();
    let _h1 = FakeHost::start(c.client(), "h1").await?;
    vms::create(&client, &process_spec("json-1", 64)).await?;
    let json = |out: &Output| -> anyhow::Result<serde_json::Value> {
        anyhow::ensure!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("not JSON: {}", text(&out.stdout)))
    };
    let is_vm = |v: &serde_json::Value| {
        v["spec"]["name"].is_string()
            && v["state"].is_string()
            && v["desired"].is_string()
            && v["generation"].is_u64()
    };

    let list = json(&ctl(&eps, &["vm", "list", "-o", "json"]).await?)?;
    let vms = list.as_array().context("vm list: an array")?;
    assert!(
        vms.iter().all(is_vm) && vms.iter().any(|v| v["spec"]["name"] == "json-1"),
        "{list}"
    );

    let show = json(&ctl(&eps, &["vm", "show", "json-1", "-o", "json"]).await?)?;
    assert!(
        is_vm(&show) && show["spec"]["name"] == "json-1" && show["host"] == "h1",
        "{show}"
    );

    let hosts = json(&ctl(&eps, &["host", "list", "-o", "json"]).await?)?;
    let hosts = hosts.as_array().context("host list: an array")?;
    assert!(
        hosts.iter().any(|h| h["id"] == "h1"
            && h["status"] == "up"
            && h["capacity"]["vcpus"].is_u64()
            && h["last_heartbeat_ms"].is_u64()),
        "{hosts:?}"
    );

    let status = json(&ctl(&eps, &["cluster", "status", "-o", "json"]).await?)?;
    assert!(
        status["node_id"].is_u64()
            && status["leader"] == status["node_id"]
            && status["term"].is_u64()
            && status["state"] == "leader"
            && status["members"].as_array().is_some_and(|m| m.len() == 1)
            && status["view"] == "local"
            && status["leader_lease_ms"].is_u64(),
        "{status}"
    );
    Ok(())
}

/// `host drain --wait` follows the drain to the end: it says how many VMs are left and which
/// (plain lines, stderr not being a terminal), exits 6 past `--timeout` naming what is left
/// and why, and 0 once the host's last VM has gone.
#[tokio::test]
async fn t57_host_drain_wait_follows_the_drain_to_the_end() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    let client = c.client();
    let eps = c.endpoints();
    let _h1 = FakeHost::start(c.client(), "h1").await?;
    let names = ["dw-a", "dw-b", "dw-c"];
    for n in names {
        vms::create(&client, &process_spec(n, 64)).await?;
        wait_state(&client, n, VmState::Scheduled, Some("h1")).await?;
    }

    // Nobody confirms the stops: the wait runs out.
    let out = ctl(&eps, &["host", "drain", "h1", "--wait", "--timeout", "1"]).await?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("host h1: 3 VMs left (dw-a, dw-b, dw-c)")
            && stderr.contains("timed out after 1s waiting for host h1 to drain")
            && stderr.contains("dw-a (stopping: host h1 draining; moving)")
            && !stderr.contains('\r')
            && !stderr.contains('\u{1b}'),
        "{stderr:?}"
    );

    // Again, and this time the host confirms one stop after another.
    let mut child = command(&eps, &["host", "drain", "h1", "--wait", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    expect_line(
        &mut lines,
        &mut seen,
        "host h1: 3 VMs left (dw-a, dw-b, dw-c)",
    )
    .await?;
    report(&client, "h1", "dw-b", VmState::Stopped, None).await?;
    expect_line(&mut lines, &mut seen, "host h1: 2 VMs left (dw-a, dw-c)").await?;
    report(&client, "h1", "dw-a", VmState::Stopped, None).await?;
    expect_line(&mut lines, &mut seen, "host h1: 1 VM left (dw-c)").await?;
    report(&client, "h1", "dw-c", VmState::Stopped, None).await?;
    expect_line(&mut lines, &mut seen, "host h1: drained, no VMs left").await?;
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .context("drain --wait did not end")??;
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("h1") && stdout.contains("draining"),
        "{stdout}"
    );
    for n in names {
        let vm = client.get_vm(n).await?;
        assert_ne!(vm.host.as_deref(), Some("h1"), "{vm:?}");
    }

    // Undrained, the host takes its VMs back; a drain undone while --wait follows it fails.
    client.undrain_host("h1").await?;
    for n in names {
        wait_state(&client, n, VmState::Scheduled, Some("h1")).await?;
    }
    let mut child = command(&eps, &["host", "drain", "h1", "--wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    expect_line(
        &mut lines,
        &mut seen,
        "host h1: 3 VMs left (dw-a, dw-b, dw-c)",
    )
    .await?;
    client.undrain_host("h1").await?;
    expect_line(
        &mut lines,
        &mut seen,
        "blixardctl: host h1 was undrained, with 3 VMs still on it",
    )
    .await?;
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .context("drain --wait did not end")??;
    assert_eq!(out.status.code(), Some(1), "{seen:?}");
    Ok(())
}

/// `cluster status` says it is the answering node's own view, and a leader cut off from the
/// others (which still believes it leads) is labelled as such: no quorum has acknowledged it
/// within its lease.
#[tokio::test]
async fn t58_cluster_status_is_the_answering_nodes_view() -> anyhow::Result<()> {
    let c = Cluster::start_with(
        3,
        ClusterOptions {
            fault_injection: true,
            ..Default::default()
        },
    )
    .await?;
    let leader = c.wait_converged(DEADLINE).await?;
    let url = |i: usize| vec![c.nodes[i].url.clone()];
    // A healthy node's view carries no warning (waited for: a loaded machine may delay a
    // heartbeat past the tests' short lease now and then).
    let healthy = |i: usize| {
        let (endpoint, id) = (url(i), c.nodes[i].id);
        async move {
            wait::until(
                &format!("node {id}'s status without a warning"),
                DEADLINE,
                || async {
                    let out = ctl(&endpoint, &["cluster", "status"])
                        .await
                        .map_err(|e| e.to_string())?;
                    let stdout = text(&out.stdout);
                    if !out.status.success() {
                        return Err(format!("{}{stdout}", text(&out.stderr)));
                    }
                    assert!(
                        stdout.contains(&format!("as seen by node {id} (local view")),
                        "{stdout}"
                    );
                    Ok((!stdout.contains("warning")).then_some(()))
                },
            )
            .await
        }
    };
    for i in 0..3 {
        healthy(i).await?;
    }
    // Cut the leader off both ways; the others elect another.
    let me = c.nodes[leader].id;
    let others: Vec<u64> = c.nodes.iter().map(|n| n.id).filter(|i| *i != me).collect();
    c.set_isolated(leader, &others).await?;
    for i in (0..3).filter(|i| *i != leader) {
        c.set_isolated(i, &[me]).await?;
    }
    let follower = (leader + 1) % 3;
    wait::until("the others to elect a new leader", DEADLINE, || async {
        let s = c.status(follower).await.ok_or("no answer")?;
        Ok(s.leader.filter(|l| *l != me).map(|_| ()))
    })
    .await?;
    let cut_off = wait::until("the cut-off node's status to warn", DEADLINE, || async {
        let out = ctl(&url(leader), &["cluster", "status"])
            .await
            .map_err(|e| e.to_string())?;
        let stdout = text(&out.stdout);
        Ok(stdout.contains("warning").then_some(stdout))
    })
    .await?;
    assert!(
        cut_off.contains(&format!("as seen by node {me}")),
        "{cut_off}"
    );
    let json = ctl(&url(leader), &["cluster", "status", "-o", "json"]).await?;
    let s: blixard_api::ClusterStatus = serde_json::from_slice(&json.stdout)?;
    assert_eq!(s.view, blixard_api::StatusView::Local);
    assert_eq!(s.leader_contact_recent(), Some(false), "{s:?}");
    eprintln!("cut-off node {me}: {cut_off}");
    eprintln!("cut-off node {me} says it is {}", s.state);
    // The nodes that still form a quorum see no reason to warn.
    healthy(follower).await?;
    Ok(())
}
