//! Tasks: VMs that run once to completion, with real control nodes, real `systemd --user`
//! hosts and real agents. `process` tasks that exit 0, exit 3 and outlive their timeout
//! (enforced by the host's systemd), read back from every control node after a leader kill;
//! a QEMU test-guest task through `blixardctl vm run`, which prints the guest's console and
//! exits with the guest's status; a task whose host is killed mid-run (`failed: host lost`,
//! or run again elsewhere when its spec allows, never two copies at once); retention.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use blixard_agent::systemd::{Systemd, SystemdClient};
use blixard_api::{unit_name, Client, TaskEndReason, TaskOutcome, Vm, VmSpec, VmState};
use blixard_tests::binaries::binary;
use blixard_tests::cluster::{Cluster, ClusterOptions};
use blixard_tests::guest;
use blixard_tests::host::SimHost;
use blixard_tests::vms::{self, wait_registered, with_logs, DEADLINE};
use blixard_tests::wait;
use tokio::io::AsyncBufReadExt;

/// The `process` hypervisor of these hosts: `BLIXARD_CMDLINE` is `SECONDS STATUS`; the
/// program prints a line, sleeps, prints another and exits with the status.
const TASK_COMMAND: &str = r#"set -- $BLIXARD_CMDLINE; echo "task $BLIXARD_VM started"; sleep "$1"; echo "task $BLIXARD_VM done"; exit "$2""#;

fn agent_extra() -> String {
    format!("process_command = [\"/bin/sh\", \"-c\", {TASK_COMMAND:?}]\n")
}

/// A `process` task that sleeps `secs` and exits `status`; `task` holds its task fields.
fn task(name: &str, secs: &str, status: u8, task: serde_json::Value) -> VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 64,
        "hypervisor": "process",
        "cmdline": format!("{secs} {status}"),
        "task": task,
    }))
    .unwrap_or_else(|e| panic!("spec {name}: {e}"))
}

/// Waits until `vm` is a finished task, as `c` sees it.
async fn wait_finished(c: &Client, vm: &str) -> anyhow::Result<Vm> {
    wait::until(&format!("task {vm} finished"), DEADLINE, || async {
        match c.get_vm(vm).await {
            Ok(v) if v.task_finished() => Ok(Some(v)),
            Ok(v) => Err(format!(
                "{} on {:?}: {:?}",
                v.state.as_str(),
                v.host,
                v.reason
            )),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Exit 0, exit 3 and a timeout: each result is recorded through Raft, with the host, times,
/// status and console, and every control node reads the same after the leader is killed.
/// The timeout is the host's: the unit is gone from its systemd when the result is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t95_process_tasks_record_results_readable_from_every_node() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("th1").await?;
    host.spawn_agent(&cluster.endpoints(), &agent_extra())?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let created = now_ms();
    with_logs(&[&host], async {
        wait_registered(&client, "th1", 1).await?;
        vms::create(&client, &task("ok", "0.2", 0, serde_json::json!({}))).await?;
        vms::create(&client, &task("three", "0.2", 3, serde_json::json!({}))).await?;
        vms::create(
            &client,
            &task("slow", "600", 0, serde_json::json!({"timeout_secs": 2})),
        )
        .await?;
        for vm in ["ok", "three", "slow"] {
            wait_finished(&client, vm).await?;
        }
        // systemd ended the slow one: nothing of it is left on the host.
        assert!(sd.unit_status(&unit_name("slow")).await?.is_none());
        Ok(())
    })
    .await?;

    let old = cluster.wait_converged(DEADLINE).await?;
    cluster.kill(old);
    let new = cluster.wait_converged(DEADLINE).await?;
    assert_ne!(new, old);
    cluster.restart(old)?;
    for i in 0..3 {
        let c = cluster.node_client(i);
        let ok = wait_finished(&c, "ok").await?;
        let three = wait_finished(&c, "three").await?;
        let slow = wait_finished(&c, "slow").await?;
        let cases = [
            (
                &ok,
                TaskOutcome::Succeeded,
                TaskEndReason::Exited,
                Some(0),
                "succeeded: exited with status 0",
            ),
            (
                &three,
                TaskOutcome::Failed,
                TaskEndReason::Exited,
                Some(3),
                "failed: exited with status 3",
            ),
            (
                &slow,
                TaskOutcome::Failed,
                TaskEndReason::TimedOut,
                None,
                "failed: timed out after 2 s",
            ),
        ];
        for (vm, outcome, reason, status, summary) in cases {
            let name = &vm.spec.name;
            let r = vm.task_result.as_ref().context("a result")?;
            assert_eq!(
                (r.outcome, r.reason, r.exit_status, r.summary().as_str()),
                (outcome, reason, status, summary),
                "{name} on node {i}"
            );
            assert_eq!(vm.reason.as_deref(), Some(summary), "{name}");
            assert_eq!(vm.host, None, "{name}: a finished task leaves its host");
            assert_eq!(r.host.as_deref(), Some("th1"), "{name}");
            let started = r.started_ms.context("a start time")?;
            assert!(created <= started && started <= r.ended_ms, "{name}: {r:?}");
            assert!(
                r.console
                    .iter()
                    .any(|l| l == &format!("task {name} started")),
                "{name}'s console: {:?}",
                r.console
            );
            let done = r.console.iter().any(|l| l == &format!("task {name} done"));
            assert_eq!(done, name != "slow", "{name}'s console: {:?}", r.console);
        }
        let r = slow.task_result.as_ref().context("a result")?;
        assert!(
            r.ended_ms - r.started_ms.unwrap_or(0) >= 1500,
            "the slow task ran its 2 s: {r:?}"
        );
        // Every node has the same records.
        assert_eq!(
            ok.task_result,
            cluster.node_client(new).get_vm("ok").await?.task_result
        );
    }
    Ok(())
}

/// `blixardctl vm run` of the real QEMU test guest: it prints the guest's console while it
/// runs, exits with the status the guest reported (`BLIXARD-TASK-EXIT=7` on its console), and
/// with `--rm` deletes the task once its result was printed. Prints the time from `vm run` to
/// the guest's first console line and to the recorded result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t96_vm_run_of_a_qemu_guest_exits_with_the_guests_status() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let client = cluster.client();
    let mut host = SimHost::start("tq1").await?;
    guest::install(&host)?;
    // Top-level keys first: agent_config() ends inside the [hypervisors] table. The agent
    // API serves the console `vm run` follows.
    let extra = format!("api_listen = \"127.0.0.1:0\"\n{}", guest::agent_config());
    host.spawn_agent(&cluster.endpoints(), &extra)?;
    wait_registered(&client, "tq1", 1).await?;
    let args = [
        "vm",
        "run",
        "guest-task",
        "--memory",
        "128",
        "--kernel",
        "vmlinuz",
        "--initrd",
        "initrd.gz",
        "--cmdline",
        "console=ttyS0 reboot=t panic=-1 quiet blixard.sleep=2 blixard.status=7",
        "--timeout",
        "5m",
        "--rm",
    ];
    let mut cmd = tokio::process::Command::new(binary("blixardctl"));
    cmd.env("BLIXARD_ENDPOINTS", cluster.endpoints().join(","))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("starting blixardctl vm run")?;
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    let read_out = async {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut all = Vec::new();
        let mut first_line = None;
        let mut marker = None;
        while let Some(l) = lines.next_line().await? {
            first_line.get_or_insert(t0.elapsed());
            if l.contains(guest::MARKER) {
                marker.get_or_insert(t0.elapsed());
            }
            all.push(l);
        }
        Ok::<_, anyhow::Error>((all, first_line, marker))
    };
    let read_err = async {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut all = Vec::new();
        let mut result_at = None;
        while let Some(l) = lines.next_line().await? {
            if l.starts_with("task guest-task ") && l.contains("exited with status") {
                result_at.get_or_insert(t0.elapsed());
            }
            all.push(l);
        }
        Ok::<_, anyhow::Error>((all, result_at))
    };
    let all = async {
        let (out, err) = tokio::join!(read_out, read_err);
        let status = tokio::time::timeout(Duration::from_secs(180), child.wait()).await??;
        Ok::<_, anyhow::Error>((out?, err?, status))
    };
    let ((out, first_line, marker), (err, result_at), status) = with_logs(&[&host], async {
        tokio::time::timeout(Duration::from_secs(240), all)
            .await
            .context("vm run did not end within 240 s")?
    })
    .await?;
    let exited = t0.elapsed();
    let text = out.join("\n");
    anyhow::ensure!(
        status.code() == Some(7),
        "vm run exited {status:?}\nstdout:\n{text}\nstderr:\n{}",
        err.join("\n")
    );
    assert!(text.contains(guest::MARKER), "the guest's console: {text}");
    assert!(
        text.contains("BLIXARD-TASK-EXIT=7"),
        "the guest's console: {text}"
    );
    assert!(
        err.iter()
            .any(|l| l.starts_with("task guest-task failed: exited with status 7 (ran ")),
        "stderr: {err:?}"
    );
    // The console was followed while the guest ran (it sleeps 2 s after its marker), not
    // only printed from the result at the end.
    let (marker, result_at) = (
        marker.context("no marker")?,
        result_at.context("no result")?,
    );
    assert!(
        marker + Duration::from_secs(1) < result_at,
        "the marker came only with the result: marker {marker:?}, result {result_at:?}"
    );
    eprintln!(
        "vm run printed:\n{text}\nand on stderr:\n{}",
        err.join("\n")
    );
    eprintln!(
        "vm run → first console line {first_line:?}, guest marker {marker:?}, result printed \
         {result_at:?}, vm run exited {exited:?}"
    );
    // --rm: deleted once the result was printed.
    let gone = client.get_vm("guest-task").await;
    assert!(
        matches!(&gone, Err(e) if e.is_not_found()),
        "after --rm: {gone:?}"
    );
    Ok(())
}

/// A task whose host is killed mid-run ends `failed: host lost` and is never started again;
/// one whose spec allows it runs again on the other host, only after the killed host's copy
/// is gone (the whole host died with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t97_a_task_on_a_lost_host_fails_or_runs_again_once() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let client = cluster.client();
    let mut h1 = SimHost::start("tl1").await?;
    let mut h2 = SimHost::start("tl2").await?;
    h1.spawn_agent(&cluster.endpoints(), &agent_extra())?;
    let sd1 = Systemd::connect_address(&h1.bus_address()).await?;
    let sd2 = Systemd::connect_address(&h2.bus_address()).await?;
    with_logs(&[&h1], async {
        wait_registered(&client, "tl1", 1).await?;
        vms::create(&client, &task("once", "600", 0, serde_json::json!({}))).await?;
        vms::create(
            &client,
            &task(
                "again",
                "600",
                0,
                serde_json::json!({"rerun_on_host_loss": true}),
            ),
        )
        .await?;
        for vm in ["once", "again"] {
            vms::wait_state(&client, vm, VmState::Running, Some("tl1")).await?;
        }
        Ok(())
    })
    .await?;
    for vm in ["once", "again"] {
        assert!(sd1.unit_status(&unit_name(vm)).await?.is_some());
    }
    h2.spawn_agent(&cluster.endpoints(), &agent_extra())?;
    wait_registered(&client, "tl2", 1).await?;
    h1.kill()?;
    let killed = Instant::now();
    with_logs(&[&h2], async {
        let once = wait_finished(&client, "once").await?;
        let r = once.task_result.as_ref().context("a result")?;
        assert_eq!(
            (r.outcome, r.reason),
            (TaskOutcome::Failed, TaskEndReason::HostLost)
        );
        assert_eq!(r.summary(), "failed: host tl1 lost");
        assert_eq!(r.host.as_deref(), Some("tl1"));
        let again = vms::wait_state(&client, "again", VmState::Running, Some("tl2")).await?;
        eprintln!(
            "host killed → once failed, again running on tl2 after {:?}",
            killed.elapsed()
        );
        assert!(again.task_result.is_none(), "{again:?}");
        // The one that may not run twice never started on the other host.
        assert!(sd2.unit_status(&unit_name("once")).await?.is_none());
        assert!(sd2.unit_status(&unit_name("again")).await?.is_some());
        let once = client.get_vm("once").await?;
        assert_eq!((once.state, once.host), (VmState::Failed, None));
        Ok(())
    })
    .await
}

/// A finished task is deleted once its retention (`--task-retention-secs`) has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t98_finished_tasks_are_collected_after_their_retention() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(
        1,
        ClusterOptions {
            extra_args: vec!["--task-retention-secs".into(), "2".into()],
            ..Default::default()
        },
    )
    .await?;
    let client = cluster.client();
    let mut host = SimHost::start("tr1").await?;
    host.spawn_agent(&cluster.endpoints(), &agent_extra())?;
    with_logs(&[&host], async {
        wait_registered(&client, "tr1", 1).await?;
        vms::create(&client, &task("brief", "0", 0, serde_json::json!({}))).await?;
        vms::create(&client, &vms::process_spec("service", 64)).await?;
        let vm = wait_finished(&client, "brief").await?;
        let ended = vm.task_result.as_ref().map(|r| r.ended_ms).unwrap_or(0);
        wait::until("brief collected", DEADLINE, || async {
            match client.get_vm("brief").await {
                Err(e) if e.is_not_found() => Ok(Some(())),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
        let after = now_ms().saturating_sub(ended);
        assert!(after >= 2000, "collected {after} ms after its end");
        // A long-running VM is no task: it stays.
        client.get_vm("service").await?;
        Ok(())
    })
    .await
}
