//! Bearer-token authentication and scoping.
//!
//! Three kinds of token, each read from a file (e.g. through `LoadCredential=`), never from
//! the command line:
//! - operator tokens (one per line) may do everything on `/v1/`;
//! - agent tokens (`HOST_ID TOKEN` per line) may only register, heartbeat, read assignments
//!   and report VMs for their own host;
//! - the peer token (shared by the control nodes) guards `/raft/`.
//!
//! `/v1/health` is always open; `/metrics` is open when configured so. Refusals are 401
//! (no or unknown token) or 403 (a token acting outside its scope), and are logged.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use blixard_api::types::codes;

use super::error::ApiError;
use crate::node::ControlNode;

/// Shortest token accepted from a file.
const MIN_TOKEN_LEN: usize = 16;

/// Errors reading token files.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Format {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: holds no token")]
    Empty { path: String },
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Operator,
    Agent(String),
    Peer,
}

impl Principal {
    /// Whether this caller may act for host `id` (register, heartbeat, report).
    pub fn may_act_for_host(&self, id: &str) -> bool {
        match self {
            Principal::Operator => true,
            Principal::Agent(h) => h == id,
            Principal::Peer => false,
        }
    }
}

/// The tokens a node accepts. `None` as a whole means authentication is off.
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    operators: Vec<String>,
    /// token → host id
    agents: BTreeMap<String, String>,
    peer: Option<String>,
    metrics_open: bool,
}

fn lines(path: &Path) -> Result<Vec<(usize, String)>, AuthError> {
    let p = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: p, source })?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect())
}

fn check_token(path: &Path, line: usize, t: &str) -> Result<(), AuthError> {
    if t.len() < MIN_TOKEN_LEN || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AuthError::Format {
            path: path.display().to_string(),
            line,
            message: format!("tokens are at least {MIN_TOKEN_LEN} characters without spaces"),
        });
    }
    Ok(())
}

/// Reads a file of one token per line.
pub fn read_token_list(path: &Path) -> Result<Vec<String>, AuthError> {
    let mut out = Vec::new();
    for (n, l) in lines(path)? {
        check_token(path, n, &l)?;
        out.push(l);
    }
    if out.is_empty() {
        return Err(AuthError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(out)
}

impl Tokens {
    /// Loads operator, agent and peer tokens.
    pub fn load(
        operators: &Path,
        agents: Option<&Path>,
        peer: &Path,
        metrics_open: bool,
    ) -> Result<Tokens, AuthError> {
        let mut agent_map = BTreeMap::new();
        if let Some(a) = agents {
            for (n, l) in lines(a)? {
                let mut parts = l.split_whitespace();
                let (Some(host), Some(token), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(AuthError::Format {
                        path: a.display().to_string(),
                        line: n,
                        message: "expected HOST_ID TOKEN".into(),
                    });
                };
                if blixard_api::validate::dns_label("host", host).is_err() {
                    return Err(AuthError::Format {
                        path: a.display().to_string(),
                        line: n,
                        message: format!("{host:?} is not a host id"),
                    });
                }
                check_token(a, n, token)?;
                agent_map.insert(token.to_string(), host.to_string());
            }
        }
        let peer_tokens = read_token_list(peer)?;
        Ok(Tokens {
            operators: read_token_list(operators)?,
            agents: agent_map,
            peer: peer_tokens.into_iter().next(),
            metrics_open,
        })
    }

    /// The peer token, for this node's own calls to its peers.
    pub fn peer_token(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// The agent token of host `id`, which the control plane presents to that host's agent.
    pub fn agent_token(&self, id: &str) -> Option<&str> {
        self.agents
            .iter()
            .find(|(_, host)| host.as_str() == id)
            .map(|(t, _)| t.as_str())
    }

    /// Who presents `token`, if anyone. Comparisons take the same time whatever matches.
    pub fn identify(&self, token: &str) -> Option<Principal> {
        self.identify_client(token).map(|(p, _)| p)
    }

    /// Who presents `token`, and which of the operator tokens it is (0 for other principals):
    /// each operator token is its own client for rate limiting.
    pub fn identify_client(&self, token: &str) -> Option<(Principal, usize)> {
        let mut found = None;
        for (i, t) in self.operators.iter().enumerate() {
            if constant_time_eq(t, token) {
                found = Some((Principal::Operator, i));
            }
        }
        for (t, host) in &self.agents {
            if constant_time_eq(t, token) {
                found = Some((Principal::Agent(host.clone()), 0));
            }
        }
        if let Some(p) = &self.peer {
            if constant_time_eq(p, token) {
                found = Some((Principal::Peer, 0));
            }
        }
        found
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// What a route needs from its caller.
#[derive(Debug, PartialEq, Eq)]
enum Need {
    Nothing,
    Peer,
    /// An operator, or the agent of this host.
    Host(String),
    /// An operator or an agent; the handler checks the host in the body.
    OperatorOrAgent,
    Operator,
    /// `/metrics` when not open: an operator or a peer.
    Observer,
}

fn need(method: &axum::http::Method, path: &str, metrics_open: bool) -> Need {
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match seg.as_slice() {
        // The health check and the API's description are public.
        ["v1", "health"] | ["v1", "openapi.json"] => Need::Nothing,
        ["metrics"] if metrics_open => Need::Nothing,
        ["metrics"] => Need::Observer,
        ["raft", ..] => Need::Peer,
        ["v1", "hosts"] if method == axum::http::Method::POST => Need::OperatorOrAgent,
        ["v1", "hosts", id, "heartbeat"]
        | ["v1", "hosts", id, "assignments"]
        | ["v1", "hosts", id, "vms", _, "status"] => Need::Host(id.to_string()),
        _ => Need::Operator,
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let code = if status == StatusCode::UNAUTHORIZED {
        codes::UNAUTHENTICATED
    } else {
        codes::FORBIDDEN
    };
    let mut r = ApiError::new(status, code, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// The bearer token a request presents, if any.
pub fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Checks the caller against the route and puts its [`Principal`] into the request.
pub async fn require(
    State(node): State<Arc<ControlNode>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(tokens) = node.tokens.as_ref() else {
        req.extensions_mut().insert(Principal::Operator);
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    let need = need(req.method(), &path, tokens.metrics_open);
    if need == Need::Nothing {
        return next.run(req).await;
    }
    let presented = bearer(&req);
    let Some(principal) = presented.and_then(|t| tokens.identify(t)) else {
        tracing::warn!(%path, method = %req.method(), "refused: missing or unknown token");
        return refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    };
    let allowed = match (&need, &principal) {
        (Need::Nothing, _) => true,
        (Need::Peer, p) => *p == Principal::Peer,
        (Need::Observer, p) => matches!(p, Principal::Operator | Principal::Peer),
        (Need::Operator, p) => *p == Principal::Operator,
        (Need::OperatorOrAgent, p) => matches!(p, Principal::Operator | Principal::Agent(_)),
        (Need::Host(id), p) => p.may_act_for_host(id),
    };
    if !allowed {
        tracing::warn!(%path, method = %req.method(), principal = ?principal, "refused: outside the token's scope");
        return refuse(StatusCode::FORBIDDEN, "this token may not do that");
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Refuses an agent acting for another host than its own (for routes whose host is in the
/// body).
pub fn check_host(principal: Option<&Principal>, id: &str) -> Result<(), ApiError> {
    match principal {
        Some(p) if !p.may_act_for_host(id) => {
            tracing::warn!(host = %id, principal = ?p, "refused: agent acting for another host");
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                codes::FORBIDDEN,
                "this token may not act for that host",
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn route_needs() {
        let cases = [
            (Method::GET, "/v1/health", Need::Nothing),
            (Method::GET, "/metrics", Need::Observer),
            (Method::GET, "/v1/openapi.json", Need::Nothing),
            (Method::POST, "/raft/append", Need::Peer),
            (Method::POST, "/v1/hosts", Need::OperatorOrAgent),
            (Method::GET, "/v1/hosts", Need::Operator),
            (
                Method::POST,
                "/v1/hosts/h1/heartbeat",
                Need::Host("h1".into()),
            ),
            (
                Method::GET,
                "/v1/hosts/h1/assignments",
                Need::Host("h1".into()),
            ),
            (
                Method::PUT,
                "/v1/hosts/h1/vms/a/status",
                Need::Host("h1".into()),
            ),
            (Method::POST, "/v1/hosts/h1/drain", Need::Operator),
            (Method::POST, "/v1/vms", Need::Operator),
            (Method::GET, "/v1/vms/a/logs", Need::Operator),
            (Method::GET, "/v1/cluster/status", Need::Operator),
        ];
        for (m, p, want) in cases {
            assert_eq!(need(&m, p, false), want, "{m} {p}");
        }
        assert_eq!(need(&Method::GET, "/metrics", true), Need::Nothing);
    }

    #[test]
    fn identify_and_scope() {
        let t = Tokens {
            operators: vec!["operator-token-0001".into()],
            agents: BTreeMap::from([("agent-token-h1-0001".to_string(), "h1".to_string())]),
            peer: Some("peer-token-000000001".into()),
            metrics_open: false,
        };
        assert_eq!(t.identify("operator-token-0001"), Some(Principal::Operator));
        assert_eq!(
            t.identify("agent-token-h1-0001"),
            Some(Principal::Agent("h1".into()))
        );
        assert_eq!(t.identify("peer-token-000000001"), Some(Principal::Peer));
        assert_eq!(t.agent_token("h1"), Some("agent-token-h1-0001"));
        assert_eq!(t.agent_token("h2"), None);
        assert_eq!(t.identify("operator-token-000"), None);
        assert_eq!(t.identify(""), None);
        assert!(Principal::Agent("h1".into()).may_act_for_host("h1"));
        assert!(!Principal::Agent("h1".into()).may_act_for_host("h2"));
        assert!(
            constant_time_eq("abc", "abc")
                && !constant_time_eq("abc", "abd")
                && !constant_time_eq("abc", "abcd")
        );
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let w = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap_or_else(|e| panic!("{e}"));
            p
        };
        let ops = w("ops", "# operators\noperator-token-0001\n\n");
        let agents = w("agents", "h1 agent-token-h1-0001\n");
        let peer = w("peer", "peer-token-000000001\n");
        assert!(Tokens::load(&ops, Some(&agents), &peer, false).is_ok());
        let short = w("short", "abc\n");
        assert!(matches!(
            Tokens::load(&short, None, &peer, false),
            Err(AuthError::Format { .. })
        ));
        let bad_agents = w("bad", "H_1 agent-token-h1-0001\n");
        assert!(Tokens::load(&ops, Some(&bad_agents), &peer, false).is_err());
        let empty = w("empty", "# nothing\n");
        assert!(matches!(
            Tokens::load(&ops, None, &empty, false),
            Err(AuthError::Empty { .. })
        ));
        assert!(Tokens::load(&dir.path().join("missing"), None, &peer, false).is_err());
    }
}
