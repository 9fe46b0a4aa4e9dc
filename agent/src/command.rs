//! Hypervisor command lines: one [`CommandBuilder`] per hypervisor turns a structured
//! [`VmSpec`] into the argv of the VM's unit.
//!
//! The executable always comes from the agent's configuration, never from the spec, and every
//! spec field becomes one whole argument at most, so nothing a user types can become an extra
//! argument or a shell word. The QEMU, cloud-hypervisor and Firecracker builders live in
//! [`crate::hypervisor`]; `process` runs a configured long-lived command.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blixard_api::{Hypervisor, VmSpec};

use crate::config::{Config, SystemdBus};
use crate::hypervisor::{
    CloudHypervisorCommand, FirecrackerCommand, GracefulStop, HostPaths, QemuCommand, TapNetwork,
    VmOwner,
};
use crate::image_path;
use crate::unit_spec::{HostAccess, Manager, VM_RUNTIME_DIR};

/// Whether a hypervisor can run on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    Available(PathBuf),
    /// No entry in the `hypervisors` table.
    NotConfigured,
    /// The configured binary is not an executable file.
    MissingBinary(PathBuf),
    /// cloud-hypervisor and Firecracker do not run without KVM.
    NeedsKvm,
}

impl std::fmt::Display for Availability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Availability::Available(p) => write!(f, "available ({})", p.display()),
            Availability::NotConfigured => write!(f, "unavailable: not configured"),
            Availability::MissingBinary(p) => {
                write!(f, "unavailable: {} is not an executable file", p.display())
            }
            Availability::NeedsKvm => write!(f, "unavailable: needs KVM, which this host lacks"),
        }
    }
}

/// Whether `p` is a regular file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Errors of building a VM's command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// This agent has no builder (or no binary) for the spec's hypervisor.
    #[error("hypervisor {0} is not available on this host")]
    Unavailable(&'static str),
    /// The builder exists but the spec asks for something it cannot express.
    #[error("cannot build a {hypervisor} command line: {message}")]
    Unsupported {
        hypervisor: &'static str,
        message: String,
    },
    /// An image path of the spec is refused (outside the image directory, missing, …).
    #[error("{0}")]
    Path(crate::image_path::PathError),
}

/// Commands systemd runs around the hypervisor, as part of the VM's unit (each one an argv,
/// executable first, absolute).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitHooks {
    /// `ExecStartPre=`, in order; a failure fails the start (e.g. creating tap devices).
    pub start_pre: Vec<Vec<String>>,
    /// `ExecStop=`: asks the hypervisor to stop gracefully before systemd's SIGTERM.
    pub stop: Vec<Vec<String>>,
    /// `ExecStopPost=`, failures ignored (e.g. deleting tap devices).
    pub stop_post: Vec<Vec<String>>,
}

/// Builds the argv (executable first) of one hypervisor.
pub trait CommandBuilder: Send + Sync + std::fmt::Debug {
    fn hypervisor(&self) -> Hypervisor;
    fn argv(&self, spec: &VmSpec) -> Result<Vec<String>, CommandError>;
    /// The commands around the hypervisor's (none by default).
    fn hooks(&self, _spec: &VmSpec) -> Result<UnitHooks, CommandError> {
        Ok(UnitHooks::default())
    }
    /// What the hypervisor needs from the host: its unit's sandbox allows that and no more.
    fn access(&self, spec: &VmSpec) -> Result<HostAccess, CommandError>;
}

/// `process`: the configured command, unchanged, whatever the spec says (for hosts and tests
/// without a hypervisor). Only resources and the name of the spec are used, by the unit.
#[derive(Debug, Clone)]
pub struct ProcessCommand {
    pub command: Vec<String>,
}

impl CommandBuilder for ProcessCommand {
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::Process
    }

    fn argv(&self, _spec: &VmSpec) -> Result<Vec<String>, CommandError> {
        if self.command.is_empty() {
            return Err(CommandError::Unavailable(Hypervisor::Process.as_str()));
        }
        Ok(self.command.clone())
    }

    /// A plain program of the operator's choosing, which may serve on the host's network (as
    /// Nomad's `raw_exec` tasks do) and may be a JIT: no device, no file to write, but the
    /// host's network and IP sockets, and no `MemoryDenyWriteExecute=`.
    fn access(&self, _spec: &VmSpec) -> Result<HostAccess, CommandError> {
        Ok(HostAccess {
            address_families: ["AF_UNIX", "AF_INET", "AF_INET6"]
                .map(String::from)
                .to_vec(),
            host_network: true,
            ip_sockets: true,
            write_execute: true,
            ..HostAccess::default()
        })
    }
}

/// The builders this agent has, by hypervisor, and the manager that runs their units.
#[derive(Debug, Default)]
pub struct CommandBuilders {
    builders: BTreeMap<&'static str, Box<dyn CommandBuilder>>,
    manager: Manager,
}

impl CommandBuilders {
    /// The builders the configuration enables: `process` when `process_command` is set, and
    /// each hypervisor of `hypervisors` whose binary is an executable file (see
    /// [`Self::availability`]). `kvm` is the host's KVM probe.
    /// The QEMU unit's graceful stop runs this agent's own binary (`qmp-powerdown`).
    pub fn from_config(config: &Config, kvm: bool) -> Self {
        let agent_exe = std::env::current_exe().ok();
        Self::from_config_with(config, kvm, &is_executable, agent_exe)
    }

    /// [`Self::from_config`] with the binary check and the agent's binary given.
    pub fn from_config_with(
        config: &Config,
        kvm: bool,
        executable: &dyn Fn(&Path) -> bool,
        agent_exe: Option<PathBuf>,
    ) -> Self {
        let manager = match config.systemd_bus {
            SystemdBus::System => Manager::System,
            SystemdBus::Session => Manager::User,
        };
        let mut b = CommandBuilders::default().with_manager(manager);
        if let Some(cmd) = &config.process_command {
            b.insert(Box::new(ProcessCommand {
                command: cmd.clone(),
            }));
        }
        for (hv, status) in Self::availability(config, kvm, executable) {
            let Availability::Available(binary) = status else {
                continue;
            };
            // Under the system manager each VM has a runtime directory of its own, owned by
            // its dynamic user; a user manager's VMs share the agent's.
            let (runtime_dir, per_vm_runtime) = match manager {
                Manager::System => (Path::new("/run").join(VM_RUNTIME_DIR), true),
                Manager::User => (config.runtime_dir.clone(), false),
            };
            let owner = match manager {
                Manager::System => agent_exe.clone().map(|agent| VmOwner { agent }),
                Manager::User => None,
            };
            let paths = HostPaths {
                binary,
                image_dir: config.image_dir.clone(),
                runtime_dir,
                per_vm_runtime,
                check: Arc::new(image_path::fs_check),
            };
            match hv {
                Hypervisor::Qemu => b.insert(Box::new(QemuCommand {
                    paths,
                    machine: config.qemu_machine,
                    kvm,
                    graceful_stop: agent_exe.clone().map(|agent| GracefulStop {
                        agent,
                        timeout_secs: config.vm_unit.graceful_stop_secs,
                    }),
                    network: Some(TapNetwork {
                        ip: config.ip.clone(),
                        bridges: config.bridges.clone(),
                        exists: Arc::new(crate::hypervisor::bridge_exists),
                    }),
                    owner: owner.clone(),
                })),
                Hypervisor::CloudHypervisor => b.insert(Box::new(CloudHypervisorCommand {
                    paths,
                    owner: owner.clone(),
                })),
                Hypervisor::Firecracker => b.insert(Box::new(FirecrackerCommand { paths })),
                Hypervisor::Process => {}
            }
        }
        b
    }

    /// Whether each real hypervisor can run here, and why not: QEMU needs its binary
    /// (it falls back to TCG without KVM); cloud-hypervisor and Firecracker need their
    /// binary and KVM.
    pub fn availability(
        config: &Config,
        kvm: bool,
        executable: &dyn Fn(&Path) -> bool,
    ) -> Vec<(Hypervisor, Availability)> {
        [
            Hypervisor::Qemu,
            Hypervisor::CloudHypervisor,
            Hypervisor::Firecracker,
        ]
        .into_iter()
        .map(|hv| {
            let status = match config.hypervisors.get(hv.as_str()) {
                None => Availability::NotConfigured,
                Some(p) if !executable(p) => Availability::MissingBinary(p.clone()),
                Some(_) if hv != Hypervisor::Qemu && !kvm => Availability::NeedsKvm,
                Some(p) => Availability::Available(p.clone()),
            };
            (hv, status)
        })
        .collect()
    }

    pub fn insert(&mut self, builder: Box<dyn CommandBuilder>) {
        self.builders.insert(builder.hypervisor().as_str(), builder);
    }

    /// The hypervisors this host can run, as registered with the control plane.
    pub fn hypervisors(&self) -> Vec<Hypervisor> {
        self.builders.values().map(|b| b.hypervisor()).collect()
    }

    /// These builders' units run under `manager`.
    pub fn with_manager(mut self, manager: Manager) -> Self {
        self.manager = manager;
        self
    }

    /// The manager that runs the VM units.
    pub fn manager(&self) -> Manager {
        self.manager
    }

    /// What `spec`'s hypervisor needs from the host (see [`HostAccess`]).
    pub fn access(&self, spec: &VmSpec) -> Result<HostAccess, CommandError> {
        let hv = spec.hypervisor.as_str();
        let builder = self.builders.get(hv).ok_or(CommandError::Unavailable(hv))?;
        builder.access(spec)
    }

    /// The commands around `spec`'s hypervisor (see [`UnitHooks`]).
    pub fn hooks(&self, spec: &VmSpec) -> Result<UnitHooks, CommandError> {
        let hv = spec.hypervisor.as_str();
        let builder = self.builders.get(hv).ok_or(CommandError::Unavailable(hv))?;
        builder.hooks(spec)
    }

    /// The argv of `spec`'s VM.
    pub fn argv(&self, spec: &VmSpec) -> Result<Vec<String>, CommandError> {
        let hv = spec.hypervisor.as_str();
        let builder = self.builders.get(hv).ok_or(CommandError::Unavailable(hv))?;
        let argv = builder.argv(spec)?;
        match argv.first() {
            Some(exe) if exe.starts_with('/') => Ok(argv),
            _ => Err(CommandError::Unsupported {
                hypervisor: hv,
                message: "the executable must be an absolute path".into(),
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A spec from JSON, so that fields the API adds later (all optional) need no change.
    pub(crate) fn spec(name: &str, hypervisor: Hypervisor) -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "vcpus": 2,
            "memory_mib": 256,
            "hypervisor": hypervisor,
            "kernel": "vmlinuz",
            "cmdline": "console=ttyS0; rm -rf /",
        }))
        .expect("a valid spec")
    }

    fn builders(process: Option<&[&str]>) -> CommandBuilders {
        let c = Config {
            process_command: process.map(|p| p.iter().map(|s| s.to_string()).collect()),
            ..Config::default()
        };
        CommandBuilders::from_config(&c, false)
    }

    #[test]
    fn availability_table() {
        let mut c = Config::default();
        for (hv, p) in [
            ("qemu", "/q"),
            ("cloud-hypervisor", "/ch"),
            ("firecracker", "/nope"),
        ] {
            c.hypervisors.insert(hv.into(), PathBuf::from(p));
        }
        let exe = |p: &Path| p != Path::new("/nope");
        let cases = [
            (
                false,
                vec![
                    Availability::Available("/q".into()),
                    Availability::NeedsKvm,
                    Availability::MissingBinary("/nope".into()),
                ],
                vec![Hypervisor::Qemu],
            ),
            (
                true,
                vec![
                    Availability::Available("/q".into()),
                    Availability::Available("/ch".into()),
                    Availability::MissingBinary("/nope".into()),
                ],
                vec![Hypervisor::Qemu, Hypervisor::CloudHypervisor],
            ),
        ];
        for (kvm, want, offered) in cases {
            let got: Vec<_> = CommandBuilders::availability(&c, kvm, &exe)
                .into_iter()
                .map(|(_, a)| a)
                .collect();
            assert_eq!(got, want, "kvm={kvm}");
            let mut h = CommandBuilders::from_config_with(&c, kvm, &exe, None).hypervisors();
            h.sort_by_key(|h| h.as_str());
            let mut offered = offered;
            offered.sort_by_key(|h| h.as_str());
            assert_eq!(h, offered, "kvm={kvm}");
        }
        let none = CommandBuilders::availability(&Config::default(), true, &exe);
        assert!(none.iter().all(|(_, a)| *a == Availability::NotConfigured));
        assert_eq!(
            Availability::NeedsKvm.to_string(),
            "unavailable: needs KVM, which this host lacks"
        );
    }

    #[test]
    fn qemu_from_config_refuses_missing_images_before_any_unit() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("vmlinuz"), b"k").expect("write");
        let mut c = Config {
            image_dir: t.path().to_path_buf(),
            runtime_dir: "/run/bx".into(),
            ..Config::default()
        };
        c.hypervisors
            .insert("qemu".into(), "/usr/bin/qemu-system-x86_64".into());
        let b = CommandBuilders::from_config_with(&c, false, &|_| true, None);
        let mut s = spec("web", Hypervisor::Qemu);
        let argv = b.argv(&s).expect("argv");
        assert_eq!(argv[0], "/usr/bin/qemu-system-x86_64");
        assert!(argv.contains(&"tcg,split-wx=on".to_string()));
        s.initrd = Some("initrd.gz".into());
        let e = b.argv(&s).expect_err("missing initrd");
        assert!(matches!(e, CommandError::Path(_)), "{e:?}");
        assert!(e.to_string().contains("initrd: "), "{e}");
    }

    #[test]
    fn process_runs_the_configured_command_whatever_the_spec_says() {
        let b = builders(Some(&["/bin/sleep", "infinity"]));
        assert_eq!(b.hypervisors(), vec![Hypervisor::Process]);
        let argv = b.argv(&spec("web", Hypervisor::Process)).expect("argv");
        assert_eq!(argv, vec!["/bin/sleep".to_string(), "infinity".to_string()]);
    }

    #[test]
    fn unavailable_hypervisors_are_clear_errors() {
        let cases = [
            (
                Some(&["/bin/sleep", "infinity"][..]),
                Hypervisor::Qemu,
                "qemu",
            ),
            (
                Some(&["/bin/sleep"][..]),
                Hypervisor::CloudHypervisor,
                "cloud-hypervisor",
            ),
            (
                Some(&["/bin/sleep"][..]),
                Hypervisor::Firecracker,
                "firecracker",
            ),
            (None, Hypervisor::Process, "process"),
        ];
        for (process, hv, name) in cases {
            let e = builders(process)
                .argv(&spec("web", hv))
                .expect_err("unavailable");
            assert_eq!(e, CommandError::Unavailable(name));
            assert_eq!(
                e.to_string(),
                format!("hypervisor {name} is not available on this host")
            );
        }
    }

    #[test]
    fn relative_executables_are_refused() {
        let mut b = CommandBuilders::default();
        b.insert(Box::new(ProcessCommand {
            command: vec!["sleep".into()],
        }));
        assert!(matches!(
            b.argv(&spec("web", Hypervisor::Process)),
            Err(CommandError::Unsupported { .. })
        ));
    }
}
