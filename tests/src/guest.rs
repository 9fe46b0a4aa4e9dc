//! The test guest: the Debian cloud kernel and the busybox initramfs that
//! `tests/guest/build.sh` builds (and caches), placed into a simulated host's image
//! directory so that VM specs can name them as `vmlinuz` and `initrd.gz`.
//!
//! The guest's console lines the tests look for are the constants below; its kernel command
//! line switches (`blixard.exit=poweroff|panic`, `blixard.net=1`) are described in the
//! build script.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context};

use crate::host::SimHost;

/// Printed by `/init` once the guest runs.
pub const MARKER: &str = "BLIXARD-GUEST-BOOTED";
/// Printed every 2 s after the marker: `BLIXARD-GUEST-HEARTBEAT n`.
pub const HEARTBEAT: &str = "BLIXARD-GUEST-HEARTBEAT";
/// Printed when the guest sees the ACPI power button.
pub const POWER_BUTTON: &str = "BLIXARD-GUEST-POWER-BUTTON";
/// The QEMU binary the tests use.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// The directory holding `vmlinuz` and `initrd.gz`: `$BLIXARD_GUEST_DIR/current` if built,
/// otherwise the output of `tests/guest/build.sh` (run once per test process).
pub fn images() -> anyhow::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let out = Command::new(&script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    for f in ["vmlinuz", "initrd.gz"] {
        if !dir.join(f).is_file() {
            bail!("the test guest has no {f} in {}", dir.display());
        }
    }
    Ok(dir)
}

/// Copies the guest's `vmlinuz` and `initrd.gz` into `host`'s image directory.
pub fn install(host: &SimHost) -> anyhow::Result<()> {
    install_from(&images()?, host)
}

/// Copies `vmlinuz` and `initrd.gz` from `src` (a build of `tests/guest/build.sh`) into
/// `host`'s image directory.
pub fn install_from(src: &Path, host: &SimHost) -> anyhow::Result<()> {
    let dst = host.image_dir();
    for f in ["vmlinuz", "initrd.gz"] {
        std::fs::copy(src.join(f), dst.join(f))
            .with_context(|| format!("copying {f} into {}", dst.display()))?;
    }
    Ok(())
}

/// Agent configuration (TOML) that offers QEMU on a simulated host.
pub fn agent_config() -> String {
    format!("[hypervisors]\nqemu = {QEMU:?}\n")
}

/// A QEMU VM of the test guest, with `extra` appended to the kernel command line.
pub fn spec(name: &str, extra_cmdline: &str) -> blixard_api::VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 128,
        "hypervisor": "qemu",
        "kernel": "vmlinuz",
        "initrd": "initrd.gz",
        "cmdline": format!("console=ttyS0 reboot=t panic=-1 quiet {extra_cmdline}").trim_end(),
        "restart_policy": "never",
    }))
    .unwrap_or_else(|e| panic!("spec {name}: {e}"))
}
