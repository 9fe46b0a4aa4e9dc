//! Validation of API inputs, shared by the control plane (which refuses bad requests with a
//! 400) and the CLI (which refuses them before sending anything).
//!
//! The rules are strict on purpose: a VM name becomes a systemd unit name and a file name, a
//! path becomes a hypervisor argument, so anything that could smuggle a separator, a control
//! character or a huge size is refused here, at the edge.

use std::collections::BTreeMap;

use crate::types::{AddMember, Capacity, HostRegistration, Hypervisor, NicSpec, VmSpec};

/// Largest VM: 256 vCPUs.
pub const MAX_VCPUS: u32 = 256;
/// Largest VM: 4 TiB of memory.
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;
/// Smallest VM memory that boots a kernel.
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;
pub const MAX_LABELS: usize = 64;
pub const MAX_PATH_LEN: usize = 1024;
pub const MAX_CMDLINE_LEN: usize = 4096;
pub const MAX_LABEL_LEN: usize = 128;
/// DNS label length limit (RFC 1035).
pub const MAX_NAME_LEN: usize = 63;
/// Largest host the control plane accepts in a registration.
pub const MAX_HOST_VCPUS: u32 = 65_536;
pub const MAX_HOST_MEMORY_MIB: u64 = 1 << 32;

/// Why an input was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

/// A DNS label: 1–63 of `[a-z0-9-]`, starting with a letter, not ending with `-`.
pub fn dns_label(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(err(
            field,
            format!("must be at most {MAX_NAME_LEN} characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(err(
            field,
            "must contain only lowercase letters, digits and '-'",
        ));
    }
    if !value.as_bytes()[0].is_ascii_lowercase() {
        return Err(err(field, "must start with a lowercase letter"));
    }
    if value.ends_with('-') {
        return Err(err(field, "must not end with '-'"));
    }
    Ok(())
}

/// A relative or absolute path to a file in the agent's image directory. The agent resolves
/// and confines it; here it must be plain text without `..`, NUL, control characters or commas
/// (QEMU's option separator).
pub fn image_path(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    if value.len() > MAX_PATH_LEN {
        return Err(err(
            field,
            format!("must be at most {MAX_PATH_LEN} characters"),
        ));
    }
    if value.chars().any(|c| c.is_control() || c == ',') {
        return Err(err(field, "must not contain control characters or ','"));
    }
    if value.split('/').any(|c| c == "..") {
        return Err(err(field, "must not contain '..'"));
    }
    Ok(())
}

fn labels(field: &str, map: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if map.len() > MAX_LABELS {
        return Err(err(field, format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in map {
        let ok_key = !k.is_empty()
            && k.len() <= MAX_LABEL_LEN
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !ok_key {
            return Err(err(
                format!("{field}.{k}"),
                "label keys are 1-128 characters of [A-Za-z0-9-_./]",
            ));
        }
        if v.len() > MAX_LABEL_LEN || v.chars().any(|c| c.is_control()) {
            return Err(err(
                format!("{field}.{k}"),
                "label values are at most 128 characters, without control characters",
            ));
        }
    }
    Ok(())
}

fn nic(index: usize, nic: &NicSpec) -> Result<(), ValidationError> {
    let field = format!("nics[{index}].bridge");
    let b = &nic.bridge;
    // IFNAMSIZ is 16 including the NUL.
    if b.is_empty()
        || b.len() > 15
        || !b
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
    {
        return Err(err(
            field,
            "must be a Linux interface name (1-15 of [A-Za-z0-9-_.])",
        ));
    }
    if let Some(mac) = &nic.mac {
        let parts: Vec<&str> = mac.split(':').collect();
        let well_formed = parts.len() == 6
            && parts
                .iter()
                .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()));
        if !well_formed {
            return Err(err(
                format!("nics[{index}].mac"),
                "must look like 52:54:00:12:34:56",
            ));
        }
        let first = u8::from_str_radix(parts[0], 16).unwrap_or(1);
        if first & 1 == 1 {
            return Err(err(
                format!("nics[{index}].mac"),
                "must be a unicast address",
            ));
        }
    }
    Ok(())
}

/// Checks every field of a VM spec.
pub fn vm_spec(spec: &VmSpec) -> Result<(), ValidationError> {
    dns_label("name", &spec.name)?;
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(err("vcpus", format!("must be between 1 and {MAX_VCPUS}")));
    }
    if spec.memory_mib < MIN_MEMORY_MIB || spec.memory_mib > MAX_MEMORY_MIB {
        return Err(err(
            "memory_mib",
            format!("must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"),
        ));
    }
    if let Some(k) = &spec.kernel {
        image_path("kernel", k)?;
    }
    if let Some(i) = &spec.initrd {
        image_path("initrd", i)?;
    }
    if spec.initrd.is_some() && spec.kernel.is_none() {
        return Err(err("initrd", "needs a kernel"));
    }
    if spec.hypervisor != Hypervisor::Process && spec.kernel.is_none() && spec.disks.is_empty() {
        return Err(err("kernel", "a VM needs a kernel or at least one disk"));
    }
    if let Some(c) = &spec.cmdline {
        if c.len() > MAX_CMDLINE_LEN {
            return Err(err(
                "cmdline",
                format!("must be at most {MAX_CMDLINE_LEN} characters"),
            ));
        }
        if c.chars().any(|ch| ch.is_control()) {
            return Err(err("cmdline", "must not contain control characters"));
        }
    }
    if spec.disks.len() > MAX_DISKS {
        return Err(err("disks", format!("at most {MAX_DISKS} disks")));
    }
    for (i, d) in spec.disks.iter().enumerate() {
        image_path(&format!("disks[{i}].path"), &d.path)?;
    }
    if spec.nics.len() > MAX_NICS {
        return Err(err(
            "nics",
            format!("at most {MAX_NICS} network interfaces"),
        ));
    }
    for (i, n) in spec.nics.iter().enumerate() {
        nic(i, n)?;
    }
    if spec.max_restarts.is_some_and(|m| m > 1000) {
        return Err(err("max_restarts", "must be at most 1000"));
    }
    if spec
        .restart_window_secs
        .is_some_and(|w| w == 0 || w > 7 * 86_400)
    {
        return Err(err("restart_window_secs", "must be between 1 and 604800"));
    }
    labels("constraints", &spec.constraints)?;
    if let Some(g) = &spec.anti_affinity {
        dns_label("anti_affinity", g)?;
    }
    Ok(())
}

/// Checks a host registration.
pub fn host_registration(reg: &HostRegistration) -> Result<(), ValidationError> {
    dns_label("id", &reg.id)?;
    if reg.address.len() > 256 || reg.address.chars().any(|c| c.is_control()) {
        return Err(err(
            "address",
            "must be at most 256 characters without control characters",
        ));
    }
    capacity(&reg.capacity)?;
    labels("labels", &reg.labels)
}

fn capacity(c: &Capacity) -> Result<(), ValidationError> {
    if c.vcpus == 0 || c.vcpus > MAX_HOST_VCPUS {
        return Err(err(
            "capacity.vcpus",
            format!("must be between 1 and {MAX_HOST_VCPUS}"),
        ));
    }
    if c.memory_mib == 0 || c.memory_mib > MAX_HOST_MEMORY_MIB {
        return Err(err(
            "capacity.memory_mib",
            format!("must be between 1 and {MAX_HOST_MEMORY_MIB}"),
        ));
    }
    Ok(())
}

/// Checks a new Raft member.
pub fn add_member(m: &AddMember) -> Result<(), ValidationError> {
    if m.id == 0 {
        return Err(err("id", "must be a positive integer"));
    }
    if !(m.addr.starts_with("http://") || m.addr.starts_with("https://")) || m.addr.len() > 256 {
        return Err(err("addr", "must be an http:// or https:// URL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{DiskSpec, PlacementStrategy, RestartPolicy};

    fn spec() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            vcpus: 1,
            memory_mib: 256,
            hypervisor: Hypervisor::Qemu,
            kernel: Some("vmlinuz".into()),
            initrd: None,
            cmdline: None,
            disks: vec![],
            nics: vec![],
            restart_policy: RestartPolicy::Always,
            constraints: BTreeMap::new(),
            anti_affinity: None,
            strategy: PlacementStrategy::Spread,
            max_restarts: None,
            restart_window_secs: None,
        }
    }

    #[test]
    fn names() {
        let cases = [
            ("a", true),
            ("web-1", true),
            ("", false),
            ("Web", false),
            ("1web", false),
            ("web-", false),
            ("we_b", false),
            ("we.b", false),
            ("we b", false),
            ("../etc", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
        ];
        for (name, ok) in cases {
            assert_eq!(dns_label("name", name).is_ok(), ok, "{name:?}");
        }
    }

    #[test]
    fn specs() {
        type Mutate = fn(&mut VmSpec);
        let cases: Vec<(&str, Mutate, bool)> = vec![
            ("valid", |_| {}, true),
            ("zero vcpus", |s| s.vcpus = 0, false),
            ("absurd vcpus", |s| s.vcpus = 100_000, false),
            ("zero memory", |s| s.memory_mib = 0, false),
            ("absurd memory", |s| s.memory_mib = u64::MAX, false),
            (
                "dotdot kernel",
                |s| s.kernel = Some("../../etc/passwd".into()),
                false,
            ),
            ("comma kernel", |s| s.kernel = Some("a,b".into()), false),
            (
                "newline cmdline",
                |s| s.cmdline = Some("a\nb".into()),
                false,
            ),
            ("no kernel no disk", |s| s.kernel = None, false),
            (
                "process needs nothing",
                |s| {
                    s.kernel = None;
                    s.hypervisor = Hypervisor::Process
                },
                true,
            ),
            (
                "too many disks",
                |s| {
                    s.disks = (0..17)
                        .map(|i| DiskSpec {
                            path: format!("d{i}"),
                            read_only: false,
                            format: Default::default(),
                        })
                        .collect()
                },
                false,
            ),
            (
                "bad bridge",
                |s| {
                    s.nics = vec![NicSpec {
                        bridge: "br0;rm".into(),
                        mac: None,
                    }]
                },
                false,
            ),
            (
                "multicast mac",
                |s| {
                    s.nics = vec![NicSpec {
                        bridge: "br0".into(),
                        mac: Some("01:00:00:00:00:01".into()),
                    }]
                },
                false,
            ),
            (
                "good mac",
                |s| {
                    s.nics = vec![NicSpec {
                        bridge: "br0".into(),
                        mac: Some("52:54:00:00:00:01".into()),
                    }]
                },
                true,
            ),
            ("bad group", |s| s.anti_affinity = Some("A B".into()), false),
        ];
        for (what, mutate, ok) in cases {
            let mut s = spec();
            mutate(&mut s);
            assert_eq!(vm_spec(&s).is_ok(), ok, "{what}: {:?}", vm_spec(&s));
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<VmSpec, _> = serde_json::from_str(
            r#"{"name":"a","vcpus":1,"memory_mib":64,"kernel":"k","memroy":5}"#,
        );
        assert!(r.is_err());
    }
}
