//! Property: no VM spec that passes the API's validation can smuggle anything into the unit
//! the agent builds, nor name a file outside the agent's image directory.
//!
//! The `process` builder runs the configured command whatever the spec says; the unit
//! carries the VM's name (unit name, syslog identifier, journal field, environment) and its
//! resources. The QEMU and cloud-hypervisor builders turn image paths, the kernel cmdline and
//! disks into arguments: their argv must parse back, flag by flag, into exactly the options
//! the spec asked for, every image path resolved inside the image directory (through the
//! agent's `image_path::resolve`, with a file check that accepts everything: symlink escapes
//! are `fs_check`'s part, tested beside it), and no value may add a `key=value` to an option
//! string. The validation layer is checked too: a path that passes is one whole argument and,
//! read lexically under the image directory (a leading `/` as its root, the most permissive
//! reading), stays inside.

use std::path::{Component, Path, PathBuf};

use std::sync::Arc;

use blixard_agent::command::{CommandBuilder, CommandBuilders, ProcessCommand};
use blixard_agent::config::VmUnitConfig;
use blixard_agent::hypervisor::{CloudHypervisorCommand, HostPaths, QemuCommand, QemuMachine};
use blixard_agent::unit_spec::{self, PropertyValue};
use blixard_api::{validate, DiskSpec, Hypervisor, NicSpec, VmSpec};
use proptest::prelude::*;

const IMAGE_DIR: &str = "/var/lib/blixard/images";
const COMMAND: [&str; 2] = ["/bin/sleep", "infinity"];

/// Strings made of the characters that matter: separators, traversal, shell and option
/// syntax, whitespace, control characters, non-ASCII.
fn hostile() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "a", "z", "0", "9", "-", "_", ".", "..", "/", "//", ",", ";", " ", "\t", "\n", "\r", "\0",
        "=", "$", "`", "'", "\"", "\\", "%", "*", "é", "\u{202e}", "\u{7f}", "vmlinuz", "web-1",
        "../", "/..", "./", "~",
    ]);
    prop::collection::vec(atoms, 0..12).prop_map(|v| v.concat())
}

/// Printable text that validation lets through, with traversal and shell syntax in it: the
/// cases where what it guarantees matters.
fn printable() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "a",
        "z",
        "0",
        "-",
        "_",
        ".",
        "..",
        "/",
        "//",
        ";",
        " ",
        "=",
        "$",
        "`",
        "'",
        "\"",
        "\\",
        "%",
        "*",
        "é",
        "\u{202e}",
        "vmlinuz",
        "disk.img",
        "../",
        "/..",
        "./",
        "~",
        "-M",
        "--",
        "@",
        "/var/lib/blixard/images/",
        "/var/lib/blixard/images",
        "/etc/",
    ]);
    prop::collection::vec(atoms, 1..10).prop_map(|v| v.concat())
}

/// Mostly paths and text that may pass validation, sometimes plainly hostile ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![4 => printable(), 1 => hostile()]
}

/// Mostly-plausible names, sometimes hostile ones.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z][a-z0-9-]{0,20}[a-z0-9]",
        1 => "[a-z][a-z0-9-]{0,70}",
        1 => hostile(),
    ]
}

/// Mostly `process`, the one builder the agent has today, so most valid specs get a unit.
fn hypervisor() -> impl Strategy<Value = Hypervisor> {
    prop_oneof![
        3 => Just(Hypervisor::Process),
        1 => prop::sample::select(vec![
            Hypervisor::Qemu,
            Hypervisor::CloudHypervisor,
            Hypervisor::Firecracker,
        ]),
    ]
}

fn spec() -> impl Strategy<Value = VmSpec> {
    (
        name(),
        prop_oneof![8 => 1u32..=8, 1 => 0u32..300],
        prop_oneof![6 => 16u64..4096, 1 => 0u64..100_000, 1 => any::<u64>()],
        hypervisor(),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::collection::vec((text(), any::<bool>()), 0..3),
        prop::collection::vec(
            (
                prop_oneof![4 => "[a-z0-9]{1,15}", 1 => hostile()],
                prop::option::of(prop_oneof![
                    "[0-9a-f][02468ace](:[0-9a-f]{2}){5}",
                    hostile()
                ]),
            ),
            0..2,
        ),
    )
        .prop_map(
            |(name, vcpus, memory_mib, hypervisor, kernel, initrd, cmdline, disks, nics)| {
                let mut s: VmSpec = serde_json::from_value(serde_json::json!({
                    "name": name, "vcpus": vcpus, "memory_mib": memory_mib,
                    "hypervisor": hypervisor,
                }))
                .unwrap_or_else(|e| panic!("base spec: {e}"));
                s.kernel = kernel;
                s.initrd = initrd;
                s.cmdline = cmdline;
                s.disks = disks
                    .into_iter()
                    .map(|(path, read_only)| DiskSpec {
                        path,
                        read_only,
                        format: Default::default(),
                    })
                    .collect();
                s.nics = nics
                    .into_iter()
                    .map(|(bridge, mac)| NicSpec { bridge, mac })
                    .collect();
                s
            },
        )
}

/// `path` under `dir`, resolved without touching the file system; `None` if it climbs out.
fn resolve_lexically(dir: &Path, path: &str) -> Option<PathBuf> {
    let mut out = dir.to_path_buf();
    for c in Path::new(path.trim_start_matches('/')).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || !out.starts_with(dir) {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    out.starts_with(dir).then_some(out)
}

fn one_argument(field: &str, v: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !v.chars().any(|c| c.is_control()),
        "{field} {v:?} has a control character"
    );
    Ok(())
}

proptest! {
    // Most random specs are refused by validation and skipped (`prop_assume!`): allow as many
    // rejects as it takes for 4096 accepted cases.
    #![proptest_config(ProptestConfig {
        cases: 4096,
        max_global_rejects: 1 << 20,
        ..ProptestConfig::default()
    })]

    #[test]
    fn valid_specs_cannot_escape_their_fields(s in spec()) {
        prop_assume!(validate::vm_spec(&s).is_ok(), "refused by validation");
        let dir = Path::new(IMAGE_DIR);
        let mut paths: Vec<(&str, &str)> = s.disks.iter().map(|d| ("disk", d.path.as_str())).collect();
        paths.extend(s.kernel.as_deref().map(|k| ("kernel", k)));
        paths.extend(s.initrd.as_deref().map(|i| ("initrd", i)));
        for (field, p) in paths {
            one_argument(field, p)?;
            prop_assert!(!p.contains(','), "{field} {p:?} has QEMU's option separator");
            prop_assert!(
                resolve_lexically(dir, p).is_some(),
                "{field} {p:?} resolves outside {IMAGE_DIR}"
            );
        }
        if let Some(c) = &s.cmdline {
            one_argument("cmdline", c)?;
        }
        for n in &s.nics {
            prop_assert!(n.bridge.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        }

        // The unit: named after the VM only, in the VM slice, running exactly the configured
        // command, with the name as the one journal field and environment entry.
        let mut builders = CommandBuilders::default();
        builders.insert(Box::new(ProcessCommand { command: COMMAND.iter().map(|c| c.to_string()).collect() }));
        let unit = unit_spec::build(&s, &builders, &VmUnitConfig::default());
        // Hypervisors without a builder, or resources beyond the unit's counters.
        prop_assume!(unit.is_ok(), "no unit for this spec");
        let unit = unit.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(unit.is_vm_unit());
        prop_assert_eq!(&unit.unit, &format!("blixard-vm-{}.service", s.name));
        prop_assert!(!s.name.contains(['/', '.', '\\', '@']));
        match unit.get("ExecStart") {
            Some(PropertyValue::Exec(cmds)) => {
                prop_assert_eq!(cmds.len(), 1);
                prop_assert_eq!(&cmds[0].path, COMMAND[0]);
                prop_assert_eq!(&cmds[0].argv, &COMMAND.iter().map(|c| c.to_string()).collect::<Vec<_>>());
            }
            other => prop_assert!(false, "ExecStart is {other:?}"),
        }
        let field = format!("BLIXARD_VM={}", s.name);
        prop_assert_eq!(unit.get("LogExtraFields"), Some(&PropertyValue::BytesList(vec![field.clone().into_bytes()])));
        // The cmdline reaches a process VM as one variable, whole (it holds no control
        // characters, so no newline can start another).
        let mut env = vec![field];
        env.extend(s.cmdline.iter().map(|c| format!("BLIXARD_CMDLINE={c}")));
        prop_assert_eq!(unit.get("Environment"), Some(&PropertyValue::StrList(env)));
        for p in &unit.properties {
            if let PropertyValue::Str(v) = &p.value {
                one_argument(p.name, v)?;
            }
        }
    }

    #[test]
    fn validation_is_stable_through_json(s in spec()) {
        let ok = validate::vm_spec(&s).is_ok();
        let text = serde_json::to_string(&s).unwrap_or_else(|e| panic!("{e}"));
        let back: VmSpec = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(&back, &s);
        prop_assert_eq!(validate::vm_spec(&back).is_ok(), ok);
    }
}

#[test]
fn lexical_resolution_catches_escapes() {
    let dir = Path::new(IMAGE_DIR);
    for (p, inside) in [
        ("vmlinuz", true),
        ("/vmlinuz", true),
        ("sub/./disk.img", true),
        ("sub/../disk.img", true),
        ("../etc/shadow", false),
        ("a/../../etc", false),
        ("/../x", false),
    ] {
        assert_eq!(resolve_lexically(dir, p).is_some(), inside, "{p}");
    }
}

fn host_paths() -> HostPaths {
    HostPaths {
        binary: "/usr/bin/qemu-system-x86_64".into(),
        image_dir: IMAGE_DIR.into(),
        runtime_dir: "/run/blixard-agent".into(),
        per_vm_runtime: false,
        check: Arc::new(|_, _| Ok(())),
    }
}

/// How many values each flag of a builder's argv takes.
fn arity(flag: &str) -> Option<usize> {
    Some(match flag {
        "-nodefaults" | "-no-user-config" | "-no-reboot" => 0,
        "-name" | "-M" | "-accel" | "-cpu" | "-smp" | "-m" | "-display" | "-serial" | "-kernel"
        | "-initrd" | "-append" | "-drive" | "-device" | "-netdev" | "-qmp" | "-action" => 1,
        "--api-socket" | "--cpus" | "--memory" | "--kernel" | "--initramfs" | "--cmdline"
        | "--disk" | "--net" | "--serial" | "--console" => 1,
        _ => return None,
    })
}

/// `argv[1..]` as (flag, value) pairs; an unknown flag or a missing value is an error.
fn parse(argv: &[String]) -> Result<Vec<(String, Option<String>)>, String> {
    let mut out = Vec::new();
    let mut it = argv.iter().skip(1);
    while let Some(flag) = it.next() {
        match arity(flag) {
            Some(0) => out.push((flag.clone(), None)),
            Some(_) => {
                let v = it.next().ok_or(format!("{flag} has no value"))?;
                out.push((flag.clone(), Some(v.clone())));
            }
            None => return Err(format!("unexpected argument {flag:?} in {argv:?}")),
        }
    }
    Ok(out)
}

/// The keys of a `key=value,key=value` option string.
fn keys(v: &str) -> Vec<&str> {
    v.split(',')
        .map(|kv| kv.split('=').next().unwrap_or(""))
        .collect()
}

fn inside(p: &str) -> bool {
    let path = Path::new(p);
    path.starts_with(IMAGE_DIR)
        && path.components().all(|c| c != Component::ParentDir)
        && path != Path::new(IMAGE_DIR)
}

proptest! {
    // Most random specs are refused by validation and skipped (`prop_assume!`): allow as many
    // rejects as it takes for 4096 accepted cases.
    #![proptest_config(ProptestConfig {
        cases: 4096,
        max_global_rejects: 1 << 20,
        ..ProptestConfig::default()
    })]

    #[test]
    fn valid_specs_make_well_formed_hypervisor_argv(
        mut s in spec(),
        qemu in any::<bool>(),
        q35 in any::<bool>(),
        kvm in any::<bool>(),
    ) {
        s.hypervisor = if qemu { Hypervisor::Qemu } else { Hypervisor::CloudHypervisor };
        prop_assume!(validate::vm_spec(&s).is_ok(), "refused by validation");
        let argv = if qemu {
            QemuCommand {
                paths: host_paths(),
                machine: if q35 { QemuMachine::Q35 } else { QemuMachine::Microvm },
                kvm,
                graceful_stop: None,
                network: None,
                owner: None,
            }
            .argv(&s)
        } else {
            CloudHypervisorCommand { paths: host_paths(), owner: None }.argv(&s)
        };
        // Refused (e.g. an absolute path outside the image directory): nothing starts.
        prop_assume!(argv.is_ok(), "argv refused");
        let argv = argv.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&argv[0], "/usr/bin/qemu-system-x86_64");
        for a in &argv {
            one_argument("argument", a)?;
        }
        let opts = parse(&argv).map_err(TestCaseError::fail)?;
        let count = |f: &str| opts.iter().filter(|(k, _)| k == f).count();
        let values = |f: &str| -> Vec<String> {
            opts.iter().filter(|(k, _)| k == f).filter_map(|(_, v)| v.clone()).collect()
        };
        let (kernel, initrd, append, disk) = if qemu {
            ("-kernel", "-initrd", "-append", "-drive")
        } else {
            ("--kernel", "--initramfs", "--cmdline", "--disk")
        };
        prop_assert_eq!(count(kernel), usize::from(s.kernel.is_some()));
        prop_assert_eq!(count(initrd), usize::from(s.initrd.is_some()));
        prop_assert_eq!(count(disk), s.disks.len());
        for p in values(kernel).iter().chain(&values(initrd)) {
            prop_assert!(inside(p), "{p:?} is not inside {IMAGE_DIR}");
        }
        if let (Some(c), [got]) = (&s.cmdline, values(append).as_slice()) {
            prop_assert!(got.starts_with(c.as_str()), "cmdline {c:?} became {got:?}");
        }
        for (i, d) in values(disk).iter().enumerate() {
            let want: Vec<&str> = match (qemu, s.disks[i].read_only) {
                (true, false) => vec!["file", "format", "if", "id"],
                (true, true) => vec!["file", "format", "if", "id", "readonly"],
                (false, _) => vec!["path", "readonly"],
            };
            prop_assert_eq!(keys(d), want, "disk option string {:?}", d);
            let file = d.split(',').next().and_then(|kv| kv.split_once('=')).map(|(_, v)| v);
            prop_assert!(file.is_some_and(inside), "disk {d:?} is not inside {IMAGE_DIR}");
        }
        if qemu {
            prop_assert_eq!(count("-netdev"), s.nics.len());
            for n in values("-netdev") {
                prop_assert_eq!(keys(&n), vec!["tap", "id", "ifname", "script", "downscript"]);
            }
            for d in values("-device").iter().filter(|d| d.contains("netdev=")) {
                prop_assert_eq!(keys(d).len(), 3, "nic device {:?}", d);
            }
        } else {
            for n in values("--net") {
                prop_assert_eq!(keys(&n), vec!["tap", "mac"]);
            }
        }
    }
}
