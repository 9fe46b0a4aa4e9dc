//! Real QEMU guests (TCG) on simulated hosts: the test guest of `tests/guest/build.sh`
//! booted through the API, its console in the host's journal, graceful stop, the guest's own
//! power-off and panic, QEMU failing to start, agent restarts, and refusals.
//!
//! Deadlines are generous: the marker appears after a median 2.3 s on an idle machine, but
//! other builds and tests share the 2 cores.

use std::time::{Duration, Instant};

use blixard_agent::hypervisor::tap_name;
use blixard_agent::systemd::{Systemd, SystemdClient};
use blixard_api::{unit_name, Client, VmSpec, VmState};
use blixard_tests::cluster::Cluster;
use blixard_tests::guest;
use blixard_tests::host::SimHost;
use blixard_tests::vms::{create, wait_registered, wait_state, with_logs};
use blixard_tests::wait;

/// Time for a TCG guest to print its marker on a loaded machine.
const BOOT: Duration = Duration::from_secs(90);

/// One control node and one host with QEMU and the test guest in its image directory.
async fn setup(name: &str, extra: &str) -> anyhow::Result<(Cluster, SimHost, Client)> {
    let cluster = Cluster::start(1).await?;
    let client = cluster.client();
    let mut host = SimHost::start(name).await?;
    guest::install(&host)?;
    host.spawn_agent(
        &cluster.endpoints(),
        // Top-level keys first: agent_config() ends inside the [hypervisors] table.
        &format!("{extra}{}", guest::agent_config()),
    )?;
    wait_registered(&client, name, 1).await?;
    Ok((cluster, host, client))
}

/// The lines `vm`'s unit wrote (guest console, QEMU, `qmp-powerdown`) in `host`'s journal.
///
/// Read by the unit's syslog identifier (`blixard-vm-NAME`, which systemd puts in the header
/// of the unit's output streams) rather than by `-u`: journald attributes a line to a unit by
/// the writer's cgroup, which it cannot find once the writer has exited, and `qmp-powerdown`
/// (the unit's ExecStop) exits right after its last line; CI lost that line under `-u`.
fn console(host: &SimHost, vm: &str) -> String {
    let unit = unit_name(vm);
    let id = unit.trim_end_matches(".service");
    host.journal(&["-t", id]).unwrap_or_default()
}

/// Waits until `vm`'s console shows a line containing `text`.
async fn wait_console(host: &SimHost, vm: &str, text: &str) -> anyhow::Result<()> {
    wait::until(&format!("{text:?} on {vm}'s console"), BOOT, || async {
        let c = console(host, vm);
        if c.contains(text) {
            return Ok(Some(()));
        }
        // On a timeout, the error shows where the console got to.
        let tail: Vec<&str> = c.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!("console ends with:\n{}", tail.join("\n")))
    })
    .await
}

async fn create_and_boot(client: &Client, host: &SimHost, spec: &VmSpec) -> anyhow::Result<()> {
    create(client, spec).await?;
    wait_console(host, &spec.name, guest::MARKER).await
}

/// A VM created through the API boots the real guest: its marker reaches the host's journal
/// under the VM's unit and `vm logs` through the control plane, and the API shows it running.
#[tokio::test]
async fn t40_qemu_guest_boots_and_its_console_reaches_the_journal() -> anyhow::Result<()> {
    let (_cluster, host, client) = setup("q1", "api_listen = \"127.0.0.1:0\"\n").await?;
    with_logs(&[&host], async {
        let t0 = Instant::now();
        create_and_boot(&client, &host, &guest::spec("boot", "")).await?;
        eprintln!("vm create → marker: {:?}", t0.elapsed());
        wait_state(&client, "boot", VmState::Running, Some("q1")).await?;
        wait_console(&host, "boot", &format!("{} 2", guest::HEARTBEAT)).await?;
        // The same console through the control plane and the host's agent (`vm logs`).
        let mut stream = client
            .vm_logs("boot", Some(200), false, Some(Duration::from_secs(30)))
            .await?;
        let mut console = Vec::new();
        while let Some(line) = stream.next_line().await? {
            console.push(line.message);
        }
        anyhow::ensure!(
            console.iter().any(|l| l.contains(guest::MARKER)),
            "vm logs lacks the marker: {console:?}"
        );
        Ok(())
    })
    .await
}

/// Stopping a VM through the API is graceful: the unit's `ExecStop=` presses the ACPI power
/// button over QMP, the guest sees it and powers off, and the state becomes `stopped`.
#[tokio::test]
async fn t40_qemu_stop_is_graceful() -> anyhow::Result<()> {
    let (_cluster, host, client) = setup("q2", "").await?;
    with_logs(&[&host], async {
        create_and_boot(&client, &host, &guest::spec("calm", "")).await?;
        wait_state(&client, "calm", VmState::Running, Some("q2")).await?;
        // The guest arms its power-button watcher shortly after the marker.
        wait_console(&host, "calm", "BLIXARD-GUEST-POWER-BUTTON-READY").await?;
        client.stop_vm("calm").await?;
        let vm = wait_state(&client, "calm", VmState::Stopped, None).await?;
        eprintln!("stopped: reason {:?}", vm.reason);
        // journald writes the unit's last lines asynchronously, so they may land a moment
        // after systemd reports the unit gone.
        wait_graceful_stop(&host, "calm").await
    })
    .await
}

/// A guest that powers off by itself becomes `stopped`, with a reason saying so; a guest
/// kernel panic becomes `failed` with the panic message (pvpanic + `panic=exit-failure`); a
/// QEMU that cannot start (a "kernel" that is not one) becomes `failed` with QEMU's message.
#[tokio::test]
async fn t40_qemu_exit_reasons() -> anyhow::Result<()> {
    let (_cluster, host, client) = setup("q3", "").await?;
    std::fs::write(
        host.image_dir().join("notakernel"),
        b"this is not a kernel\n",
    )?;
    with_logs(&[&host], async {
        create(&client, &guest::spec("off", "blixard.exit=poweroff")).await?;
        create(&client, &guest::spec("oops", "blixard.exit=panic")).await?;
        let mut bad = guest::spec("bad", "");
        bad.kernel = Some("notakernel".into());
        create(&client, &bad).await?;

        let off = wait_reason(&client, "off", VmState::Stopped).await?;
        anyhow::ensure!(off.contains("the guest powered off"), "{off}");
        let oops = wait_reason(&client, "oops", VmState::Failed).await?;
        anyhow::ensure!(
            oops.contains("guest kernel panic: Attempted to kill init!"),
            "{oops}"
        );
        let bad = wait_reason(&client, "bad", VmState::Failed).await?;
        // QEMU's own words, e.g. "qemu: linux kernel too old to load a ram disk".
        anyhow::ensure!(
            bad.starts_with("qemu: ") && bad.ends_with("(exit-code status=1)"),
            "{bad}"
        );
        eprintln!("reasons:\n  off: {off}\n  oops: {oops}\n  bad: {bad}");
        Ok(())
    })
    .await
}

/// Waits (boot deadline) until `vm` is in `state` and returns its reason.
async fn wait_reason(client: &Client, vm: &str, state: VmState) -> anyhow::Result<String> {
    wait::until(&format!("{vm} {}", state.as_str()), BOOT, || async {
        match client.get_vm(vm).await {
            Ok(v) if v.state == state => Ok(Some(v.reason.unwrap_or_default())),
            Ok(v) => Err(format!("state {} reason {:?}", v.state.as_str(), v.reason)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Restarting the agent leaves the guest running: the same QEMU process, and its console
/// goes on (a later heartbeat appears). With the agent down, stopping the unit is still
/// graceful.
#[tokio::test]
async fn t40_qemu_agent_restart_keeps_the_guest() -> anyhow::Result<()> {
    // The agent is killed twice: a lease longer than its restart (and than the graceful stop
    // below), so its dead man's switch does not fence the guest meanwhile.
    const LONG_LEASE: &str = "lease_ms = 30000\n";
    let (cluster, mut host, client) = setup("q4", LONG_LEASE).await?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let unit = unit_name("keep");
    let pid = with_logs(&[&host], async {
        create_and_boot(&client, &host, &guest::spec("keep", "")).await?;
        wait_state(&client, "keep", VmState::Running, Some("q4")).await?;
        main_pid(&sd, &unit).await
    })
    .await?;
    host.kill_agent()?;
    let beats_before = heartbeats(&console(&host, "keep"));
    host.spawn_agent(
        &cluster.endpoints(),
        &format!("{LONG_LEASE}{}", guest::agent_config()),
    )?;
    with_logs(&[&host], async {
        wait_registered(&client, "q4", 2).await?;
        wait_state(&client, "keep", VmState::Running, Some("q4")).await?;
        wait::until("a later heartbeat", BOOT, || async {
            Ok((heartbeats(&console(&host, "keep")) > beats_before + 1).then_some(()))
        })
        .await?;
        let now = main_pid(&sd, &unit).await?;
        anyhow::ensure!(now == pid, "QEMU changed from pid {pid} to {now}");
        Ok(())
    })
    .await?;

    // With the agent down, stopping the unit directly (what `systemctl stop` does) is still
    // graceful: the unit's own ExecStop presses the power button.
    host.kill_agent()?;
    sd.stop_unit(&unit).await?;
    wait::until("the unit gone", BOOT, || async {
        match sd.unit_status(&unit).await {
            Ok(None) => Ok(Some(())),
            Ok(Some(s)) => Err(format!("{} {}", s.active_state, s.sub_state)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await?;
    wait_graceful_stop(&host, "keep").await
}

/// Waits (boot deadline) until `vm`'s journal shows a graceful stop: the guest saw the power
/// button and `qmp-powerdown` saw QEMU exit.
async fn wait_graceful_stop(host: &SimHost, vm: &str) -> anyhow::Result<()> {
    let button = format!("{}\n", guest::POWER_BUTTON);
    wait::until(
        &format!("a graceful stop on {vm}'s journal"),
        BOOT,
        || async {
            let c = console(host, vm);
            if c.contains(&button) && c.contains("qmp-powerdown: Exited") {
                Ok(Some(()))
            } else {
                Err(format!("not (yet) a graceful stop:\n{c}"))
            }
        },
    )
    .await
}

async fn main_pid(sd: &Systemd, unit: &str) -> anyhow::Result<u32> {
    match sd.unit_status(unit).await? {
        Some(s) if s.active_state == "active" && s.main_pid != 0 => Ok(s.main_pid),
        other => anyhow::bail!("{unit} is not active: {other:?}"),
    }
}

/// The highest heartbeat number on a console.
fn heartbeats(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.split_once(guest::HEARTBEAT).map(|(_, n)| n.trim()))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

/// A bridge made for one test, without addresses and never up (no traffic leaves the root
/// namespace's side of it), deleted on drop.
struct TestBridge(String);

impl TestBridge {
    fn create() -> anyhow::Result<TestBridge> {
        let name = format!("bxt{}", std::process::id() % 1_000_000);
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let out = std::process::Command::new("ip").args(args).output()?;
            anyhow::ensure!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        ip(&["link", "add", "name", &name, "type", "bridge"])?;
        let b = TestBridge(name);
        ip(&["link", "set", "dev", &b.0, "addrgenmode", "none"])?;
        Ok(b)
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", "dev", &self.0])
            .status();
    }
}

/// A NIC becomes a tap device on its bridge (created by the unit's `ExecStartPre=`), the
/// guest brings its NIC up, and the tap is deleted when the VM stops.
#[tokio::test]
async fn t40_qemu_nic_is_a_tap_on_the_bridge() -> anyhow::Result<()> {
    let br = TestBridge::create()?;
    let (_cluster, host, client) = setup("q5", &format!("bridges = [{:?}]\n", br.0)).await?;
    let mut spec = guest::spec("net", "blixard.net=1");
    spec.nics = vec![serde_json::from_value(
        serde_json::json!({ "bridge": br.0 }),
    )?];
    let tap = tap_name("net", 0);
    with_logs(&[&host], async {
        create_and_boot(&client, &host, &spec).await?;
        wait_console(&host, "net", "BLIXARD-GUEST-NET-UP").await?;
        let master = std::fs::read_link(format!("/sys/class/net/{tap}/master"))?;
        anyhow::ensure!(
            master.file_name().and_then(|n| n.to_str()) == Some(br.0.as_str()),
            "{tap} is enslaved to {master:?}, not {}",
            br.0
        );
        let c = console(&host, "net");
        let line = c
            .lines()
            .find(|l| l.contains("BLIXARD-GUEST-NET-UP"))
            .unwrap_or_default();
        anyhow::ensure!(line.contains(",UP"), "the guest's NIC is not up: {line}");
        client.stop_vm("net").await?;
        wait_state(&client, "net", VmState::Stopped, None).await?;
        wait::until(&format!("{tap} deleted"), BOOT, || async {
            Ok((!std::path::Path::new(&format!("/sys/class/net/{tap}")).exists()).then_some(()))
        })
        .await
    })
    .await
}

/// Every refusal ends with a clear error and no unit: `..` and absolute paths at the API
/// (400); at the agent, a missing file, an unreadable one (a
/// symlink loop: root reads any regular file), a bridge not in the agent's list and a listed
/// bridge that does not exist.
#[tokio::test]
async fn t40_qemu_refusals_start_no_unit() -> anyhow::Result<()> {
    let (_cluster, host, client) = setup("q6", "bridges = [\"bxabsent0\"]\n").await?;
    let img = host.image_dir();
    std::os::unix::fs::symlink(img.join("loop"), img.join("loop"))?;
    with_logs(&[&host], async {
        let mut dotdot = guest::spec("dotdot", "");
        dotdot.kernel = Some("../images/vmlinuz".into());
        let e = client.create_vm(&dotdot).await.expect_err("'..' accepted");
        anyhow::ensure!(e.status() == Some(400), "{e}");
        anyhow::ensure!(e.to_string().contains("'..'"), "{e}");
        // Absolute paths too are refused at admission now (issue 17), by the agent's rule.
        let mut abs = guest::spec("abs", "");
        abs.kernel = Some("/etc/hostname".into());
        let e = client.create_vm(&abs).await.expect_err("absolute path accepted");
        anyhow::ensure!(e.status() == Some(400), "{e}");
        anyhow::ensure!(e.to_string().contains("is absolute"), "{e}");

        let with = |name: &str, kernel: &str, bridge: Option<&str>| -> anyhow::Result<VmSpec> {
            let mut s = guest::spec(name, "");
            s.kernel = Some(kernel.into());
            if let Some(b) = bridge {
                s.nics = vec![serde_json::from_value(serde_json::json!({ "bridge": b }))?];
            }
            Ok(s)
        };
        let cases = [
            (with("missing", "nope", None)?, "does not exist"),
            (with("unreadable", "loop", None)?, "cannot be read"),
            (with("badbr", "vmlinuz", Some("bxnotlisted"))?, "is not an allowed bridge"),
            (with("gonebr", "vmlinuz", Some("bxabsent0"))?, "does not exist on this host"),
        ];
        for (spec, _) in &cases {
            create(&client, spec).await?;
        }
        for (spec, want) in &cases {
            let reason = wait_reason(&client, &spec.name, VmState::Failed).await?;
            eprintln!("{}: {reason}", spec.name);
            anyhow::ensure!(reason.contains(want), "{}: {reason}", spec.name);
            let log = host.agent_log();
            anyhow::ensure!(
                !log.lines()
                    .any(|l| l.contains("starting VM") && l.contains(&format!("vm={} ", spec.name))),
                "a unit was started for {}",
                spec.name
            );
            anyhow::ensure!(
                console(&host, &spec.name).trim().is_empty() || console(&host, &spec.name).contains("No entries"),
                "{} has journal lines",
                spec.name
            );
        }
        Ok(())
    })
    .await
}

/// A guest that ignores the power button: a stop made outside the agent (an operator's
/// `systemctl stop`) waits `graceful_stop_secs`, then systemd's SIGTERM ends QEMU. The agent
/// waits for the stopping unit and records its end once, as `stopped`.
#[tokio::test]
async fn t40_qemu_stubborn_guest_ends_on_sigterm_after_the_timeout() -> anyhow::Result<()> {
    let (_cluster, host, client) = setup(
        "q7",
        "[vm_unit]\ngraceful_stop_secs = 5\nstop_timeout_secs = 20\n",
    )
    .await?;
    let sd = Systemd::connect_address(&host.bus_address()).await?;
    let unit = unit_name("mule");
    with_logs(&[&host], async {
        create_and_boot(&client, &host, &guest::spec("mule", "blixard.nobutton=1")).await?;
        wait_state(&client, "mule", VmState::Running, Some("q7")).await?;
        let t0 = Instant::now();
        sd.stop_unit(&unit).await?;
        let reason = wait_reason(&client, "mule", VmState::Stopped).await?;
        let took = t0.elapsed();
        eprintln!("stubborn guest stopped after {took:?}: {reason}");
        anyhow::ensure!(took >= Duration::from_secs(5), "ended after {took:?}");
        // journald may show the last lines a moment after the agent saw the unit end.
        wait_console(&host, "mule", "qmp-powerdown: TimedOut").await?;
        wait_console(&host, "mule", "terminating on signal 15").await?;
        let ends = host
            .agent_log()
            .lines()
            .filter(|l| l.contains("VM mule on ") && l.contains(" ended "))
            .count();
        anyhow::ensure!(ends == 1, "the end was recorded {ends} times");
        Ok(())
    })
    .await
}
