//! Work only the leader does: placing pending VMs, declaring hosts whose heartbeats stopped
//! `down` (which moves their VMs), and taking evicted VMs off their hosts once the eviction
//! deadline passed. The loop runs on every node and acts only while this node leads, so a
//! new leader picks up where the old one stopped.
//!
//! The decisions are pure functions of the state and the time ([`expired_hosts`],
//! [`overdue_evictions`], `scheduler::schedule`); this module only proposes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_api::HostStatus;

use crate::node::{now_ms, ControlNode};
use crate::scheduler::{self, Overcommit};
use crate::state_machine::{ClusterState, Command, VmRef};

/// The most pending VMs one placement round decides: a round reads the state under its lock
/// (applies wait meanwhile) and costs this many × hosts checks; the rest go in the next rounds.
const PLACE_PER_ROUND: usize = 1_000;

/// Hosts (up or draining) whose last heartbeat is older than `ttl_ms` at `now`.
pub fn expired_hosts(s: &ClusterState, now: u64, ttl_ms: u64) -> Vec<String> {
    s.hosts
        .values()
        .filter(|h| {
            h.status != HostStatus::Down && now.saturating_sub(h.last_heartbeat_ms) > ttl_ms
        })
        .map(|h| h.id.clone())
        .collect()
}

/// Evicted VMs whose deadline has passed at `now`.
pub fn overdue_evictions(s: &ClusterState, now: u64) -> Vec<VmRef> {
    s.vms
        .values()
        .filter(|vm| {
            vm.host.is_some() && vm.evicting.as_ref().is_some_and(|e| e.deadline_ms <= now)
        })
        .map(|vm| VmRef {
            vm: vm.spec.name.clone(),
            generation: vm.generation,
        })
        .collect()
}

/// Runs the leader's duties until the task is aborted.
pub async fn run(node: Arc<ControlNode>, overcommit: Overcommit) {
    let ttl = node.config.host_ttl_ms;
    let mut applied = node.state.subscribe();
    // When this node became leader: hosts are only declared down after a full TTL of our own
    // leadership, so a cluster that had no leader for a while does not fail every host.
    let mut leading_since: Option<Instant> = None;
    // Where the last placement round stopped among the pending VMs.
    let mut cursor = scheduler::Cursor::default();
    loop {
        // Wake on every applied change, or at least every 500 ms for time-based duties.
        let _ = tokio::time::timeout(Duration::from_millis(500), applied.changed()).await;
        if node.leader() != Some(node.id) {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(Instant::now);
        let now = now_ms();
        if since.elapsed() > Duration::from_millis(ttl) {
            for host in node.state.read(|s| expired_hosts(s, now, ttl)) {
                tracing::warn!(host = %host, "heartbeats stopped; declaring the host down");
                let cmd = Command::SetHostStatus {
                    host,
                    status: HostStatus::Down,
                    now_ms: 0,
                };
                if let Err(e) = node.propose(cmd).await {
                    tracing::warn!(error = %e, "marking a host down failed");
                }
            }
        }
        let overdue = node.state.read(|s| overdue_evictions(s, now));
        if !overdue.is_empty() {
            let cmd = Command::Unassign {
                vms: overdue,
                reason: "eviction deadline passed".into(),
                now_ms: 0,
            };
            if let Err(e) = node.propose(cmd).await {
                tracing::warn!(error = %e, "unassigning overdue evictions failed");
            }
        }
        place(&node, overcommit, &mut cursor).await;
    }
}

async fn place(node: &ControlNode, overcommit: Overcommit, cursor: &mut scheduler::Cursor) {
    let (placements, unplaced) = node.state.read(|s| {
        if !scheduler::any_pending(s) {
            *cursor = scheduler::Cursor::default();
            return (vec![], vec![]);
        }
        let (p, mut u, next) = scheduler::schedule_window(s, overcommit, cursor, PLACE_PER_ROUND);
        *cursor = next;
        // Only write a pending reason when it changed.
        u.retain(|u| {
            s.vms
                .get(&u.vm)
                .is_some_and(|vm| vm.reason.as_deref() != Some(&u.reason))
        });
        (p, u)
    });
    if placements.is_empty() && unplaced.is_empty() {
        return;
    }
    let n = placements.len();
    match node
        .propose(Command::Place {
            placements,
            unplaced,
            now_ms: 0,
        })
        .await
    {
        Ok(r) => tracing::debug!(proposed = n, result = ?r, "placement round"),
        Err(e) => {
            tracing::warn!(error = %e, "placement round failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blixard_api::{Eviction, Host};

    fn host(id: &str, status: HostStatus, hb: u64) -> Host {
        Host {
            last_heartbeat_ms: hb,
            ..crate::state_machine::tests_support::host_record(id, status)
        }
    }

    #[test]
    fn hosts_expire_after_the_ttl() {
        let mut s = ClusterState::default();
        for h in [
            host("fresh", HostStatus::Up, 9_000),
            host("stale", HostStatus::Up, 1_000),
            host("draining-stale", HostStatus::Draining, 1_000),
            host("already-down", HostStatus::Down, 0),
        ] {
            s.hosts.insert(h.id.clone(), h);
        }
        assert_eq!(
            expired_hosts(&s, 10_000, 6_000),
            vec!["draining-stale", "stale"]
        );
        assert!(expired_hosts(&s, 7_000, 6_000).is_empty());
    }

    #[test]
    fn evictions_are_overdue_after_their_deadline() {
        let mut s = ClusterState::default();
        let mut vm = crate::state_machine::tests_support::running_vm("a", "h1");
        vm.evicting = Some(Eviction {
            reason: "drain".into(),
            deadline_ms: 100,
        });
        s.vms.insert("a".into(), vm);
        assert!(overdue_evictions(&s, 99).is_empty());
        assert_eq!(
            overdue_evictions(&s, 100),
            vec![VmRef {
                vm: "a".into(),
                generation: 2
            }]
        );
    }
}
