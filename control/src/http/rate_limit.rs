//! Per-client rate limiting of the API (`rate_limit_per_sec`, `rate_limit_burst`).
//!
//! A client is the principal its bearer token names (each operator token, each agent's host,
//! the peers), or its IP address when it presents no valid token (or authentication is off),
//! so unauthenticated floods and token guessing are limited too. Each client has its own
//! GCRA bucket ([`governor`]): one client over its rate gets `429 Too Many Requests` with
//! `Retry-After` and the usual error JSON, and nobody else notices. `/raft/*` (the cluster's
//! own traffic) and `/v1/health` (probes) are never limited. Refusals are counted in
//! `blixard_api_rate_limited_total` and logged, at most once a second per client.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use blixard_api::types::codes;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::net::TcpListener;

use super::auth::{Principal, Tokens};
use super::error::ApiError;
use super::tls::TlsListener;
use crate::config::RateLimit;
use crate::metrics::ClientKindLabels;
use crate::node::ControlNode;

/// Buckets kept before idle ones are dropped (a full bucket is the same as no bucket).
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// The address a connection comes from, for [`ConnectInfo`] over plain TCP and TLS alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// Whom a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The n-th operator token (the token itself is never kept here or logged).
    Operator(usize),
    Agent(String),
    Peer,
    /// A caller without a valid token, or any caller when authentication is off.
    Address(Option<IpAddr>),
}

impl ClientKey {
    /// The metric label of this kind of client.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientKey::Operator(_) => "operator",
            ClientKey::Agent(_) => "agent",
            ClientKey::Peer => "peer",
            ClientKey::Address(_) => "address",
        }
    }
}

/// Whether `path` is limited at all.
pub fn is_limited(path: &str) -> bool {
    !(path == "/v1/health" || path == "/raft" || path.starts_with("/raft/"))
}

/// The client a request counts against: its token's principal, else its address.
pub fn client_key(
    tokens: Option<&Tokens>,
    bearer: Option<&str>,
    peer: Option<IpAddr>,
) -> ClientKey {
    match tokens.zip(bearer).and_then(|(t, b)| t.identify_client(b)) {
        Some((Principal::Operator, i)) => ClientKey::Operator(i),
        Some((Principal::Agent(h), _)) => ClientKey::Agent(h),
        Some((Principal::Peer, _)) => ClientKey::Peer,
        None => ClientKey::Address(peer),
    }
}

/// Whole seconds to put in `Retry-After`: the wait rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// The buckets of every client of one node.
pub struct ClientLimiter {
    limit: RateLimit,
    buckets: DefaultKeyedRateLimiter<ClientKey>,
    /// One log line per client per second, however many refusals.
    log_buckets: DefaultKeyedRateLimiter<ClientKey>,
    clock: DefaultClock,
}

impl ClientLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let quota = Quota::per_second(limit.per_sec).allow_burst(limit.burst);
        ClientLimiter {
            limit,
            buckets: RateLimiter::keyed(quota),
            log_buckets: RateLimiter::keyed(Quota::per_second(std::num::NonZeroU32::MIN)),
            clock: DefaultClock::default(),
        }
    }

    /// `Ok` if `key` may make a request now, else how long until it may.
    pub fn check(&self, key: &ClientKey) -> Result<(), Duration> {
        if self.buckets.len() > MAX_TRACKED_CLIENTS {
            self.buckets.retain_recent();
            self.log_buckets.retain_recent();
        }
        self.buckets
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    fn should_log(&self, key: &ClientKey) -> bool {
        self.log_buckets.check_key(key).is_ok()
    }
}

/// What the rate-limit middleware needs.
pub struct RateLimitState {
    pub node: Arc<ControlNode>,
    pub limiter: ClientLimiter,
}

/// Refuses a request over its client's rate with a 429.
pub async fn limit(State(state): State<Arc<RateLimitState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !is_limited(path) {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<PeerAddr>>()
        .map(|c| c.0 .0.ip());
    let key = client_key(state.node.tokens.as_ref(), super::auth::bearer(&req), peer);
    let Err(wait) = state.limiter.check(&key) else {
        return next.run(req).await;
    };
    let kind = key.kind();
    state
        .node
        .metrics
        .rate_limited
        .get_or_create(&ClientKindLabels {
            client: kind.into(),
        })
        .inc();
    let retry = retry_after_secs(wait);
    if state.limiter.should_log(&key) {
        let who = match &key {
            ClientKey::Operator(i) => format!("operator token #{}", i + 1),
            ClientKey::Agent(h) => format!("agent {h}"),
            ClientKey::Peer => "peer".into(),
            ClientKey::Address(a) => a.map_or_else(|| "unknown address".into(), |a| a.to_string()),
        };
        tracing::warn!(client = %who, %path, method = %req.method(), retry_after_secs = retry,
            "refused: over the per-client rate limit (further refusals this second are only counted)");
    }
    let RateLimit { per_sec, burst } = state.limiter.limit;
    let mut resp = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        codes::RATE_LIMITED,
        format!(
            "too many requests from this client (limit {per_sec}/s, burst {burst}); \
             retry in {retry} s"
        ),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn limited_paths() {
        let cases = [
            ("/v1/health", false),
            ("/raft/append", false),
            ("/raft/vote", false),
            ("/v1/vms", true),
            ("/v1/hosts/h1/heartbeat", true),
            ("/metrics", true),
            ("/raftish", true),
            ("/nope", true),
        ];
        for (path, want) in cases {
            assert_eq!(is_limited(path), want, "{path}");
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        let cases = [
            (Duration::ZERO, 1),
            (Duration::from_millis(1), 1),
            (Duration::from_millis(1000), 1),
            (Duration::from_millis(1001), 2),
            (Duration::from_secs(7), 7),
        ];
        for (wait, want) in cases {
            assert_eq!(retry_after_secs(wait), want, "{wait:?}");
        }
    }

    #[test]
    fn keys_without_tokens_are_addresses() {
        let ip: IpAddr = [127, 0, 0, 2].into();
        assert_eq!(
            client_key(None, Some("whatever-token-0001"), Some(ip)),
            ClientKey::Address(Some(ip))
        );
        assert_eq!(client_key(None, None, None), ClientKey::Address(None));
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let n = |v| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
        let l = ClientLimiter::new(RateLimit {
            per_sec: n(1),
            burst: n(3),
        });
        let a = ClientKey::Operator(0);
        let b = ClientKey::Agent("h1".into());
        for _ in 0..3 {
            assert!(l.check(&a).is_ok());
        }
        let wait = l.check(&a).err();
        assert!(
            wait.is_some_and(|w| w <= Duration::from_secs(1)),
            "{wait:?}"
        );
        assert!(l.check(&b).is_ok(), "another client is not affected");
        assert!(l.check(&ClientKey::Operator(1)).is_ok());
    }
}
