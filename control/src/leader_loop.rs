//! Work only the leader does: placing pending VMs. The loop runs on every node and acts only
//! while this node leads, so a new leader picks up where the old one stopped.

use std::sync::Arc;
use std::time::Duration;

use crate::node::ControlNode;
use crate::scheduler::{self, Overcommit};
use crate::state_machine::Command;

/// Places pending VMs whenever the state changes (and at least every second), committing
/// each round's placements as one `Place` command.
pub async fn run(node: Arc<ControlNode>, overcommit: Overcommit) {
    let mut applied = node.state.subscribe();
    loop {
        // Wake on every applied change, or once a second to catch leadership changes.
        let _ = tokio::time::timeout(Duration::from_secs(1), applied.changed()).await;
        if node.leader() != Some(node.id) {
            continue;
        }
        let (placements, unplaced) = node.state.read(|s| {
            if scheduler::pending(s).is_empty() {
                return (vec![], vec![]);
            }
            let (p, mut u) = scheduler::schedule(s, overcommit);
            // Only write a pending reason when it changed.
            u.retain(|u| {
                s.vms
                    .get(&u.vm)
                    .is_some_and(|vm| vm.reason.as_deref() != Some(&u.reason))
            });
            (p, u)
        });
        if placements.is_empty() && unplaced.is_empty() {
            continue;
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
}
