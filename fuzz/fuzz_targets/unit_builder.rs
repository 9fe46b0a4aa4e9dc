//! The VM spec → argv → unit builders of the agent (`process`, QEMU, cloud-hypervisor): any
//! spec that passes validation becomes a unit named after the VM only, in the VM slice, with
//! no control character in any string property or argument; a QEMU or cloud-hypervisor argv
//! has its image paths inside the image directory and no option string gains a key; nothing
//! panics on any spec, valid or not.
#![no_main]

use std::path::{Component, Path};
use std::sync::Arc;

use blixard_agent::command::{CommandBuilders, ProcessCommand};
use blixard_agent::config::VmUnitConfig;
use blixard_agent::hypervisor::{
    CloudHypervisorCommand, GracefulStop, HostPaths, QemuCommand, QemuMachine, TapNetwork, VmOwner,
};
use blixard_agent::unit_spec::{self, PropertyValue};
use blixard_api::{validate, DiskSpec, Hypervisor, NicSpec, VmSpec};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    name: String,
    vcpus: u32,
    memory_mib: u64,
    hypervisor: u8,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    disks: Vec<(String, bool)>,
    nics: Vec<(String, Option<String>)>,
    overhead_mib: u64,
    stop_timeout_secs: u64,
    q35: bool,
    kvm: bool,
}

const IMAGE_DIR: &str = "/var/lib/blixard/images";

fn inside(p: &str) -> bool {
    let path = Path::new(p);
    path.starts_with(IMAGE_DIR) && path.components().all(|c| c != Component::ParentDir)
}

/// Values of the path-carrying flags must be inside the image directory; option strings keep
/// their keys.
fn check_argv(argv: &[String]) {
    assert!(
        argv.iter().all(|a| !a.chars().any(char::is_control)),
        "{argv:?}"
    );
    for w in argv.windows(2) {
        let (flag, v) = (w[0].as_str(), w[1].as_str());
        match flag {
            "-kernel" | "-initrd" | "--kernel" | "--initramfs" => assert!(inside(v), "{v:?}"),
            "-drive" => {
                let keys: Vec<&str> = v
                    .split(',')
                    .map(|kv| kv.split('=').next().unwrap_or(""))
                    .collect();
                assert!(
                    keys == ["file", "format", "if", "id"]
                        || keys == ["file", "format", "if", "id", "readonly"],
                    "{v:?}"
                );
                assert!(
                    inside(&v["file=".len()..v.find(",format=").unwrap_or(v.len())]),
                    "{v:?}"
                );
            }
            "--disk" => {
                let keys: Vec<&str> = v
                    .split(',')
                    .map(|kv| kv.split('=').next().unwrap_or(""))
                    .collect();
                assert_eq!(keys, ["path", "readonly"], "{v:?}");
            }
            _ => {}
        }
    }
}

const COMMAND: [&str; 2] = ["/bin/sleep", "infinity"];

fuzz_target!(|i: Input| {
    let mut s: VmSpec = serde_json::from_value(serde_json::json!({
        "name": i.name, "vcpus": i.vcpus, "memory_mib": i.memory_mib,
    }))
    .expect("base spec");
    s.hypervisor = match i.hypervisor % 4 {
        0 => Hypervisor::Process,
        1 => Hypervisor::Qemu,
        2 => Hypervisor::CloudHypervisor,
        _ => Hypervisor::Firecracker,
    };
    s.kernel = i.kernel;
    s.initrd = i.initrd;
    s.cmdline = i.cmdline;
    s.disks = i
        .disks
        .into_iter()
        .map(|(path, read_only)| DiskSpec {
            path,
            read_only,
            format: Default::default(),
        })
        .collect();
    s.nics = i
        .nics
        .into_iter()
        .map(|(bridge, mac)| NicSpec { bridge, mac })
        .collect();
    let cfg = VmUnitConfig {
        memory_overhead_mib: i.overhead_mib,
        stop_timeout_secs: i.stop_timeout_secs,
        ..VmUnitConfig::default()
    };
    let paths = HostPaths {
        binary: "/usr/bin/qemu-system-x86_64".into(),
        image_dir: IMAGE_DIR.into(),
        runtime_dir: "/run/blixard-vm".into(),
        per_vm_runtime: true,
        check: Arc::new(|_, _| Ok(())),
    };
    let mut builders = CommandBuilders::default();
    builders.insert(Box::new(ProcessCommand {
        command: COMMAND.iter().map(|c| c.to_string()).collect(),
    }));
    builders.insert(Box::new(QemuCommand {
        paths: paths.clone(),
        machine: if i.q35 {
            QemuMachine::Q35
        } else {
            QemuMachine::Microvm
        },
        kvm: i.kvm,
        graceful_stop: Some(GracefulStop {
            agent: "/usr/bin/blixard-agent".into(),
            timeout_secs: 20,
        }),
        network: Some(TapNetwork {
            ip: "/usr/sbin/ip".into(),
            bridges: vec!["br0".into()],
            exists: Arc::new(|b| b == "br0"),
        }),
        owner: Some(VmOwner {
            agent: "/usr/bin/blixard-agent".into(),
        }),
    }));
    builders.insert(Box::new(CloudHypervisorCommand {
        paths,
        owner: Some(VmOwner {
            agent: "/usr/bin/blixard-agent".into(),
        }),
    }));
    // Whatever the spec, building must not panic (it may refuse).
    let built = unit_spec::build(&s, &builders, &cfg);
    if validate::vm_spec(&s).is_err() {
        return;
    }
    let Ok(unit) = built else {
        return;
    };
    assert!(unit.is_vm_unit());
    assert_eq!(unit.unit, format!("blixard-vm-{}.service", s.name));
    match unit.get("ExecStart") {
        Some(PropertyValue::Exec(cmds)) => {
            assert_eq!(cmds.len(), 1);
            if s.hypervisor == Hypervisor::Process {
                assert_eq!(cmds[0].argv, COMMAND);
            } else {
                check_argv(&cmds[0].argv);
            }
        }
        other => panic!("ExecStart is {other:?}"),
    }
    for p in &unit.properties {
        match &p.value {
            PropertyValue::Str(v) => assert!(!v.chars().any(char::is_control), "{}", p.name),
            PropertyValue::StrList(l) => {
                assert!(
                    l.iter().all(|v| !v.chars().any(char::is_control)),
                    "{}",
                    p.name
                )
            }
            _ => {}
        }
    }
});
