//! VM spec → the transient systemd unit that runs it, as plain data.
//!
//! [`build`] is a pure function: a [`VmSpec`], the argv its [`CommandBuilder`] made and the
//! agent's [`VmUnitConfig`] become the unit name and its properties, typed as systemd's D-Bus
//! API wants them (`ExecStart` is `a(sasb)`, `MemoryMax` is `t`, `LogExtraFields` is `aay`, …).
//! Only the systemd adapter turns them into D-Bus variants. The unit layer does not depend on
//! which hypervisor made the argv.
//!
//! The unit's `Description=` carries the assignment generation ([`with_generation`]), which
//! `ListUnits` returns: adoption tells an old incarnation from the current one by it
//! ([`generation_of_description`]). [`fence_unit`] is the one other unit the agent starts, its
//! dead man's switch.
//!
//! [`CommandBuilder`]: crate::command::CommandBuilder

use blixard_api::{unit_name, Hypervisor, VmSpec, UNIT_PREFIX, VM_SLICE};

use crate::command::{CommandBuilders, CommandError};
use crate::config::VmUnitConfig;

const MIB: u64 = 1024 * 1024;
const USEC_PER_SEC: u64 = 1_000_000;

/// Errors of building a VM's unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitSpecError {
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The spec's resources do not fit the unit's counters.
    #[error("{0}")]
    Resources(String),
}

/// One `ExecStart=` entry: `(path, argv, ignore_failure)`, D-Bus type `(sasb)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCommand {
    pub path: String,
    pub argv: Vec<String>,
    pub ignore_failure: bool,
}

/// A property value with its D-Bus type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertyValue {
    /// `s`
    Str(String),
    /// `t`
    U64(u64),
    /// `b`
    Bool(bool),
    /// `as`
    StrList(Vec<String>),
    /// `aay`
    BytesList(Vec<Vec<u8>>),
    /// `a(sasb)`
    Exec(Vec<ExecCommand>),
}

/// One unit property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    pub name: &'static str,
    pub value: PropertyValue,
}

/// The transient unit of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpec {
    /// `blixard-vm-<vm>.service`
    pub unit: String,
    pub vm: String,
    pub properties: Vec<Property>,
}

impl UnitSpec {
    /// The value of property `name`, if set.
    pub fn get(&self, name: &str) -> Option<&PropertyValue> {
        self.properties
            .iter()
            .find(|p| p.name == name)
            .map(|p| &p.value)
    }

    /// Whether this is a unit the agent may start: a `blixard-vm-*.service` in the VM slice.
    pub fn is_vm_unit(&self) -> bool {
        self.unit.starts_with(UNIT_PREFIX)
            && self.unit.ends_with(".service")
            && self.get("Slice") == Some(&PropertyValue::Str(VM_SLICE.to_string()))
    }
}

impl UnitSpec {
    /// Whether this is the agent's dead man's switch, [`fence_unit`]: `blixard-fence.service`,
    /// outside the VM slice.
    pub fn is_fence_unit(&self) -> bool {
        self.unit == FENCE_UNIT
            && self.get("Slice") != Some(&PropertyValue::Str(VM_SLICE.to_string()))
    }
}

/// The dead man's switch: `blixard-agent fence-watch`, run by the same manager as the VMs.
pub const FENCE_UNIT: &str = "blixard-fence.service";

/// The unit of the dead man's switch: `argv` (the agent's own executable first, absolute)
/// with `environment` (`NAME=value`), restarted whenever it exits.
pub fn fence_unit(argv: Vec<String>, environment: Vec<String>) -> UnitSpec {
    let path = argv.first().cloned().unwrap_or_default();
    let s = |v: &str| PropertyValue::Str(v.to_string());
    UnitSpec {
        unit: FENCE_UNIT.to_string(),
        vm: String::new(),
        properties: vec![
            Property {
                name: "Description",
                value: s("Blixard fence: stops the move VMs once the agent's lease runs out"),
            },
            Property {
                name: "ExecStart",
                value: PropertyValue::Exec(vec![ExecCommand {
                    path,
                    argv,
                    ignore_failure: false,
                }]),
            },
            Property {
                name: "Restart",
                value: s("always"),
            },
            Property {
                name: "RestartUSec",
                value: PropertyValue::U64(200_000),
            },
            // Never give up restarting it.
            Property {
                name: "StartLimitIntervalUSec",
                value: PropertyValue::U64(0),
            },
            // Gone once it ends for good, so the next agent start creates it again.
            Property {
                name: "CollectMode",
                value: s("inactive-or-failed"),
            },
            Property {
                name: "Environment",
                value: PropertyValue::StrList(environment),
            },
            Property {
                name: "StandardOutput",
                value: s("journal"),
            },
            Property {
                name: "StandardError",
                value: s("journal"),
            },
        ],
    }
}

/// `unit` with the assignment generation in its description.
pub fn with_generation(mut unit: UnitSpec, generation: u64) -> UnitSpec {
    let prefix = format!("Blixard VM {} ", unit.vm);
    for p in unit.properties.iter_mut() {
        if let (true, PropertyValue::Str(d)) = (p.name == "Description", &mut p.value) {
            if let Some(rest) = d.strip_prefix(&prefix) {
                *d = format!("{prefix}generation {generation} {rest}");
            }
        }
    }
    unit
}

/// The generation in a VM unit's description (see [`with_generation`]).
pub fn generation_of_description(description: &str) -> Option<u64> {
    let mut words = description.split(' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("Blixard"), Some("VM"), Some(_), Some("generation")) => words.next()?.parse().ok(),
        _ => None,
    }
}

/// The syslog identifier (and unit name stem) of a VM's output.
pub fn syslog_identifier(vm: &str) -> String {
    format!("{UNIT_PREFIX}{vm}")
}

/// The unit of `spec`'s VM, with the argv from `builders`.
pub fn build(
    spec: &VmSpec,
    builders: &CommandBuilders,
    cfg: &VmUnitConfig,
) -> Result<UnitSpec, UnitSpecError> {
    let argv = builders.argv(spec)?;
    let hooks = builders.hooks(spec)?;
    let mut unit = build_with_argv(spec, argv, cfg)?;
    let exec = |cmds: &[Vec<String>], ignore_failure: bool| {
        PropertyValue::Exec(
            cmds.iter()
                .map(|argv| ExecCommand {
                    path: argv.first().cloned().unwrap_or_default(),
                    argv: argv.clone(),
                    ignore_failure,
                })
                .collect(),
        )
    };
    for (name, cmds, ignore) in [
        ("ExecStartPre", &hooks.start_pre, false),
        ("ExecStop", &hooks.stop, false),
        ("ExecStopPost", &hooks.stop_post, true),
    ] {
        if cmds
            .iter()
            .any(|c| !c.first().is_some_and(|p| p.starts_with('/')))
        {
            return Err(UnitSpecError::Resources(format!(
                "{name}: every command needs an absolute executable"
            )));
        }
        if !cmds.is_empty() {
            unit.properties.push(Property {
                name,
                value: exec(cmds, ignore),
            });
        }
    }
    Ok(unit)
}

/// The VM's environment: `BLIXARD_VM=<name>`, and for a `process` VM with a kernel command
/// line `BLIXARD_CMDLINE=<cmdline>` (the configured program may read it; the spec still
/// cannot choose the executable).
fn environment(spec: &VmSpec) -> Vec<String> {
    let mut env = vec![format!("BLIXARD_VM={}", spec.name)];
    if let (Hypervisor::Process, Some(c)) = (spec.hypervisor, &spec.cmdline) {
        env.push(format!("BLIXARD_CMDLINE={c}"));
    }
    env
}

/// The unit of `spec`'s VM running `argv` (executable first, absolute).
pub fn build_with_argv(
    spec: &VmSpec,
    argv: Vec<String>,
    cfg: &VmUnitConfig,
) -> Result<UnitSpec, UnitSpecError> {
    let path = argv
        .first()
        .cloned()
        .ok_or_else(|| UnitSpecError::Resources("empty command line".into()))?;
    let memory_max = spec
        .memory_mib
        .checked_add(cfg.memory_overhead_mib)
        .and_then(|m| m.checked_mul(MIB))
        .ok_or_else(|| {
            UnitSpecError::Resources(format!("memory_mib {} is too large", spec.memory_mib))
        })?;
    if spec.vcpus == 0 {
        return Err(UnitSpecError::Resources("vcpus must be at least 1".into()));
    }
    let cpu_quota = u64::from(spec.vcpus) * USEC_PER_SEC;
    let stop_timeout = cfg
        .stop_timeout_secs
        .checked_mul(USEC_PER_SEC)
        .ok_or_else(|| UnitSpecError::Resources("stop timeout is too large".into()))?;
    let name = &spec.name;
    let s = |v: &str| PropertyValue::Str(v.to_string());
    let properties = vec![
        Property {
            name: "Description",
            value: PropertyValue::Str(format!(
                "Blixard VM {name} ({}, {} vCPU, {} MiB)",
                spec.hypervisor.as_str(),
                spec.vcpus,
                spec.memory_mib
            )),
        },
        Property {
            name: "ExecStart",
            value: PropertyValue::Exec(vec![ExecCommand {
                path,
                argv,
                ignore_failure: false,
            }]),
        },
        Property {
            name: "Slice",
            value: s(VM_SLICE),
        },
        Property {
            name: "MemoryAccounting",
            value: PropertyValue::Bool(true),
        },
        Property {
            name: "MemoryMax",
            value: PropertyValue::U64(memory_max),
        },
        Property {
            name: "CPUQuotaPerSecUSec",
            value: PropertyValue::U64(cpu_quota),
        },
        Property {
            name: "CPUWeight",
            value: PropertyValue::U64(cfg.cpu_weight),
        },
        Property {
            name: "TasksMax",
            value: PropertyValue::U64(cfg.tasks_max),
        },
        // SIGTERM to the main process only (the hypervisor shuts the guest down), SIGKILL to
        // the whole cgroup after the timeout.
        Property {
            name: "KillMode",
            value: s("mixed"),
        },
        Property {
            name: "TimeoutStopUSec",
            value: PropertyValue::U64(stop_timeout),
        },
        // Restarting is the cluster's decision (restart policy, rescheduling), not the host's.
        Property {
            name: "Restart",
            value: s("no"),
        },
        // A VM that ended leaves no unit behind; its end is recorded from the signals.
        Property {
            name: "CollectMode",
            value: s("inactive-or-failed"),
        },
        Property {
            name: "StandardOutput",
            value: s("journal"),
        },
        Property {
            name: "StandardError",
            value: s("journal"),
        },
        Property {
            name: "SyslogIdentifier",
            value: PropertyValue::Str(syslog_identifier(name)),
        },
        Property {
            name: "LogExtraFields",
            value: PropertyValue::BytesList(vec![format!("BLIXARD_VM={name}").into_bytes()]),
        },
        Property {
            name: "Environment",
            value: PropertyValue::StrList(environment(spec)),
        },
    ];
    let mut properties = properties;
    if let Some(secs) = spec.task.as_ref().and_then(|t| t.timeout_secs) {
        // The host enforces a task's timeout, agent or no agent: systemd stops the unit
        // (ExecStop=, SIGTERM, SIGKILL after TimeoutStopSec=) and its result is `timeout`.
        let usec = secs
            .checked_mul(USEC_PER_SEC)
            .ok_or_else(|| UnitSpecError::Resources("task timeout is too large".into()))?;
        properties.push(Property {
            name: "RuntimeMaxUSec",
            value: PropertyValue::U64(usec),
        });
    }
    Ok(UnitSpec {
        unit: unit_name(name),
        vm: name.clone(),
        properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::tests::spec;
    use crate::command::ProcessCommand;

    fn builders() -> CommandBuilders {
        let mut b = CommandBuilders::default();
        b.insert(Box::new(ProcessCommand {
            command: vec!["/bin/sleep".into(), "infinity".into()],
        }));
        b
    }

    #[test]
    fn a_task_timeout_is_runtime_max_and_a_process_sees_its_cmdline() {
        let cfg = VmUnitConfig::default();
        let mut sp = spec("job", Hypervisor::Process);
        sp.cmdline = None;
        let u = build(&sp, &builders(), &cfg).expect("unit");
        assert_eq!(u.get("RuntimeMaxUSec"), None);
        assert_eq!(
            u.get("Environment"),
            Some(&PropertyValue::StrList(vec!["BLIXARD_VM=job".into()]))
        );
        sp.task = Some(blixard_api::TaskSpec {
            timeout_secs: Some(90),
            rerun_on_host_loss: false,
        });
        sp.cmdline = Some("0.5 3".into());
        let u = build(&sp, &builders(), &cfg).expect("unit");
        assert_eq!(
            u.get("RuntimeMaxUSec"),
            Some(&PropertyValue::U64(90_000_000))
        );
        assert_eq!(
            u.get("Environment"),
            Some(&PropertyValue::StrList(vec![
                "BLIXARD_VM=job".into(),
                "BLIXARD_CMDLINE=0.5 3".into()
            ]))
        );
        // A task without a timeout runs as long as it takes.
        sp.task = Some(blixard_api::TaskSpec::default());
        let u = build(&sp, &builders(), &cfg).expect("unit");
        assert_eq!(u.get("RuntimeMaxUSec"), None);
    }

    #[test]
    fn process_vm_unit_has_every_property() {
        let cfg = VmUnitConfig::default();
        let u = build(&spec("web-1", Hypervisor::Process), &builders(), &cfg).expect("unit");
        assert_eq!(u.unit, "blixard-vm-web-1.service");
        assert!(u.is_vm_unit());
        let str_of = |n: &str| match u.get(n) {
            Some(PropertyValue::Str(s)) => s.clone(),
            other => panic!("{n}: {other:?}"),
        };
        let u64_of = |n: &str| match u.get(n) {
            Some(PropertyValue::U64(v)) => *v,
            other => panic!("{n}: {other:?}"),
        };
        assert_eq!(str_of("Slice"), "blixard-vms.slice");
        assert_eq!(str_of("KillMode"), "mixed");
        assert_eq!(str_of("CollectMode"), "inactive-or-failed");
        assert_eq!(str_of("StandardOutput"), "journal");
        assert_eq!(str_of("StandardError"), "journal");
        assert_eq!(str_of("SyslogIdentifier"), "blixard-vm-web-1");
        assert_eq!(str_of("Restart"), "no");
        assert!(str_of("Description").contains("web-1"));
        assert_eq!(u64_of("MemoryMax"), (256 + 128) * MIB);
        assert_eq!(u64_of("CPUQuotaPerSecUSec"), 2_000_000);
        assert_eq!(u64_of("CPUWeight"), 100);
        assert_eq!(u64_of("TasksMax"), 4096);
        assert_eq!(u64_of("TimeoutStopUSec"), 30_000_000);
        assert_eq!(
            u.get("LogExtraFields"),
            Some(&PropertyValue::BytesList(
                vec![b"BLIXARD_VM=web-1".to_vec()]
            ))
        );
        assert_eq!(
            u.get("ExecStart"),
            Some(&PropertyValue::Exec(vec![ExecCommand {
                path: "/bin/sleep".into(),
                argv: vec!["/bin/sleep".into(), "infinity".into()],
                ignore_failure: false,
            }]))
        );
        // Every property appears once.
        let mut names: Vec<_> = u.properties.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), u.properties.len());
    }

    #[test]
    fn resources_follow_the_spec_and_config() {
        // (vcpus, memory_mib, overhead, expected MemoryMax MiB, expected quota µs)
        let cases = [
            (1, 16, 0, 16, 1_000_000),
            (2, 256, 128, 384, 2_000_000),
            (8, 8192, 64, 8256, 8_000_000),
            (
                256,
                4 * 1024 * 1024,
                128,
                4 * 1024 * 1024 + 128,
                256_000_000,
            ),
        ];
        for (vcpus, mem, overhead, want_mib, want_quota) in cases {
            let mut s = spec("db", Hypervisor::Process);
            s.vcpus = vcpus;
            s.memory_mib = mem;
            let cfg = VmUnitConfig {
                memory_overhead_mib: overhead,
                ..VmUnitConfig::default()
            };
            let u = build(&s, &builders(), &cfg).expect("unit");
            assert_eq!(
                u.get("MemoryMax"),
                Some(&PropertyValue::U64(want_mib * MIB)),
                "{vcpus}/{mem}"
            );
            assert_eq!(
                u.get("CPUQuotaPerSecUSec"),
                Some(&PropertyValue::U64(want_quota))
            );
        }
    }

    #[test]
    fn impossible_resources_are_errors_not_overflows() {
        let mut s = spec("db", Hypervisor::Process);
        s.memory_mib = u64::MAX;
        assert!(matches!(
            build(&s, &builders(), &VmUnitConfig::default()),
            Err(UnitSpecError::Resources(_))
        ));
        let mut s = spec("db", Hypervisor::Process);
        s.vcpus = 0;
        assert!(build(&s, &builders(), &VmUnitConfig::default()).is_err());
    }

    #[test]
    fn hypervisors_without_a_builder_fail_clearly() {
        for hv in [
            Hypervisor::Qemu,
            Hypervisor::CloudHypervisor,
            Hypervisor::Firecracker,
        ] {
            let e = build(&spec("web", hv), &builders(), &VmUnitConfig::default())
                .expect_err("no builder");
            assert_eq!(
                e.to_string(),
                format!("hypervisor {} is not available on this host", hv.as_str())
            );
        }
    }

    #[test]
    fn spec_text_never_reaches_the_argv() {
        // The spec's cmdline holds shell syntax; the process argv is the configured one only.
        let u = build(
            &spec("web", Hypervisor::Process),
            &builders(),
            &VmUnitConfig::default(),
        )
        .expect("unit");
        let Some(PropertyValue::Exec(cmds)) = u.get("ExecStart") else {
            panic!("no ExecStart")
        };
        assert!(cmds
            .iter()
            .all(|c| c.argv.iter().all(|a| !a.contains("rm -rf"))));
    }

    #[test]
    fn the_generation_rides_in_the_description() {
        let u = build(
            &spec("web-1", Hypervisor::Process),
            &builders(),
            &VmUnitConfig::default(),
        )
        .expect("unit");
        let desc = |u: &UnitSpec| match u.get("Description") {
            Some(PropertyValue::Str(s)) => s.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(generation_of_description(&desc(&u)), None);
        let u = with_generation(u, 42);
        assert_eq!(
            desc(&u),
            "Blixard VM web-1 generation 42 (process, 2 vCPU, 256 MiB)"
        );
        assert_eq!(generation_of_description(&desc(&u)), Some(42));
        for (d, want) in [
            ("Blixard VM a generation 7", Some(7)),
            ("Blixard VM a generation x (y)", None),
            ("Blixard VM a (process, 1 vCPU, 64 MiB)", None),
            ("something else generation 3", None),
            ("", None),
        ] {
            assert_eq!(generation_of_description(d), want, "{d}");
        }
    }

    #[test]
    fn the_fence_unit_is_the_only_other_unit() {
        let u = fence_unit(
            vec!["/usr/bin/blixard-agent".into(), "fence-watch".into()],
            vec!["A=1".into()],
        );
        assert!(u.is_fence_unit());
        assert!(!u.is_vm_unit());
        assert_eq!(u.get("Restart"), Some(&PropertyValue::Str("always".into())));
        let mut v = u.clone();
        v.unit = "blixard-vm-x.service".into();
        assert!(!v.is_fence_unit());
        let mut w = u;
        w.properties.push(Property {
            name: "Slice",
            value: PropertyValue::Str(VM_SLICE.into()),
        });
        assert!(!w.is_fence_unit());
    }

    #[test]
    fn only_vm_units_in_the_vm_slice_count_as_vm_units() {
        let mut u = build(
            &spec("web", Hypervisor::Process),
            &builders(),
            &VmUnitConfig::default(),
        )
        .expect("unit");
        assert!(u.is_vm_unit());
        u.unit = "sshd.service".into();
        assert!(!u.is_vm_unit());
        u.unit = "blixard-vm-web.service".into();
        for p in u.properties.iter_mut() {
            if p.name == "Slice" {
                p.value = PropertyValue::Str("system.slice".into());
            }
        }
        assert!(!u.is_vm_unit());
    }
}
