//! systemd's view of the node: `STATUS=` (what `systemctl status blixard-control` shows on
//! its "Status:" line) and the watchdog.
//!
//! `STATUS=` follows Raft's metrics as they change: the role, the term and the applied index
//! (at most one update every [`MIN_GAP`], so a busy leader does not flood PID 1), and the
//! watchdog is petted every half `WatchdogSec=` while the Raft core runs. A core that stopped
//! on a fatal error is no longer petted, so systemd restarts the node.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::node::ControlNode;
use crate::raft_types::NodeId;

/// The shortest time between two `STATUS=` updates.
pub const MIN_GAP: Duration = Duration::from_millis(500);

/// The `STATUS=` text: `leader, term 3, applied 120`, `follower of 2, term 3, applied 118`
/// or `no leader, term 4, applied 118`.
pub fn status_text(me: NodeId, leader: Option<NodeId>, term: u64, applied: Option<u64>) -> String {
    let applied = applied.unwrap_or(0);
    match leader {
        Some(l) if l == me => format!("leader, term {term}, applied {applied}"),
        Some(l) => format!("follower of {l}, term {term}, applied {applied}"),
        None => format!("no leader, term {term}, applied {applied}"),
    }
}

fn notify(states: &[NotifyState<'_>]) {
    // no-op without NOTIFY_SOCKET; an error only if the socket went away: not fatal
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Keeps `STATUS=` current and pets the watchdog while Raft is alive; returns when the Raft
/// core has stopped.
pub async fn run(node: Arc<ControlNode>) {
    let watchdog = sd_notify::watchdog_enabled();
    let pet_every = watchdog.map(|interval| (interval / 2).max(Duration::from_millis(100)));
    let mut metrics = node.raft.metrics();
    let mut last_status = String::new();
    let mut last_pet = tokio::time::Instant::now();
    loop {
        let m = metrics.borrow_and_update().clone();
        if m.running_state.is_err() {
            tracing::error!(
                "raft stopped: {:?}; no longer petting the watchdog",
                m.running_state
            );
            return;
        }
        let status = status_text(
            node.id,
            m.current_leader,
            m.current_term,
            m.last_applied.map(|l| l.index),
        );
        let pet = pet_every.is_some_and(|every| last_pet.elapsed() >= every);
        if status != last_status || pet {
            let mut states = vec![NotifyState::Status(&status)];
            if watchdog.is_some() {
                states.push(NotifyState::Watchdog);
                last_pet = tokio::time::Instant::now();
            }
            notify(&states);
            last_status = status;
        }
        let until_pet = pet_every
            .map(|every| every.saturating_sub(last_pet.elapsed()))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(MIN_GAP.min(until_pet)).await;
            }
            _ = tokio::time::sleep(until_pet) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::status_text;

    #[test]
    fn status_names_role_term_and_applied_index() {
        let cases = [
            (1, Some(1), 3, Some(120), "leader, term 3, applied 120"),
            (
                1,
                Some(2),
                3,
                Some(118),
                "follower of 2, term 3, applied 118",
            ),
            (1, None, 4, Some(118), "no leader, term 4, applied 118"),
            (2, None, 0, None, "no leader, term 0, applied 0"),
        ];
        for (me, leader, term, applied, want) in cases {
            assert_eq!(status_text(me, leader, term, applied), want);
        }
    }
}
