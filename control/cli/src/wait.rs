//! `--wait`: follow a VM through the event stream until it reaches a state, with a progress
//! line on stderr: redrawn in place on a terminal, one plain line per change otherwise (a
//! log file or CI output gets no `\r` or escape sequences).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use blixard_api::{Client, ClientError, Vm, VmState};

/// `--wait` ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {secs}s waiting for {vm} to be {target} (it is {state})")]
pub struct Timeout {
    pub vm: String,
    pub target: &'static str,
    pub state: &'static str,
    pub secs: u64,
}

/// The VM ended somewhere else than asked.
#[derive(Debug, thiserror::Error)]
#[error("{vm} is {state}: {reason}")]
pub struct Failed {
    pub vm: String,
    pub state: &'static str,
    pub reason: String,
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
        let line = progress_line(vm);
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
            return Err(Timeout {
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
