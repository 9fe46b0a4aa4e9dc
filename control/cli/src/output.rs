//! Printing API objects as aligned tables or as JSON.

use blixard_api::{ClusterStatus, Host, Member, Vm};
use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn print_json<T: Serialize + ?Sized>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => outln!("{s}"),
        Err(e) => eprintln!("blixardctl: cannot encode output: {e}"),
    }
}

/// Prints rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    grow(&mut widths, rows);
    print_line(&widths, header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        print_line(&widths, r.clone());
    }
}

/// Widens `widths` to fit every cell of `rows`.
fn grow(widths: &mut [usize], rows: &[Vec<String>]) {
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
}

fn print_line(widths: &[usize], cells: Vec<String>) {
    let s: Vec<String> = cells
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
        .collect();
    outln!("{}", s.join("  ").trim_end());
}

fn dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_string()
}

fn ago(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

const VM_HEADER: &[&str] = &[
    "NAME", "STATE", "DESIRED", "HOST", "VCPUS", "MEMORY", "SINCE",
];

fn vm_row(v: &Vm) -> Vec<String> {
    vec![
        v.spec.name.clone(),
        v.state.as_str().into(),
        format!("{:?}", v.desired).to_lowercase(),
        dash(v.host.as_deref()),
        v.spec.vcpus.to_string(),
        v.spec.memory_mib.to_string(),
        ago(v.since_ms),
    ]
}

pub fn print_vms(f: Format, vms: &[Vm]) {
    if f == Format::Json {
        return print_json(vms);
    }
    let rows: Vec<Vec<String>> = vms.iter().map(vm_row).collect();
    table(VM_HEADER, &rows);
}

/// A list printed as its pages arrive: a table prints each page at once (its columns as wide
/// as the widest cell seen so far, as `kubectl` does with chunks); JSON, one array at the end.
pub struct Pages<T> {
    format: Format,
    widths: Option<Vec<usize>>,
    kept: Vec<T>,
}

impl<T: Serialize> Pages<T> {
    pub fn new(format: Format) -> Self {
        Pages {
            format,
            widths: None,
            kept: Vec::new(),
        }
    }

    fn page(&mut self, header: &[&str], items: Vec<T>, row: impl Fn(&T) -> Vec<String>) {
        if self.format == Format::Json {
            self.kept.extend(items);
            return;
        }
        let rows: Vec<Vec<String>> = items.iter().map(row).collect();
        let first = self.widths.is_none();
        let widths = self
            .widths
            .get_or_insert_with(|| header.iter().map(|h| h.len()).collect());
        grow(widths, &rows);
        if first {
            print_line(widths, header.iter().map(|h| h.to_string()).collect());
        }
        for r in rows {
            print_line(widths, r);
        }
    }

    /// Prints the JSON array, or the header of an empty table.
    fn finish(self, header: &[&str]) {
        match self.format {
            Format::Json => print_json(&self.kept),
            Format::Table if self.widths.is_none() => table(header, &[]),
            Format::Table => {}
        }
    }
}

impl Pages<Vm> {
    pub fn vms(&mut self, vms: Vec<Vm>) {
        self.page(VM_HEADER, vms, vm_row);
    }

    pub fn finish_vms(self) {
        self.finish(VM_HEADER);
    }
}

impl Pages<Host> {
    pub fn hosts(&mut self, hosts: Vec<Host>) {
        self.page(HOST_HEADER, hosts, host_row);
    }

    pub fn finish_hosts(self) {
        self.finish(HOST_HEADER);
    }
}

pub fn print_vm(f: Format, vm: &Vm) {
    if f == Format::Json {
        return print_json(vm);
    }
    outln!("name:        {}", vm.spec.name);
    outln!(
        "state:       {} (since {})",
        vm.state.as_str(),
        ago(vm.since_ms)
    );
    outln!(
        "desired:     {}",
        format!("{:?}", vm.desired).to_lowercase()
    );
    outln!("host:        {}", dash(vm.host.as_deref()));
    if let Some(r) = &vm.reason {
        outln!("reason:      {r}");
    }
    outln!("hypervisor:  {}", vm.spec.hypervisor.as_str());
    outln!("vcpus:       {}", vm.spec.vcpus);
    outln!("memory:      {} MiB", vm.spec.memory_mib);
    outln!("generation:  {}", vm.generation);
    if let Some(t) = &vm.spec.task {
        let timeout = t
            .timeout_secs
            .map(|s| format!("timeout {s} s"))
            .unwrap_or_else(|| "no timeout".into());
        outln!(
            "task:        {timeout}, max restarts {}{}",
            vm.spec.max_restarts(),
            if t.rerun_on_host_loss {
                ", runs again if its host is lost"
            } else {
                ""
            }
        );
    }
    if let Some(r) = &vm.task_result {
        outln!("result:      {}", r.summary());
        if let Some(s) = r.exit_status {
            outln!("exit status: {s}");
        }
        outln!("reason:      {}", r.reason.as_str());
        outln!("ran on:      {}", dash(r.host.as_deref()));
        if let Some(s) = r.started_ms {
            outln!("started:     {} ({})", ago(s), rfc3339(s));
        }
        outln!("ended:       {} ({})", ago(r.ended_ms), rfc3339(r.ended_ms));
        if let Some(s) = r.started_ms {
            outln!(
                "ran:         {:.1} s",
                r.ended_ms.saturating_sub(s) as f64 / 1000.0
            );
        }
    }
}

/// Unix milliseconds as `2026-12-03T17:40:01.123Z`.
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

const HOST_HEADER: &[&str] = &[
    "HOST",
    "STATUS",
    "VCPUS",
    "MEMORY",
    "DISK_GIB",
    "KVM",
    "HEARTBEAT",
    "LABELS",
];

fn host_row(h: &Host) -> Vec<String> {
    let labels: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    vec![
        h.id.clone(),
        h.status.as_str().into(),
        h.capacity.vcpus.to_string(),
        h.capacity.memory_mib.to_string(),
        h.capacity.disk_gib.to_string(),
        if h.capacity.kvm { "yes" } else { "no" }.into(),
        ago(h.last_heartbeat_ms),
        if labels.is_empty() {
            "-".into()
        } else {
            labels.join(",")
        },
    ]
}

pub fn print_hosts(f: Format, hosts: &[Host]) {
    if f == Format::Json {
        return print_json(hosts);
    }
    let rows: Vec<Vec<String>> = hosts.iter().map(host_row).collect();
    table(HOST_HEADER, &rows);
}

pub fn print_members(f: Format, members: &[Member]) {
    if f == Format::Json {
        return print_json(members);
    }
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| vec![m.id.to_string(), m.role.clone(), m.addr.clone()])
        .collect();
    table(&["ID", "ROLE", "URL"], &rows);
}

pub fn print_status(f: Format, s: &ClusterStatus) {
    if f == Format::Json {
        return print_json(s);
    }
    outln!(
        "as seen by node {} ({} view: what this node believes, not checked with the others)",
        s.node_id,
        s.view.as_str()
    );
    outln!("node:          {} ({})", s.node_id, s.state);
    match (s.leader, &s.leader_addr) {
        (Some(l), Some(a)) => outln!("leader:        {l} ({a})"),
        (Some(l), None) => outln!("leader:        {l}"),
        _ => outln!("leader:        none"),
    }
    if let Some(line) = contact_line(s) {
        outln!("{line}");
    }
    outln!("term:          {}", s.term);
    outln!("commit index:  {}", s.commit_index);
    outln!("applied index: {}", s.applied_index);
    outln!("members:");
    for m in &s.members {
        outln!("  {} {} {}", m.id, m.role, m.addr);
    }
}

/// Seconds with one decimal, from milliseconds.
fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// How recently the node heard from a leader, and what it means when that is longer ago than
/// its lease; `None` when the node does not say (an older node, a fresh leader).
pub fn contact_line(s: &ClusterStatus) -> Option<String> {
    let ms = s.leader_contact_ms?;
    let leads = s.state == "leader";
    let what = if leads {
        "quorum ack:   "
    } else {
        "leader heard: "
    };
    let line = match s.leader_lease_ms {
        Some(lease) => format!("{what} {} ago (lease {})", secs(ms), secs(lease)),
        None => format!("{what} {} ago", secs(ms)),
    };
    Some(match s.leader_contact_recent() {
        Some(false) if leads => format!(
            "{line}\nwarning:       no quorum acknowledged this node within its lease: it may be \
             cut off, and another node may lead now"
        ),
        Some(false) => format!(
            "{line}\nwarning:       no word from a leader within the lease: the leader above may \
             be gone, or this node cut off"
        ),
        _ => line,
    })
}
#[cfg(test)]
mod tests {
    use blixard_api::{ClusterStatus, StatusView};

    fn status(state: &str, contact: Option<u64>, lease: Option<u64>) -> ClusterStatus {
        ClusterStatus {
            node_id: 1,
            leader: Some(1),
            leader_addr: None,
            term: 3,
            state: state.into(),
            members: vec![],
            commit_index: 0,
            applied_index: 0,
            last_log_index: 0,
            snapshot_index: 0,
            view: StatusView::Local,
            leader_contact_ms: contact,
            leader_lease_ms: lease,
        }
    }

    #[test]
    fn leader_contact_lines() {
        let line = |st, c, l| super::contact_line(&status(st, c, l));
        assert_eq!(line("leader", None, Some(1500)), None);
        assert_eq!(
            line("leader", Some(120), Some(1500)).as_deref(),
            Some("quorum ack:    0.1 s ago (lease 1.5 s)")
        );
        assert_eq!(
            line("follower", Some(80), None).as_deref(),
            Some("leader heard:  0.1 s ago")
        );
        let cut_off = line("leader", Some(9000), Some(1500)).unwrap_or_default();
        assert!(cut_off.contains("may be cut off"), "{cut_off}");
        let orphan = line("follower", Some(1501), Some(1500)).unwrap_or_default();
        assert!(orphan.contains("no word from a leader"), "{orphan}");
        // Exactly the lease is still recent.
        let edge = line("follower", Some(1500), Some(1500)).unwrap_or_default();
        assert!(!edge.contains("warning"), "{edge}");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            super::rfc3339(1_796_319_601_000),
            "2026-12-03T17:40:01.000Z"
        );
    }
}
