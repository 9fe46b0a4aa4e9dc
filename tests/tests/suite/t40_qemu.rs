//! Real QEMU guests (TCG) on simulated hosts: the test guest of `tests/guest/build.sh`
//! booted through the API, its console in the host's journal, graceful stop, the guest's own
//! power-off and panic, QEMU failing to start, agent restarts, and refusals.
//!
//! Deadlines are generous: the marker appears after a median 2.3 s on an idle machine, but
//! other builds and tests share the 2 cores.

use std::time::{Duration, Instant};

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
        &format!("{}{extra}", guest::agent_config()),
    )?;
    wait_registered(&client, name, 1).await?;
    Ok((cluster, host, client))
}

/// The console (and unit) lines of `vm` in `host`'s journal.
fn console(host: &SimHost, vm: &str) -> String {
    host.journal(&["-u", &unit_name(vm)]).unwrap_or_default()
}

/// Waits until `vm`'s console shows a line containing `text`.
async fn wait_console(host: &SimHost, vm: &str, text: &str) -> anyhow::Result<()> {
    wait::until(&format!("{text:?} on {vm}'s console"), BOOT, || async {
        let c = console(host, vm);
        Ok(c.contains(text).then_some(()))
    })
    .await
}

async fn create_and_boot(client: &Client, host: &SimHost, spec: &VmSpec) -> anyhow::Result<()> {
    create(client, spec).await?;
    wait_console(host, &spec.name, guest::MARKER).await
}

/// A VM created through the API boots the real guest: its marker reaches the host's journal
/// under the VM's unit, and the API shows it running there.
#[tokio::test]
async fn t40_qemu_guest_boots_and_its_console_reaches_the_journal() -> anyhow::Result<()> {
    let (_cluster, host, client) = setup("q1", "").await?;
    with_logs(&[&host], async {
        let t0 = Instant::now();
        create_and_boot(&client, &host, &guest::spec("boot", "")).await?;
        eprintln!("vm create → marker: {:?}", t0.elapsed());
        wait_state(&client, "boot", VmState::Running, Some("q1")).await?;
        wait_console(&host, "boot", &format!("{} 2", guest::HEARTBEAT)).await?;
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
        let c = console(&host, "calm");
        assert!(
            c.contains(&format!("{}\n", guest::POWER_BUTTON)),
            "the guest did not see the power button:\n{c}"
        );
        assert!(c.contains("qmp-powerdown: Exited"), "{c}");
        Ok(())
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
