//! Raft RPC between control nodes over HTTP/JSON: `POST {peer}/raft/{append,vote,snapshot}`.
//!
//! Peer traffic has its own routes, apart from the client API (see `http::raft_routes`). A
//! transport failure is reported to openraft as `Unreachable`, which makes it back off;
//! a `RaftError` from the peer is passed through as a remote error. An append larger than
//! 64 KiB is sent by a task of its own ([`InflightAppend`]), which openraft's deadline of one
//! heartbeat interval does not cancel.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::election_trigger::VoteNews;
use crate::raft_types::{Node, NodeId, TypeConfig};

/// Creates one [`PeerClient`] per peer, sharing one HTTP connection pool.
#[derive(Clone)]
pub struct HttpNetwork {
    http: reqwest::Client,
    news: Arc<VoteNews>,
}

impl HttpNetwork {
    /// Uses `http` (built by the node with the peer token and TLS roots) for every peer, and
    /// tells `news` why vote requests were refused.
    pub fn from_client(http: reqwest::Client, news: Arc<VoteNews>) -> Self {
        HttpNetwork { http, news }
    }
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerClient {
            http: self.http.clone(),
            news: self.news.clone(),
            target,
            addr: node.addr.trim_end_matches('/').to_string(),
            inflight: None,
        }
    }
}

/// RPC client to one peer.
pub struct PeerClient {
    http: reqwest::Client,
    news: Arc<VoteNews>,
    target: NodeId,
    addr: String,
    inflight: Option<InflightAppend>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Transport(String);

impl PeerClient {
    async fn post<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, Node, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        send(
            self.http.clone(),
            self.addr.clone(),
            self.target,
            path,
            body,
            timeout,
        )
        .await
    }
}

/// One RPC: `body` to `{addr}/raft/{path}`, the answer decoded.
async fn send<Resp, E>(
    http: reqwest::Client,
    addr: String,
    target: NodeId,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Resp, RPCError<NodeId, Node, E>>
where
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    if crate::faults::is_isolated(target) {
        let e = crate::faults::Isolated(target);
        return Err(RPCError::Unreachable(Unreachable::new(&e)));
    }
    let url = format!("{addr}/raft/{path}");
    let timeout = timeout + transfer_allowance(body.len());
    let resp = http
        .post(&url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| {
            if e.is_connect() {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                RPCError::Network(NetworkError::new(&e))
            }
        })?;
    if !resp.status().is_success() {
        let t = Transport(format!("{url}: HTTP {}", resp.status()));
        return Err(RPCError::Network(NetworkError::new(&t)));
    }
    let body: Result<Resp, E> = resp
        .json()
        .await
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    body.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
}

type AppendResult =
    Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>>;

/// An append too large to reach a peer within openraft's deadline (one heartbeat interval),
/// sent by a task of its own so that the deadline does not cancel it: a retry of the same
/// append (same vote and range) waits for that task instead of starting over.
struct InflightAppend {
    key: String,
    task: tokio::task::JoinHandle<AppendResult>,
}

/// Appends at most this large are sent inline; larger ones by an [`InflightAppend`].
const INLINE_APPEND_BYTES: usize = 64 * 1024;

fn append_key(rpc: &AppendEntriesRequest<TypeConfig>) -> String {
    format!(
        "{} {:?} {:?}",
        rpc.vote,
        rpc.prev_log_id,
        rpc.entries.last().map(|e| e.log_id)
    )
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let body =
            serde_json::to_vec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if body.len() <= INLINE_APPEND_BYTES {
            self.inflight = None;
            let (http, addr) = (self.http.clone(), self.addr.clone());
            return send(http, addr, self.target, "append", body, option.hard_ttl()).await;
        }
        let key = append_key(&rpc);
        if self.inflight.as_ref().is_none_or(|i| i.key != key) {
            let (http, addr, target) = (self.http.clone(), self.addr.clone(), self.target);
            let ttl = option.hard_ttl();
            let task =
                tokio::spawn(async move { send(http, addr, target, "append", body, ttl).await });
            self.inflight = Some(InflightAppend { key, task });
        }
        // Cancelled here by openraft's deadline, the task goes on and the next try of this
        // append awaits it again.
        let Some(inflight) = self.inflight.as_mut() else {
            return Err(RPCError::Network(NetworkError::new(&Transport(
                "no append in flight".into(),
            ))));
        };
        let res = (&mut inflight.task).await;
        self.inflight = None;
        res.map_err(|e| RPCError::Network(NetworkError::new(&e)))?
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.post("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let resp = self.post("vote", &rpc, option.hard_ttl()).await;
        if let Ok(r) = &resp {
            self.news.record(&rpc, r);
        }
        resp
    }
}

/// Time beyond openraft's RPC deadline that a body of `bytes` gets to be sent, decoded and
/// written on the peer: 1 ms per 4 KiB. With [`InflightAppend`] it lets an entry of a few MiB
/// (a snapshot restore of 10,000 VMs) reach a follower; without both, replication retried such
/// an entry for ever, each try cut off after one heartbeat interval.
pub fn transfer_allowance(bytes: usize) -> Duration {
    Duration::from_millis((bytes / 4096) as u64)
}
