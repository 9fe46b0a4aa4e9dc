//! The fence's rules, shared by the agent and its dead man's switch, and the switch itself:
//! `blixard-agent fence-watch --lease-file P`.
//!
//! [`Watch`] is pure (times are `u64` ms on `CLOCK_BOOTTIME`, passed in): while the lease has
//! run out, every running VM unit not listed as `stay` gets SIGTERM, and SIGKILL `grace_ms`
//! later if it is still up; once the lease shows a later expiry, the watch re-arms. The agent
//! runs it on its own lease; the switch, [`run`], on the lease file, so that the fence holds
//! when the agent is dead, hung or crash-looping. The agent starts the switch as the transient
//! unit `blixard-fence.service` of the manager it drives; it polls the file every 100 ms and
//! only lists units once the lease has run out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use blixard_api::unit_name;

use crate::lease_file::{self, LeaseFile};
use crate::systemd::{SystemdClient, SystemdError};

/// How often the switch reads the lease file.
pub const POLL: Duration = Duration::from_millis(100);

pub const SIGTERM: i32 = 15;
pub const SIGKILL: i32 = 9;

/// Errors that end the switch.
#[derive(Debug, thiserror::Error)]
pub enum FenceWatchError {
    #[error(transparent)]
    Systemd(#[from] SystemdError),
}

/// The lease as the fence sees it.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    /// When the lease runs (or ran) out.
    pub expires: u64,
    pub grace_ms: u64,
    /// VMs never fenced.
    pub stay: &'a BTreeSet<String>,
}

/// A signal to send to a VM's unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kill {
    Term(String),
    Kill(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signalled {
    term_at: u64,
    killed: bool,
}

/// The fence's state: which units it signalled, and when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watch {
    signalled: BTreeMap<String, Signalled>,
    /// The expiry the fence fired for.
    fired: Option<u64>,
}

impl Watch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the lease has run out (as of the last [`Watch::decide`]).
    pub fn is_firing(&self) -> bool {
        self.fired.is_some()
    }

    /// The signals due at `now`, given the lease (`None`: never held, nothing to do) and the
    /// VMs whose unit is up.
    pub fn decide(&mut self, now: u64, fence: Option<Fence<'_>>, up: &[String]) -> Vec<Kill> {
        let Some(f) = fence.filter(|f| now >= f.expires) else {
            // Held, or never held: re-armed.
            self.signalled.clear();
            self.fired = None;
            return Vec::new();
        };
        self.fired = Some(f.expires);
        let up: BTreeSet<&str> = up.iter().map(String::as_str).collect();
        self.signalled.retain(|vm, _| up.contains(vm.as_str()));
        let mut out = Vec::new();
        for vm in up {
            if f.stay.contains(vm) {
                continue;
            }
            match self.signalled.get_mut(vm) {
                None => {
                    self.signalled.insert(
                        vm.to_string(),
                        Signalled {
                            term_at: now,
                            killed: false,
                        },
                    );
                    out.push(Kill::Term(vm.to_string()));
                }
                Some(s) if !s.killed && now >= s.term_at.saturating_add(f.grace_ms) => {
                    s.killed = true;
                    out.push(Kill::Kill(vm.to_string()));
                }
                Some(_) => {}
            }
        }
        out
    }

    /// When a SIGKILL is due next.
    pub fn next_deadline(&self, grace_ms: u64) -> Option<u64> {
        self.signalled
            .values()
            .filter(|s| !s.killed)
            .map(|s| s.term_at.saturating_add(grace_ms))
            .min()
    }
}

/// Runs the switch on `lease_file` until the process is killed: see the module docs.
pub async fn run<S: SystemdClient>(systemd: S, lease_file: PathBuf) -> Result<(), FenceWatchError> {
    tracing::info!(lease_file = %lease_file.display(), "fence watch: watching the agent's lease");
    let mut watch = Watch::new();
    let mut last: Option<LeaseFile> = None;
    let mut read_error = false;
    loop {
        match lease_file::read(&lease_file) {
            Ok(l) => {
                if read_error {
                    tracing::info!("fence watch: the lease file is readable again");
                }
                read_error = false;
                last = l;
            }
            Err(e) => {
                // Keep the last good lease: a torn or unreadable file must neither fence nor
                // disarm by itself (writes are atomic, so this is not expected).
                if !read_error {
                    tracing::warn!(error = %crate::error_chain(&e), "fence watch: cannot read the lease file");
                }
                read_error = true;
            }
        }
        let now = lease_file::boottime_ms();
        let fence = last.as_ref().map(|l| Fence {
            expires: l.expires_boottime_ms,
            grace_ms: l.grace_ms,
            stay: &l.stay,
        });
        let expired = fence.is_some_and(|f| now >= f.expires);
        let was_firing = watch.is_firing();
        let up = if expired {
            match systemd.list_vm_units().await {
                Ok(units) => units
                    .into_iter()
                    .filter(|u| u.active.is_up())
                    .map(|u| u.vm)
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "fence watch: cannot list VM units");
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            }
        } else {
            Vec::new()
        };
        if expired && !was_firing {
            if let Some(f) = fence {
                tracing::warn!(
                    expired_ms_ago = now.saturating_sub(f.expires),
                    stay = ?f.stay,
                    "fence watch: the agent's lease ran out; stopping every move VM"
                );
            }
        }
        if !expired && was_firing {
            tracing::info!("fence watch: the lease was renewed; re-armed");
        }
        for k in watch.decide(now, fence, &up) {
            let (vm, signal, name) = match &k {
                Kill::Term(vm) => (vm, SIGTERM, "SIGTERM"),
                Kill::Kill(vm) => (vm, SIGKILL, "SIGKILL"),
            };
            match systemd.kill_unit(&unit_name(vm), signal).await {
                Ok(true) => tracing::warn!(vm = %vm, signal = name, "fence watch: fencing VM"),
                Ok(false) => tracing::info!(vm = %vm, "fence watch: VM unit already gone"),
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %crate::error_chain(&e), "fence watch: cannot signal VM")
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(vms: &[&str]) -> Vec<String> {
        vms.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fence_table() {
        let stay = BTreeSet::from(["db".to_string()]);
        let f = |expires| {
            Some(Fence {
                expires,
                grace_ms: 500,
                stay: &stay,
            })
        };
        let t = |vm: &str| Kill::Term(vm.into());
        let k = |vm: &str| Kill::Kill(vm.into());
        let mut w = Watch::new();
        // (now, lease expiry, up units, signals due)
        type Row = (u64, Option<u64>, Vec<String>, Vec<Kill>);
        let steps: Vec<Row> = vec![
            (0, None, up(&["web", "db"]), vec![]),
            (100, Some(1000), up(&["web", "db"]), vec![]),
            (999, Some(1000), up(&["web", "db"]), vec![]),
            (1000, Some(1000), up(&["web", "db"]), vec![t("web")]),
            (1100, Some(1000), up(&["web", "db"]), vec![]),
            (1499, Some(1000), up(&["web", "db", "api"]), vec![t("api")]),
            (1500, Some(1000), up(&["web", "db", "api"]), vec![k("web")]),
            (1600, Some(1000), up(&["web", "db", "api"]), vec![]),
            (2000, Some(1000), up(&["db", "api"]), vec![k("api")]),
            // Renewed: re-armed; a later expiry fences again from scratch.
            (2100, Some(4000), up(&["web", "db"]), vec![]),
            (4000, Some(4000), up(&["web", "db"]), vec![t("web")]),
            // A file gone (no lease this boot): nothing.
            (5000, None, up(&["web"]), vec![]),
        ];
        for (i, (now, expiry, units, want)) in steps.into_iter().enumerate() {
            let got = w.decide(now, expiry.and_then(f), &units);
            assert_eq!(got, want, "step {i} at {now}");
        }
    }

    #[test]
    fn the_next_deadline_is_the_earliest_sigkill() {
        let stay = BTreeSet::new();
        let f = Fence {
            expires: 0,
            grace_ms: 500,
            stay: &stay,
        };
        let mut w = Watch::new();
        assert_eq!(w.next_deadline(500), None);
        w.decide(10, Some(f), &up(&["a"]));
        w.decide(20, Some(f), &up(&["a", "b"]));
        assert_eq!(w.next_deadline(500), Some(510));
        w.decide(510, Some(f), &up(&["a", "b"]));
        assert_eq!(w.next_deadline(500), Some(520));
    }
}
