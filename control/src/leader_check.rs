//! Coalesced leadership checks: one quorum round confirms this node's leadership for every
//! caller that was waiting when the round began.
//!
//! Heartbeats of thousands of hosts and linearizable reads (assignments long-polls, lists)
//! each need "this node still leads, and here is the read index". openraft's
//! `get_read_log_id` sends a round of AppendEntries to the followers per call; here callers
//! queue up, one round runs at a time, and each round answers everyone who queued before it
//! started (never someone who came later: their request may have arrived after the round's
//! quorum answered, so it does not prove leadership at their arrival).

use std::sync::{Arc, Mutex};

use openraft::error::RaftError;
use tokio::sync::oneshot;

use crate::raft_types::Raft;

/// A confirmed leadership: the term, and the read index a linearizable read must wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    pub term: u64,
    pub read_index: u64,
}

/// Why leadership could not be confirmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaderCheckError {
    #[error("this node is not the leader")]
    NotLeader,
    #[error("leadership check failed: {0}")]
    Raft(String),
}

type Waiter = oneshot::Sender<Result<Confirmed, LeaderCheckError>>;

#[derive(Default)]
struct Queue {
    /// A round is running (its driver task will pick up `waiting` when it ends).
    running: bool,
    waiting: Vec<Waiter>,
}

/// The shared check of one node.
#[derive(Clone)]
pub struct LeaderCheck {
    raft: Raft,
    id: u64,
    queue: Arc<Mutex<Queue>>,
}

impl LeaderCheck {
    pub fn new(raft: Raft, id: u64) -> Self {
        LeaderCheck {
            raft,
            id,
            queue: Arc::default(),
        }
    }

    /// Confirms that this node leads, by a quorum round that began after this call.
    pub async fn confirm(&self) -> Result<Confirmed, LeaderCheckError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self
                .queue
                .lock()
                .map_err(|_| LeaderCheckError::Raft("the check's lock is poisoned".into()))?;
            q.waiting.push(tx);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            tokio::spawn(self.clone().drive());
        }
        rx.await
            .unwrap_or_else(|_| Err(LeaderCheckError::Raft("the check was dropped".into())))
    }

    /// Runs rounds until nobody waits.
    async fn drive(self) {
        loop {
            let batch = match self.queue.lock() {
                Ok(mut q) => {
                    if q.waiting.is_empty() {
                        q.running = false;
                        return;
                    }
                    std::mem::take(&mut q.waiting)
                }
                Err(_) => return,
            };
            let outcome = self.round().await;
            for w in batch {
                let _ = w.send(outcome.clone());
            }
        }
    }

    async fn round(&self) -> Result<Confirmed, LeaderCheckError> {
        let before = self.raft.metrics().borrow().clone();
        if before.current_leader != Some(self.id) {
            return Err(LeaderCheckError::NotLeader);
        }
        let term = before.current_term;
        let (read_log_id, _applied) = match self.raft.get_read_log_id().await {
            Ok(r) => r,
            Err(RaftError::APIError(_)) => return Err(LeaderCheckError::NotLeader),
            Err(e) => return Err(LeaderCheckError::Raft(e.to_string())),
        };
        // The round proved leadership of the term the node was in when it answered; the term
        // must be the one read before, or leadership may have changed hands in between.
        if self.raft.metrics().borrow().current_term != term {
            return Err(LeaderCheckError::NotLeader);
        }
        Ok(Confirmed {
            term,
            read_index: read_log_id.map(|l| l.index).unwrap_or(0),
        })
    }
}
