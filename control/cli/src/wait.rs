//! `--wait`: follow a VM until it reaches a state, or a draining host until no VM is left on
//! it, through the event stream, with a progress line on stderr: redrawn in place on a
//! terminal, one plain line per change otherwise (a log file or CI output gets no `\r` or
//! escape sequences).
//!
//! What a drain still waits for ([`drain_left`]) and how that reads ([`drain_line`]) are
//! plain functions over the listed VMs; [`until_drained`] feeds them.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use blixard_api::{Client, ClientError, Host, HostStatus, Vm, VmState};

/// `--wait` ran out of time (exit status 6).
#[derive(Debug, thiserror::Error)]
pub enum Timeout {
    #[error("timed out after {secs}s waiting for {vm} to be {target} (it is {state})")]
    Vm {
        vm: String,
        target: &'static str,
        state: &'static str,
        secs: u64,
    },
    #[error("timed out after {secs}s waiting for host {host} to drain: {}", left_detail(.left))]
    Drain {
        host: String,
        left: Vec<Left>,
        secs: u64,
    },
}

/// A VM still assigned to a draining host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub name: String,
    pub state: VmState,
    pub reason: Option<String>,
}

/// The drain ended without emptying the host: it was undrained meanwhile.
#[derive(Debug, thiserror::Error)]
#[error("host {host} was undrained, with {} still on it", vms(*.left))]
pub struct DrainStopped {
    pub host: String,
    pub left: usize,
}

/// The VM ended somewhere else than asked.
#[derive(Debug, thiserror::Error)]
#[error("{vm} is {state}: {reason}")]
pub struct Failed {
    pub vm: String,
    pub state: &'static str,
    pub reason: String,
}

/// `2 VMs left: web (stopping: host h1 draining; moving), db (running)`.
fn left_detail(left: &[Left]) -> String {
    let each: Vec<String> = left
        .iter()
        .map(|l| match l.reason.as_deref() {
            Some(r) if !r.is_empty() => format!("{} ({}: {r})", l.name, l.state.as_str()),
            _ => format!("{} ({})", l.name, l.state.as_str()),
        })
        .collect();
    format!("{} left: {}", vms(left.len()), each.join(", "))
}

/// `1 VM`, `3 VMs`.
fn vms(n: usize) -> String {
    if n == 1 {
        "1 VM".into()
    } else {
        format!("{n} VMs")
    }
}

/// Names a progress line lists before it cuts the rest to `…`.
const NAMES_SHOWN: usize = 5;

/// The VMs of `vms` still assigned to `host`, by name. A finished task has left its host
/// already; a task still running stays until its end, a VM whose stop the host has not
/// confirmed stays until it does (its reason says so), and both keep the drain going.
pub fn drain_left(host: &str, vms: &[Vm]) -> Vec<Left> {
    let mut left: Vec<Left> = vms
        .iter()
        .filter(|v| v.host.as_deref() == Some(host))
        .map(|v| Left {
            name: v.spec.name.clone(),
            state: v.state,
            reason: v.reason.clone(),
        })
        .collect();
    left.sort_by(|a, b| a.name.cmp(&b.name));
    left
}

/// `host h1: 3 VMs left (web, db, cache)`, at most [`NAMES_SHOWN`] names then `…`;
/// `host h1: drained, no VMs left` once empty.
pub fn drain_line(host: &str, left: &[Left]) -> String {
    if left.is_empty() {
        return format!("host {host}: drained, no VMs left");
    }
    let mut names: Vec<&str> = left
        .iter()
        .take(NAMES_SHOWN)
        .map(|l| l.name.as_str())
        .collect();
    if left.len() > NAMES_SHOWN {
        names.push("…");
    }
    format!(
        "host {host}: {} left ({})",
        vms(left.len()),
        names.join(", ")
    )
}

/// The progress line: the VM's state, host and reason.
fn progress_line(vm: &Vm) -> String {
    let host = vm.host.as_deref().unwrap_or("-");
    let line = format!("{}: {} on {host}", vm.spec.name, vm.state.as_str());
    match vm.reason.as_deref() {
        Some(reason) if !reason.is_empty() => format!("{line} {reason}"),
        _ => line,
    }
}

/// Writes progress to stderr: on a terminal one line redrawn in place, elsewhere a plain
/// line each time it changes.
struct Progress {
    tty: bool,
    last: Option<String>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, vm: &Vm) {
        self.line(progress_line(vm));
    }

    /// Shows `line` unless it is the one shown last.
    fn line(&mut self, line: String) {
        if self.last.as_deref() == Some(line.as_str()) {
            return;
        }
        let mut err = std::io::stderr().lock();
        // stderr going away is no reason to fail the wait
        let _ = if self.tty {
            write!(err, "\r\x1b[2K{line}").and_then(|()| err.flush())
        } else {
            writeln!(err, "{line}")
        };
        self.last = Some(line);
    }

    /// Ends the redrawn line on a terminal (plain lines are ended already).
    fn finish(&self) {
        if self.tty && self.last.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Waits until `vm` is in `target`. Fails when it ends `failed` (or `stopped` while waiting
/// for `running`), or after `timeout_secs`.
pub async fn until_state(
    client: &Client,
    vm: Vm,
    target: VmState,
    timeout_secs: u64,
) -> anyhow::Result<Vm> {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let name = vm.spec.name.clone();
    let mut since = vm.mod_index;
    let mut vm = vm;
    let mut progress = Progress::new();
    loop {
        progress.show(&vm);
        if vm.state == target {
            progress.finish();
            return Ok(vm);
        }
        let gave_up = vm.state == VmState::Failed
            || (target == VmState::Running
                && vm.state == VmState::Stopped
                && vm.desired == blixard_api::DesiredState::Running);
        if gave_up {
            progress.finish();
            return Err(Failed {
                vm: name,
                state: vm.state.as_str(),
                reason: vm
                    .reason
                    .clone()
                    .unwrap_or_else(|| "no reason given".into()),
            }
            .into());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            progress.finish();
            return Err(Timeout::Vm {
                vm: name,
                target: target.as_str(),
                state: vm.state.as_str(),
                secs: timeout_secs,
            }
            .into());
        }
        // Sleep until something about this VM changes (or the wait runs out).
        match client
            .events(since, left.min(Duration::from_secs(30)))
            .await
        {
            Ok(ev) => {
                let relevant = ev
                    .events
                    .iter()
                    .any(|e| e.vm.as_deref() == Some(name.as_str()));
                since = ev.index.max(since);
                if !relevant {
                    continue;
                }
            }
            // The node restarted and forgot older events: resume from the VM's state.
            Err(ClientError::Api { status: 410, .. }) => {}
            Err(e) => return Err(e.into()),
        }
        vm = client.get_vm(&name).await?;
        since = since.max(vm.mod_index);
    }
}

/// How long to pause before asking again after a node did not answer, or after the event
/// stream could not be resumed.
const RETRY: Duration = Duration::from_millis(500);

/// Whether `e` is a moment without a leader or without an answer, which the next attempt (on
/// another node, or after an election) may not see.
fn transient(e: &ClientError) -> bool {
    matches!(e, ClientError::Unreachable(_))
        || matches!(
            e,
            ClientError::Api {
                status: 502..=504,
                ..
            }
        )
}

/// Waits until no VM is assigned to the draining `host` any more, showing how many are left
/// and which; returns the host then. Fails when the host is undrained with VMs still on it,
/// or after `timeout_secs` ([`Timeout::Drain`]). A node that does not answer, or a cluster
/// without a leader for a moment, is waited out within the timeout.
pub async fn until_drained(client: &Client, host: &str, timeout_secs: u64) -> anyhow::Result<Host> {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let mut progress = Progress::new();
    let mut last_left = Vec::new();
    loop {
        let read = async {
            Ok::<_, ClientError>((client.get_host(host).await?, client.list_vms().await?))
        };
        let (h, vms) = match read.await {
            Ok(r) => r,
            Err(e) if transient(&e) && Instant::now() < deadline => {
                tokio::time::sleep(RETRY.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
                continue;
            }
            // Out of time: the last VMs seen are what is left; never having had an answer is
            // the error itself.
            Err(e) if transient(&e) && !last_left.is_empty() => {
                progress.finish();
                return Err(Timeout::Drain {
                    host: host.into(),
                    left: last_left,
                    secs: timeout_secs,
                }
                .into());
            }
            Err(e) => {
                progress.finish();
                return Err(e.into());
            }
        };
        let left = drain_left(host, &vms);
        progress.line(drain_line(host, &left));
        if left.is_empty() {
            progress.finish();
            return Ok(h);
        }
        // A host that went down stays in the wait: its `move` VMs leave it once its lease
        // has run out, and its `stay` VMs when it comes back or is declared gone.
        if h.status == HostStatus::Up {
            progress.finish();
            return Err(DrainStopped {
                host: host.into(),
                left: left.len(),
            }
            .into());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            progress.finish();
            return Err(Timeout::Drain {
                host: host.into(),
                left,
                secs: timeout_secs,
            }
            .into());
        }
        // Sleep until something about the host or the VMs left on it changes. The newest VM
        // change in the list is where the stream resumes: anything later is news.
        let mut since = vms.iter().map(|v| v.mod_index).max().unwrap_or(0);
        last_left = left;
        loop {
            let left_now = deadline.saturating_duration_since(Instant::now());
            if left_now.is_zero() {
                break;
            }
            match client
                .events(since, left_now.min(Duration::from_secs(30)))
                .await
            {
                Ok(ev) => {
                    since = ev.index.max(since);
                    let relevant = ev.events.iter().any(|e| {
                        e.host.as_deref() == Some(host)
                            || e.vm
                                .as_deref()
                                .is_some_and(|v| last_left.iter().any(|l| l.name == v))
                    });
                    if relevant {
                        break;
                    }
                }
                // Older events are no longer kept (or no node answers): read the state again
                // after a pause.
                Err(e) if transient(&e) || e.status() == Some(410) => {
                    tokio::time::sleep(RETRY.min(left_now)).await;
                    break;
                }
                Err(e) => {
                    progress.finish();
                    return Err(e.into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, host: Option<&str>, state: VmState, reason: Option<&str>) -> Vm {
        let mut v: Vm = serde_json::from_value(serde_json::json!({
            "spec": {"name": name, "vcpus": 1, "memory_mib": 64, "hypervisor": "process"},
            "desired": "running",
            "state": "pending",
            "generation": 1,
            "since_ms": 0,
            "created_ms": 0,
            "mod_index": 1,
        }))
        .unwrap_or_else(|e| panic!("vm {name}: {e}"));
        v.host = host.map(String::from);
        v.state = state;
        v.reason = reason.map(String::from);
        v
    }

    #[test]
    fn a_drain_waits_for_every_vm_still_on_the_host() {
        let vms = [
            vm(
                "web",
                Some("h1"),
                VmState::Stopping,
                Some("host h1 draining; moving"),
            ),
            vm("db", Some("h1"), VmState::Running, None),
            vm("moved", Some("h2"), VmState::Running, None),
            vm("pending", None, VmState::Pending, Some("no host fits")),
        ];
        let left = drain_left("h1", &vms);
        let names: Vec<&str> = left.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["db", "web"]);
        assert_eq!(drain_line("h1", &left), "host h1: 2 VMs left (db, web)");
        assert_eq!(
            left_detail(&left),
            "2 VMs left: db (running), web (stopping: host h1 draining; moving)"
        );
        assert!(drain_left("h2", &vms[..2]).is_empty());
        assert_eq!(drain_line("h2", &[]), "host h2: drained, no VMs left");
    }

    #[test]
    fn a_long_drain_line_names_the_first_few() {
        let vms: Vec<Vm> = (1..=7)
            .map(|i| vm(&format!("v{i}"), Some("h1"), VmState::Stopping, None))
            .collect();
        let left = drain_left("h1", &vms);
        assert_eq!(
            drain_line("h1", &left),
            "host h1: 7 VMs left (v1, v2, v3, v4, v5, …)"
        );
        assert_eq!(drain_line("h1", &left[..1]), "host h1: 1 VM left (v1)");
    }
}
