//! A running control node: the Raft instance over the SQLite stores, and the operations the
//! HTTP layer needs (propose, linearizable read, membership, status), each of which works on
//! any node: a follower forwards to the leader over `POST /raft/forward`.
//!
//! Cluster formation follows etcd: every node starts with the same initial membership, and a
//! node whose store is pristine calls `initialize` with it (openraft allows several nodes to
//! do so with the same config). A restart finds its log and vote and simply rejoins.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blixard_api::{AddMember, ClusterStatus, Member};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::leader_check::{LeaderCheck, LeaderCheckError};
use crate::liveness::{Leases, LivenessConfig, Renewal};
use crate::metrics::Metrics;
use crate::network::HttpNetwork;
use crate::raft_types::{NodeId, Raft};
use crate::state_machine::{ApplyError, Command, Response};
use crate::store::log::LogStore;
use crate::store::state::StateStore;
use crate::store::StoreError;

/// How long an operation waits for a leader before giving up with `NoLeader`.
const LEADER_WAIT: Duration = Duration::from_secs(5);

/// The most proposals one log entry carries.
const MAX_BATCH: usize = 256;

/// How many batches may be in Raft at once; while they are, new proposals queue up and go
/// into the next batch.
const BATCHES_IN_FLIGHT: usize = 2;

/// A proposal waiting for the batcher, and where its outcome goes.
/// A command to propose, the term it must be appended in (a leader's own decision, see
/// [`ControlNode::propose_in_term`]), and where its answer goes.
type QueuedProposal = (Command, Option<u64>, oneshot::Sender<ForwardReply>);

/// Errors of node operations. Each kind maps to one HTTP status (`http::error`); a message
/// never repeats the cause it chains with `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no leader elected yet; retry shortly")]
    NoLeader,
    #[error("the leader could not be reached: {0}")]
    LeaderUnreachable(String),
    #[error("raft: {0}")]
    Raft(String),
    /// The leader received a forwarded write and stopped answering before it said how it
    /// ended: it may have been applied (504, never retried blindly).
    #[error("the leader stopped answering after it received the request: {0}")]
    OutcomeUnknown(String),
    #[error("this node no longer leads term {0}: its decision is not proposed")]
    LeadershipLost(u64),
    /// The leader could not read the forward (a node of an older version).
    #[error("the leader refused the forward: {0}")]
    PeerRefused(String),
    /// The request is wrong (400).
    #[error("{0}")]
    Invalid(String),
    /// What the request names does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the cluster's state, such as removing the last voter (409).
    #[error("{0}")]
    Conflict(String),
    /// The leader cannot do it now; a retry shortly may succeed (503).
    #[error("{0}")]
    Unavailable(String),
    /// The node's configuration cannot be used (TLS files, tokens, Raft settings): a
    /// start-up failure, never an answer to a request.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What kind of failure the leader answers a [`Forward`] with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    Invalid,
    NotFound,
    Conflict,
    Unavailable,
    Internal,
}

/// A failed [`Forward`]: its kind, and a message for the client (or, for `internal`, the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl From<Failure> for NodeError {
    fn from(f: Failure) -> Self {
        match f.kind {
            FailureKind::Invalid => NodeError::Invalid(f.message),
            FailureKind::NotFound => NodeError::NotFound(f.message),
            FailureKind::Conflict => NodeError::Conflict(f.message),
            FailureKind::Unavailable => NodeError::Unavailable(f.message),
            FailureKind::Internal => NodeError::Raft(f.message),
        }
    }
}

/// Requests a follower sends to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Forward {
    Propose(Box<Command>),
    ReadIndex,
    AddMember(AddMember),
    RemoveMember(u64),
    /// A host's heartbeat: the leader confirms its leadership, then renews the host's lease
    /// in memory (see [`crate::liveness`]). Appended; older nodes do not know it.
    Heartbeat(String),
    /// How long each host has been silent, per the leader's leases (for host reads).
    /// Appended; older nodes do not know it.
    Silence,
    /// Many hosts' heartbeats at once, each answered as [`Forward::Heartbeat`] would be (see
    /// [`crate::heartbeat_forward`]). Appended; older nodes refuse it.
    Heartbeats(Vec<String>),
}

/// The leader's answer to a [`Forward`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    Response(Response),
    ReadIndex(u64),
    Members(Vec<Member>),
    /// The receiver is not (or no longer) the leader.
    NotLeader,
    /// Per host, milliseconds since its last confirmed heartbeat on the leader.
    Silence(Vec<(String, u64)>),
    /// A failure without a kind, from nodes before [`ForwardReply::Failed`]: read as internal.
    Error(String),
    /// The answers to [`Forward::Heartbeats`], in its order.
    Heartbeats(Vec<ForwardReply>),
    /// A failure and its kind. Appended; older nodes cannot read it (they answer their
    /// client 503, as for an unreachable leader), so it is sent only once all run this version
    /// or later in a rolling upgrade's usual order (followers first).
    Failed(Failure),
}

impl ForwardReply {
    pub fn failed(kind: FailureKind, message: impl Into<String>) -> Self {
        ForwardReply::Failed(Failure {
            kind,
            message: message.into(),
        })
    }

    /// An internal failure: the client sees a 500, the message goes to the log.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::failed(FailureKind::Internal, message)
    }

    /// The failure this reply carries, of either form.
    pub fn failure(self) -> Result<ForwardReply, NodeError> {
        match self {
            ForwardReply::Failed(f) => Err(f.into()),
            ForwardReply::Error(e) => Err(NodeError::Raft(e)),
            other => Ok(other),
        }
    }
}

/// The HTTP client for peer traffic: the peer token on every request, and with TLS the
/// cluster's CA as the only trust root.
fn peer_client(peer_token: Option<&str>, config: &Config) -> Result<reqwest::Client, NodeError> {
    blixard_api::tls::install_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = peer_token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|e| NodeError::Config(format!("peer token: {e}")))?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let mut b = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_millis(500))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true);
    if let Some(tls) = &config.tls {
        b = blixard_api::tls::trust_only(b, &tls.ca)
            .map_err(|e| NodeError::Config(e.to_string()))?;
    }
    b.build().map_err(|e| NodeError::Raft(e.to_string()))
}

/// The HTTP client for calls to agents: a short connect timeout, so that a dead host is an
/// error within seconds; with TLS the cluster's CA as the only trust root.
fn agent_client(config: &Config) -> Result<reqwest::Client, NodeError> {
    blixard_api::tls::install_provider();
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    if let Some(tls) = &config.tls {
        b = blixard_api::tls::trust_only(b, &tls.ca)
            .map_err(|e| NodeError::Config(e.to_string()))?;
    }
    b.build().map_err(|e| NodeError::Raft(e.to_string()))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A running control node.
pub struct ControlNode {
    pub id: NodeId,
    pub config: Config,
    pub raft: Raft,
    pub state: StateStore,
    pub metrics: Arc<Metrics>,
    /// Accepted tokens; `None` when authentication is off.
    pub tokens: Option<crate::http::auth::Tokens>,
    /// Client for calls to peers (carries the peer token and the cluster CA).
    http: reqwest::Client,
    /// The Raft log (a clone of openraft's), for the last log id a pre-vote compares.
    log: LogStore,
    /// Client for calls to hosts' agents (a VM's logs): no default credentials, each call
    /// carries that host's agent token.
    pub agent_http: reqwest::Client,
    /// Proposals for [`propose_batched`], which gathers them into log entries.
    proposals: mpsc::Sender<QueuedProposal>,
    /// When a current leader's AppendEntries or snapshot last arrived at this node (or the
    /// node opened, or stopped leading): what [`crate::election_trigger`] and
    /// [`crate::pre_vote`] measure silence from.
    leader_contact: std::sync::Mutex<std::time::Instant>,
    /// Why this node's vote requests were refused, for [`crate::election_trigger`].
    pub vote_news: Arc<crate::election_trigger::VoteNews>,
    /// Coalesced leadership checks for heartbeats and linearizable reads.
    leader_check: LeaderCheck,
    /// Hosts' leases while this node leads (see [`crate::liveness`]).
    pub leases: std::sync::Mutex<Leases>,
    /// Where the leader places creates as it admits them, and their reservations.
    admission: std::sync::Mutex<crate::admission::Admission>,
    /// Heartbeats on their way to the leader (see [`crate::heartbeat_forward`]).
    heartbeat_queue: mpsc::Sender<crate::heartbeat_forward::Queued>,
    /// Woken when the leader loop resolves the proposals of hosts going down, for heartbeats
    /// that wait for them ([`crate::liveness::Renewal::GoingDown`]).
    pub downs_resolved: tokio::sync::Notify,
    /// How host TTLs follow from the agents' fence timing.
    pub liveness: LivenessConfig,
    /// The origin of [`Self::clock_ms`].
    clock_origin: std::time::Instant,
}

/// Gathers the proposals queued on `rx` into log entries: takes whatever is waiting (at
/// most [`MAX_BATCH`], without waiting for more), proposes it as one entry, and hands each
/// caller its own response. Up to [`BATCHES_IN_FLIGHT`] entries are in Raft at a time, so a
/// lone proposal goes out at once and a crowd shares one fsync and one replication round.
async fn propose_batched(
    raft: Raft,
    id: NodeId,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<QueuedProposal>,
) {
    crate::gather::batches(rx, MAX_BATCH, BATCHES_IN_FLIGHT, |mut batch| {
        // A leader's own decisions are appended in the term they were made in or not at all:
        // checked as late as this process can, just before the write.
        let (leader, term) = {
            let m = raft.metrics().borrow().clone();
            (m.current_leader, m.current_term)
        };
        batch.retain_mut(|p| match p.1 {
            Some(t) if leader != Some(id) || term != t => {
                let (tx, _) = oneshot::channel();
                let _ = std::mem::replace(&mut p.2, tx).send(ForwardReply::NotLeader);
                false
            }
            _ => true,
        });
        let (raft, metrics) = (raft.clone(), metrics.clone());
        Some(async move {
            if !batch.is_empty() {
                write_batch(&raft, &metrics, batch).await;
            }
        })
    })
    .await
}

/// Proposes `batch` as one entry (a lone command as itself) and answers every caller.
async fn write_batch(raft: &Raft, metrics: &Metrics, batch: Vec<QueuedProposal>) {
    let (cmds, replies): (Vec<Command>, Vec<oneshot::Sender<ForwardReply>>) =
        batch.into_iter().map(|(c, _, r)| (c, r)).unzip();
    let kinds: Vec<&'static str> = cmds.iter().map(Command::kind).collect();
    let entry = match <[Command; 1]>::try_from(cmds) {
        Ok([cmd]) => cmd,
        Err(commands) => Command::Batch { commands },
    };
    let answers: Vec<(ForwardReply, &str)> = match raft.client_write(entry).await {
        Ok(r) => match r.data {
            Response::Batch(rs) if rs.len() == replies.len() => rs
                .into_iter()
                .map(|r| (ForwardReply::Response(r), "ok"))
                .collect(),
            r if replies.len() == 1 => vec![(ForwardReply::Response(r), "ok")],
            r => {
                let e = format!("a batch of {} got the response {r:?}", replies.len());
                vec![(ForwardReply::internal(e), "error"); replies.len()]
            }
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            vec![(ForwardReply::NotLeader, "not_leader"); replies.len()]
        }
        Err(e) => vec![(ForwardReply::internal(e.to_string()), "error"); replies.len()],
    };
    for ((reply, (answer, outcome)), kind) in replies.into_iter().zip(answers).zip(kinds) {
        metrics.proposal(kind, outcome);
        // The caller may have gone away (its request timed out); nothing to do then.
        let _ = reply.send(answer);
    }
}

impl ControlNode {
    /// Opens the stores and starts Raft. Does not form the cluster: see [`Self::bootstrap`].
    pub async fn open(config: Config) -> Result<Arc<Self>, NodeError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let log = LogStore::open(&config.data_dir)?;
        let state = StateStore::open(&config.data_dir)?;
        let raft_config = openraft::Config {
            cluster_name: "blixard".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            // A loaded 2-core machine can take longer than the 200 ms default to write a
            // snapshot chunk.
            install_snapshot_timeout: 5_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: (config.snapshot_every / 2).min(1_000),
            max_payload_entries: 1_000,
            // Elections are started only by `election_trigger`, after a pre-vote round.
            enable_elect: false,
            ..Default::default()
        };
        let raft_config = Arc::new(
            raft_config
                .validate()
                .map_err(|e| NodeError::Config(e.to_string()))?,
        );
        let tokens = match &config.auth {
            Some(a) => Some(
                crate::http::auth::Tokens::load(
                    &a.operators,
                    a.agents.as_deref(),
                    &a.peer,
                    config.metrics_open,
                )
                .map_err(|e| NodeError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let http = peer_client(tokens.as_ref().and_then(|t| t.peer_token()), &config)?;
        let agent_http = agent_client(&config)?;
        let vote_news = Arc::new(crate::election_trigger::VoteNews::default());
        let network = HttpNetwork::from_client(http.clone(), vote_news.clone());
        let raft = Raft::new(
            config.node_id,
            raft_config,
            network,
            log.clone(),
            state.clone(),
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let metrics = Arc::new(Metrics::new());
        let (proposals, queued) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(propose_batched(
            raft.clone(),
            config.node_id,
            metrics.clone(),
            queued,
        ));
        let leader_check = LeaderCheck::new(raft.clone(), config.node_id);
        let (heartbeat_queue, heartbeats_queued) = crate::heartbeat_forward::queue();
        let liveness = LivenessConfig {
            default_ttl_ms: config.host_ttl_ms,
            margin_ms: config.host_lease_margin_ms,
        };
        let node = Arc::new(ControlNode {
            id: config.node_id,
            config,
            raft,
            state,
            metrics,
            tokens,
            http,
            log,
            agent_http,
            proposals,
            leader_contact: std::sync::Mutex::new(std::time::Instant::now()),
            vote_news,
            leader_check,
            leases: std::sync::Mutex::new(Leases::default()),
            downs_resolved: tokio::sync::Notify::new(),
            heartbeat_queue,
            admission: Default::default(),
            liveness,
            clock_origin: std::time::Instant::now(),
        });
        tokio::spawn(crate::heartbeat_forward::run(
            Arc::downgrade(&node),
            heartbeats_queued,
        ));
        Ok(node)
    }

    /// Forms the cluster from `initial_cluster` if this node's store is pristine and it is not
    /// joining an existing cluster. Safe to call on every node of the initial cluster.
    pub async fn bootstrap(&self) -> Result<(), NodeError> {
        if self.config.join {
            return Ok(());
        }
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        if initialized {
            tracing::info!("store holds a cluster already; rejoining");
            return Ok(());
        }
        let members: BTreeMap<NodeId, BasicNode> = self
            .config
            .initial_cluster
            .iter()
            .map(|(id, url)| (*id, BasicNode { addr: url.clone() }))
            .collect();
        match self.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(members = ?self.config.initial_cluster, "formed the cluster");
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(NodeError::Raft(e.to_string())),
        }
    }

    /// Records that a leader was heard from just now (or, when this node stops leading, that
    /// its own leadership counts as the last word from a leader).
    pub fn heard_from_leader(&self) {
        if let Ok(mut t) = self.leader_contact.lock() {
            *t = std::time::Instant::now();
        }
    }

    /// Called as an AppendEntries or snapshot request with `vote` arrives, before it is
    /// processed (and before its entries reach the disk): contact with a leader that this
    /// node would follow, so a slow fsync here never reads as a silent leader. A deposed
    /// leader's request (a lower vote) is not contact.
    pub fn leader_request_arrived(&self, vote: &openraft::Vote<NodeId>) {
        let current = self.raft.metrics().borrow().vote;
        if vote.is_committed() && *vote >= current {
            self.heard_from_leader();
        }
    }

    /// This node's answer to a pre-vote (see [`crate::pre_vote`]).
    pub async fn answer_pre_vote(
        &self,
        req: &crate::pre_vote::PreVoteRequest,
    ) -> Result<crate::pre_vote::PreVoteResponse, NodeError> {
        let leading = self.leader() == Some(self.id);
        let last_log_id = self.last_log_id().await?;
        let voter = crate::pre_vote::Voter {
            leading,
            silence: self.last_leader_contact().elapsed(),
            lease: Duration::from_millis(self.config.election_timeout_max_ms),
            last_log_id,
        };
        let answer = crate::pre_vote::judge(req, &voter);
        if answer.granted {
            tracing::info!(
                candidate = req.candidate,
                silence_ms = voter.silence.as_millis() as u64,
                "pre-vote granted to node {}: no word from a leader for {} ms",
                req.candidate,
                voter.silence.as_millis()
            );
        }
        Ok(answer)
    }

    /// Runs a pre-vote round for this node among the other voters.
    pub async fn pre_vote_round(&self) -> Result<crate::pre_vote::Outcome, NodeError> {
        let (voters, peers) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            let peers: Vec<(NodeId, String)> = voters
                .iter()
                .filter(|id| **id != self.id)
                .filter_map(|id| membership.get_node(id).map(|n| (*id, n.addr.clone())))
                .collect();
            (voters.len(), peers)
        };
        let req = crate::pre_vote::PreVoteRequest {
            candidate: self.id,
            last_log_id: self.last_log_id().await?,
        };
        let timeout = Duration::from_millis(self.config.election_timeout_max_ms / 2);
        let answers = crate::pre_vote::ask(&self.http, &peers, &req, timeout).await;
        Ok(crate::pre_vote::tally(voters, &answers))
    }

    /// The last log id this node accepted (maybe not yet on its disk).
    async fn last_log_id(&self) -> Result<Option<openraft::LogId<NodeId>>, NodeError> {
        use openraft::storage::RaftLogStorage;
        let mut log = self.log.clone();
        log.get_log_state()
            .await
            .map(|s| s.last_log_id)
            .map_err(|e| NodeError::Raft(e.to_string()))
    }

    /// When a leader was last heard from (see [`Self::heard_from_leader`]).
    pub fn last_leader_contact(&self) -> std::time::Instant {
        self.leader_contact
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|p| *p.into_inner())
    }

    /// Milliseconds on this node's monotonic clock (what leases are measured in).
    pub fn clock_ms(&self) -> u64 {
        self.clock_origin.elapsed().as_millis() as u64
    }

    /// Runs `f` on the leases (a poisoned lock is taken over: the leases are plain data).
    pub fn with_leases<T>(&self, f: impl FnOnce(&mut Leases) -> T) -> T {
        let mut g = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// The leader's id, if one is known.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    fn node_addr(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// Waits until a leader is known (or the deadline passes).
    async fn wait_leader(&self) -> Result<NodeId, NodeError> {
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            if let Some(l) = rx.borrow_and_update().current_leader {
                return Ok(l);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(NodeError::NoLeader),
            }
        }
    }

    /// Waits until the leader is someone other than `old` (or anyone, if `old` is `None`).
    async fn wait_leader_change(&self, old: Option<NodeId>, deadline: tokio::time::Instant) {
        let mut rx = self.raft.metrics();
        loop {
            let l = rx.borrow_and_update().current_leader;
            if l.is_some() && l != old {
                return;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Runs `req` on the leader: here if this node leads, otherwise over HTTP.
    pub(crate) async fn on_leader(&self, req: Forward) -> Result<ForwardReply, NodeError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut last = NodeError::NoLeader;
        loop {
            if tokio::time::Instant::now() > deadline {
                return Err(last);
            }
            let leader = match self.wait_leader().await {
                Ok(l) => l,
                Err(e) => return Err(e),
            };
            let reply = if leader == self.id {
                self.handle_forward(req.clone()).await
            } else {
                let Some(addr) = self.node_addr(leader) else {
                    last = NodeError::NoLeader;
                    self.wait_leader_change(Some(leader), deadline).await;
                    continue;
                };
                match self.send_forward(leader, &addr, &req).await {
                    Ok(r) => r,
                    Err(e @ NodeError::LeaderUnreachable(_)) => {
                        last = e;
                        self.wait_leader_change(
                            Some(leader),
                            deadline.min(tokio::time::Instant::now() + Duration::from_millis(300)),
                        )
                        .await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            };
            match reply {
                ForwardReply::NotLeader => {
                    last = NodeError::NoLeader;
                    self.wait_leader_change(
                        Some(leader),
                        deadline.min(tokio::time::Instant::now() + Duration::from_millis(300)),
                    )
                    .await;
                }
                other => return other.failure(),
            }
        }
    }

    async fn send_forward(
        &self,
        to: NodeId,
        addr: &str,
        req: &Forward,
    ) -> Result<ForwardReply, NodeError> {
        if crate::faults::is_isolated(to) {
            return Err(NodeError::LeaderUnreachable(format!(
                "node {to} is isolated"
            )));
        }
        let url = format!("{addr}/raft/forward");
        let resp = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(30))
            .json(req)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    // Nothing was sent: safe to retry elsewhere.
                    NodeError::LeaderUnreachable(format!("{url}: {e}"))
                } else {
                    // The leader may have applied it: retrying could apply it twice.
                    NodeError::OutcomeUnknown(format!("{url}: {e}"))
                }
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::BAD_REQUEST
            || status == reqwest::StatusCode::UNPROCESSABLE_ENTITY
        {
            // It could not read the request: nothing was done, and retrying will not help.
            return Err(NodeError::PeerRefused(format!("{url}: HTTP {status}")));
        }
        if !status.is_success() {
            return Err(NodeError::LeaderUnreachable(format!(
                "{url}: HTTP {}",
                resp.status()
            )));
        }
        resp.json()
            .await
            .map_err(|e| NodeError::LeaderUnreachable(format!("{url}: {e}")))
    }

    /// Executes a forwarded request, if this node is the leader.
    pub async fn handle_forward(&self, req: Forward) -> ForwardReply {
        match req {
            Forward::Propose(cmd) => {
                if matches!(*cmd, Command::Batch { .. }) {
                    return ForwardReply::failed(
                        FailureKind::Invalid,
                        "batches are formed by the leader",
                    );
                }
                self.propose_admitted(*cmd).await
            }
            Forward::ReadIndex => match self.leader_check.confirm().await {
                Ok(c) => ForwardReply::ReadIndex(c.read_index),
                Err(LeaderCheckError::NotLeader) => ForwardReply::NotLeader,
                Err(e) => ForwardReply::internal(e.to_string()),
            },
            Forward::Heartbeat(host) => self.heartbeat_here(&host).await,
            Forward::Heartbeats(hosts) => {
                if self.leader() != Some(self.id) {
                    return ForwardReply::NotLeader;
                }
                let each = hosts.iter().map(|h| self.heartbeat_here(h));
                let replies = futures::future::join_all(each).await;
                if replies.iter().all(|r| matches!(r, ForwardReply::NotLeader)) {
                    return ForwardReply::NotLeader;
                }
                ForwardReply::Heartbeats(replies)
            }
            Forward::Silence => {
                if self.leader() != Some(self.id) {
                    return ForwardReply::NotLeader;
                }
                let now = self.clock_ms();
                let hosts: Vec<String> = self.state.read(|s| s.hosts.keys().cloned().collect());
                ForwardReply::Silence(self.with_leases(|l| {
                    hosts
                        .into_iter()
                        .filter_map(|h| l.silent_ms(&h, now).map(|ms| (h, ms)))
                        .collect()
                }))
            }
            Forward::AddMember(m) => self.add_member_here(m).await,
            Forward::RemoveMember(id) => self.remove_member_here(id).await,
        }
    }

    /// Stamps `cmd` with the leader's clock and hands it to the batcher; the applied outcome.
    /// A client's proposal on the leader; a create is placed first (see [`crate::admission`]),
    /// so its placement travels in its own entry.
    async fn propose_admitted(&self, mut cmd: Command) -> ForwardReply {
        let Command::CreateVm {
            spec,
            placement: placement @ None,
            ..
        } = &mut cmd
        else {
            return self.propose_here(cmd).await;
        };
        let name = spec.name.clone();
        let oc = crate::scheduler::Overcommit::default();
        let applied = self.state.applied_index();
        let host = self.state.read(|s| {
            let mut adm = self.admission.lock().unwrap_or_else(|p| p.into_inner());
            adm.place(s, applied, oc, spec)
        });
        let Some(decided) = host else {
            return self.propose_here(cmd).await;
        };
        *placement = Some(decided);
        let reply = self.propose_here(cmd).await;
        self.admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(&name);
        reply
    }

    async fn propose_here(&self, cmd: Command) -> ForwardReply {
        self.propose_guarded(cmd, None).await
    }

    /// Queues `cmd` for the batcher; with `term`, only if this node still leads that term
    /// when the batch is written.
    async fn propose_guarded(&self, mut cmd: Command, term: Option<u64>) -> ForwardReply {
        cmd.stamp(now_ms());
        let (tx, rx) = oneshot::channel();
        if self.proposals.send((cmd, term, tx)).await.is_err() {
            return ForwardReply::internal("the proposal queue is closed");
        }
        rx.await
            .unwrap_or_else(|_| ForwardReply::internal("the proposal was dropped unanswered"))
    }

    /// A heartbeat on the leader: confirms leadership by a round that began after the
    /// heartbeat arrived, renews the host's lease from its arrival, and proposes the host's
    /// return only when it was down. Steady-state heartbeats write nothing to the log.
    async fn heartbeat_here(&self, host: &str) -> ForwardReply {
        let arrived = self.clock_ms();
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            // Enabled before the lease is looked at, so a resolution in between is not missed.
            let resolved = self.downs_resolved.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            let confirmed = match self.leader_check.confirm().await {
                Ok(c) => c,
                Err(LeaderCheckError::NotLeader) => return ForwardReply::NotLeader,
                Err(e) => return ForwardReply::internal(e.to_string()),
            };
            // Wait until this node has applied everything in its log when the check ended,
            // not only what was committed when it began: an entry that declares this host
            // down may be in flight, and the answer must not tell the agent it is up while
            // that entry can still move its VMs.
            let last_log = self.raft.metrics().borrow().last_log_index;
            let applied = self
                .raft
                .wait(Some(LEADER_WAIT))
                .applied_index_at_least(
                    Some(confirmed.read_index.max(last_log.unwrap_or(0))),
                    "heartbeat",
                )
                .await;
            if let Err(e) = applied {
                return ForwardReply::internal(e.to_string());
            }
            let Some(record) = self.state.read(|s| s.hosts.get(host).cloned()) else {
                return ForwardReply::Response(Response::Error(ApplyError::NotFound(format!(
                    "host {host} not registered"
                ))));
            };
            let now = self.clock_ms();
            let renewal = self.with_leases(|l| {
                l.lead(confirmed.term, now);
                l.renew(confirmed.term, host, arrived)
            });
            if renewal == Renewal::GoingDown {
                tracing::info!(host = %host, "heartbeat from a host being declared down; waiting for that to resolve");
                // The leader loop is declaring this host down: once that is resolved the
                // record says down (and the host comes back up below), or the proposal failed.
                if tokio::time::timeout_at(deadline, resolved).await.is_err() {
                    return ForwardReply::failed(
                        FailureKind::Unavailable,
                        format!("host {host} is being declared down; try again"),
                    );
                }
                continue;
            }
            self.metrics.heartbeat();
            if record.status == blixard_api::HostStatus::Down {
                tracing::info!(host = %host, "heartbeat from a host that was down; bringing it back up");
                let cmd = Command::Heartbeat {
                    host: host.to_string(),
                    now_ms: 0,
                };
                return self.propose_here(cmd).await;
            }
            return ForwardReply::Response(Response::Host(Box::new(blixard_api::Host {
                last_heartbeat_ms: now_ms(),
                ..record
            })));
        }
    }

    async fn add_member_here(&self, m: AddMember) -> ForwardReply {
        if self.leader() != Some(self.id) {
            return ForwardReply::NotLeader;
        }
        if let Err(e) = self
            .raft
            .add_learner(
                m.id,
                BasicNode {
                    addr: m.addr.clone(),
                },
                true,
            )
            .await
        {
            return ForwardReply::internal(format!("adding node {} as learner: {e}", m.id));
        }
        let add = ChangeMembers::AddVoterIds(BTreeSet::from([m.id]));
        match self.raft.change_membership(add, false).await {
            Ok(_) => ForwardReply::Members(self.members()),
            Err(e) => ForwardReply::internal(format!("promoting node {}: {e}", m.id)),
        }
    }

    async fn remove_member_here(&self, id: u64) -> ForwardReply {
        if self.leader() != Some(self.id) {
            return ForwardReply::NotLeader;
        }
        let voters: BTreeSet<NodeId> = self
            .members()
            .iter()
            .filter(|m| m.role == "voter")
            .map(|m| m.id)
            .collect();
        if !self.members().iter().any(|m| m.id == id) {
            return ForwardReply::failed(
                FailureKind::NotFound,
                format!("node {id} is not a member"),
            );
        }
        if voters.contains(&id) && voters.len() == 1 {
            return ForwardReply::failed(FailureKind::Conflict, "cannot remove the last voter");
        }
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        match self.raft.change_membership(change, false).await {
            Ok(_) => ForwardReply::Members(self.members()),
            Err(e) => ForwardReply::internal(format!("removing node {id}: {e}")),
        }
    }

    /// Proposes a command through Raft (on the leader, wherever that is) and returns the
    /// applied outcome.
    /// Proposes a decision this node made as the leader of `term` (a host is down, an
    /// eviction is overdue, a placement round): on this node and in that term only, never
    /// forwarded to a later leader. A decision outlives its leadership otherwise: a leader
    /// cut off from the others decides a host is down (it hears no heartbeats), steps down
    /// when the cut heals, and its stuck proposal, retried through the new leader, would take
    /// down a host whose agent holds a lease from that new leader (an overlap the host fault
    /// suite caught).
    pub async fn propose_in_term(&self, cmd: Command, term: u64) -> Result<Response, NodeError> {
        match self.propose_guarded(cmd, Some(term)).await {
            ForwardReply::Response(r) => Ok(r),
            ForwardReply::NotLeader => Err(NodeError::LeadershipLost(term)),
            ForwardReply::Error(e) => Err(NodeError::Raft(e)),
            ForwardReply::Failed(f) => Err(f.into()),
            other => Err(NodeError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn propose(&self, cmd: Command) -> Result<Response, NodeError> {
        match self.on_leader(Forward::Propose(Box::new(cmd))).await? {
            ForwardReply::Response(r) => Ok(r),
            other => Err(NodeError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// A host's heartbeat, answered by the leader once it has confirmed it leads (here or
    /// over a forward): the host's record, or `Response::Error(NotFound)`.
    pub async fn heartbeat(&self, host: &str) -> Result<Response, NodeError> {
        if self.leader() == Some(self.id) {
            match self.heartbeat_here(host).await {
                // Lost the leadership meanwhile: on to the new leader, below.
                ForwardReply::NotLeader => {}
                r => return crate::heartbeat_forward::answer(r),
            }
        }
        // A follower's heartbeats travel to the leader together.
        let (tx, rx) = oneshot::channel();
        self.heartbeat_queue
            .send((host.to_string(), tx))
            .await
            .map_err(|_| NodeError::Raft("the heartbeat queue is closed".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(NodeError::Raft("the heartbeat was dropped".into())))
    }

    /// Per host, how long ago the leader last confirmed a heartbeat of it (or began to lead,
    /// if it has seen none since).
    pub async fn host_silence(&self) -> Result<BTreeMap<String, u64>, NodeError> {
        match self.on_leader(Forward::Silence).await? {
            ForwardReply::Silence(v) => Ok(v.into_iter().collect()),
            other => Err(NodeError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Returns once this node's state machine reflects every write committed before the call
    /// (a read-index read, on followers via the leader).
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        let index = match self.on_leader(Forward::ReadIndex).await? {
            ForwardReply::ReadIndex(i) => i,
            other => return Err(NodeError::Raft(format!("unexpected reply {other:?}"))),
        };
        self.raft
            .wait(Some(LEADER_WAIT))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        Ok(())
    }

    pub async fn add_member(&self, m: AddMember) -> Result<Vec<Member>, NodeError> {
        match self.on_leader(Forward::AddMember(m)).await? {
            ForwardReply::Members(v) => Ok(v),
            other => Err(NodeError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn remove_member(&self, id: u64) -> Result<Vec<Member>, NodeError> {
        match self.on_leader(Forward::RemoveMember(id)).await? {
            ForwardReply::Members(v) => Ok(v),
            other => Err(NodeError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Members from Raft's own configuration (on every node, followers included).
    pub fn members(&self) -> Vec<Member> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                addr: node.addr.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
            })
            .collect()
    }

    /// This node's view of the cluster.
    pub async fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let commit_index = self
            .raft
            .with_raft_state(|st| st.committed.map(|c| c.index).unwrap_or(0))
            .await
            .unwrap_or(0);
        let leader_addr = m.current_leader.and_then(|l| self.node_addr(l));
        let leader_contact_ms = match m.state {
            ServerState::Leader => m.millis_since_quorum_ack,
            _ => Some(self.last_leader_contact().elapsed().as_millis() as u64),
        };
        ClusterStatus {
            node_id: self.id,
            leader: m.current_leader,
            leader_addr,
            term: m.current_term,
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            members: self.members(),
            commit_index,
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            view: blixard_api::StatusView::Local,
            leader_contact_ms,
            leader_lease_ms: Some(self.config.election_timeout_max_ms),
        }
    }

    /// Refreshes the Raft gauges (called at scrape time).
    pub async fn refresh_gauges(&self) {
        let s = self.status().await;
        let mx = &self.metrics;
        mx.term.set(s.term as i64);
        mx.leader.set(s.leader.unwrap_or(0) as i64);
        mx.is_leader.set(i64::from(s.leader == Some(self.id)));
        mx.commit_index.set(s.commit_index as i64);
        mx.applied_index.set(s.applied_index as i64);
        mx.last_log_index.set(s.last_log_index as i64);
        let (vms, hosts) = self.state.read(|c| (c.vms.len(), c.hosts.len()));
        mx.vms.set(vms as i64);
        mx.hosts.set(hosts as i64);
        mx.leased_hosts.set(self.with_leases(|l| l.len()) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward protocol's failures: the new form is pinned, the old one still decodes.
    #[test]
    fn forward_failures_carry_kinds() {
        let r = ForwardReply::failed(FailureKind::Conflict, "cannot remove the last voter");
        let json = serde_json::to_string(&r).expect("encodes");
        assert_eq!(
            json,
            r#"{"Failed":{"kind":"conflict","message":"cannot remove the last voter"}}"#
        );
        type Is = fn(&NodeError) -> bool;
        let cases: [(&str, Is); 6] = [
            (r#"{"Failed":{"kind":"invalid","message":"m"}}"#, |e| {
                matches!(e, NodeError::Invalid(_))
            }),
            (r#"{"Failed":{"kind":"not_found","message":"m"}}"#, |e| {
                matches!(e, NodeError::NotFound(_))
            }),
            (r#"{"Failed":{"kind":"conflict","message":"m"}}"#, |e| {
                matches!(e, NodeError::Conflict(_))
            }),
            (r#"{"Failed":{"kind":"unavailable","message":"m"}}"#, |e| {
                matches!(e, NodeError::Unavailable(_))
            }),
            (r#"{"Failed":{"kind":"internal","message":"m"}}"#, |e| {
                matches!(e, NodeError::Raft(_))
            }),
            (r#"{"Error":"m"}"#, |e| matches!(e, NodeError::Raft(_))),
        ];
        for (wire, want) in cases {
            let r: ForwardReply = serde_json::from_str(wire).expect(wire);
            let e = r.failure().expect_err(wire);
            assert!(want(&e), "{wire}: {e:?}");
        }
        assert!(matches!(
            ForwardReply::ReadIndex(3).failure(),
            Ok(ForwardReply::ReadIndex(3))
        ));
    }
}
