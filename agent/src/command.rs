//! Hypervisor command lines: one [`CommandBuilder`] per hypervisor turns a structured
//! [`VmSpec`] into the argv of the VM's unit.
//!
//! The executable always comes from the agent's configuration, never from the spec, and every
//! spec field becomes one whole argument at most, so nothing a user types can become an extra
//! argument or a shell word. QEMU, cloud-hypervisor and Firecracker plug in here (issue 4);
//! until then only the `process` hypervisor, a configured long-lived command, is available.

use std::collections::BTreeMap;

use blixard_api::{Hypervisor, VmSpec};

use crate::config::Config;

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
}

/// Builds the argv (executable first) of one hypervisor.
pub trait CommandBuilder: Send + Sync + std::fmt::Debug {
    fn hypervisor(&self) -> Hypervisor;
    fn argv(&self, spec: &VmSpec) -> Result<Vec<String>, CommandError>;
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
}

/// The builders this agent has, by hypervisor.
#[derive(Debug, Default)]
pub struct CommandBuilders {
    builders: BTreeMap<&'static str, Box<dyn CommandBuilder>>,
}

impl CommandBuilders {
    /// The builders the configuration enables. Hypervisor binaries listed in `hypervisors`
    /// get no builder yet: their command lines arrive with issue 4.
    pub fn from_config(config: &Config) -> Self {
        let mut b = CommandBuilders::default();
        if let Some(cmd) = &config.process_command {
            b.insert(Box::new(ProcessCommand {
                command: cmd.clone(),
            }));
        }
        b
    }

    pub fn insert(&mut self, builder: Box<dyn CommandBuilder>) {
        self.builders.insert(builder.hypervisor().as_str(), builder);
    }

    /// The hypervisors this host can run, as registered with the control plane.
    pub fn hypervisors(&self) -> Vec<Hypervisor> {
        self.builders.values().map(|b| b.hypervisor()).collect()
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
        CommandBuilders::from_config(&c)
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
