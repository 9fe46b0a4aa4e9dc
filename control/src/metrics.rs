//! Prometheus metrics of a control node, served as text at `/metrics`.
//!
//! Request counters and latency histograms are recorded by the HTTP layer; Raft gauges are
//! read from openraft's metrics at scrape time, so they are never stale.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientKindLabels {
    /// `operator`, `agent`, `peer` or `address` (unauthenticated callers).
    pub client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProposalLabels {
    pub kind: String,
    pub outcome: String,
}

/// Every `Command::kind` and every outcome a proposal is counted under. Their series exist
/// from the start at zero on every node (Prometheus' advice for known label values), so a
/// follower, which proposes nothing itself, exposes the same metric names as the leader: the
/// encoder leaves out a family without series.
const PROPOSAL_KINDS: &[&str] = &[
    "create_vm",
    "delete_vm",
    "set_desired",
    "register_host",
    "heartbeat",
    "report_vm_status",
    "place",
    "set_host_status",
    "update_vm",
    "drain_host",
    "unassign",
    "restore_state",
    "batch",
    "declare_host_gone",
];
pub const PROPOSAL_OUTCOMES: &[&str] = &["ok", "error", "not_leader"];
/// The kinds of client a rate limit refusal is counted under (see `http::rate_limit`).
const CLIENT_KINDS: &[&str] = &["operator", "agent", "peer", "address"];

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Every metric of a node.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub proposals: Family<ProposalLabels, Counter>,
    pub rate_limited: Family<ClientKindLabels, Counter>,
    pub term: Gauge,
    pub leader: Gauge,
    pub is_leader: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub last_log_index: Gauge,
    pub vms: Gauge,
    pub hosts: Gauge,
    /// Heartbeats this node confirmed as leader (none of them is a log entry).
    pub heartbeats: Counter,
    /// Hosts holding a lease on this leader (0 on followers).
    pub leased_hosts: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("blixard");
        let requests = Family::<RequestLabels, Counter>::default();
        r.register(
            "api_requests",
            "HTTP API requests by route and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        r.register(
            "api_request_duration_seconds",
            "HTTP API latency by route",
            latency.clone(),
        );
        let proposals = Family::<ProposalLabels, Counter>::default();
        r.register(
            "raft_proposals",
            "Raft proposals by command and outcome",
            proposals.clone(),
        );
        let rate_limited = Family::<ClientKindLabels, Counter>::default();
        r.register(
            "api_rate_limited",
            "API requests refused with 429 by the per-client rate limit, by kind of client",
            rate_limited.clone(),
        );
        let g = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let term = g(&mut r, "raft_term", "current Raft term");
        let leader = g(
            &mut r,
            "raft_leader",
            "id of the current leader (0 if none)",
        );
        let is_leader = g(&mut r, "raft_is_leader", "1 on the leader");
        let commit_index = g(&mut r, "raft_commit_index", "committed log index");
        let applied_index = g(&mut r, "raft_applied_index", "applied log index");
        let last_log_index = g(&mut r, "raft_last_log_index", "last log index");
        let vms = g(&mut r, "vms", "VMs in the cluster");
        let hosts = g(&mut r, "hosts", "hosts in the cluster");
        let leased_hosts = g(
            &mut r,
            "leased_hosts",
            "hosts whose lease this leader holds in memory (0 on followers)",
        );
        let heartbeats = Counter::default();
        r.register(
            "host_heartbeats",
            "host heartbeats confirmed by this node as leader (kept in memory, not in the log)",
            heartbeats.clone(),
        );
        for kind in PROPOSAL_KINDS {
            for outcome in PROPOSAL_OUTCOMES {
                let _ = proposals.get_or_create(&ProposalLabels {
                    kind: (*kind).into(),
                    outcome: (*outcome).into(),
                });
            }
        }
        for client in CLIENT_KINDS {
            let _ = rate_limited.get_or_create(&ClientKindLabels {
                client: (*client).into(),
            });
        }
        Metrics {
            registry: Mutex::new(r),
            requests,
            latency,
            proposals,
            rate_limited,
            term,
            leader,
            is_leader,
            commit_index,
            applied_index,
            last_log_index,
            vms,
            hosts,
            heartbeats,
            leased_hosts,
        }
    }

    pub fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    pub fn proposal(&self, kind: &str, outcome: &str) {
        self.proposals
            .get_or_create(&ProposalLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}
