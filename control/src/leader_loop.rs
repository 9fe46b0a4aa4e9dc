//! Work only the leader does: placing pending VMs, declaring hosts whose heartbeats stopped
//! `down` (which moves their VMs), proposing evictions past their deadline (a VM on a host
//! that may still run it stays there, saying why, until the host confirms the stop), and
//! deleting finished tasks past their retention (`state_machine::expired_tasks`). The loop
//! runs on every node and acts only while this node leads, so a new leader picks up where the
//! old one stopped.
//!
//! The decisions are pure functions of the state and the time (`liveness::Leases::expired`,
//! [`overdue_evictions`], `scheduler::schedule`); this module only proposes them.

use std::sync::Arc;
use std::time::Duration;

use blixard_api::HostStatus;

use crate::node::{now_ms, ControlNode};
use crate::scheduler::{self, Overcommit};
use crate::state_machine::{expired_tasks, overdue_wait_reason, ClusterState, Command, VmRef};

/// The most pending VMs one placement round decides: a round reads the state under its lock
/// (applies wait meanwhile) and costs this many × hosts checks; the rest go in the next rounds.
const PLACE_PER_ROUND: usize = 1_000;

/// Evicted VMs whose deadline has passed at `now`, except those already saying why they stay
/// on their host (see [`overdue_wait_reason`]): proposed once, not every round.
pub fn overdue_evictions(s: &ClusterState, now: u64) -> Vec<VmRef> {
    s.index
        .evicting()
        .filter_map(|name| s.vms.get(name))
        .filter(|vm| {
            vm.host.is_some()
                && vm.evicting.as_ref().is_some_and(|e| e.deadline_ms <= now)
                && overdue_wait_reason(s, vm).is_none_or(|w| vm.reason.as_deref() != Some(&w))
        })
        .map(|vm| VmRef {
            vm: vm.spec.name.clone(),
            generation: vm.generation,
        })
        .collect()
}

/// Runs the leader's duties until the task is aborted.
pub async fn run(node: Arc<ControlNode>, overcommit: Overcommit, task_retention_ms: u64) {
    let mut applied = node.state.subscribe();
    // Where the last placement round stopped among the pending VMs.
    let mut cursor = scheduler::Cursor::default();
    // When the next host's lease runs out on this leader (its clock), if nothing renews it.
    let mut next_expiry: Option<u64> = None;
    loop {
        // Wake on every applied change, when the next lease runs out, or at least every
        // 500 ms for the other time-based duties.
        let mut wait = Duration::from_millis(500);
        if let Some(at) = next_expiry {
            wait = wait.min(Duration::from_millis(at.saturating_sub(node.clock_ms())));
        }
        let _ = tokio::time::timeout(wait, applied.changed()).await;
        let metrics = node.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(node.id) {
            node.with_leases(|l| l.step_down());
            next_expiry = None;
            continue;
        }
        let clock = node.clock_ms();
        // Every decision below is this term's, proposed in it or not at all.
        let term = metrics.current_term;
        // A new term starts every host's silence now: a full TTL before anything is down.
        if node.with_leases(|l| l.lead(metrics.current_term, clock)) {
            tracing::info!(
                term = metrics.current_term,
                "leading: every host gets a full lease before it can be declared down"
            );
        }
        let (expired, next) = node.state.read(|s| {
            node.with_leases(|l| {
                l.retain(|h| s.hosts.contains_key(h));
                (
                    // Marked going down in the same step: no heartbeat renews them until
                    // their proposals below are resolved.
                    l.take_expired(s.hosts.values(), clock, now_ms(), &node.liveness),
                    l.next_expiry(s.hosts.values(), clock, &node.liveness),
                )
            })
        });
        next_expiry = next;
        // All at once: the batcher puts them in as few entries as it can, so a burst of
        // expiries (a rack going dark) does not take one Raft round per host.
        let downs = expired.into_iter().map(|host| {
            let silent = node.with_leases(|l| l.silent_ms(&host, clock));
            tracing::warn!(host = %host, silent_ms = ?silent, "lease expired; declaring the host down");
            let node = &node;
            async move {
                let cmd = Command::SetHostStatus {
                    host: host.clone(),
                    status: HostStatus::Down,
                    now_ms: 0,
                };
                let r = node.propose_in_term(cmd, term).await;
                if let Err(e) = r {
                    tracing::warn!(host = %host, error = %e, "marking a host down failed");
                }
                // Applied (or failed: if the entry is in the log anyway, a heartbeat waits
                // for this node's whole log before it answers).
                node.with_leases(|l| l.end_down(&host));
                node.downs_resolved.notify_waiters();
            }
        });
        futures::future::join_all(downs).await;
        let now = now_ms();
        let overdue = node.state.read(|s| overdue_evictions(s, now));
        if !overdue.is_empty() {
            let cmd = Command::Unassign {
                vms: overdue,
                reason: "eviction deadline passed".into(),
                now_ms: 0,
                keep_on_live_host: Some(true),
            };
            if let Err(e) = node.propose_in_term(cmd, term).await {
                tracing::warn!(error = %e, "unassigning overdue evictions failed");
            }
        }
        let expired = node
            .state
            .read(|s| expired_tasks(s, now, task_retention_ms));
        for t in expired {
            tracing::info!(vm = %t.vm, "deleting finished task {} past its retention", t.vm);
            let cmd = Command::DeleteVm {
                name: t.vm.clone(),
                now_ms: 0,
                expected_generation: Some(t.generation),
            };
            if let Err(e) = node.propose_in_term(cmd, term).await {
                tracing::warn!(vm = %t.vm, error = %e, "deleting a finished task failed");
            }
        }
        place(&node, term, overcommit, &mut cursor).await;
    }
}

async fn place(
    node: &ControlNode,
    term: u64,
    overcommit: Overcommit,
    cursor: &mut scheduler::Cursor,
) {
    let (placements, unplaced, capacity_rev) = node.state.read(|s| {
        if !scheduler::any_pending(s) {
            *cursor = scheduler::Cursor::default();
            return (vec![], vec![], 0);
        }
        let (p, u, next) = scheduler::schedule_window(s, overcommit, cursor, PLACE_PER_ROUND);
        *cursor = next;
        // Every VM that fits nowhere is sent, its reason unchanged or not: applied, the entry
        // blocks it until capacity changes, so it is not tried again every round. Only a
        // changed reason is written to its row.
        (p, u, s.index.capacity_rev())
    });
    if placements.is_empty() && unplaced.is_empty() {
        return;
    }
    let n = placements.len();
    let cmd = Command::Place {
        placements,
        unplaced,
        now_ms: 0,
        overcommit: Some(overcommit),
        capacity_rev: Some(capacity_rev),
    };
    match node.propose_in_term(cmd, term).await {
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
    fn evictions_are_overdue_after_their_deadline() {
        let mut s = ClusterState::default();
        let mut vm = crate::state_machine::tests_support::running_vm("a", "h1");
        vm.evicting = Some(Eviction {
            reason: "drain".into(),
            deadline_ms: 100,
        });
        s.vms.insert("a".into(), vm);
        s.hosts
            .insert("h1".into(), host("h1", HostStatus::Draining, 0));
        s.reindex(0);
        assert!(overdue_evictions(&s, 99).is_empty());
        let overdue = overdue_evictions(&s, 100);
        assert_eq!(
            overdue,
            vec![VmRef {
                vm: "a".into(),
                generation: 2
            }]
        );
        // Applied, it keeps the VM on its live host with the reason, and is not proposed again.
        let cmd = Command::Unassign {
            vms: overdue,
            reason: "eviction deadline passed".into(),
            now_ms: 100,
            keep_on_live_host: Some(true),
        };
        let (r, _) = crate::state_machine::apply(&mut s, 1, &cmd);
        assert_eq!(r, crate::state_machine::Response::Count(0));
        assert_eq!(s.vms["a"].host.as_deref(), Some("h1"));
        assert!(overdue_evictions(&s, 200).is_empty());
    }
}
