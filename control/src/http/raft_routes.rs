//! Peer routes: Raft RPC (`append`, `vote`, `snapshot`), `prevote` (see
//! [`crate::pre_vote`]) and `forward`, through which a
//! follower runs a proposal, a read index or a membership change on the leader; and `faults`,
//! which sets this node's fault switches when it runs with `--fault-injection` (404 otherwise).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use serde::{Deserialize, Serialize};

use super::api::ApiJson;
use super::error::ApiError;
use crate::node::{ControlNode, Forward, ForwardReply};
use crate::pre_vote::{PreVoteRequest, PreVoteResponse};
use crate::raft_types::{NodeId, TypeConfig};

/// Snapshot chunks and large appends are bigger than client requests.
const PEER_BODY_LIMIT: usize = 64 * 1024 * 1024;

pub fn routes() -> Router<Arc<ControlNode>> {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/prevote", post(pre_vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/forward", post(forward))
        .route("/raft/faults", post(faults))
        .layer(DefaultBodyLimit::max(PEER_BODY_LIMIT))
}

/// Refuses an RPC whose sender is this node itself: a member added at an address that
/// leads back here (its own, or another name for it) would make openraft's core receive its
/// own vote as a peer's, which it treats as a broken invariant and panics on, taking the node
/// down. Refused, the replication to that "member" just fails and the node stays up.
fn refuse_own(node: &ControlNode, vote: &openraft::Vote<NodeId>) -> Result<(), ApiError> {
    if vote.leader_id().voted_for() == Some(node.id) {
        tracing::warn!(
            "a Raft RPC from this node itself arrived: some member's address leads back here"
        );
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            blixard_api::types::codes::CONFLICT,
            format!("this is node {}, not the node the sender meant", node.id),
        ));
    }
    Ok(())
}

async fn append(
    State(node): State<Arc<ControlNode>>,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Result<Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    refuse_own(&node, &req.vote)?;
    node.leader_request_arrived(&req.vote);
    let res = node.raft.append_entries(req).await;
    if matches!(
        res,
        Ok(AppendEntriesResponse::Success
            | AppendEntriesResponse::PartialSuccess(_)
            | AppendEntriesResponse::Conflict)
    ) {
        node.heard_from_leader();
    }
    Ok(Json(res))
}

async fn vote(
    State(node): State<Arc<ControlNode>>,
    Json(req): Json<VoteRequest<NodeId>>,
) -> Result<Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    refuse_own(&node, &req.vote)?;
    Ok(Json(node.raft.vote(req).await))
}

async fn snapshot(
    State(node): State<Arc<ControlNode>>,
    Json(req): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Result<
    Json<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>>,
    ApiError,
> {
    refuse_own(&node, &req.vote)?;
    node.leader_request_arrived(&req.vote);
    let res = node.raft.install_snapshot(req).await;
    if res.is_ok() {
        node.heard_from_leader();
    }
    Ok(Json(res))
}

async fn pre_vote(
    State(node): State<Arc<ControlNode>>,
    ApiJson(req): ApiJson<PreVoteRequest>,
) -> Result<Json<PreVoteResponse>, ApiError> {
    Ok(Json(node.answer_pre_vote(&req).await?))
}

async fn forward(
    State(node): State<Arc<ControlNode>>,
    Json(req): Json<Forward>,
) -> Json<ForwardReply> {
    if node.leader() != Some(node.id) {
        return Json(ForwardReply::NotLeader);
    }
    let reply = node.handle_forward(req).await;
    crate::faults::crash_if(crate::faults::CrashPoint::ForwardAnswered);
    Json(reply)
}

/// Body of `POST /raft/faults`, and its answer: the switches replace the previous ones (an
/// empty body heals everything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Peers this node must not talk to.
    #[serde(default)]
    pub isolate: Vec<NodeId>,
    /// Milliseconds added to every commit of this node's Raft log (a slow fsync).
    #[serde(default)]
    pub fsync_stall_ms: u64,
    /// Where this node dies at once (a power cut at a hard moment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_at: Option<crate::faults::CrashPoint>,
}

async fn faults(
    State(node): State<Arc<ControlNode>>,
    ApiJson(req): ApiJson<Faults>,
) -> Result<Json<Faults>, ApiError> {
    if !node.config.fault_injection {
        return Err(ApiError::not_found("no such route"));
    }
    crate::faults::set_isolated(req.isolate);
    crate::faults::set_fsync_stall(req.fsync_stall_ms);
    crate::faults::set_crash_point(req.crash_at);
    let isolate = crate::faults::isolated();
    let fsync_stall_ms = crate::faults::fsync_stall().as_millis() as u64;
    let crash_at = crate::faults::crash_point();
    tracing::warn!(
        ?isolate,
        fsync_stall_ms,
        ?crash_at,
        "fault injection: isolated peers {isolate:?}, log commits stalled by {fsync_stall_ms} ms, dying at {crash_at:?}"
    );
    Ok(Json(Faults {
        isolate,
        fsync_stall_ms,
        crash_at,
    }))
}
