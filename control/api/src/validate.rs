//! Validation of API inputs, shared by the control plane (which refuses bad requests with a
//! 400) and the CLI (which refuses them before sending anything).
//!
//! The rules are strict on purpose: a VM name becomes a systemd unit name and a file name, a
//! path becomes a hypervisor argument, so anything that could smuggle a separator, a control
//! character or a huge size is refused here, at the edge.
//!
//! Free text (label values, paths, the kernel command line, reasons, addresses) reaches logs,
//! systemd units and terminals, so it must not hold Unicode control or format characters
//! ([`is_hostile_char`]): a bidi override (U+202E) or a zero-width space would make a log line
//! or a `blixardctl` table say something other than what is stored.

use std::collections::BTreeMap;

use unicode_general_category::{get_general_category, GeneralCategory};

use crate::types::{
    AddMember, Capacity, FenceTiming, Host, HostRegistration, Hypervisor, NicSpec, OnHostLoss, Vm,
    VmSpec, VmStatusReport, TASK_CONSOLE_BYTES,
};

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
/// Longest reason a VM status report or an eviction may carry.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest host or member address.
pub const MAX_ADDRESS_LEN: usize = 256;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

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

/// Whether `c` may not appear in free text: Unicode control characters (general category Cc:
/// C0 and C1 controls, DEL), format characters (Cf: bidi embeddings, overrides and isolates
/// U+202A–U+202E and U+2066–U+2069, zero-width space, joiners and U+FEFF, the soft hyphen, tag
/// characters…) and the line and paragraph separators (Zl, Zp), which break log lines too.
pub fn is_hostile_char(c: char) -> bool {
    matches!(
        get_general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// Free text of at most `max` bytes without [hostile characters](is_hostile_char). The error
/// names the offending code point, never echoes it.
pub fn free_text(field: &str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.len() > max {
        return Err(err(field, format!("must be at most {max} bytes")));
    }
    if let Some(c) = value.chars().find(|c| is_hostile_char(*c)) {
        return Err(err(
            field,
            format!(
                "must not contain control or format characters (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

/// `value` made fit for [`free_text`]: each hostile character becomes a space and the text is
/// cut (on a character boundary) to at most `max` bytes. For text the sender does not choose,
/// such as an error message from systemd, that must still be reported.
pub fn printable(value: &str, max: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max));
    for c in value.chars() {
        let c = if is_hostile_char(c) { ' ' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
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

/// A path to a file in the agent's image directory, relative to it: the one rule for image
/// paths (kernel, initrd, disks), applied at admission here and again by the agent
/// (`agent/src/image_path.rs`) before it resolves the file. Refused: empty, longer than
/// [`MAX_PATH_LEN`], [hostile characters](is_hostile_char), commas (QEMU's option
/// separator), absolute paths, any `..` component (a path that could leave the directory
/// lexically; symlinks are the agent's to check), and paths that name no file (`.`, `./`).
pub fn image_path(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    free_text(field, value, MAX_PATH_LEN)?;
    if value.contains(',') {
        return Err(err(field, "must not contain ','"));
    }
    if value.starts_with('/') {
        return Err(err(
            field,
            format!(
                "{} is absolute: image paths are relative to the agent's image directory",
                escaped(value)
            ),
        ));
    }
    if value.split('/').any(|c| c == "..") {
        return Err(err(field, "must not contain '..'"));
    }
    if value.split('/').all(|c| c.is_empty() || c == ".") {
        return Err(err(field, format!("{} names no file", escaped(value))));
    }
    Ok(())
}

/// `value` for an error message, each [hostile character](is_hostile_char) written as
/// `\u{202e}`, so that a message never carries what it refuses.
pub fn escaped(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if is_hostile_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Label or constraint keys and values.
pub fn labels(field: &str, map: &BTreeMap<String, String>) -> Result<(), ValidationError> {
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
                format!("{field}.{}", escaped(k)),
                "label keys are 1-128 characters of [A-Za-z0-9-_./]",
            ));
        }
        free_text(&format!("{field}.{k}"), v, MAX_LABEL_LEN)?;
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
        free_text("cmdline", c, MAX_CMDLINE_LEN)?;
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
    labels("labels", &spec.labels)?;
    if let Some(g) = &spec.anti_affinity {
        dns_label("anti_affinity", g)?;
    }
    if let Some(t) = &spec.task {
        if t.timeout_secs
            .is_some_and(|s| s == 0 || s > MAX_TASK_TIMEOUT_SECS)
        {
            return Err(err(
                "task.timeout_secs",
                format!("must be between 1 and {MAX_TASK_TIMEOUT_SECS}"),
            ));
        }
        if t.rerun_on_host_loss && spec.on_host_loss() == OnHostLoss::Stay {
            return Err(err(
                "task.rerun_on_host_loss",
                "cannot be combined with on_host_loss = stay",
            ));
        }
    }
    Ok(())
}

/// Longest task timeout: 30 days.
pub const MAX_TASK_TIMEOUT_SECS: u64 = 30 * 86_400;
/// Most console lines a task's end may carry.
pub const MAX_TASK_CONSOLE_LINES: usize = 1000;

/// Checks a host registration.
pub fn host_registration(reg: &HostRegistration) -> Result<(), ValidationError> {
    dns_label("id", &reg.id)?;
    free_text("address", &reg.address, MAX_ADDRESS_LEN)?;
    capacity(&reg.capacity)?;
    if let Some(url) = &reg.agent_url {
        agent_url("agent_url", url)?;
    }
    if let Some(f) = &reg.fence {
        fence_timing(f)?;
    }
    labels("labels", &reg.labels)
}

/// Longest lease an agent may hold: a host is declared down at the earliest this long (plus
/// the grace and the margin) after it went silent.
pub const MAX_LEASE_MS: u64 = 600_000;
/// Shortest lease: a few heartbeats must fit in it on a loaded machine.
pub const MIN_LEASE_MS: u64 = 500;
/// Longest SIGTERM → SIGKILL grace of a fence.
pub const MAX_FENCE_GRACE_MS: u64 = 60_000;

/// Checks an agent's fence timing.
pub fn fence_timing(f: &FenceTiming) -> Result<(), ValidationError> {
    if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&f.lease_ms) {
        return Err(err(
            "fence.lease_ms",
            format!("must be between {MIN_LEASE_MS} and {MAX_LEASE_MS}"),
        ));
    }
    if f.grace_ms > MAX_FENCE_GRACE_MS {
        return Err(err(
            "fence.grace_ms",
            format!("must be at most {MAX_FENCE_GRACE_MS}"),
        ));
    }
    Ok(())
}

/// Checks the URL of an agent's API: `http://` or `https://` then a host and port, no user,
/// path, query or fragment (control nodes append the path themselves).
pub fn agent_url(field: &str, url: &str) -> Result<(), ValidationError> {
    free_text(field, url, MAX_ADDRESS_LEN)?;
    let authority = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| err(field, "must start with http:// or https://"))?;
    if authority.is_empty()
        || authority
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@' | '\\'))
    {
        return Err(err(field, "must be scheme://host:port and nothing more"));
    }
    Ok(())
}

/// Checks an agent's report of a VM's state.
pub fn status_report(report: &VmStatusReport) -> Result<(), ValidationError> {
    if let Some(r) = &report.reason {
        free_text("reason", r, MAX_REASON_LEN)?;
    }
    if let Some(t) = &report.task_end {
        if t.exit_status.is_some_and(|s| !(0..=255).contains(&s)) {
            return Err(err("task_end.exit_status", "must be between 0 and 255"));
        }
        if let Some(d) = &t.detail {
            free_text("task_end.detail", d, MAX_REASON_LEN)?;
        }
        if t.console.len() > MAX_TASK_CONSOLE_LINES {
            return Err(err(
                "task_end.console",
                format!("at most {MAX_TASK_CONSOLE_LINES} lines"),
            ));
        }
        let bytes: usize = t.console.iter().map(String::len).sum();
        if bytes > TASK_CONSOLE_BYTES {
            return Err(err(
                "task_end.console",
                format!("at most {TASK_CONSOLE_BYTES} bytes"),
            ));
        }
        for l in &t.console {
            free_text("task_end.console", l, TASK_CONSOLE_BYTES)?;
        }
    }
    Ok(())
}

/// Checks an idempotency key: 1-128 characters of free text.
pub fn idempotency_key(key: &str) -> Result<(), ValidationError> {
    if key.is_empty() {
        return Err(err("Idempotency-Key", "must not be empty"));
    }
    free_text("Idempotency-Key", key, MAX_IDEMPOTENCY_KEY_LEN)
}

/// Checks a host record of a restored snapshot.
pub fn host_record(host: &Host) -> Result<(), ValidationError> {
    dns_label("hosts[].id", &host.id)?;
    free_text("hosts[].address", &host.address, MAX_ADDRESS_LEN)?;
    if let Some(url) = &host.agent_url {
        agent_url("hosts[].agent_url", url)?;
    }
    labels("hosts[].labels", &host.labels)
}

/// Checks a VM record of a restored snapshot: its spec and every free-text field.
pub fn vm_record(vm: &Vm) -> Result<(), ValidationError> {
    vm_spec(&vm.spec)?;
    if let Some(r) = &vm.reason {
        free_text("vms[].reason", r, MAX_REASON_LEN)?;
    }
    if let Some(h) = &vm.host {
        dns_label("vms[].host", h)?;
    }
    if let Some(e) = &vm.evicting {
        free_text("vms[].evicting.reason", &e.reason, MAX_REASON_LEN)?;
    }
    if let Some(k) = &vm.idempotency_key {
        idempotency_key(k)?;
    }
    if let Some(r) = &vm.task_result {
        free_text("vms[].task_result.message", &r.message, MAX_REASON_LEN)?;
        if let Some(h) = &r.host {
            dns_label("vms[].task_result.host", h)?;
        }
        let bytes: usize = r.console.iter().map(String::len).sum();
        if bytes > TASK_CONSOLE_BYTES || r.console.len() > MAX_TASK_CONSOLE_LINES {
            return Err(err(
                "vms[].task_result.console",
                format!("at most {TASK_CONSOLE_BYTES} bytes"),
            ));
        }
        for l in &r.console {
            free_text("vms[].task_result.console", l, TASK_CONSOLE_BYTES)?;
        }
    }
    Ok(())
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
    if !(m.addr.starts_with("http://") || m.addr.starts_with("https://")) {
        return Err(err("addr", "must be an http:// or https:// URL"));
    }
    free_text("addr", &m.addr, MAX_ADDRESS_LEN)?;
    if m.addr.chars().any(char::is_whitespace) {
        return Err(err("addr", "must not contain whitespace"));
    }
    Ok(())
}

/// Parses a label selector, `k=v` pairs separated by commas (every pair must match), as
/// `-l`/`?label=` take it; each key and value checked as [`labels`] checks them.
pub fn label_selector(field: &str, s: &str) -> Result<BTreeMap<String, String>, ValidationError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(err(field, format!("{}: expected key=value", escaped(part))));
        };
        out.insert(k.to_string(), v.to_string());
    }
    labels(field, &out)?;
    Ok(out)
}

/// Checks a list's `limit` (1..=[`MAX_PAGE`]).
pub fn page_limit(limit: u32) -> Result<usize, ValidationError> {
    if limit == 0 || limit as usize > MAX_PAGE {
        return Err(err("limit", format!("must be 1 to {MAX_PAGE}")));
    }
    Ok(limit as usize)
}

/// The most items one page of a list holds.
pub const MAX_PAGE: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{DiskSpec, PlacementStrategy, RestartPolicy};

    fn spec() -> VmSpec {
        VmSpec {
            on_host_loss: None,
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
            labels: Default::default(),
            anti_affinity: None,
            strategy: PlacementStrategy::Spread,
            max_restarts: None,
            restart_window_secs: None,
            task: None,
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
                "absolute kernel",
                |s| s.kernel = Some("/etc/shadow".into()),
                false,
            ),
            (
                "absolute initrd",
                |s| s.initrd = Some("/etc/shadow".into()),
                false,
            ),
            ("dot kernel", |s| s.kernel = Some("./".into()), false),
            (
                "nested kernel",
                |s| s.kernel = Some("./k/vmlinuz".into()),
                true,
            ),
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

    /// Strings that must be refused in every free-text field, and why.
    const HOSTILE: &[(&str, &str)] = &[
        ("nul", "a\u{0}b"),
        ("newline (forged log line)", "ok\nlevel=ERROR forged"),
        ("carriage return", "a\rb"),
        ("escape (terminal control)", "\u{1b}[2J"),
        ("delete", "a\u{7f}"),
        ("C1 control", "a\u{85}b"),
        ("right-to-left override", "evil\u{202e}gpj.exe"),
        ("left-to-right embedding", "\u{202a}x"),
        ("right-to-left isolate", "\u{2067}x\u{2069}"),
        ("zero-width space", "we\u{200b}b"),
        ("zero-width joiner", "a\u{200d}b"),
        ("left-to-right mark", "a\u{200e}"),
        ("word joiner", "a\u{2060}b"),
        ("byte order mark", "\u{feff}a"),
        ("soft hyphen", "a\u{ad}b"),
        ("arabic letter mark", "a\u{61c}"),
        ("tag character", "a\u{e0041}"),
        ("line separator", "a\u{2028}b"),
        ("paragraph separator", "a\u{2029}b"),
    ];

    /// Text that stays allowed: ordinary Unicode letters, symbols, spaces and emoji.
    const BENIGN: &[&str] = &[
        "plain",
        "zone a/b",
        "Zürich",
        "東京",
        "ok 👍",
        "x=1 y=2",
        "🏳️‍",
    ];

    #[test]
    fn hostile_characters() {
        for (what, text) in HOSTILE {
            let c = text.chars().find(|c| is_hostile_char(*c));
            assert!(c.is_some(), "{what}: not seen as hostile");
            let e = free_text("f", text, 100).expect_err(what);
            assert!(e.message.contains("U+"), "{what}: {e}");
            // The message names the code point and never echoes the character itself.
            assert!(!e.to_string().chars().any(is_hostile_char), "{what}: {e}");
            let cleaned = printable(text, 100);
            assert!(free_text("f", &cleaned, 100).is_ok(), "{what}: {cleaned:?}");
        }
        // The ZWJ inside an emoji sequence is a format character too: refused. Everything
        // else in BENIGN is fine.
        for text in BENIGN {
            let ok = !text.contains('\u{200d}');
            assert_eq!(free_text("f", text, 100).is_ok(), ok, "{text:?}");
        }
        assert!(free_text("f", "abc", 2).is_err());
        assert_eq!(printable("aé\nb", 3), "aé");
        assert_eq!(printable("a\u{202e}b", 100), "a b");
    }

    #[test]
    fn hostile_text_in_every_field() {
        type Put = fn(&str) -> Result<(), ValidationError>;
        let cases: Vec<(&str, Put)> = vec![
            ("kernel", |t| with_spec(|s, t| s.kernel = Some(t.into()), t)),
            ("initrd", |t| with_spec(|s, t| s.initrd = Some(t.into()), t)),
            ("cmdline", |t| {
                with_spec(|s, t| s.cmdline = Some(t.into()), t)
            }),
            ("disk path", |t| {
                with_spec(
                    |s, t| {
                        s.disks = vec![DiskSpec {
                            path: t.into(),
                            read_only: false,
                            format: Default::default(),
                        }]
                    },
                    t,
                )
            }),
            ("constraint value", |t| {
                with_spec(
                    |s, t| {
                        s.constraints.insert("zone".into(), t.into());
                    },
                    t,
                )
            }),
            ("constraint key", |t| {
                with_spec(
                    |s, t| {
                        s.constraints.insert(t.into(), "a".into());
                    },
                    t,
                )
            }),
            ("anti-affinity group", |t| {
                with_spec(|s, t| s.anti_affinity = Some(t.into()), t)
            }),
            ("name", |t| with_spec(|s, t| s.name = t.into(), t)),
            ("bridge", |t| {
                with_spec(
                    |s, t| {
                        s.nics = vec![NicSpec {
                            bridge: t.into(),
                            mac: None,
                        }]
                    },
                    t,
                )
            }),
            ("host id", |t| host_registration(&registration(t, "a", "v"))),
            ("host address", |t| {
                host_registration(&registration("h1", t, "v"))
            }),
            ("host label value", |t| {
                host_registration(&registration("h1", "a", t))
            }),
            ("status reason", |t| {
                status_report(&VmStatusReport {
                    state: crate::types::VmState::Failed,
                    reason: Some(t.into()),
                    generation: 1,
                    task_end: None,
                })
            }),
            ("task console line", |t| {
                status_report(&VmStatusReport {
                    state: crate::types::VmState::Failed,
                    reason: None,
                    generation: 1,
                    task_end: Some(crate::types::TaskEnd {
                        reason: crate::types::TaskEndReason::Exited,
                        exit_status: Some(1),
                        detail: None,
                        console: vec![t.into()],
                    }),
                })
            }),
            ("task end detail", |t| {
                status_report(&VmStatusReport {
                    state: crate::types::VmState::Failed,
                    reason: None,
                    generation: 1,
                    task_end: Some(crate::types::TaskEnd {
                        reason: crate::types::TaskEndReason::CouldNotStart,
                        exit_status: None,
                        detail: Some(t.into()),
                        console: vec![],
                    }),
                })
            }),
            ("idempotency key", idempotency_key),
            ("member address", |t| {
                add_member(&AddMember {
                    id: 2,
                    addr: format!("http://{t}"),
                })
            }),
        ];
        for (field, put) in &cases {
            assert!(put("ok").is_ok(), "{field}: ok refused");
            for (what, text) in HOSTILE {
                assert!(put(text).is_err(), "{field}: {what} accepted");
            }
        }
        assert!(host_registration(&registration("h1", "a", "v")).is_ok());
    }

    #[test]
    fn task_specs_and_ends() {
        use crate::types::{TaskEnd, TaskEndReason, TaskSpec};
        let task = |timeout_secs, rerun_on_host_loss, stay: bool| {
            let mut s = spec();
            s.task = Some(TaskSpec {
                timeout_secs,
                rerun_on_host_loss,
            });
            s.on_host_loss = stay.then_some(OnHostLoss::Stay);
            vm_spec(&s).map_err(|e| e.to_string())
        };
        assert!(task(None, false, false).is_ok());
        assert!(task(Some(1), true, false).is_ok());
        assert!(task(Some(MAX_TASK_TIMEOUT_SECS), false, true).is_ok());
        for (t, r, stay) in [
            (Some(0), false, false),
            (Some(MAX_TASK_TIMEOUT_SECS + 1), false, false),
            (None, true, true),
        ] {
            assert!(task(t, r, stay).is_err(), "{t:?} {r} {stay}");
        }
        let end = |exit_status, console: Vec<String>| {
            status_report(&VmStatusReport {
                state: crate::types::VmState::Failed,
                reason: None,
                generation: 1,
                task_end: Some(TaskEnd {
                    reason: TaskEndReason::Exited,
                    exit_status,
                    detail: None,
                    console,
                }),
            })
        };
        assert!(end(Some(255), vec!["x".repeat(TASK_CONSOLE_BYTES)]).is_ok());
        assert!(end(Some(256), vec![]).is_err());
        assert!(end(Some(-1), vec![]).is_err());
        assert!(end(None, vec!["x".repeat(TASK_CONSOLE_BYTES), "y".into()]).is_err());
        assert!(end(None, vec![String::new(); MAX_TASK_CONSOLE_LINES + 1]).is_err());
    }

    fn with_spec(f: fn(&mut VmSpec, &str), t: &str) -> Result<(), ValidationError> {
        let mut s = spec();
        f(&mut s, t);
        vm_spec(&s)
    }

    fn registration(id: &str, address: &str, label: &str) -> HostRegistration {
        HostRegistration {
            fence: None,
            id: id.into(),
            address: address.into(),
            capacity: Capacity {
                vcpus: 1,
                memory_mib: 1024,
                disk_gib: 1,
                kvm: false,
            },
            labels: BTreeMap::from([("zone".to_string(), label.to_string())]),
            hypervisors: vec![],
            agent_url: None,
        }
    }

    #[test]
    fn agent_urls() {
        let cases: &[(&str, bool)] = &[
            ("http://127.0.0.1:7101", true),
            ("https://h1.example:7101", true),
            ("http://[::1]:7101", true),
            ("ftp://h1:7101", false),
            ("http://", false),
            ("http://h1:7101/x", false),
            ("http://user@h1:7101", false),
            ("http://h1:7101?x=1", false),
            ("http://h1 :7101", false),
            ("http://h1\u{202e}:7101", false),
        ];
        for (url, ok) in cases {
            assert_eq!(agent_url("agent_url", url).is_ok(), *ok, "{url}");
        }
        let mut reg = registration("h1", "10.0.0.1", "a");
        reg.agent_url = Some("http://h1:7101/evil".into());
        assert_eq!(
            host_registration(&reg).map_err(|e| e.field),
            Err("agent_url".into())
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<VmSpec, _> = serde_json::from_str(
            r#"{"name":"a","vcpus":1,"memory_mib":64,"kernel":"k","memroy":5}"#,
        );
        assert!(r.is_err());
    }

    #[test]
    fn image_path_table() {
        let cases: [(&str, Result<(), &str>); 9] = [
            ("vmlinuz", Ok(())),
            ("k/vmlinuz", Ok(())),
            ("./k//vmlinuz", Ok(())),
            ("/etc/shadow", Err("is absolute")),
            ("/img/vmlinuz", Err("is absolute")),
            ("k/../../x", Err("must not contain '..'")),
            ("..", Err("must not contain '..'")),
            (".", Err("names no file")),
            ("", Err("must not be empty")),
        ];
        for (value, want) in cases {
            match (want, image_path("kernel", value)) {
                (Ok(()), Ok(())) => {}
                (Err(m), Err(e)) => assert!(e.message.contains(m), "{value}: {e}"),
                (w, g) => panic!("{value:?}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn refused_characters_are_escaped_in_messages() {
        assert_eq!(escaped("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(escaped("plain ascii"), "plain ascii");
        let map: BTreeMap<String, String> = [("x\u{202e}y".to_string(), "v".to_string())].into();
        let e = labels("constraints", &map).expect_err("refused key");
        let shown = e.to_string();
        assert!(!shown.contains('\u{202e}'), "{shown:?}");
        assert!(shown.contains("x\\u{202e}y"), "{shown}");
        let e = image_path("kernel", "/\u{202e}").expect_err("refused");
        assert!(!e.to_string().contains('\u{202e}'), "{e}");
    }
}
