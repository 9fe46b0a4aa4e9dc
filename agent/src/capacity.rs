//! What this host offers to VMs: vCPUs, memory, disk of the data directory, KVM.
//!
//! The parsing parts are pure and table-tested; [`probe`] reads `/proc`, `/sys` and
//! `statvfs(2)`.
//!
//! KVM counts as available when `/dev/kvm` opens read-write **and** a hardware KVM module
//! (`kvm_intel` or `kvm_amd`) is loaded. A `/dev/kvm` that opens is not enough: on our CI
//! machines it belongs to `kvm_pvm`, which creates VMs and vCPUs happily but runs only guests
//! built for it, so the ioctl probe (`KVM_CREATE_VM`) would say yes there too. (An ioctl probe
//! would also need `unsafe`, which the workspace forbids.) `kvm = true|false` in the
//! configuration overrides the probe.

use std::fs::OpenOptions;
use std::path::Path;

use blixard_api::Capacity;

use crate::config::Config;

/// Errors of probing the host.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no MemTotal line")]
    NoMemTotal { path: String },
    #[error("cannot statvfs {path}")]
    Statvfs {
        path: String,
        #[source]
        source: nix::Error,
    },
}

/// The host's capacity and why KVM is (not) counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub capacity: Capacity,
    /// One line on the KVM decision, for the log.
    pub kvm_note: String,
}

/// `MemTotal` of `/proc/meminfo`, in MiB.
pub fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        let unit = parts.next().unwrap_or("kB");
        let kib = match unit {
            "kB" | "KiB" => value,
            "MB" | "MiB" => value * 1024,
            "B" => value / 1024,
            _ => return None,
        };
        Some(kib / 1024)
    })
}

/// Memory VMs may use: total minus the host's reserve, never below zero.
pub fn usable_memory_mib(total_mib: u64, reserve_mib: u64) -> u64 {
    total_mib.saturating_sub(reserve_mib)
}

/// Whether loaded kernel modules (names under `/sys/module`) include a hardware KVM module.
pub fn hardware_kvm_module<'a>(modules: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    modules
        .into_iter()
        .find(|m| *m == "kvm_intel" || *m == "kvm_amd")
}

/// GiB available to unprivileged users on the file system of a path, from statvfs figures.
pub fn disk_gib(blocks_available: u64, fragment_size: u64) -> u64 {
    blocks_available.saturating_mul(fragment_size) / (1024 * 1024 * 1024)
}

fn read(path: &str) -> Result<String, CapacityError> {
    std::fs::read_to_string(path).map_err(|source| CapacityError::Read {
        path: path.to_string(),
        source,
    })
}

/// KVM availability and a note on why.
pub fn probe_kvm(dev: &Path, sys_module: &Path) -> (bool, String) {
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev) {
        return (false, format!("{}: {e}", dev.display()));
    }
    let modules: Vec<String> = match std::fs::read_dir(sys_module) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => return (false, format!("{}: {e}", sys_module.display())),
    };
    match hardware_kvm_module(modules.iter().map(String::as_str)) {
        Some(m) => (true, format!("{} opens and {m} is loaded", dev.display())),
        None => {
            let others: Vec<&str> = modules
                .iter()
                .map(String::as_str)
                .filter(|m| m.starts_with("kvm"))
                .collect();
            (
                false,
                format!(
                    "{} opens but no hardware KVM module is loaded (found: {})",
                    dev.display(),
                    if others.is_empty() {
                        "none".to_string()
                    } else {
                        others.join(", ")
                    }
                ),
            )
        }
    }
}

/// Probes this host.
pub fn probe(config: &Config) -> Result<Probe, CapacityError> {
    let vcpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let meminfo = read("/proc/meminfo")?;
    let total = parse_mem_total_mib(&meminfo).ok_or_else(|| CapacityError::NoMemTotal {
        path: "/proc/meminfo".into(),
    })?;
    // The data directory may not exist yet on a fresh host: measure its nearest ancestor.
    let mut dir = config.data_dir.as_path();
    while !dir.exists() {
        match dir.parent() {
            Some(p) => dir = p,
            None => break,
        }
    }
    let st = nix::sys::statvfs::statvfs(dir).map_err(|source| CapacityError::Statvfs {
        path: dir.display().to_string(),
        source,
    })?;
    let disk = disk_gib(st.blocks_available() as u64, st.fragment_size() as u64);
    let (kvm, kvm_note) = match config.kvm {
        Some(forced) => (forced, format!("set to {forced} by the configuration")),
        None => probe_kvm(Path::new("/dev/kvm"), Path::new("/sys/module")),
    };
    Ok(Probe {
        capacity: Capacity {
            vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
            memory_mib: usable_memory_mib(total, config.memory_reserve_mib),
            disk_gib: disk,
            kvm,
        },
        kvm_note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_parsed() {
        let cases = [
            ("MemTotal:       24599612 kB\nMemFree: 1 kB\n", Some(24023)),
            ("MemFree: 1 kB\nMemTotal: 2048 kB\n", Some(2)),
            ("MemTotal: 1023 kB\n", Some(0)),
            ("MemTotal: 4 MB\n", Some(4)),
            ("MemFree: 1 kB\n", None),
            ("MemTotal: lots kB\n", None),
            ("MemTotal: 5 GB\n", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_mem_total_mib(text), want, "{text:?}");
        }
    }

    #[test]
    fn memory_reserve_is_subtracted() {
        assert_eq!(usable_memory_mib(24022, 512), 23510);
        assert_eq!(usable_memory_mib(256, 512), 0);
    }

    #[test]
    fn hardware_kvm_modules_are_recognised() {
        assert_eq!(hardware_kvm_module(["kvm", "kvm_intel"]), Some("kvm_intel"));
        assert_eq!(hardware_kvm_module(["kvm_amd", "kvm"]), Some("kvm_amd"));
        assert_eq!(hardware_kvm_module(["kvm", "kvm_pvm"]), None);
        assert_eq!(hardware_kvm_module([]), None);
    }

    #[test]
    fn disk_is_counted_in_whole_gib() {
        assert_eq!(disk_gib(262_144, 4096), 1);
        assert_eq!(disk_gib(262_143, 4096), 0);
        assert_eq!(disk_gib(u64::MAX, 4096), u64::MAX / (1024 * 1024 * 1024));
    }

    #[test]
    fn kvm_probe_says_why_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ok, note) = probe_kvm(&dir.path().join("kvm"), dir.path());
        assert!(!ok);
        assert!(note.contains("kvm"), "{note}");
        // A device that opens but no hardware module.
        let dev = dir.path().join("dev-kvm");
        std::fs::write(&dev, b"").expect("write");
        let modules = dir.path().join("module");
        std::fs::create_dir_all(modules.join("kvm_pvm")).expect("mkdir");
        let (ok, note) = probe_kvm(&dev, &modules);
        assert!(!ok);
        assert!(note.contains("kvm_pvm"), "{note}");
        std::fs::create_dir_all(modules.join("kvm_intel")).expect("mkdir");
        assert!(probe_kvm(&dev, &modules).0);
    }

    #[test]
    fn this_host_probes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().join("not/yet"),
            ..Config::default()
        };
        let p = probe(&config).expect("probe");
        assert!(p.capacity.vcpus >= 1);
        assert!(p.capacity.memory_mib > 0);
    }
}
