//! Raft RPC between control nodes over HTTP/JSON: `POST {peer}/raft/{append,vote,snapshot}`.
//!
//! Peer traffic has its own routes, apart from the client API (see `http::raft_routes`). A
//! transport failure is reported to openraft as `Unreachable`, which makes it back off;
//! a `RaftError` from the peer is passed through as a remote error.

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
        }
    }
}

/// RPC client to one peer.
pub struct PeerClient {
    http: reqwest::Client,
    news: Arc<VoteNews>,
    target: NodeId,
    addr: String,
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
        if crate::faults::is_isolated(self.target) {
            let e = crate::faults::Isolated(self.target);
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        let url = format!("{}/raft/{path}", self.addr);
        let resp = self
            .http
            .post(&url)
            .timeout(timeout)
            .json(req)
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
        body.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.post("append", &rpc, option.hard_ttl()).await
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
