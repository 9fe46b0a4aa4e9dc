//! Agent tests against real systemd managers: simulated hosts (`blixard_tests::host`) whose
//! `systemd --user` manager the agent's zbus adapter drives, and real agents on them.

use std::time::{Duration, Instant};

use blixard_agent::config::VmUnitConfig;
use blixard_agent::reconcile::describe_end;
use blixard_agent::systemd::{
    StartOutcome, StopOutcome, Systemd, SystemdClient, SystemdError, UnitEvent, UnitEvents,
};
use blixard_agent::unit_spec::{self, UnitSpec};
use blixard_api::{unit_name, VmSpec, VmState};
use blixard_tests::binaries::binary;
use blixard_tests::cluster::Cluster;
use blixard_tests::host::{get_property, SimHost};
use blixard_tests::vms::{self, wait_registered, wait_state as wait_vm_state, with_logs};
use blixard_tests::wait;
use zbus::{OwnedVariant, Variant};

const DEADLINE: Duration = Duration::from_secs(30);
const MIB: u64 = 1024 * 1024;

/// A process VM that is never restarted by the cluster, from JSON so that fields the API
/// adds later (all optional) need no change here.
fn spec(name: &str) -> VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 64,
        "hypervisor": "process",
        "restart_policy": "never",
    }))
    .unwrap_or_else(|e| panic!("spec {name}: {e}"))
}

/// A process VM restarted by the cluster whatever its end, moved or fenced on host loss
/// (`on_host_loss = move`, the default) or never fenced (`stay`).
fn spec_with(name: &str, on_host_loss: &str) -> VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 64,
        "hypervisor": "process",
        "restart_policy": "always",
        "on_host_loss": on_host_loss,
    }))
    .unwrap_or_else(|e| panic!("spec {name}: {e}"))
}

/// A lease long enough for an agent killed in a test to be restarted within it on a loaded
/// machine.
const LONG_LEASE: &str = "lease_ms = 15000\n";

/// Waits until the dead man's switch runs on the host's manager.
async fn wait_fence_unit(sd: &Systemd) -> anyhow::Result<u32> {
    wait_active(sd, "blixard-fence.service").await
}

fn unit_for(name: &str, argv: &[&str]) -> anyhow::Result<UnitSpec> {
    let argv = argv.iter().map(|s| s.to_string()).collect();
    Ok(unit_spec::build_with_argv(
        &spec(name),
        argv,
        &VmUnitConfig::default(),
    )?)
}

/// The object path of a loaded unit.
async fn unit_path(conn: &zbus::Connection, unit: &str) -> anyhow::Result<String> {
    let reply = conn
        .call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "GetUnit",
            &(unit,),
        )
        .await?;
    let path: zbus::OwnedObjectPath = reply.body().deserialize()?;
    Ok(path.as_str().to_string())
}

async fn prop(
    conn: &zbus::Connection,
    unit: &str,
    iface: &str,
    name: &str,
) -> anyhow::Result<OwnedVariant> {
    let path = unit_path(conn, unit).await?;
    get_property(conn, &path, iface, name).await
}

fn as_u64(v: &OwnedVariant) -> Option<u64> {
    match &**v {
        Variant::U64(x) => Some(*x),
        _ => None,
    }
}

fn as_str(v: &OwnedVariant) -> Option<String> {
    match &**v {
        Variant::Str(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Waits for an event that `pick` accepts, keeping the rest.
async fn next_event<T>(
    events: &mut UnitEvents,
    what: &str,
    mut pick: impl FnMut(&UnitEvent) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| anyhow::anyhow!("timed out waiting for {what}"))?
            .ok_or_else(|| anyhow::anyhow!("event stream ended waiting for {what}"))?;
        if let Some(t) = pick(&ev) {
            return Ok(t);
        }
    }
}

async fn wait_active(sd: &Systemd, unit: &str) -> anyhow::Result<u32> {
    wait::until(&format!("{unit} active"), DEADLINE, || async {
        match sd.unit_status(unit).await {
            Ok(Some(s)) if s.active_state == "active" && s.main_pid > 0 => Ok(Some(s.main_pid)),
            Ok(s) => Err(format!("{s:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

async fn wait_gone(sd: &Systemd, unit: &str) -> anyhow::Result<()> {
    wait::until(&format!("{unit} gone"), DEADLINE, || async {
        match sd.unit_status(unit).await {
            Ok(None) => Ok(Some(())),
            Ok(s) => Err(format!("{s:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// The adapter starts a VM unit with every property of the unit spec, as systemd's own
/// D-Bus properties show them; starting again and stopping twice are no-ops.
#[tokio::test]
async fn t20_adapter_runs_a_vm_unit_with_its_properties() -> anyhow::Result<()> {
    let host = SimHost::start("adapter").await?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let mut events = sd.watch().await?;
    let unit = unit_for("web", &["/bin/sleep", "infinity"])?;
    let name = unit_name("web");

    let t0 = Instant::now();
    let outcome = sd.start_transient_unit(&unit).await?;
    assert!(
        matches!(outcome, StartOutcome::Started { .. }),
        "{outcome:?}"
    );
    let pid = wait_active(&sd, &name).await?;
    eprintln!("StartTransientUnit → active: {:?}", t0.elapsed());

    let conn = host.connect().await?;
    let svc = "org.freedesktop.systemd1.Service";
    let unit_iface = "org.freedesktop.systemd1.Unit";
    assert_eq!(
        as_u64(&prop(&conn, &name, svc, "MemoryMax").await?),
        Some((64 + 128) * MIB)
    );
    assert_eq!(
        as_u64(&prop(&conn, &name, svc, "CPUQuotaPerSecUSec").await?),
        Some(1_000_000)
    );
    assert_eq!(
        as_u64(&prop(&conn, &name, svc, "CPUWeight").await?),
        Some(100)
    );
    assert_eq!(
        as_u64(&prop(&conn, &name, svc, "TasksMax").await?),
        Some(4096)
    );
    assert_eq!(
        as_u64(&prop(&conn, &name, svc, "TimeoutStopUSec").await?),
        Some(30_000_000)
    );
    assert_eq!(
        as_str(&prop(&conn, &name, svc, "Slice").await?).as_deref(),
        Some("blixard-vms.slice")
    );
    assert_eq!(
        as_str(&prop(&conn, &name, svc, "KillMode").await?).as_deref(),
        Some("mixed")
    );
    assert_eq!(
        as_str(&prop(&conn, &name, svc, "StandardOutput").await?).as_deref(),
        Some("journal")
    );
    assert_eq!(
        as_str(&prop(&conn, &name, svc, "SyslogIdentifier").await?).as_deref(),
        Some("blixard-vm-web")
    );
    assert_eq!(
        as_str(&prop(&conn, &name, unit_iface, "CollectMode").await?).as_deref(),
        Some("inactive-or-failed")
    );
    assert!(
        as_str(&prop(&conn, &name, unit_iface, "Description").await?)
            .is_some_and(|d| d.contains("Blixard VM web"))
    );
    let extra = prop(&conn, &name, svc, "LogExtraFields").await?;
    let fields: Vec<Vec<u8>> = extra.try_clone()?.try_into()?;
    assert_eq!(fields, vec![b"BLIXARD_VM=web".to_vec()]);
    // MemoryMax is enforced only if the manager has the memory controller: the unit's
    // memory is accounted.
    let current = as_u64(&prop(&conn, &name, svc, "MemoryCurrent").await?);
    assert!(
        current.is_some_and(|c| c > 0 && c != u64::MAX),
        "MemoryCurrent {current:?}"
    );

    // Idempotent start: nothing happens to the running unit.
    assert_eq!(
        sd.start_transient_unit(&unit).await?,
        StartOutcome::AlreadyExists
    );
    assert_eq!(sd.unit_status(&name).await?.map(|s| s.main_pid), Some(pid));
    let listed = sd.list_vm_units().await?;
    assert_eq!(
        listed.iter().map(|u| u.vm.as_str()).collect::<Vec<_>>(),
        vec!["web"]
    );

    // Stop, then stop again.
    assert!(matches!(
        sd.stop_unit(&name).await?,
        StopOutcome::Stopping { .. }
    ));
    wait_gone(&sd, &name).await?;
    assert_eq!(sd.stop_unit(&name).await?, StopOutcome::NotLoaded);
    assert!(!sd.kill_unit(&name, 9).await?);
    assert!(sd.list_vm_units().await?.is_empty());

    // The signals told the story.
    next_event(&mut events, "web removed", |e| {
        matches!(e, UnitEvent::Removed { unit } if unit == &name).then_some(())
    })
    .await?;
    Ok(())
}

/// A unit whose binary is missing fails, and the signals carry the reason before the unit
/// is collected.
#[tokio::test]
async fn t20_adapter_reports_why_a_unit_failed() -> anyhow::Result<()> {
    let host = SimHost::start("badbin").await?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let mut events = sd.watch().await?;
    let unit = unit_for("bad", &["/nonexistent/hypervisor", "--flag"])?;
    let name = unit.unit.clone();
    let outcome = sd.start_transient_unit(&unit).await;
    eprintln!("start of a missing binary: {outcome:?}");
    let (mut result, mut code, mut status) = (None, None, None);
    let failed_at = next_event(&mut events, "bad failed", |e| match e {
        UnitEvent::Changed { unit, change } if unit == &name => {
            result = change.result.clone().or(result.take());
            code = change.exec_main_code.or(code);
            status = change.exec_main_status.or(status);
            (change.active_state.as_deref() == Some("failed")).then_some(())
        }
        UnitEvent::JobRemoved { unit, result, .. } if unit == &name => {
            eprintln!("job of {unit}: {result}");
            None
        }
        _ => None,
    })
    .await;
    failed_at?;
    let (state, reason) = describe_end(
        result.as_deref().unwrap_or("?"),
        code.unwrap_or(0),
        status.unwrap_or(0),
    );
    eprintln!("failure seen: {state:?} {reason}");
    assert_eq!(state, VmState::Failed);
    assert!(reason.starts_with("exit-code status=203"), "{reason}");
    wait_gone(&sd, &name).await?;
    Ok(())
}

/// KillUnit reaches the VM's processes, and the signals say which signal ended it.
#[tokio::test]
async fn t20_adapter_kill_unit_ends_the_vm_with_its_signal() -> anyhow::Result<()> {
    let host = SimHost::start("kill").await?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let mut events = sd.watch().await?;
    let unit = unit_for("victim", &["/bin/sleep", "infinity"])?;
    let name = unit.unit.clone();
    sd.start_transient_unit(&unit).await?;
    wait_active(&sd, &name).await?;
    assert!(sd.kill_unit(&name, 9).await?);
    let (mut result, mut code, mut status) = (None, None, None);
    next_event(&mut events, "victim failed", |e| match e {
        UnitEvent::Changed { unit, change } if unit == &name => {
            result = change.result.clone().or(result.take());
            code = change.exec_main_code.or(code);
            status = change.exec_main_status.or(status);
            (change.active_state.as_deref() == Some("failed")).then_some(())
        }
        _ => None,
    })
    .await?;
    let (state, reason) = describe_end(
        result.as_deref().unwrap_or("?"),
        code.unwrap_or(0),
        status.unwrap_or(0),
    );
    assert_eq!(
        (state, reason.as_str()),
        (VmState::Failed, "signal signal=SIGKILL")
    );
    wait_gone(&sd, &name).await?;
    Ok(())
}

/// The adapter never touches units that are not VM units.
#[tokio::test]
async fn t20_adapter_refuses_other_units() -> anyhow::Result<()> {
    let host = SimHost::start("refuse").await?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let mut unit = unit_for("web", &["/bin/sleep", "infinity"])?;
    unit.unit = "evil.service".into();
    assert!(matches!(
        sd.start_transient_unit(&unit).await,
        Err(SystemdError::NotAVmUnit { .. })
    ));
    assert!(matches!(
        sd.stop_unit("dbus.socket").await,
        Err(SystemdError::NotAVmUnit { .. })
    ));
    assert!(matches!(
        sd.kill_unit("dbus.socket", 9).await,
        Err(SystemdError::NotAVmUnit { .. })
    ));
    Ok(())
}

/// A VM's output lands in its host's journal under its unit and its syslog identifier.
#[tokio::test]
async fn t20_adapter_vm_output_reaches_the_journal() -> anyhow::Result<()> {
    let host = SimHost::start("journal").await?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let unit = unit_for(
        "talk",
        &[
            "/bin/sh",
            "-c",
            "echo console-marker-42; exec sleep infinity",
        ],
    )?;
    sd.start_transient_unit(&unit).await?;
    // `journalctl BLIXARD_VM=talk` needs the system manager: only it exports LogExtraFields
    // to journald (/run/systemd/units/log-extra-fields:UNIT), so under a user manager the
    // field is checked as a unit property (above) and the lines by unit and identifier.
    wait::until("the marker in the journal", DEADLINE, || async {
        let by_unit = host
            .journal(&["-u", "blixard-vm-talk.service"])
            .map_err(|e| e.to_string())?;
        let by_id = host
            .journal(&["-t", "blixard-vm-talk"])
            .map_err(|e| e.to_string())?;
        if by_unit.contains("console-marker-42") && by_id.contains("console-marker-42") {
            return Ok(Some(()));
        }
        Err(format!("by unit: {by_unit:?}, by identifier: {by_id:?}"))
    })
    .await?;
    Ok(())
}

// ---- the real agent against real control nodes -------------------------------------------

/// Creating a VM through the API puts its unit on the host's manager with the expected
/// properties, and the API follows the unit's state. Prints the placement → unit-active
/// latency.
#[tokio::test]
async fn t21_agent_runs_a_created_vm() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    host.spawn_agent(&cluster.endpoints(), "")?;
    let h = &host;
    with_logs(&[h], async {
        wait_registered(&client, "h1", 1).await?;
        let sd = Systemd::connect_address(&h.bus_address()).await?;
        let mut vm_spec = spec("web");
        vm_spec.vcpus = 2;
        vm_spec.memory_mib = 96;
        let t0 = Instant::now();
        vms::create(&client, &vm_spec).await?;
        let created = t0.elapsed();
        let unit = unit_name("web");
        wait_active_tight(&sd, &unit, t0).await?;
        let active = t0.elapsed();
        let vm = wait_vm_state(&client, "web", VmState::Running, Some("h1")).await?;
        eprintln!(
            "LATENCY create_vm answered in {created:?}; unit active {active:?} after the \
             create call; API running after {:?} (generation {})",
            t0.elapsed(),
            vm.generation
        );

        let conn = h.connect().await?;
        let svc = "org.freedesktop.systemd1.Service";
        assert_eq!(
            as_u64(&prop(&conn, &unit, svc, "MemoryMax").await?),
            Some((96 + 128) * MIB)
        );
        assert_eq!(
            as_u64(&prop(&conn, &unit, svc, "CPUQuotaPerSecUSec").await?),
            Some(2_000_000)
        );
        assert_eq!(
            as_str(&prop(&conn, &unit, svc, "Slice").await?).as_deref(),
            Some("blixard-vms.slice")
        );
        let exec = prop(&conn, &unit, svc, "ExecStart").await?;
        assert!(format!("{:?}", *exec).contains("/bin/sleep"), "{:?}", *exec);

        // A few more, one after another, for a median.
        let mut samples = vec![active];
        for i in 0..9 {
            let name = format!("lat-{i}");
            let t0 = Instant::now();
            vms::create(&client, &spec(&name)).await?;
            wait_active_tight(&sd, &unit_name(&name), t0).await?;
            samples.push(t0.elapsed());
            // Make room: the host has 2 vCPUs to overcommit.
            client.delete_vm(&name).await?;
            wait_gone(&sd, &unit_name(&name)).await?;
        }
        samples.sort();
        eprintln!(
            "LATENCY create call → unit active over {} VMs: min {:?}, median {:?}, max {:?}",
            samples.len(),
            samples[0],
            samples[samples.len() / 2],
            samples[samples.len() - 1]
        );
        Ok(())
    })
    .await
}

/// Polls every 2 ms (not wait::until's backoff) so that a latency figure means something.
async fn wait_active_tight(sd: &Systemd, unit: &str, since: Instant) -> anyhow::Result<()> {
    loop {
        if let Some(s) = sd.unit_status(unit).await? {
            if s.active_state == "active" {
                return Ok(());
            }
        }
        anyhow::ensure!(since.elapsed() < DEADLINE, "{unit} never became active");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Stop makes the unit go away and the API say stopped; start brings a new unit; delete
/// removes the unit and the VM.
#[tokio::test]
async fn t22_agent_stops_starts_and_deletes() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    host.spawn_agent(&cluster.endpoints(), "")?;
    let h = &host;
    with_logs(&[h], async {
        wait_registered(&client, "h1", 1).await?;
        let sd = Systemd::connect_address(&h.bus_address()).await?;
        let unit = unit_name("db");
        vms::create(&client, &spec("db")).await?;
        wait_vm_state(&client, "db", VmState::Running, Some("h1")).await?;
        let pid1 = wait_active(&sd, &unit).await?;

        client.stop_vm("db").await?;
        wait_gone(&sd, &unit).await?;
        let vm = wait_vm_state(&client, "db", VmState::Stopped, Some("h1")).await?;
        assert_eq!(vm.reason, None);
        // Stopping a stopped VM changes nothing.
        client.stop_vm("db").await?;
        assert!(sd.unit_status(&unit).await?.is_none());

        client.start_vm("db").await?;
        wait_vm_state(&client, "db", VmState::Running, Some("h1")).await?;
        let pid2 = wait_active(&sd, &unit).await?;
        assert_ne!(pid1, pid2, "a started VM is a new process");

        client.delete_vm("db").await?;
        wait_gone(&sd, &unit).await?;
        wait::until("db gone from the API", DEADLINE, || async {
            match client.get_vm("db").await {
                Err(e) if e.is_not_found() => Ok(Some(())),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
        assert!(sd.list_vm_units().await?.is_empty());
        Ok(())
    })
    .await
}

/// SIGKILL the agent: the VM runs on; a new agent adopts it without restarting it (same
/// main PID). SIGTERM: the agent exits cleanly and the VM still runs.
#[tokio::test]
async fn t23_agent_restart_adopts_running_vms() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    // Restarted within the lease: adopted, not fenced.
    host.spawn_agent(&cluster.endpoints(), LONG_LEASE)?;
    let endpoints = cluster.endpoints();
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let unit = unit_name("keep");
    let pid = with_logs(&[&host], async {
        wait_registered(&client, "h1", 1).await?;
        vms::create(&client, &spec("keep")).await?;
        wait_vm_state(&client, "keep", VmState::Running, Some("h1")).await?;
        wait_active(&sd, &unit).await
    })
    .await?;

    host.kill_agent()?;
    let s = sd.unit_status(&unit).await?;
    assert_eq!(
        s.as_ref().map(|s| (s.active_state.as_str(), s.main_pid)),
        Some(("active", pid))
    );

    host.spawn_agent(&endpoints, LONG_LEASE)?;
    with_logs(&[&host], async {
        wait_registered(&client, "h1", 2).await?;
        wait::until("the new agent to adopt keep", DEADLINE, || async {
            let log = host.agent_log();
            let run2 = log.split("---- agent run 2 ----").nth(1).unwrap_or("");
            Ok((run2.contains("adopting VM keep on h1")
                && run2.contains("keep")
                && run2.contains("the previous run's lease still holds"))
            .then_some(()))
        })
        .await?;
        // The new session reports the VM again; it is still the same process.
        wait_vm_state(&client, "keep", VmState::Running, Some("h1")).await?;
        let s = sd.unit_status(&unit).await?;
        assert_eq!(
            s.map(|s| (s.active_state, s.main_pid)),
            Some(("active".into(), pid))
        );
        Ok(())
    })
    .await?;

    let status = host.stop_agent().await?;
    assert!(status.success(), "agent exit after SIGTERM: {status}");
    let s = sd.unit_status(&unit).await?;
    assert_eq!(
        s.map(|s| s.main_pid),
        Some(pid),
        "SIGTERM to the agent must not stop VMs"
    );
    Ok(())
}

/// A VM whose hypervisor binary is missing shows as failed in the API, with the reason, and
/// is not restarted in a loop.
#[tokio::test]
async fn t24_agent_reports_a_failed_vm_with_its_reason() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    host.spawn_agent(
        &cluster.endpoints(),
        "process_command = [\"/nonexistent/hypervisor\", \"--serve\"]",
    )?;
    let h = &host;
    with_logs(&[h], async {
        wait_registered(&client, "h1", 1).await?;
        vms::create(&client, &spec("broken")).await?;
        let vm = wait_vm_state(&client, "broken", VmState::Failed, Some("h1")).await?;
        let reason = vm.reason.unwrap_or_default();
        eprintln!("failed VM reason: {reason}");
        assert!(reason.starts_with("exit-code status=203"), "{reason}");
        // Not restarted: the agent started it once.
        let starts = h.agent_log().matches("starting VM").count();
        assert_eq!(starts, 1, "starts: {starts}");
        Ok(())
    })
    .await
}

/// A VM whose process exits on its own: a clean exit shows as stopped, a non-zero one as
/// failed with its status; neither is restarted by the host.
#[tokio::test]
async fn t24_agent_reports_exits() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    // The VM's process exits 0 when $BLIXARD_VM is "clean", 3 otherwise.
    host.spawn_agent(
        &cluster.endpoints(),
        r#"process_command = ["/bin/sh", "-c", "test \"$BLIXARD_VM\" = clean || exit 3"]"#,
    )?;
    let h = &host;
    with_logs(&[h], async {
        wait_registered(&client, "h1", 1).await?;
        vms::create(&client, &spec("clean")).await?;
        vms::create(&client, &spec("dirty")).await?;
        let clean = wait_vm_state(&client, "clean", VmState::Stopped, Some("h1")).await?;
        assert_eq!(clean.reason.as_deref(), Some("exited status=0"));
        let dirty = wait_vm_state(&client, "dirty", VmState::Failed, Some("h1")).await?;
        assert_eq!(dirty.reason.as_deref(), Some("exit-code status=3"));
        assert_eq!(h.agent_log().matches("starting VM").count(), 2);
        Ok(())
    })
    .await
}

/// Two hosts, each with its own manager: each runs exactly the VMs the API places on it.
#[tokio::test]
async fn t25_two_hosts_each_run_only_their_own_vms() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let mut h1 = SimHost::start("h1").await?;
    let mut h2 = SimHost::start("h2").await?;
    h1.spawn_agent(&cluster.endpoints(), "")?;
    h2.spawn_agent(&cluster.endpoints(), "")?;
    let (h1, h2) = (&h1, &h2);
    with_logs(&[h1, h2], async {
        wait_registered(&client, "h1", 1).await?;
        wait_registered(&client, "h2", 1).await?;
        let names = ["a1", "a2", "a3", "a4"];
        for n in names {
            vms::create(&client, &spec(n)).await?;
        }
        let mut placed = std::collections::BTreeMap::new();
        for n in names {
            let vm = wait_vm_state(&client, n, VmState::Running, None).await?;
            placed.insert(n.to_string(), vm.host.unwrap_or_default());
        }
        for h in [h1, h2] {
            let sd = Systemd::connect_address(&h.bus_address()).await?;
            let mut on_host: Vec<String> = sd
                .list_vm_units()
                .await?
                .into_iter()
                .map(|u| u.vm)
                .collect();
            on_host.sort();
            let mut want: Vec<String> = placed
                .iter()
                .filter(|(_, host)| host.as_str() == h.name())
                .map(|(vm, _)| vm.clone())
                .collect();
            want.sort();
            assert_eq!(
                on_host,
                want,
                "units on {} (placement {placed:?})",
                h.name()
            );
        }
        assert!(
            placed.values().any(|h| h == "h1") && placed.values().any(|h| h == "h2"),
            "spread placement uses both hosts: {placed:?}"
        );
        Ok(())
    })
    .await
}

/// With the whole control plane down, a restarted agent leaves its `stay` VMs running (the
/// lease file tells it, and the switch, which they are) and keeps trying; once the control
/// plane is back it registers and reports them.
#[tokio::test]
async fn t26_control_plane_outage_leaves_vms_running() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    let endpoints = cluster.endpoints();
    host.spawn_agent(&endpoints, "")?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let unit = unit_name("steady");
    let pid = with_logs(&[&host], async {
        wait_registered(&client, "h1", 1).await?;
        vms::create(&client, &spec_with("steady", "stay")).await?;
        wait_vm_state(&client, "steady", VmState::Running, Some("h1")).await?;
        wait_active(&sd, &unit).await
    })
    .await?;

    for i in 0..3 {
        cluster.kill(i);
    }
    host.kill_agent()?;
    host.spawn_agent(&endpoints, "")?;
    with_logs(&[&host], async {
        wait::until("the agent to retry registering", DEADLINE, || async {
            let log = host.agent_log();
            let run2 = log.split("---- agent run 2 ----").nth(1).unwrap_or("");
            Ok((run2.matches("cannot register host h1: ").count() >= 3).then_some(()))
        })
        .await?;
        let s = sd.unit_status(&unit).await?;
        assert_eq!(
            s.map(|s| (s.active_state, s.main_pid)),
            Some(("active".into(), pid))
        );
        Ok(())
    })
    .await?;

    anyhow::ensure!(host.agent_exit().is_none(), "the agent gave up");
    for i in 0..3 {
        cluster.restart(i)?;
    }
    with_logs(&[&host], async {
        wait_registered(&client, "h1", 2).await?;
        wait_vm_state(&client, "steady", VmState::Running, Some("h1")).await?;
        let s = sd.unit_status(&unit).await?;
        assert_eq!(s.map(|s| s.main_pid), Some(pid));
        Ok(())
    })
    .await
}

/// Fencing is on by default: an agent cut off from the control plane stops its `move` VMs
/// once its lease runs out (they may be placed elsewhere meanwhile, and must not run twice),
/// and leaves its `stay` VMs running. Once the control plane answers again, the agent reports
/// the fenced VM failed and does not start it on its own: the cluster's restart policy does,
/// with a new generation.
#[tokio::test]
async fn t26_fenced_agent_stops_its_move_vms_and_the_cluster_restarts_them() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    host.spawn_agent(&cluster.endpoints(), "")?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let unit = unit_name("fenced");
    let (pid, stay_pid, generation) = with_logs(&[&host], async {
        wait_registered(&client, "h1", 1).await?;
        vms::create(&client, &spec_with("fenced", "move")).await?;
        vms::create(&client, &spec_with("kept", "stay")).await?;
        let vm = wait_vm_state(&client, "fenced", VmState::Running, Some("h1")).await?;
        wait_vm_state(&client, "kept", VmState::Running, Some("h1")).await?;
        let pid = wait_active(&sd, &unit).await?;
        let stay_pid = wait_active(&sd, &unit_name("kept")).await?;
        Ok((pid, stay_pid, vm.generation))
    })
    .await?;

    cluster.kill(0);
    with_logs(&[&host], async {
        wait_gone(&sd, &unit).await?;
        anyhow::ensure!(
            host.agent_log().contains("fencing: stopping every move VM"),
            "the agent did not say it fenced"
        );
        let s = sd.unit_status(&unit_name("kept")).await?;
        assert_eq!(
            s.map(|s| s.main_pid),
            Some(stay_pid),
            "stay VMs are never fenced"
        );
        Ok(())
    })
    .await?;

    cluster.restart(0)?;
    with_logs(&[&host], async {
        let vm = wait::until("fenced restarted by the cluster", DEADLINE, || async {
            match client.get_vm("fenced").await {
                Ok(v) if v.state == VmState::Running && v.generation > generation => Ok(Some(v)),
                Ok(v) => Err(format!(
                    "{} gen {} {:?}",
                    v.state.as_str(),
                    v.generation,
                    v.reason
                )),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
        assert_eq!(vm.host.as_deref(), Some("h1"));
        let again = wait_active(&sd, &unit).await?;
        anyhow::ensure!(again != pid, "the same process {pid}: it was never stopped");
        let log = host.agent_log();
        anyhow::ensure!(log.contains("ending the fence"), "no end of the fence");
        anyhow::ensure!(
            log.contains(" fenced on h1: "),
            "the end was not recorded as the fence's"
        );
        let s = sd.unit_status(&unit_name("kept")).await?;
        assert_eq!(s.map(|s| s.main_pid), Some(stay_pid));
        Ok(())
    })
    .await?;
    anyhow::ensure!(host.agent_exit().is_none(), "the agent exited");
    Ok(())
}

/// The fence does not depend on the agent: `kill -9` it and its dead man's switch
/// (`blixard-fence.service`, a unit of the host's manager) stops the `move` VMs once the
/// lease runs out, while the `stay` VM keeps running. A new agent then starts fenced.
#[tokio::test]
async fn t26_killed_agent_is_fenced_by_its_dead_mans_switch() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    let endpoints = cluster.endpoints();
    host.spawn_agent(&endpoints, "")?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let stay_pid = with_logs(&[&host], async {
        wait_registered(&client, "h1", 1).await?;
        wait_fence_unit(&sd).await?;
        vms::create(&client, &spec_with("mover", "move")).await?;
        vms::create(&client, &spec_with("stayer", "stay")).await?;
        wait_vm_state(&client, "mover", VmState::Running, Some("h1")).await?;
        wait_vm_state(&client, "stayer", VmState::Running, Some("h1")).await?;
        wait_active(&sd, &unit_name("mover")).await?;
        wait_active(&sd, &unit_name("stayer")).await
    })
    .await?;

    host.kill_agent()?;
    let t0 = Instant::now();
    with_logs(&[&host], async {
        wait_gone(&sd, &unit_name("mover")).await?;
        eprintln!(
            "the switch fenced mover {:?} after the agent died",
            t0.elapsed()
        );
        let s = sd.unit_status(&unit_name("stayer")).await?;
        assert_eq!(
            s.map(|s| s.main_pid),
            Some(stay_pid),
            "stay VMs are never fenced"
        );
        wait::until("the switch's log line", DEADLINE, || async {
            let j = host
                .journal(&["-u", "blixard-fence.service"])
                .map_err(|e| e.to_string())?;
            Ok(j.contains("fence watch: fencing VM").then_some(()))
        })
        .await?;
        Ok(())
    })
    .await?;

    // Restarted after its lease ran out, the agent starts fenced, then rejoins.
    host.spawn_agent(&endpoints, "")?;
    with_logs(&[&host], async {
        wait::until("the new agent to start fenced", DEADLINE, || async {
            let log = host.agent_log();
            let run2 = log.split("---- agent run 2 ----").nth(1).unwrap_or("");
            Ok(run2
                .contains("the previous run's lease ran out")
                .then_some(()))
        })
        .await?;
        wait_registered(&client, "h1", 2).await?;
        let s = sd.unit_status(&unit_name("stayer")).await?;
        assert_eq!(s.map(|s| s.main_pid), Some(stay_pid));
        Ok(())
    })
    .await
}

/// Without a bus the agent exits non-zero with one clear line, and no panic.
#[tokio::test]
async fn t27_agent_without_a_bus_fails_clearly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "host_id = \"nobus\"\ncontrol_endpoints = [\"http://127.0.0.1:9\"]\n\
             systemd_bus = \"session\"\ndata_dir = {:?}\n",
            dir.path().display().to_string()
        ),
    )?;
    let bus = format!("unix:path={}/no-such-bus", dir.path().display());
    let out = std::process::Command::new(binary("blixard-agent"))
        .arg("--config")
        .arg(&config)
        .arg("--log-stderr")
        .env("DBUS_SESSION_BUS_ADDRESS", &bus)
        .env_remove("NOTIFY_SOCKET")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "blixard-agent: cannot connect to the session bus at {bus}"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // check-config: 0 and a summary for a good file, 1 and one line for a bad one.
    let ok = std::process::Command::new(binary("blixard-agent"))
        .arg("check-config")
        .arg(&config)
        .output()?;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::write(&config, "host_id = \"Bad Name\"\ncontrol_endpoints = []\n")?;
    let bad = std::process::Command::new(binary("blixard-agent"))
        .arg("check-config")
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("host_id"), "{stderr}");
    Ok(())
}

/// `Type=notify`: READY=1 once registered, STATUS= lines, WATCHDOG=1 at half of
/// WATCHDOG_USEC, STOPPING=1 on SIGTERM; logs in the journal with structured fields.
#[tokio::test]
async fn t28_agent_speaks_sd_notify() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let mut host = SimHost::start("h1").await?;
    host.agent_logs_to_journal = true;
    let path = host.base_dir().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&path)?;
    let path = path.display().to_string();
    host.spawn_agent_with_env(
        &cluster.endpoints(),
        "",
        &[
            ("NOTIFY_SOCKET", path.as_str()),
            ("WATCHDOG_USEC", "600000"),
        ],
    )?;
    let mut seen = String::new();
    let mut buf = vec![0u8; 4096];
    let want = [
        "READY=1",
        "STATUS=0 VMs running, control plane: connected",
        "WATCHDOG=1",
    ];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !want.iter().all(|w| seen.lines().any(|l| l == *w)) {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("no {want:?} in {seen:?}\n{}", host.agent_log()))??;
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    // Its logs are in the host's journal, with the host as a structured field.
    wait::until("the agent's lines in the journal", DEADLINE, || async {
        let lines = host
            .journal(&["-t", "blixard-agent", "HOST=h1"])
            .map_err(|e| e.to_string())?;
        Ok(lines
            .contains("with the control plane (epoch")
            .then_some(()))
    })
    .await?;
    let status = host.stop_agent().await?;
    assert!(status.success(), "{status}");
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("no STOPPING=1 in {seen:?}"))??;
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == "STOPPING=1") {
            break;
        }
        seen.push_str(&msg);
    }
    Ok(())
}

/// A VM deleted while its host's agent was down: the new agent adopts the unit, finds no
/// assignment for it, and stops it.
#[tokio::test]
async fn t29_agent_stops_units_deleted_while_it_was_down() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    let endpoints = cluster.endpoints();
    host.spawn_agent(&endpoints, LONG_LEASE)?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    with_logs(&[&host], async {
        wait_registered(&client, "h1", 1).await?;
        for n in ["gone", "stays"] {
            vms::create(&client, &spec(n)).await?;
            wait_vm_state(&client, n, VmState::Running, Some("h1")).await?;
        }
        Ok(())
    })
    .await?;
    let stays = wait_active(&sd, &unit_name("stays")).await?;
    host.kill_agent()?;
    client.delete_vm("gone").await?;
    assert!(
        sd.unit_status(&unit_name("gone")).await?.is_some(),
        "nobody stopped it yet"
    );
    host.spawn_agent(&endpoints, LONG_LEASE)?;
    with_logs(&[&host], async {
        wait_gone(&sd, &unit_name("gone")).await?;
        let s = sd.unit_status(&unit_name("stays")).await?;
        assert_eq!(s.map(|s| s.main_pid), Some(stays));
        Ok(())
    })
    .await
}

/// Host loss and fencing: the agent of h1 dies; its dead man's switch stops the VM on h1
/// once the lease runs out, before the cluster (after the host's TTL, which covers the lease
/// and the grace) moves it to h2: the two copies never run at once. When h1's agent comes
/// back, it finds the VM assigned elsewhere and runs nothing.
#[tokio::test]
async fn t29_host_loss_moves_the_vm_and_the_old_copy_is_fenced() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let client = cluster.client();
    let endpoints = cluster.endpoints();
    let mut h1 = SimHost::start("h1").await?;
    let mut h2 = SimHost::start("h2").await?;
    h1.spawn_agent(&endpoints, "")?;
    let sd1 = Systemd::connect_address(&h1.bus_address()).await?;
    let sd2 = Systemd::connect_address(&h2.bus_address()).await?;
    let unit = unit_name("mobile");
    let mobile = spec_with("mobile", "move");
    with_logs(&[&h1], async {
        wait_registered(&client, "h1", 1).await?;
        vms::create(&client, &mobile).await?;
        wait_vm_state(&client, "mobile", VmState::Running, Some("h1")).await?;
        wait_active(&sd1, &unit).await
    })
    .await?;

    h2.spawn_agent(&endpoints, "")?;
    wait_registered(&client, "h2", 1).await?;
    h1.kill_agent()?;
    let t0 = Instant::now();
    // Watch both hosts on one clock: h1's copy must be gone before h2's is active.
    let (gone_h1, active_h2) = with_logs(&[&h1, &h2], async {
        let mut gone_h1 = None;
        let mut active_h2 = None;
        while active_h2.is_none() || gone_h1.is_none() {
            anyhow::ensure!(
                t0.elapsed() < DEADLINE,
                "timed out: h1 gone {gone_h1:?}, h2 active {active_h2:?}"
            );
            if gone_h1.is_none()
                && sd1
                    .unit_status(&unit)
                    .await?
                    .is_none_or(|s| s.active_state != "active")
            {
                gone_h1 = Some(t0.elapsed());
            }
            if active_h2.is_none()
                && sd2
                    .unit_status(&unit)
                    .await?
                    .is_some_and(|s| s.active_state == "active")
            {
                active_h2 = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok((gone_h1.unwrap_or_default(), active_h2.unwrap_or_default()))
    })
    .await?;
    eprintln!("h1's copy fenced {gone_h1:?} and h2's active {active_h2:?} after h1's agent died");
    anyhow::ensure!(
        gone_h1 <= active_h2,
        "both copies ran at once: h1's ended at {gone_h1:?}, h2's started at {active_h2:?}"
    );
    with_logs(&[&h2], async {
        wait_vm_state(&client, "mobile", VmState::Running, Some("h2")).await?;
        Ok(())
    })
    .await?;

    h1.spawn_agent(&endpoints, "")?;
    with_logs(&[&h1], async {
        wait_registered(&client, "h1", 2).await?;
        wait::until("h1's agent to end its fence", DEADLINE, || async {
            Ok(h1.agent_log().contains("ending the fence").then_some(()))
        })
        .await?;
        assert!(sd1.unit_status(&unit).await?.is_none());
        let vm = client.get_vm("mobile").await?;
        assert_eq!(
            (vm.state, vm.host.as_deref()),
            (VmState::Running, Some("h2"))
        );
        assert!(sd2.unit_status(&unit).await?.is_some());
        Ok(())
    })
    .await
}

/// A VM whose unit ended while its agent was down is reported failed by the next agent, not
/// started again on the host's own initiative.
#[tokio::test]
async fn t29_vm_that_ended_while_the_agent_was_down_is_reported_not_restarted() -> anyhow::Result<()>
{
    let cluster = Cluster::start(1).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    let endpoints = cluster.endpoints();
    host.spawn_agent(&endpoints, LONG_LEASE)?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let unit = unit_name("lost");
    with_logs(&[&host], async {
        wait_registered(&client, "h1", 1).await?;
        vms::create(&client, &spec("lost")).await?;
        wait_vm_state(&client, "lost", VmState::Running, Some("h1")).await?;
        wait_active(&sd, &unit).await
    })
    .await?;
    host.kill_agent()?;
    assert!(sd.kill_unit(&unit, 9).await?);
    wait_gone(&sd, &unit).await?;
    host.spawn_agent(&endpoints, LONG_LEASE)?;
    with_logs(&[&host], async {
        let vm = wait_vm_state(&client, "lost", VmState::Failed, Some("h1")).await?;
        assert_eq!(
            vm.reason.as_deref(),
            Some("the unit ended while the agent was not running")
        );
        assert!(
            sd.unit_status(&unit).await?.is_none(),
            "restarted on its own"
        );
        anyhow::ensure!(host.agent_log().matches("starting VM").count() == 1);
        Ok(())
    })
    .await
}

/// The cluster's restart policy drives restarts through new generations: a VM that keeps
/// failing is started again by the agent up to `max_restarts` times, then left failed.
#[tokio::test]
async fn t29_restart_policy_restarts_through_the_agent() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    host.spawn_agent(&cluster.endpoints(), r#"process_command = ["/bin/false"]"#)?;
    let mut flaky = spec("flaky");
    flaky.restart_policy = blixard_api::RestartPolicy::OnFailure;
    flaky.max_restarts = Some(2);
    let h = &host;
    with_logs(&[h], async {
        wait_registered(&client, "h1", 1).await?;
        vms::create(&client, &flaky).await?;
        let vm = wait::until("flaky to be given up on", DEADLINE, || async {
            match client.get_vm("flaky").await {
                Ok(v) if v.reason.as_deref().is_some_and(|r| r.contains("giving up")) => {
                    Ok(Some(v))
                }
                Ok(v) => Err(format!("{} {:?}", v.state.as_str(), v.reason)),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
        assert_eq!(vm.state, VmState::Failed);
        assert!(vm
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("exit-code status=1")));
        assert_eq!(
            h.agent_log().matches("starting VM").count(),
            3,
            "1 start + 2 restarts"
        );
        Ok(())
    })
    .await
}

/// On a cluster with TLS and tokens, the agent trusts the cluster's CA, authenticates with
/// its host's agent token, and runs its VMs as anywhere else.
#[tokio::test]
async fn t29_agent_on_a_secure_cluster() -> anyhow::Result<()> {
    let (cluster, ca) = Cluster::start_secure(3).await?;
    let client = cluster.client();
    let mut host = SimHost::start("h1").await?;
    let token = host.base_dir().join("agent-token");
    blixard_tests::cluster::write_agent_token("h1", &token)?;
    assert!(cluster
        .endpoints()
        .iter()
        .all(|e| e.starts_with("https://")));
    host.spawn_agent(
        &cluster.endpoints(),
        &format!(
            "token_file = {:?}\nca_file = {:?}\n",
            token.display().to_string(),
            ca.display().to_string()
        ),
    )?;
    let h = &host;
    with_logs(&[h], async {
        wait_registered(&client, "h1", 1).await?;
        vms::create(&client, &spec("tls")).await?;
        wait_vm_state(&client, "tls", VmState::Running, Some("h1")).await?;
        Ok(())
    })
    .await
}
