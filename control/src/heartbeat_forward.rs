//! Heartbeats a follower passes on to the leader, gathered into one forward.
//!
//! Every agent heartbeat that reaches a follower must be answered by the leader (see
//! [`crate::liveness`]). One forward per heartbeat cost each of them a peer HTTP request on
//! both sides; with 10,000 hosts at the default interval that is over 13,000 forwards a
//! second. Here a follower's heartbeats queue, and one `Forward::Heartbeats` carries every
//! heartbeat that arrived while the previous forwards were out (at most [`MAX_BATCH`], at
//! most [`IN_FLIGHT`] forwards at a time). The leader confirms its leadership once for them
//! all (its checks are coalesced anyway) and answers each heartbeat as it would alone.
//!
//! A leader from before `Forward::Heartbeats` refuses it (HTTP 4xx); the batch is then sent
//! one heartbeat per forward, as before.

use std::sync::Weak;

use tokio::sync::{mpsc, oneshot};

use crate::node::{ControlNode, Forward, ForwardReply, NodeError};
use crate::state_machine::Response;

/// Heartbeats in one forward, at most.
pub const MAX_BATCH: usize = 1024;
/// Forwards of heartbeats out at a time, at most.
pub const IN_FLIGHT: usize = 4;

/// One heartbeat waiting for its forward, and where its answer goes.
pub type Queued = (String, oneshot::Sender<Result<Response, NodeError>>);

/// The queue's sending side and its receiving side (for [`run`]).
pub fn queue() -> (mpsc::Sender<Queued>, mpsc::Receiver<Queued>) {
    mpsc::channel(4 * MAX_BATCH)
}

/// Gathers the heartbeats queued on `rx` into forwards until the node is gone.
pub async fn run(node: Weak<ControlNode>, rx: mpsc::Receiver<Queued>) {
    crate::gather::batches(rx, MAX_BATCH, IN_FLIGHT, |batch| {
        let node = node.upgrade()?;
        Some(async move { forward(&node, batch).await })
    })
    .await
}

/// Sends `batch` on and answers each heartbeat.
async fn forward(node: &ControlNode, batch: Vec<Queued>) {
    let (hosts, replies): (Vec<String>, Vec<_>) = batch.into_iter().unzip();
    let answers: Vec<Result<Response, NodeError>> = match node
        .on_leader(Forward::Heartbeats(hosts.clone()))
        .await
    {
        Ok(ForwardReply::Heartbeats(rs)) if rs.len() == hosts.len() => {
            rs.into_iter().map(answer).collect()
        }
        Ok(other) => {
            let e = format!("unexpected reply to {} heartbeats: {other:?}", hosts.len());
            hosts
                .iter()
                .map(|_| Err(NodeError::Raft(e.clone())))
                .collect()
        }
        Err(NodeError::PeerRefused(why)) => {
            // A leader that does not know `Heartbeats`: one forward each, as before.
            tracing::debug!(refused = %why, "the leader refused a heartbeat batch; forwarding one by one");
            let one_by_one = hosts
                .iter()
                .map(|h| node.on_leader(Forward::Heartbeat(h.clone())));
            futures::future::join_all(one_by_one)
                .await
                .into_iter()
                .map(|r| r.and_then(answer))
                .collect()
        }
        Err(e) => hosts.iter().map(|_| Err(same_error(&e))).collect(),
    };
    for (reply, a) in replies.into_iter().zip(answers) {
        // The agent's request may have timed out meanwhile; nothing to do then.
        let _ = reply.send(a);
    }
}

/// One heartbeat's answer from the leader's reply for it.
pub fn answer(r: ForwardReply) -> Result<Response, NodeError> {
    match r {
        ForwardReply::Response(r) => Ok(r),
        ForwardReply::NotLeader => Err(NodeError::NoLeader),
        ForwardReply::Error(e) => Err(NodeError::Raft(e)),
        ForwardReply::Failed(f) => Err(f.into()),
        other => Err(NodeError::Raft(format!("unexpected reply {other:?}"))),
    }
}

/// The error of a whole batch, for each of its heartbeats (same kind, same message).
fn same_error(e: &NodeError) -> NodeError {
    match e {
        NodeError::NoLeader => NodeError::NoLeader,
        NodeError::LeaderUnreachable(m) => NodeError::LeaderUnreachable(m.clone()),
        NodeError::PeerRefused(m) => NodeError::PeerRefused(m.clone()),
        NodeError::Invalid(m) => NodeError::Invalid(m.clone()),
        NodeError::NotFound(m) => NodeError::NotFound(m.clone()),
        NodeError::Conflict(m) => NodeError::Conflict(m.clone()),
        NodeError::Unavailable(m) => NodeError::Unavailable(m.clone()),
        other => NodeError::Raft(other.to_string()),
    }
}
