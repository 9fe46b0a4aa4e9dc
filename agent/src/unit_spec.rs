//! VM spec → the transient systemd unit that runs it, as plain data.
//!
//! [`build`] is a pure function: a [`VmSpec`], the argv its [`CommandBuilder`] made and the
//! agent's [`VmUnitConfig`] become the unit name and its properties, typed as systemd's D-Bus
//! API wants them (`ExecStart` is `a(sasb)`, `MemoryMax` is `t`, `LogExtraFields` is `aay`, …).
//! Only the systemd adapter turns them into D-Bus variants. The unit layer does not depend on
//! which hypervisor made the argv.
//!
//! Every VM unit is sandboxed ([`sandbox`]): under the system manager the hypervisor runs as a
//! dynamic user of its own with no capabilities, in a read-only view of the host where it may
//! write only its own disks and runtime directory, open only the devices it needs, and make
//! only the system calls and sockets it needs (`systemd-analyze security` scores a QEMU VM
//! 0.2–1.x of 10, "SAFE"/"OK"). A user manager cannot switch users or set up most namespaces,
//! so there the unit keeps only what any process may ask for itself (seccomp filters,
//! `NoNewPrivileges=`). The `ExecStartPre=`/`ExecStopPost=` hooks (tap devices, disk owners)
//! run with full privileges (`+`, flag `privileged`); `ExecStop=` runs sandboxed like the
//! hypervisor.
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

/// One `ExecStartPreEx=`-style entry: `(path, argv, flags)`, D-Bus type `(sasas)`; flags are
/// systemd's names of the command prefixes (`privileged` is `+`, `ignore-failure` is `-`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCommandEx {
    pub path: String,
    pub argv: Vec<String>,
    pub flags: Vec<String>,
}

/// One `IPAddressDeny=` entry: `(family, address bytes, prefix length)`, D-Bus `(iayu)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPrefix {
    pub family: i32,
    pub address: Vec<u8>,
    pub prefix_len: u32,
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
    /// `u`
    U32(u32),
    /// `i`
    I32(i32),
    /// `a(ss)`
    StrPairs(Vec<(String, String)>),
    /// `(bas)`: an allow list (`true`) or a deny list (`false`) of names.
    NameList(bool, Vec<String>),
    /// `a(iayu)`
    IpPrefixes(Vec<IpPrefix>),
    /// `a(sasas)`
    ExecEx(Vec<ExecCommandEx>),
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

/// Which systemd manager runs the VM units, and so how far their sandbox can go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Manager {
    /// PID 1 (`systemd_bus = "system"`): the whole sandbox, a dynamic user per VM.
    #[default]
    System,
    /// A user manager (`systemd_bus = "session"`, e.g. the test hosts): it cannot switch users
    /// nor (unprivileged) set up mount namespaces, so only what a process may ask for itself.
    User,
}

/// Where the system manager puts each VM's runtime directory (`RuntimeDirectory=`, relative
/// to `/run`): `/run/blixard-vm/<vm>`, owned by the VM's dynamic user, removed when it ends.
pub const VM_RUNTIME_DIR: &str = "blixard-vm";

/// The runtime directory of VM `vm` under the system manager.
pub fn vm_runtime_dir(vm: &str) -> String {
    format!("/run/{VM_RUNTIME_DIR}/{vm}")
}

/// What a VM's hypervisor needs from the host. Its unit allows that and nothing more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAccess {
    /// Device nodes it opens read-write (`/dev/kvm`, `/dev/net/tun`); none: a private `/dev`.
    pub devices: Vec<String>,
    /// Groups its identity needs besides its own (`kvm`, which owns `/dev/kvm`).
    pub groups: Vec<String>,
    /// Files it writes besides its runtime directory (its writable disks), absolute.
    pub writable: Vec<String>,
    /// Socket families it creates (`AF_UNIX` for QMP); at least one.
    pub address_families: Vec<String>,
    /// Whether it needs the host's network namespace (tap NICs live there; a `process` VM's
    /// program may serve on it). Otherwise it gets a namespace with only loopback.
    pub host_network: bool,
    /// Whether it sends IP traffic through sockets of its own (a `process` VM); a hypervisor's
    /// guest traffic goes through tap devices, which `IPAddressDeny=` does not see.
    pub ip_sockets: bool,
    /// Whether it maps memory writable and executable at once (a JIT without W^X);
    /// otherwise the unit gets `MemoryDenyWriteExecute=`.
    pub write_execute: bool,
}

/// The syscall groups a VM may not use, on top of the `@system-service` allow list.
pub const DENIED_SYSCALLS: [&str; 2] = ["@privileged", "@resources"];

/// The sandbox properties of a VM unit (see the module doc).
pub fn sandbox(manager: Manager, vm: &str, access: &HostAccess) -> Vec<Property> {
    let b = |name, v: bool| Property {
        name,
        value: PropertyValue::Bool(v),
    };
    let s = |name, v: &str| Property {
        name,
        value: PropertyValue::Str(v.to_string()),
    };
    let list = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut p = Vec::new();
    if manager == Manager::System {
        p.extend([
            // A user of its own, allocated while the unit runs: it owns nothing on the host
            // but its runtime directory (and its writable disks, while it runs).
            b("DynamicUser", true),
            Property {
                name: "RuntimeDirectory",
                value: PropertyValue::StrList(vec![format!("{VM_RUNTIME_DIR}/{vm}")]),
            },
            Property {
                name: "RuntimeDirectoryMode",
                value: PropertyValue::U32(0o700),
            },
            Property {
                name: "CapabilityBoundingSet",
                value: PropertyValue::U64(0),
            },
            Property {
                name: "AmbientCapabilities",
                value: PropertyValue::U64(0),
            },
            s("ProtectSystem", "strict"),
            s("ProtectHome", "yes"),
            b("PrivateTmp", true),
            b("PrivateIPC", true),
            b("PrivateMounts", true),
            b("ProtectKernelTunables", true),
            b("ProtectKernelModules", true),
            b("ProtectKernelLogs", true),
            b("ProtectControlGroups", true),
            b("ProtectClock", true),
            b("ProtectHostname", true),
            s("ProtectProc", "invisible"),
            s("ProcSubset", "pid"),
            s("KeyringMode", "private"),
            b("RemoveIPC", true),
        ]);
        if access.groups.is_empty() {
            // A user namespace that maps only the VM's own user. Not with extra groups: they
            // would be unmapped inside it.
            p.push(b("PrivateUsers", true));
        } else {
            p.push(Property {
                name: "SupplementaryGroups",
                value: PropertyValue::StrList(access.groups.clone()),
            });
        }
        if !access.writable.is_empty() {
            p.push(Property {
                name: "ReadWritePaths",
                value: PropertyValue::StrList(access.writable.clone()),
            });
        }
        if access.devices.is_empty() {
            p.push(b("PrivateDevices", true));
        } else {
            p.push(s("DevicePolicy", "closed"));
            p.push(Property {
                name: "DeviceAllow",
                value: PropertyValue::StrPairs(
                    access
                        .devices
                        .iter()
                        .map(|d| (d.clone(), "rw".to_string()))
                        .collect(),
                ),
            });
        }
        if !access.host_network {
            p.push(b("PrivateNetwork", true));
        }
        if !access.ip_sockets {
            p.push(Property {
                name: "IPAddressDeny",
                value: PropertyValue::IpPrefixes(vec![
                    IpPrefix {
                        family: AF_INET,
                        address: vec![0; 4],
                        prefix_len: 0,
                    },
                    IpPrefix {
                        family: AF_INET6,
                        address: vec![0; 16],
                        prefix_len: 0,
                    },
                ]),
            });
        }
    }
    // What any process may ask for itself, so a user manager applies it too.
    p.extend([
        b("NoNewPrivileges", true),
        b("RestrictRealtime", true),
        b("RestrictSUIDSGID", true),
        b("LockPersonality", true),
        b("MemoryDenyWriteExecute", !access.write_execute),
        // The namespace types the unit may create: none.
        Property {
            name: "RestrictNamespaces",
            value: PropertyValue::U64(0),
        },
        Property {
            name: "RestrictAddressFamilies",
            value: PropertyValue::NameList(true, access.address_families.clone()),
        },
        Property {
            name: "SystemCallArchitectures",
            value: PropertyValue::StrList(list(&["native"])),
        },
        Property {
            name: "SystemCallFilter",
            value: PropertyValue::NameList(true, list(&["@system-service"])),
        },
        Property {
            name: "SystemCallFilter",
            value: PropertyValue::NameList(false, list(&DENIED_SYSCALLS)),
        },
        Property {
            name: "SystemCallErrorNumber",
            value: PropertyValue::I32(EPERM),
        },
        Property {
            name: "UMask",
            value: PropertyValue::U32(0o077),
        },
    ]);
    p
}

const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const EPERM: i32 = 1;

/// The unit of `spec`'s VM, with the argv from `builders`.
pub fn build(
    spec: &VmSpec,
    builders: &CommandBuilders,
    cfg: &VmUnitConfig,
) -> Result<UnitSpec, UnitSpecError> {
    let argv = builders.argv(spec)?;
    let hooks = builders.hooks(spec)?;
    let access = builders.access(spec)?;
    let mut unit = build_with_argv(spec, argv, cfg)?;
    unit.properties
        .extend(sandbox(builders.manager(), &spec.name, &access));
    // The hooks before and after the hypervisor set up and tear down what it may not
    // (tap devices, its disks' owner): full privileges, systemd's `+`. The graceful stop
    // talks to the hypervisor only and is sandboxed like it.
    let exec = |cmds: &[Vec<String>], flags: &[&str]| {
        PropertyValue::ExecEx(
            cmds.iter()
                .map(|argv| ExecCommandEx {
                    path: argv.first().cloned().unwrap_or_default(),
                    argv: argv.clone(),
                    flags: flags.iter().map(|f| f.to_string()).collect(),
                })
                .collect(),
        )
    };
    for (name, cmds, flags) in [
        ("ExecStartPreEx", &hooks.start_pre, &["privileged"][..]),
        ("ExecStopEx", &hooks.stop, &[][..]),
        (
            "ExecStopPostEx",
            &hooks.stop_post,
            &["privileged", "ignore-failure"][..],
        ),
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
                value: exec(cmds, flags),
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
        // Every property appears once, but SystemCallFilter: an allow list, then a deny list
        // (as two lines of a unit file would).
        let mut names: Vec<_> = u
            .properties
            .iter()
            .map(|p| p.name)
            .filter(|n| *n != "SystemCallFilter")
            .collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len() + 2, u.properties.len());
        let filters: Vec<_> = u
            .properties
            .iter()
            .filter(|p| p.name == "SystemCallFilter")
            .map(|p| p.value.clone())
            .collect();
        assert_eq!(
            filters,
            vec![
                PropertyValue::NameList(true, vec!["@system-service".into()]),
                PropertyValue::NameList(false, vec!["@privileged".into(), "@resources".into()]),
            ]
        );
    }

    fn names(props: &[Property]) -> Vec<&'static str> {
        props.iter().map(|p| p.name).collect()
    }

    fn get<'a>(props: &'a [Property], name: &str) -> Option<&'a PropertyValue> {
        props.iter().find(|p| p.name == name).map(|p| &p.value)
    }

    /// What only the system manager can do, and what every manager gets.
    const SYSTEM_ONLY: [&str; 8] = [
        "DynamicUser",
        "RuntimeDirectory",
        "CapabilityBoundingSet",
        "ProtectSystem",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectProc",
        "RemoveIPC",
    ];
    const EVERYWHERE: [&str; 9] = [
        "NoNewPrivileges",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictNamespaces",
        "RestrictAddressFamilies",
        "SystemCallFilter",
        "UMask",
    ];

    #[test]
    fn the_sandbox_follows_the_manager_and_what_the_hypervisor_needs() {
        let qemu_tcg = HostAccess {
            address_families: vec!["AF_UNIX".into()],
            ..HostAccess::default()
        };
        let qemu_kvm_nic_disk = HostAccess {
            devices: vec!["/dev/kvm".into(), "/dev/net/tun".into()],
            groups: vec!["kvm".into()],
            writable: vec!["/img/root.img".into()],
            address_families: vec!["AF_UNIX".into()],
            host_network: true,
            ..HostAccess::default()
        };
        let process = HostAccess {
            address_families: vec!["AF_UNIX".into(), "AF_INET".into(), "AF_INET6".into()],
            host_network: true,
            ip_sockets: true,
            write_execute: true,
            ..HostAccess::default()
        };
        let yes = |v: bool| Some(PropertyValue::Bool(v));
        // (what, manager, access, property, its value; None: not set)
        type Row<'a> = (
            &'a str,
            Manager,
            &'a HostAccess,
            &'a str,
            Option<PropertyValue>,
        );
        let cases: Vec<Row> = vec![
            (
                "tcg: no devices at all",
                Manager::System,
                &qemu_tcg,
                "PrivateDevices",
                yes(true),
            ),
            (
                "tcg: no device list",
                Manager::System,
                &qemu_tcg,
                "DeviceAllow",
                None,
            ),
            (
                "tcg: loopback only",
                Manager::System,
                &qemu_tcg,
                "PrivateNetwork",
                yes(true),
            ),
            (
                "tcg: own user namespace",
                Manager::System,
                &qemu_tcg,
                "PrivateUsers",
                yes(true),
            ),
            (
                "tcg: W^X (split-wx)",
                Manager::System,
                &qemu_tcg,
                "MemoryDenyWriteExecute",
                yes(true),
            ),
            (
                "tcg: nothing to write",
                Manager::System,
                &qemu_tcg,
                "ReadWritePaths",
                None,
            ),
            (
                "tcg: no IP at all",
                Manager::System,
                &qemu_tcg,
                "IPAddressDeny",
                Some(PropertyValue::IpPrefixes(vec![
                    IpPrefix {
                        family: 2,
                        address: vec![0; 4],
                        prefix_len: 0,
                    },
                    IpPrefix {
                        family: 10,
                        address: vec![0; 16],
                        prefix_len: 0,
                    },
                ])),
            ),
            (
                "tcg: unix sockets only",
                Manager::System,
                &qemu_tcg,
                "RestrictAddressFamilies",
                Some(PropertyValue::NameList(true, vec!["AF_UNIX".into()])),
            ),
            (
                "its runtime directory",
                Manager::System,
                &qemu_tcg,
                "RuntimeDirectory",
                Some(PropertyValue::StrList(vec!["blixard-vm/web-1".into()])),
            ),
            (
                "no capabilities",
                Manager::System,
                &qemu_tcg,
                "CapabilityBoundingSet",
                Some(PropertyValue::U64(0)),
            ),
            (
                "kvm: a private /dev is no use",
                Manager::System,
                &qemu_kvm_nic_disk,
                "PrivateDevices",
                None,
            ),
            (
                "kvm: closed policy",
                Manager::System,
                &qemu_kvm_nic_disk,
                "DevicePolicy",
                Some(PropertyValue::Str("closed".into())),
            ),
            (
                "kvm: exactly its devices",
                Manager::System,
                &qemu_kvm_nic_disk,
                "DeviceAllow",
                Some(PropertyValue::StrPairs(vec![
                    ("/dev/kvm".into(), "rw".into()),
                    ("/dev/net/tun".into(), "rw".into()),
                ])),
            ),
            (
                "kvm: the group of /dev/kvm",
                Manager::System,
                &qemu_kvm_nic_disk,
                "SupplementaryGroups",
                Some(PropertyValue::StrList(vec!["kvm".into()])),
            ),
            (
                "kvm: groups rule out a user namespace",
                Manager::System,
                &qemu_kvm_nic_disk,
                "PrivateUsers",
                None,
            ),
            (
                "nic: the host's network (its tap)",
                Manager::System,
                &qemu_kvm_nic_disk,
                "PrivateNetwork",
                None,
            ),
            (
                "disk: writes only its disk",
                Manager::System,
                &qemu_kvm_nic_disk,
                "ReadWritePaths",
                Some(PropertyValue::StrList(vec!["/img/root.img".into()])),
            ),
            (
                "process: host network",
                Manager::System,
                &process,
                "PrivateNetwork",
                None,
            ),
            (
                "process: IP allowed",
                Manager::System,
                &process,
                "IPAddressDeny",
                None,
            ),
            (
                "process: may JIT",
                Manager::System,
                &process,
                "MemoryDenyWriteExecute",
                yes(false),
            ),
            (
                "process: a dynamic user too",
                Manager::System,
                &process,
                "DynamicUser",
                yes(true),
            ),
            (
                "user manager: no identity switch",
                Manager::User,
                &qemu_tcg,
                "DynamicUser",
                None,
            ),
            (
                "user manager: no runtime dir",
                Manager::User,
                &qemu_tcg,
                "RuntimeDirectory",
                None,
            ),
            (
                "user manager: no mount namespace",
                Manager::User,
                &qemu_tcg,
                "ProtectSystem",
                None,
            ),
            (
                "user manager: no private network",
                Manager::User,
                &qemu_tcg,
                "PrivateNetwork",
                None,
            ),
            (
                "user manager: but seccomp",
                Manager::User,
                &qemu_tcg,
                "MemoryDenyWriteExecute",
                yes(true),
            ),
            (
                "user manager: no new privileges",
                Manager::User,
                &process,
                "NoNewPrivileges",
                yes(true),
            ),
        ];
        for (what, manager, access, name, want) in cases {
            let props = sandbox(manager, "web-1", access);
            assert_eq!(get(&props, name), want.as_ref(), "{what}");
        }
        for access in [&qemu_tcg, &qemu_kvm_nic_disk, &process] {
            let system = sandbox(Manager::System, "web-1", access);
            let user = sandbox(Manager::User, "web-1", access);
            for n in EVERYWHERE {
                assert!(names(&system).contains(&n), "system: {n}");
                assert!(names(&user).contains(&n), "user: {n}");
            }
            for n in SYSTEM_ONLY {
                assert!(names(&system).contains(&n), "system: {n}");
                assert!(!names(&user).contains(&n), "user: {n}");
            }
        }
        assert_eq!(vm_runtime_dir("web-1"), "/run/blixard-vm/web-1");
    }

    #[test]
    fn hooks_run_privileged_and_the_graceful_stop_sandboxed() {
        use crate::hypervisor::{
            GracefulStop, HostPaths, QemuCommand, QemuMachine, TapNetwork, VmOwner,
        };
        use blixard_api::{DiskFormat, DiskSpec, NicSpec};
        use std::sync::Arc;
        let agent = "/usr/bin/blixard-agent";
        let mut b = CommandBuilders::default().with_manager(Manager::System);
        b.insert(Box::new(QemuCommand {
            paths: HostPaths {
                binary: "/usr/bin/qemu-system-x86_64".into(),
                image_dir: "/img".into(),
                runtime_dir: "/run/blixard-vm".into(),
                per_vm_runtime: true,
                check: Arc::new(|_, _| Ok(())),
            },
            machine: QemuMachine::Microvm,
            kvm: false,
            graceful_stop: Some(GracefulStop {
                agent: agent.into(),
                timeout_secs: 20,
            }),
            network: Some(TapNetwork {
                ip: "/usr/sbin/ip".into(),
                bridges: vec!["br0".into()],
                exists: Arc::new(|_| true),
            }),
            owner: Some(VmOwner {
                agent: agent.into(),
            }),
        }));
        let mut s = spec("web-1", Hypervisor::Qemu);
        s.disks = vec![
            DiskSpec {
                path: "root.img".into(),
                read_only: false,
                format: DiskFormat::Raw,
            },
            DiskSpec {
                path: "base.img".into(),
                read_only: true,
                format: DiskFormat::Raw,
            },
        ];
        s.nics = vec![NicSpec {
            bridge: "br0".into(),
            mac: None,
        }];
        let u = build(&s, &b, &VmUnitConfig::default()).expect("unit");
        let ex = |name: &str| match u.get(name) {
            Some(PropertyValue::ExecEx(c)) => c.clone(),
            other => panic!("{name}: {other:?}"),
        };
        let tap = crate::hypervisor::tap_name("web-1", 0);
        let pre = ex("ExecStartPreEx");
        assert!(pre.iter().all(|c| c.flags == ["privileged"]), "{pre:?}");
        let argv: Vec<String> = pre.iter().map(|c| c.argv.join(" ")).collect();
        assert_eq!(
            argv,
            [
                format!("{agent} vm-owner --like /run/blixard-vm/web-1 -- /usr/sbin/ip tuntap add dev {tap} mode tap user {{uid}}"),
                format!("/usr/sbin/ip link set dev {tap} addrgenmode none"),
                format!("/usr/sbin/ip link set dev {tap} master br0 up"),
                format!("{agent} vm-owner --like /run/blixard-vm/web-1 --chown /img/root.img"),
            ]
        );
        let post = ex("ExecStopPostEx");
        assert!(post
            .iter()
            .all(|c| c.flags == ["privileged", "ignore-failure"]));
        assert_eq!(
            post.iter().map(|c| c.argv.join(" ")).collect::<Vec<_>>(),
            [
                format!("/usr/sbin/ip link del dev {tap}"),
                format!("{agent} vm-owner --like /img --chown /img/root.img"),
            ]
        );
        let stop = ex("ExecStopEx");
        assert_eq!(stop.len(), 1);
        assert!(stop[0].flags.is_empty(), "the graceful stop runs sandboxed");
        assert!(stop[0]
            .argv
            .join(" ")
            .contains("--socket /run/blixard-vm/web-1/qmp"));
        let Some(PropertyValue::Exec(start)) = u.get("ExecStart") else {
            panic!("no ExecStart")
        };
        assert!(start[0]
            .argv
            .contains(&"unix:/run/blixard-vm/web-1/qmp,server=on,wait=off".to_string()));
        assert_eq!(
            u.get("ReadWritePaths"),
            Some(&PropertyValue::StrList(vec!["/img/root.img".into()]))
        );
        assert_eq!(
            u.get("DeviceAllow"),
            Some(&PropertyValue::StrPairs(vec![(
                "/dev/net/tun".into(),
                "rw".into()
            )]))
        );
        assert_eq!(u.get("DynamicUser"), Some(&PropertyValue::Bool(true)));
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
