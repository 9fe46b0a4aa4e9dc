//! The VM spec → unit builder of the agent: any spec that passes validation becomes a unit
//! named after the VM only, in the VM slice, running exactly the configured command, with no
//! control character in any string property; nothing panics on any spec, valid or not.
#![no_main]

use blixard_agent::command::{CommandBuilders, ProcessCommand};
use blixard_agent::config::VmUnitConfig;
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
    let mut builders = CommandBuilders::default();
    builders.insert(Box::new(ProcessCommand {
        command: COMMAND.iter().map(|c| c.to_string()).collect(),
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
            assert_eq!(cmds[0].argv, COMMAND);
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
