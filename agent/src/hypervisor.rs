//! The QEMU, cloud-hypervisor and Firecracker command builders.
//!
//! Each turns a [`VmSpec`] into an argv where every spec value is one whole element (never
//! split, never a shell word), image paths are resolved inside the image directory by
//! [`image_path::resolve`] before anything starts, and any value that lands inside a
//! `key=value,key=value` option string is refused if it holds a `,` (the option separator
//! of QEMU and cloud-hypervisor), so it cannot add an option.
//!
//! QEMU runs `-M microvm` (or `q35`, [`QemuMachine`]), `-accel kvm` when the host's KVM probe
//! said yes and `tcg` otherwise, with the serial console on stdout (the unit's journal) and a
//! QMP socket in the runtime directory for a graceful stop, and a pvpanic device so that a
//! guest kernel panic ends QEMU with a failure. Under TCG with `microvm` the
//! kernel command line gets `tsc_early_khz=`: without it the kernel's TSC calibration
//! against the PIT fails in most boots ("Marking TSC unstable") and the guest hangs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blixard_api::{DiskFormat, Hypervisor, VmSpec};
use serde::{Deserialize, Serialize};

use crate::command::{CommandBuilder, CommandError, UnitHooks};
use crate::image_path::{self, FileProblem};
use crate::unit_spec::{vm_runtime_dir, HostAccess};

/// The file check image paths go through (real: [`image_path::fs_check`]).
pub type FileCheck = Arc<dyn Fn(&Path, &Path) -> Result<(), FileProblem> + Send + Sync>;

/// The TSC frequency given to a microvm guest under TCG.
pub const TCG_TSC_KHZ: &str = "tsc_early_khz=2400000";
/// Kernel command line of a VM whose spec has none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1";
/// Longest path of a unix socket (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// QEMU's machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QemuMachine {
    /// `-M microvm`: virtio-mmio devices, no PCI, no firmware; needs a kernel.
    #[default]
    Microvm,
    /// `-M q35`: the fallback for guests microvm cannot run (e.g. booting from a disk).
    Q35,
}

impl QemuMachine {
    fn as_str(self) -> &'static str {
        match self {
            QemuMachine::Microvm => "microvm",
            QemuMachine::Q35 => "q35",
        }
    }
    fn blk_device(self) -> &'static str {
        match self {
            QemuMachine::Microvm => "virtio-blk-device",
            QemuMachine::Q35 => "virtio-blk-pci",
        }
    }
    fn net_device(self) -> &'static str {
        match self {
            QemuMachine::Microvm => "virtio-net-device",
            QemuMachine::Q35 => "virtio-net-pci",
        }
    }
}

/// What every builder needs from the agent's configuration.
#[derive(Clone)]
pub struct HostPaths {
    pub binary: PathBuf,
    pub image_dir: PathBuf,
    /// Where the VMs' sockets go: `<runtime_dir>/<vm>.<suffix>`, or, with `per_vm_runtime`,
    /// `<runtime_dir>/<vm>/<suffix>` (each VM's own `RuntimeDirectory=` under the system
    /// manager, see [`crate::unit_spec::vm_runtime_dir`]).
    pub runtime_dir: PathBuf,
    pub per_vm_runtime: bool,
    pub check: FileCheck,
}

impl std::fmt::Debug for HostPaths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPaths")
            .field("binary", &self.binary)
            .field("image_dir", &self.image_dir)
            .field("runtime_dir", &self.runtime_dir)
            .field("per_vm_runtime", &self.per_vm_runtime)
            .finish_non_exhaustive()
    }
}

fn unsupported(hv: Hypervisor, message: impl Into<String>) -> CommandError {
    CommandError::Unsupported {
        hypervisor: hv.as_str(),
        message: message.into(),
    }
}

/// `value` as a value inside a comma-separated option string.
fn opt_value(hv: Hypervisor, what: &str, value: &str) -> Result<String, CommandError> {
    if value.contains(',') {
        return Err(unsupported(hv, format!("{what} {value:?} contains ','")));
    }
    if value.chars().any(char::is_control) {
        return Err(unsupported(
            hv,
            format!("{what} {value:?} contains control characters"),
        ));
    }
    Ok(value.to_string())
}

fn path_str(hv: Hypervisor, what: &str, p: &Path) -> Result<String, CommandError> {
    let s = p
        .to_str()
        .ok_or_else(|| unsupported(hv, format!("{what} {} is not UTF-8", p.display())))?;
    opt_value(hv, what, s)
}

impl HostPaths {
    fn resolve(&self, hv: Hypervisor, field: &str, value: &str) -> Result<String, CommandError> {
        let p = image_path::resolve(&self.image_dir, field, value, &*self.check)
            .map_err(CommandError::Path)?;
        path_str(hv, field, &p)
    }

    /// `<runtime_dir>/<vm>.<suffix>` (or `<runtime_dir>/<vm>/<suffix>`): a socket of this VM.
    fn socket(&self, hv: Hypervisor, vm: &str, suffix: &str) -> Result<String, CommandError> {
        let p = self.vm_file(vm, suffix);
        let s = path_str(hv, "socket path", &p)?;
        if s.len() > MAX_SOCKET_PATH {
            return Err(unsupported(
                hv,
                format!("socket path {s} is longer than {MAX_SOCKET_PATH} bytes"),
            ));
        }
        Ok(s)
    }

    fn vm_file(&self, vm: &str, suffix: &str) -> PathBuf {
        if self.per_vm_runtime {
            self.runtime_dir.join(vm).join(suffix)
        } else {
            self.runtime_dir.join(format!("{vm}.{suffix}"))
        }
    }

    fn binary(&self, hv: Hypervisor) -> Result<String, CommandError> {
        self.binary
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| unsupported(hv, "the binary path is not UTF-8"))
    }
}

/// FNV-1a, 64 bits: stable across Rust releases, unlike `DefaultHasher`.
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The MAC of NIC `index` of VM `vm` when the spec gives none: `52:54:00` (QEMU's locally
/// administered prefix) and three bytes of a hash of the name and index.
pub fn derived_mac(vm: &str, index: usize) -> String {
    let h = fnv1a(format!("{vm}/{index}").as_bytes()).to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

/// The TAP device of NIC `index` of VM `vm`: at most 15 bytes (IFNAMSIZ), deterministic.
pub fn tap_name(vm: &str, index: usize) -> String {
    let h = fnv1a(vm.as_bytes()) as u32;
    format!("bxv{h:08x}n{index}")
}

fn mac_of(hv: Hypervisor, spec: &VmSpec, index: usize) -> Result<String, CommandError> {
    match &spec.nics[index].mac {
        Some(m) => opt_value(hv, "mac", m),
        None => Ok(derived_mac(&spec.name, index)),
    }
}

fn check_name(hv: Hypervisor, name: &str) -> Result<(), CommandError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(unsupported(
            hv,
            format!("VM name {name:?} is not a DNS label"),
        ))
    }
}

/// The graceful stop of a QEMU VM: `<agent> qmp-powerdown --socket <qmp> --timeout <secs>`
/// as the unit's `ExecStop=` (see [`crate::qmp`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulStop {
    /// The agent's own binary.
    pub agent: PathBuf,
    /// How long the guest gets to power off after the ACPI power button.
    pub timeout_secs: u64,
}

/// Under the system manager a VM runs as a dynamic user that only exists while its unit
/// runs, so what it must own is handed to it at start by `<agent> vm-owner` (see
/// [`crate::vm_owner`]), in the unit's privileged `ExecStartPre=`: its writable disks, and its
/// tap devices (`ip tuntap add … user <uid>`, which lets it attach without CAP_NET_ADMIN). The
/// disks go back to the image directory's owner in `ExecStopPost=`, so that a dynamic uid
/// given to another unit later owns nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOwner {
    /// The agent's own binary.
    pub agent: PathBuf,
}

impl VmOwner {
    /// `<agent> vm-owner --like <dir> [--chown FILE]… [-- ARGV…]`.
    fn command(
        &self,
        hv: Hypervisor,
        like: &str,
        chown: &[String],
        argv: &[String],
    ) -> Result<Vec<String>, CommandError> {
        let agent = self
            .agent
            .to_str()
            .ok_or_else(|| unsupported(hv, "the agent's path is not UTF-8"))?;
        let mut c = vec![
            agent.to_string(),
            "vm-owner".into(),
            "--like".into(),
            like.into(),
        ];
        for f in chown {
            c.push("--chown".into());
            c.push(f.clone());
        }
        if !argv.is_empty() {
            c.push("--".into());
            c.extend(argv.iter().cloned());
        }
        Ok(c)
    }

    /// Gives `spec`'s writable disks to the VM's user at start, and back to the image
    /// directory's owner at stop.
    fn disk_hooks(
        &self,
        paths: &HostPaths,
        hv: Hypervisor,
        spec: &VmSpec,
    ) -> Result<UnitHooks, CommandError> {
        let disks = writable_disks(paths, hv, spec)?;
        if disks.is_empty() {
            return Ok(UnitHooks::default());
        }
        let image_dir = path_str(hv, "image directory", &paths.image_dir)?;
        Ok(UnitHooks {
            start_pre: vec![self.command(hv, &vm_runtime_dir(&spec.name), &disks, &[])?],
            stop: Vec::new(),
            stop_post: vec![self.command(hv, &image_dir, &disks, &[])?],
        })
    }
}

/// Whether a bridge exists on this host (real: [`bridge_exists`]).
pub type BridgeCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// `/sys/class/net/<name>/bridge` exists: `name` is a bridge of this network namespace.
pub fn bridge_exists(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .join("bridge")
        .is_dir()
}

/// Tap networking of QEMU VMs: each NIC is a tap device on one of the allowed bridges,
/// created by the unit's `ExecStartPre=` with `ip` and deleted by its `ExecStopPost=`.
#[derive(Clone)]
pub struct TapNetwork {
    /// The `ip` binary (iproute2).
    pub ip: PathBuf,
    /// Bridges VMs may join (the agent's `bridges` setting).
    pub bridges: Vec<String>,
    pub exists: BridgeCheck,
}

impl std::fmt::Debug for TapNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapNetwork")
            .field("ip", &self.ip)
            .field("bridges", &self.bridges)
            .finish_non_exhaustive()
    }
}

impl TapNetwork {
    /// The start and stop commands of NIC `index` of VM `vm` on `bridge`, after checking the
    /// bridge is allowed and exists.
    fn hooks(
        &self,
        vm: &str,
        index: usize,
        bridge: &str,
        owner: Option<(&VmOwner, &str)>,
    ) -> Result<UnitHooks, CommandError> {
        let hv = Hypervisor::Qemu;
        if !self.bridges.iter().any(|b| b == bridge) {
            return Err(unsupported(
                hv,
                format!(
                    "nics[{index}].bridge {bridge:?} is not an allowed bridge on this host (allowed: {})",
                    if self.bridges.is_empty() {
                        "none".to_string()
                    } else {
                        self.bridges.join(", ")
                    }
                ),
            ));
        }
        if !(self.exists)(bridge) {
            return Err(unsupported(
                hv,
                format!("nics[{index}].bridge {bridge:?} does not exist on this host"),
            ));
        }
        let ip = self
            .ip
            .to_str()
            .ok_or_else(|| unsupported(hv, "the ip binary's path is not UTF-8"))?;
        let tap = tap_name(vm, index);
        let cmd = |args: &[&str]| -> Vec<String> {
            std::iter::once(ip)
                .chain(args.iter().copied())
                .map(String::from)
                .collect()
        };
        let add = match owner {
            None => cmd(&["tuntap", "add", "dev", &tap, "mode", "tap"]),
            Some((o, like)) => o.command(
                hv,
                like,
                &[],
                &cmd(&["tuntap", "add", "dev", &tap, "mode", "tap", "user", "{uid}"]),
            )?,
        };
        Ok(UnitHooks {
            start_pre: vec![
                add,
                // The host needs no address of its own on a VM's tap (no IPv6 link-local).
                cmd(&["link", "set", "dev", &tap, "addrgenmode", "none"]),
                cmd(&["link", "set", "dev", &tap, "master", bridge, "up"]),
            ],
            stop: Vec::new(),
            stop_post: vec![cmd(&["link", "del", "dev", &tap])],
        })
    }
}

/// QEMU (`qemu-system-x86_64`).
#[derive(Debug, Clone)]
pub struct QemuCommand {
    pub paths: HostPaths,
    pub machine: QemuMachine,
    /// `-accel kvm` when true, `-accel tcg` otherwise.
    pub kvm: bool,
    /// The unit's `ExecStop=`; without it a stop is systemd's SIGTERM.
    pub graceful_stop: Option<GracefulStop>,
    /// Tap devices for NICs; without it specs with NICs are refused.
    pub network: Option<TapNetwork>,
    /// Hands the VM's disks and taps to its dynamic user (the system manager); `None` under a
    /// user manager, whose VMs run as the agent's own user.
    pub owner: Option<VmOwner>,
}

impl QemuCommand {
    /// The kernel command line QEMU gets.
    fn cmdline(&self, spec: &VmSpec) -> String {
        let mut c = spec
            .cmdline
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if !self.kvm
            && self.machine == QemuMachine::Microvm
            && !c
                .split_whitespace()
                .any(|w| w.starts_with("tsc_early_khz="))
        {
            if !c.is_empty() {
                c.push(' ');
            }
            c.push_str(TCG_TSC_KHZ);
        }
        c
    }
}

impl CommandBuilder for QemuCommand {
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::Qemu
    }

    fn argv(&self, spec: &VmSpec) -> Result<Vec<String>, CommandError> {
        let hv = Hypervisor::Qemu;
        check_name(hv, &spec.name)?;
        if spec.vcpus == 0 {
            return Err(unsupported(hv, "vcpus must be at least 1"));
        }
        if self.machine == QemuMachine::Microvm && spec.kernel.is_none() {
            return Err(unsupported(
                hv,
                "machine microvm needs a kernel (use q35 to boot from a disk)",
            ));
        }
        let p = &self.paths;
        let mut a: Vec<String> = vec![p.binary(hv)?];
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
        push(&["-M", self.machine.as_str()]);
        // TCG's code buffer mapped twice, writable and executable apart (split-wx): the JIT
        // then never needs a writable and executable page, so the unit can deny them.
        push(&["-accel", if self.kvm { "kvm" } else { "tcg,split-wx=on" }]);
        if self.kvm {
            push(&["-cpu", "host"]);
        }
        push(&["-smp", &spec.vcpus.to_string()]);
        push(&["-m", &spec.memory_mib.to_string()]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            // A guest kernel panic (the guest's pvpanic driver) ends QEMU with status 1
            // instead of a silent reboot; the ISA pvpanic works on microvm and q35 alike.
            "-device",
            "pvpanic",
            "-action",
            "panic=exit-failure",
        ]);
        if let Some(k) = &spec.kernel {
            let k = p.resolve(hv, "kernel", k)?;
            a.push("-kernel".into());
            a.push(k);
            if let Some(i) = &spec.initrd {
                let i = p.resolve(hv, "initrd", i)?;
                a.push("-initrd".into());
                a.push(i);
            }
            // -append is not an option string: commas in a kernel command line are fine.
            a.push("-append".into());
            a.push(self.cmdline(spec));
        } else if spec.initrd.is_some() || spec.cmdline.is_some() {
            return Err(unsupported(hv, "initrd and cmdline need a kernel"));
        }
        for (i, d) in spec.disks.iter().enumerate() {
            let file = p.resolve(hv, &format!("disks[{i}].path"), &d.path)?;
            let format = match d.format {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            let mut drive = format!("file={file},format={format},if=none,id=disk{i}");
            if d.read_only {
                drive.push_str(",readonly=on");
            }
            a.push("-drive".into());
            a.push(drive);
            a.push("-device".into());
            a.push(format!("{},drive=disk{i}", self.machine.blk_device()));
        }
        for i in 0..spec.nics.len() {
            let mac = mac_of(hv, spec, i)?;
            let tap = tap_name(&spec.name, i);
            a.push("-netdev".into());
            a.push(format!(
                "tap,id=net{i},ifname={tap},script=no,downscript=no"
            ));
            a.push("-device".into());
            a.push(format!(
                "{},netdev=net{i},mac={mac}",
                self.machine.net_device()
            ));
        }
        let qmp = p.socket(hv, &spec.name, "qmp")?;
        a.push("-qmp".into());
        a.push(format!("unix:{qmp},server=on,wait=off"));
        Ok(a)
    }

    fn access(&self, spec: &VmSpec) -> Result<HostAccess, CommandError> {
        vmm_access(&self.paths, Hypervisor::Qemu, spec, self.kvm)
    }

    fn hooks(&self, spec: &VmSpec) -> Result<UnitHooks, CommandError> {
        let hv = Hypervisor::Qemu;
        let mut hooks = UnitHooks::default();
        if !spec.nics.is_empty() {
            let net = self.network.as_ref().ok_or_else(|| {
                unsupported(
                    hv,
                    "this host has no tap networking (no bridges configured)",
                )
            })?;
            let like = self.owner.as_ref().map(|o| (o, vm_runtime_dir(&spec.name)));
            for (i, nic) in spec.nics.iter().enumerate() {
                let owner = like.as_ref().map(|(o, d)| (*o, d.as_str()));
                let h = net.hooks(&spec.name, i, &nic.bridge, owner)?;
                hooks.start_pre.extend(h.start_pre);
                hooks.stop_post.extend(h.stop_post);
            }
        }
        if let Some(o) = &self.owner {
            let h = o.disk_hooks(&self.paths, hv, spec)?;
            hooks.start_pre.extend(h.start_pre);
            hooks.stop_post.extend(h.stop_post);
        }
        if let Some(g) = &self.graceful_stop {
            let agent = g
                .agent
                .to_str()
                .ok_or_else(|| unsupported(hv, "the agent's path is not UTF-8"))?;
            hooks.stop.push(vec![
                agent.to_string(),
                "qmp-powerdown".into(),
                "--socket".into(),
                self.paths.socket(hv, &spec.name, "qmp")?,
                "--timeout".into(),
                g.timeout_secs.to_string(),
            ]);
        }
        Ok(hooks)
    }
}

/// The resolved paths of `spec`'s writable disks.
fn writable_disks(
    paths: &HostPaths,
    hv: Hypervisor,
    spec: &VmSpec,
) -> Result<Vec<String>, CommandError> {
    spec.disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.read_only)
        .map(|(i, d)| paths.resolve(hv, &format!("disks[{i}].path"), &d.path))
        .collect()
}

/// What a VMM needs from the host: `/dev/kvm` (and the `kvm` group, which owns it) with KVM,
/// `/dev/net/tun` and the host's network namespace with NICs, its writable disks, and unix
/// sockets (its control socket). No IP sockets of its own, no writable and executable memory.
fn vmm_access(
    paths: &HostPaths,
    hv: Hypervisor,
    spec: &VmSpec,
    kvm: bool,
) -> Result<HostAccess, CommandError> {
    let mut a = HostAccess {
        writable: writable_disks(paths, hv, spec)?,
        address_families: vec!["AF_UNIX".into()],
        host_network: !spec.nics.is_empty(),
        ..HostAccess::default()
    };
    if kvm {
        a.devices.push("/dev/kvm".into());
        a.groups.push("kvm".into());
    }
    if !spec.nics.is_empty() {
        a.devices.push("/dev/net/tun".into());
    }
    Ok(a)
}

/// cloud-hypervisor (needs KVM). Its serial console goes to stdout, its API socket lives in
/// the runtime directory.
#[derive(Debug, Clone)]
pub struct CloudHypervisorCommand {
    pub paths: HostPaths,
    /// Hands the VM's writable disks to its dynamic user (see [`VmOwner`]).
    pub owner: Option<VmOwner>,
}

impl CommandBuilder for CloudHypervisorCommand {
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::CloudHypervisor
    }

    fn access(&self, spec: &VmSpec) -> Result<HostAccess, CommandError> {
        vmm_access(&self.paths, Hypervisor::CloudHypervisor, spec, true)
    }

    fn hooks(&self, spec: &VmSpec) -> Result<UnitHooks, CommandError> {
        match &self.owner {
            Some(o) => o.disk_hooks(&self.paths, Hypervisor::CloudHypervisor, spec),
            None => Ok(UnitHooks::default()),
        }
    }

    fn argv(&self, spec: &VmSpec) -> Result<Vec<String>, CommandError> {
        let hv = Hypervisor::CloudHypervisor;
        check_name(hv, &spec.name)?;
        let p = &self.paths;
        let kernel = spec
            .kernel
            .as_deref()
            .ok_or_else(|| unsupported(hv, "a kernel is required"))?;
        let api = p.socket(hv, &spec.name, "ch.sock")?;
        let mut a = vec![
            p.binary(hv)?,
            "--api-socket".into(),
            format!("path={api}"),
            "--cpus".into(),
            format!("boot={}", spec.vcpus),
            "--memory".into(),
            format!("size={}M", spec.memory_mib),
            "--kernel".into(),
            p.resolve(hv, "kernel", kernel)?,
        ];
        if let Some(i) = &spec.initrd {
            a.push("--initramfs".into());
            a.push(p.resolve(hv, "initrd", i)?);
        }
        a.push("--cmdline".into());
        a.push(
            spec.cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        );
        for (i, d) in spec.disks.iter().enumerate() {
            let file = p.resolve(hv, &format!("disks[{i}].path"), &d.path)?;
            a.push("--disk".into());
            a.push(format!(
                "path={file},readonly={}",
                if d.read_only { "on" } else { "off" }
            ));
        }
        for i in 0..spec.nics.len() {
            let mac = mac_of(hv, spec, i)?;
            a.push("--net".into());
            a.push(format!("tap={},mac={mac}", tap_name(&spec.name, i)));
        }
        a.extend(["--serial", "tty", "--console", "off"].map(String::from));
        Ok(a)
    }
}

/// Firecracker (needs KVM). Firecracker takes the machine from a JSON file, not from argv:
/// the argv points at `<runtime_dir>/<vm>.fc.json`, which [`firecracker_config`] describes
/// (writing it before the unit starts is the agent's job).
#[derive(Debug, Clone)]
pub struct FirecrackerCommand {
    pub paths: HostPaths,
}

impl FirecrackerCommand {
    fn config_path(&self, vm: &str) -> PathBuf {
        self.paths.vm_file(vm, "fc.json")
    }
}

/// The `--config-file` contents of `spec`'s Firecracker VM, its paths resolved.
pub fn firecracker_config(
    paths: &HostPaths,
    spec: &VmSpec,
) -> Result<serde_json::Value, CommandError> {
    let hv = Hypervisor::Firecracker;
    let kernel = spec
        .kernel
        .as_deref()
        .ok_or_else(|| unsupported(hv, "a kernel is required"))?;
    let mut boot = serde_json::json!({
        "kernel_image_path": paths.resolve(hv, "kernel", kernel)?,
        "boot_args": spec.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
    });
    if let Some(i) = &spec.initrd {
        boot["initrd_path"] = paths.resolve(hv, "initrd", i)?.into();
    }
    let mut drives = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        if d.format != DiskFormat::Raw {
            return Err(unsupported(hv, "only raw disks are supported"));
        }
        drives.push(serde_json::json!({
            "drive_id": format!("disk{i}"),
            "path_on_host": paths.resolve(hv, &format!("disks[{i}].path"), &d.path)?,
            "is_root_device": false,
            "is_read_only": d.read_only,
        }));
    }
    let mut nics = Vec::new();
    for i in 0..spec.nics.len() {
        nics.push(serde_json::json!({
            "iface_id": format!("net{i}"),
            "host_dev_name": tap_name(&spec.name, i),
            "guest_mac": mac_of(hv, spec, i)?,
        }));
    }
    Ok(serde_json::json!({
        "boot-source": boot,
        "drives": drives,
        "network-interfaces": nics,
        "machine-config": { "vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib },
    }))
}

impl CommandBuilder for FirecrackerCommand {
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::Firecracker
    }

    fn access(&self, spec: &VmSpec) -> Result<HostAccess, CommandError> {
        vmm_access(&self.paths, Hypervisor::Firecracker, spec, true)
    }

    fn argv(&self, spec: &VmSpec) -> Result<Vec<String>, CommandError> {
        let hv = Hypervisor::Firecracker;
        check_name(hv, &spec.name)?;
        // Resolves and checks every path before anything starts.
        firecracker_config(&self.paths, spec)?;
        let p = &self.paths;
        Ok(vec![
            p.binary(hv)?,
            "--api-sock".into(),
            p.socket(hv, &spec.name, "fc.sock")?,
            "--config-file".into(),
            path_str(hv, "config file", &self.config_path(&spec.name))?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blixard_api::{DiskSpec, NicSpec};

    fn paths(missing: &'static [&'static str]) -> HostPaths {
        HostPaths {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            image_dir: "/img".into(),
            runtime_dir: "/run/bx".into(),
            per_vm_runtime: false,
            check: Arc::new(move |_, p: &Path| {
                if missing.iter().any(|m| p == Path::new(m)) {
                    Err(FileProblem::Missing)
                } else {
                    Ok(())
                }
            }),
        }
    }

    fn base() -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "name": "web-1", "vcpus": 2, "memory_mib": 256,
            "kernel": "vmlinuz", "initrd": "initrd.gz",
        }))
        .expect("spec")
    }

    fn qemu(machine: QemuMachine, kvm: bool) -> QemuCommand {
        QemuCommand {
            paths: paths(&["/img/missing"]),
            machine,
            kvm,
            graceful_stop: None,
            network: None,
            owner: None,
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn qemu_microvm_tcg_full_argv() {
        let argv = qemu(QemuMachine::Microvm, false)
            .argv(&base())
            .expect("argv");
        assert_eq!(
            argv,
            s(&[
                "/usr/bin/qemu-system-x86_64",
                "-name",
                "guest=web-1,debug-threads=on",
                "-M",
                "microvm",
                "-accel",
                "tcg,split-wx=on",
                "-smp",
                "2",
                "-m",
                "256",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                "-device",
                "pvpanic",
                "-action",
                "panic=exit-failure",
                "-kernel",
                "/img/vmlinuz",
                "-initrd",
                "/img/initrd.gz",
                "-append",
                "console=ttyS0 reboot=t panic=-1 tsc_early_khz=2400000",
                "-qmp",
                "unix:/run/bx/web-1.qmp,server=on,wait=off",
            ])
        );
    }

    /// (machine, kvm, cmdline, expected -accel, expected -append)
    #[test]
    fn qemu_accel_and_cmdline_table() {
        let cases = [
            (
                QemuMachine::Microvm,
                false,
                Some("console=ttyS0"),
                "tcg,split-wx=on",
                "console=ttyS0 tsc_early_khz=2400000",
            ),
            (
                QemuMachine::Microvm,
                false,
                Some("console=ttyS0 tsc_early_khz=1000"),
                "tcg,split-wx=on",
                "console=ttyS0 tsc_early_khz=1000",
            ),
            (
                QemuMachine::Microvm,
                false,
                Some(""),
                "tcg,split-wx=on",
                "tsc_early_khz=2400000",
            ),
            (
                QemuMachine::Microvm,
                true,
                Some("console=ttyS0"),
                "kvm",
                "console=ttyS0",
            ),
            (
                QemuMachine::Q35,
                false,
                Some("console=ttyS0"),
                "tcg,split-wx=on",
                "console=ttyS0",
            ),
            (QemuMachine::Q35, true, None, "kvm", DEFAULT_CMDLINE),
            (
                QemuMachine::Microvm,
                false,
                Some("console=ttyS0,115200; rm -rf /"),
                "tcg,split-wx=on",
                "console=ttyS0,115200; rm -rf / tsc_early_khz=2400000",
            ),
        ];
        for (machine, kvm, cmdline, accel, append) in cases {
            let mut spec = base();
            spec.cmdline = cmdline.map(String::from);
            let argv = qemu(machine, kvm).argv(&spec).expect("argv");
            let after = |flag: &str| {
                let i = argv.iter().position(|a| a == flag).expect(flag);
                argv[i + 1].clone()
            };
            assert_eq!(after("-accel"), accel, "{machine:?} {kvm} {cmdline:?}");
            assert_eq!(after("-append"), append, "{machine:?} {kvm} {cmdline:?}");
            assert_eq!(after("-M"), machine.as_str());
            assert_eq!(argv.contains(&"host".to_string()), kvm);
        }
    }

    #[test]
    fn qemu_disks_and_nics() {
        let mut spec = base();
        spec.disks = vec![
            DiskSpec {
                path: "root.img".into(),
                read_only: false,
                format: DiskFormat::Raw,
            },
            DiskSpec {
                path: "/img/data.qcow2".into(),
                read_only: true,
                format: DiskFormat::Qcow2,
            },
        ];
        spec.nics = vec![
            NicSpec {
                bridge: "br0".into(),
                mac: None,
            },
            NicSpec {
                bridge: "br0".into(),
                mac: Some("52:54:00:aa:bb:cc".into()),
            },
        ];
        let mac0 = derived_mac("web-1", 0);
        let tap = |i| tap_name("web-1", i);
        for (machine, blk, net) in [
            (
                QemuMachine::Microvm,
                "virtio-blk-device",
                "virtio-net-device",
            ),
            (QemuMachine::Q35, "virtio-blk-pci", "virtio-net-pci"),
        ] {
            let argv = qemu(machine, false).argv(&spec).expect("argv");
            let joined = argv.join(" ");
            for want in [
                "-drive file=/img/root.img,format=raw,if=none,id=disk0".to_string(),
                format!("-device {blk},drive=disk0"),
                "-drive file=/img/data.qcow2,format=qcow2,if=none,id=disk1,readonly=on".into(),
                format!("-device {blk},drive=disk1"),
                format!(
                    "-netdev tap,id=net0,ifname={},script=no,downscript=no",
                    tap(0)
                ),
                format!("-device {net},netdev=net0,mac={mac0}"),
                format!(
                    "-netdev tap,id=net1,ifname={},script=no,downscript=no",
                    tap(1)
                ),
                format!("-device {net},netdev=net1,mac=52:54:00:aa:bb:cc"),
            ] {
                assert!(
                    joined.contains(&want),
                    "{machine:?}: {want} not in {joined}"
                );
            }
            assert!(!argv[1..]
                .iter()
                .any(|a| a.contains("readonly=on") && a.contains("disk0")));
        }
    }

    #[test]
    fn macs_and_taps_are_deterministic_and_valid() {
        assert_eq!(derived_mac("web-1", 0), derived_mac("web-1", 0));
        assert_ne!(derived_mac("web-1", 0), derived_mac("web-1", 1));
        assert_ne!(derived_mac("web-1", 0), derived_mac("web-2", 0));
        for name in ["a", "web-1", &"x".repeat(63)] {
            for i in [0, 1, 7] {
                let mac = derived_mac(name, i);
                assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");
                let tap = tap_name(name, i);
                assert!(tap.len() <= 15, "{tap}");
            }
        }
    }

    #[test]
    fn qemu_refusals_table() {
        type Edit = fn(&mut VmSpec);
        let cases: [(&str, Edit, QemuMachine, &str); 9] = [
            (
                "missing kernel file",
                |s| s.kernel = Some("missing".into()),
                QemuMachine::Microvm,
                "kernel: /img/missing does not exist",
            ),
            (
                "missing initrd file",
                |s| s.initrd = Some("missing".into()),
                QemuMachine::Microvm,
                "initrd: /img/missing does not exist",
            ),
            (
                "dotdot",
                |s| s.kernel = Some("../etc/shadow".into()),
                QemuMachine::Microvm,
                "must not contain '..'",
            ),
            (
                "absolute outside",
                |s| s.kernel = Some("/etc/shadow".into()),
                QemuMachine::Microvm,
                "outside the image directory",
            ),
            (
                "disk outside",
                |s| {
                    s.disks = vec![DiskSpec {
                        path: "/boot/x".into(),
                        read_only: true,
                        format: DiskFormat::Raw,
                    }]
                },
                QemuMachine::Q35,
                "disks[0].path",
            ),
            (
                "comma in disk",
                |s| {
                    s.disks = vec![DiskSpec {
                        path: "a,file=/etc/shadow".into(),
                        read_only: true,
                        format: DiskFormat::Raw,
                    }]
                },
                QemuMachine::Q35,
                "contain ','",
            ),
            (
                "comma in mac",
                |s| {
                    s.nics = vec![NicSpec {
                        bridge: "br0".into(),
                        mac: Some("52:54:00:00:00:01,x=y".into()),
                    }]
                },
                QemuMachine::Q35,
                "contains ','",
            ),
            (
                "microvm without kernel",
                |s| {
                    s.kernel = None;
                    s.initrd = None;
                },
                QemuMachine::Microvm,
                "needs a kernel",
            ),
            (
                "bad name",
                |s| s.name = "a,b".into(),
                QemuMachine::Microvm,
                "not a DNS label",
            ),
        ];
        for (what, edit, machine, want) in cases {
            let mut spec = base();
            edit(&mut spec);
            let e = qemu(machine, false).argv(&spec).expect_err(what);
            assert!(e.to_string().contains(want), "{what}: {e}");
        }
    }

    #[test]
    fn long_runtime_dir_is_refused() {
        let mut q = qemu(QemuMachine::Microvm, false);
        q.paths.runtime_dir = PathBuf::from(format!("/{}", "r".repeat(120)));
        let e = q.argv(&base()).expect_err("long");
        assert!(e.to_string().contains("socket path"), "{e}");
        q.paths.runtime_dir = PathBuf::from("/run/a,b");
        assert!(q
            .argv(&base())
            .expect_err("comma")
            .to_string()
            .contains("','"));
    }

    #[test]
    fn qemu_stops_gracefully_through_the_agents_qmp_powerdown() {
        let mut q = qemu(QemuMachine::Microvm, false);
        assert_eq!(q.hooks(&base()).expect("hooks"), UnitHooks::default());
        q.graceful_stop = Some(GracefulStop {
            agent: "/usr/bin/blixard-agent".into(),
            timeout_secs: 7,
        });
        let hooks = q.hooks(&base()).expect("hooks");
        assert_eq!(
            hooks.stop,
            vec![s(&[
                "/usr/bin/blixard-agent",
                "qmp-powerdown",
                "--socket",
                "/run/bx/web-1.qmp",
                "--timeout",
                "7",
            ])]
        );
        assert!(hooks.start_pre.is_empty() && hooks.stop_post.is_empty());
    }

    #[test]
    fn nics_become_taps_on_allowed_existing_bridges() {
        let mut q = qemu(QemuMachine::Microvm, false);
        let mut spec = base();
        spec.nics = vec![NicSpec {
            bridge: "br0".into(),
            mac: None,
        }];
        let e = q.hooks(&spec).expect_err("no network");
        assert!(e.to_string().contains("no tap networking"), "{e}");
        q.network = Some(TapNetwork {
            ip: "/usr/sbin/ip".into(),
            bridges: vec!["br0".into(), "gone".into()],
            exists: Arc::new(|b| b == "br0"),
        });
        let tap = tap_name("web-1", 0);
        let h = q.hooks(&spec).expect("hooks");
        assert_eq!(
            h.start_pre,
            vec![
                s(&["/usr/sbin/ip", "tuntap", "add", "dev", &tap, "mode", "tap"]),
                s(&[
                    "/usr/sbin/ip",
                    "link",
                    "set",
                    "dev",
                    &tap,
                    "addrgenmode",
                    "none"
                ]),
                s(&[
                    "/usr/sbin/ip",
                    "link",
                    "set",
                    "dev",
                    &tap,
                    "master",
                    "br0",
                    "up"
                ]),
            ]
        );
        assert_eq!(
            h.stop_post,
            vec![s(&["/usr/sbin/ip", "link", "del", "dev", &tap])]
        );
        let cases = [
            (
                "br9",
                "\"br9\" is not an allowed bridge on this host (allowed: br0, gone)",
            ),
            ("gone", "\"gone\" does not exist on this host"),
        ];
        for (bridge, want) in cases {
            spec.nics[0].bridge = bridge.into();
            let e = q.hooks(&spec).expect_err(bridge).to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains("nics[0].bridge"), "{e}");
        }
    }

    #[test]
    fn every_spec_value_is_one_element() {
        let mut spec = base();
        spec.cmdline = Some("a b  -device evil --x".into());
        let argv = qemu(QemuMachine::Microvm, false).argv(&spec).expect("argv");
        assert!(argv.contains(&"a b  -device evil --x tsc_early_khz=2400000".to_string()));
        // Only the builder's own pvpanic device: the cmdline added none.
        assert_eq!(argv.iter().filter(|a| *a == "-device").count(), 1);
    }

    #[test]
    fn cloud_hypervisor_argv() {
        let mut spec = base();
        spec.cmdline = Some("console=ttyS0".into());
        spec.disks = vec![DiskSpec {
            path: "root.img".into(),
            read_only: true,
            format: DiskFormat::Raw,
        }];
        spec.nics = vec![NicSpec {
            bridge: "br0".into(),
            mac: Some("52:54:00:00:00:02".into()),
        }];
        let mut p = paths(&[]);
        p.binary = "/usr/bin/cloud-hypervisor".into();
        let argv = CloudHypervisorCommand {
            paths: p.clone(),
            owner: None,
        }
        .argv(&spec)
        .expect("argv");
        assert_eq!(
            argv,
            s(&[
                "/usr/bin/cloud-hypervisor",
                "--api-socket",
                "path=/run/bx/web-1.ch.sock",
                "--cpus",
                "boot=2",
                "--memory",
                "size=256M",
                "--kernel",
                "/img/vmlinuz",
                "--initramfs",
                "/img/initrd.gz",
                "--cmdline",
                "console=ttyS0",
                "--disk",
                "path=/img/root.img,readonly=on",
                "--net",
                &format!("tap={},mac=52:54:00:00:00:02", tap_name("web-1", 0)),
                "--serial",
                "tty",
                "--console",
                "off",
            ])
        );
        // Under the system manager its writable disks go to the VM's user and back.
        spec.disks[0].read_only = false;
        let ch = CloudHypervisorCommand {
            paths: p.clone(),
            owner: Some(VmOwner {
                agent: "/usr/bin/blixard-agent".into(),
            }),
        };
        let h = ch.hooks(&spec).expect("hooks");
        assert_eq!(
            (h.start_pre, h.stop_post),
            (
                vec![s(&[
                    "/usr/bin/blixard-agent",
                    "vm-owner",
                    "--like",
                    "/run/blixard-vm/web-1",
                    "--chown",
                    "/img/root.img",
                ])],
                vec![s(&[
                    "/usr/bin/blixard-agent",
                    "vm-owner",
                    "--like",
                    "/img",
                    "--chown",
                    "/img/root.img",
                ])],
            )
        );
        spec.kernel = None;
        spec.initrd = None;
        let e = CloudHypervisorCommand {
            paths: p,
            owner: None,
        }
        .argv(&spec)
        .expect_err("no kernel");
        assert!(e.to_string().contains("kernel is required"), "{e}");
    }

    #[test]
    fn firecracker_argv_and_config() {
        let mut spec = base();
        spec.disks = vec![DiskSpec {
            path: "root.img".into(),
            read_only: true,
            format: DiskFormat::Raw,
        }];
        spec.nics = vec![NicSpec {
            bridge: "br0".into(),
            mac: None,
        }];
        let mut p = paths(&[]);
        p.binary = "/usr/bin/firecracker".into();
        let fc = FirecrackerCommand { paths: p.clone() };
        assert_eq!(
            fc.argv(&spec).expect("argv"),
            s(&[
                "/usr/bin/firecracker",
                "--api-sock",
                "/run/bx/web-1.fc.sock",
                "--config-file",
                "/run/bx/web-1.fc.json",
            ])
        );
        let c = firecracker_config(&p, &spec).expect("config");
        assert_eq!(c["boot-source"]["kernel_image_path"], "/img/vmlinuz");
        assert_eq!(c["boot-source"]["initrd_path"], "/img/initrd.gz");
        assert_eq!(c["boot-source"]["boot_args"], DEFAULT_CMDLINE);
        assert_eq!(c["drives"][0]["path_on_host"], "/img/root.img");
        assert_eq!(c["drives"][0]["is_read_only"], true);
        assert_eq!(
            c["network-interfaces"][0]["guest_mac"],
            derived_mac("web-1", 0).as_str()
        );
        assert_eq!(c["machine-config"]["vcpu_count"], 2);
        spec.disks[0].format = DiskFormat::Qcow2;
        assert!(fc
            .argv(&spec)
            .expect_err("qcow2")
            .to_string()
            .contains("raw"));
        spec.disks.clear();
        spec.kernel = Some("../x".into());
        assert!(fc
            .argv(&spec)
            .expect_err("dotdot")
            .to_string()
            .contains(".."));
    }
}
