//! The agent's own HTTP API, which the control plane calls on behalf of operators (as Nomad's
//! servers forward alloc-log requests to the client running the alloc).
//!
//! `GET /v1/vms/{name}/logs?lines=N&follow=BOOL` runs `journalctl` for the VM's unit in this
//! host's namespaces and streams its entries as NDJSON [`LogLine`]s; the `journalctl` process
//! dies with the response (when the client goes away). Only VM names are accepted, so only
//! `blixard-vm-*` units are read ([`crate::journal`]).
//!
//! A caller must present the host's agent token (`Authorization: Bearer …`, compared in
//! constant time). An agent without a token serves only on loopback (the configuration
//! refuses anything else). With `api_tls_cert_file` and `api_tls_key_file` it serves HTTPS
//! ([`crate::api_tls`]); otherwise plain HTTP, for loopback or a trusted network.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use blixard_api::types::codes;
use blixard_api::{ErrorBody, ErrorDetail, DEFAULT_LOG_LINES};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::journal::{self, Manager};

/// Errors of starting the API.
#[derive(Debug, thiserror::Error)]
pub enum AgentApiError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the agent API's certificate")]
    Tls(#[from] blixard_api::tls_server::ServerTlsError),
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The host's agent token; `None` only on a loopback listener.
    token: Option<Arc<str>>,
    /// The `journalctl` to run (the agent config's `journalctl`).
    journalctl: Arc<str>,
    /// The manager that runs the VM units.
    manager: Manager,
}

impl ApiState {
    pub fn new(token: Option<String>, journalctl: &std::path::Path, manager: Manager) -> Self {
        ApiState {
            token: token.map(Arc::from),
            journalctl: Arc::from(journalctl.to_string_lossy().as_ref()),
            manager,
        }
    }
}

/// A bound listener and its URL, ready to [`serve`].
pub struct Bound {
    pub listener: tokio::net::TcpListener,
    /// With a certificate: HTTPS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub url: String,
}

/// Binds `addr` (e.g. `127.0.0.1:0`), with HTTPS when `tls` names a certificate and key; the
/// URL names the bound port.
pub async fn bind(
    addr: &str,
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Bound, AgentApiError> {
    let tls = match tls {
        Some((cert, key)) => Some(blixard_api::tls_server::acceptor(cert, key)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentApiError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local: SocketAddr = listener
        .local_addr()
        .map_err(|source| AgentApiError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    Ok(Bound {
        listener,
        tls,
        url: format!("{scheme}://{local}"),
    })
}

/// Serves the API on `bound` until the task is aborted.
pub async fn serve(bound: Bound, state: ApiState) {
    let result = match bound.tls {
        Some(acceptor) => {
            let listener = blixard_api::tls_server::TlsListener {
                tcp: bound.listener,
                acceptor,
            };
            axum::serve(listener, router(state)).await
        }
        None => axum::serve(bound.listener, router(state)).await,
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "agent API stopped");
    }
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/vms/{name}/logs", get(logs))
        .fallback(|| async { error(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message: message.into(),
        },
    };
    (status, Json(body)).into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(token) = state.token.as_deref() else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        tracing::warn!(path = %req.uri().path(), "agent API refused: missing or wrong token");
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            codes::UNAUTHENTICATED,
            "the host's agent token is required",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    next.run(req).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    lines: Option<u32>,
    follow: Option<bool>,
}

async fn logs(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                codes::INVALID_ARGUMENT,
                e.body_text(),
            )
        }
    };
    let lines = q.lines.unwrap_or(DEFAULT_LOG_LINES);
    let follow = q.follow.unwrap_or(false);
    let args = match journal::journalctl_args(&name, lines, follow, state.manager) {
        Ok(a) => a,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                codes::INVALID_ARGUMENT,
                e.to_string(),
            )
        }
    };
    let mut child = match tokio::process::Command::new(&*state.journalctl)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot run journalctl");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
                format!("cannot run journalctl: {e}"),
            );
        }
    };
    let Some(stdout) = child.stdout.take() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            "journalctl has no output pipe",
        );
    };
    tracing::debug!(vm = %name, lines, follow, "streaming logs");
    // The child lives in the stream: when the response is dropped (the client went away),
    // `kill_on_drop` ends journalctl.
    let reader = BufReader::new(stdout).lines();
    let stream = futures::stream::unfold((child, reader), |(child, mut reader)| async move {
        loop {
            match reader.next_line().await {
                Ok(Some(line)) => match journal::parse_entry(&line) {
                    Ok(Some(entry)) => {
                        let mut out = serde_json::to_vec(&entry).unwrap_or_default();
                        out.push(b'\n');
                        return Some((Ok::<_, std::io::Error>(Bytes::from(out)), (child, reader)));
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "skipping a journal line");
                        continue;
                    }
                },
                Ok(None) => return None,
                Err(e) => return Some((Err(e), (child, reader))),
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn state(token: Option<&str>, journalctl: &str) -> ApiState {
        ApiState {
            token: token.map(Arc::from),
            journalctl: Arc::from(journalctl),
            manager: Manager::System,
        }
    }

    async fn call(s: ApiState, uri: &str, token: Option<&str>) -> (StatusCode, String) {
        let mut req = axum::http::Request::get(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Body::empty())
            .unwrap_or_else(|e| panic!("request: {e}"));
        let resp = router(s)
            .oneshot(req)
            .await
            .unwrap_or_else(|e| panic!("oneshot: {e}"));
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap_or_else(|e| panic!("body: {e}"));
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A stand-in `journalctl` that prints canned JSON entries (the real one is exercised by
    /// the integration tests against a real host's journal).
    fn fake_journalctl(dir: &std::path::Path) -> String {
        let p = dir.join("journalctl");
        std::fs::write(
            &p,
            "#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n\
             echo '{\"__REALTIME_TIMESTAMP\":\"1\",\"MESSAGE\":\"hello\"}'\n\
             echo 'garbage'\n\
             echo '{\"__REALTIME_TIMESTAMP\":\"2\",\"MESSAGE\":\"Started.\",\"UNIT\":\"u\"}'\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        p.display().to_string()
    }

    #[tokio::test]
    async fn logs_route_table() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let j = fake_journalctl(dir.path());
        let tok = "agent-token-h1-for-tests-0001";
        let cases = [
            ("/v1/vms/web/logs", Some(tok), StatusCode::OK),
            ("/v1/vms/web/logs", None, StatusCode::UNAUTHORIZED),
            (
                "/v1/vms/web/logs",
                Some("agent-token-h1-for-tests-0002"),
                StatusCode::UNAUTHORIZED,
            ),
            ("/v1/vms/web/logs", Some("x"), StatusCode::UNAUTHORIZED),
            (
                "/v1/vms/ssh.service/logs",
                Some(tok),
                StatusCode::BAD_REQUEST,
            ),
            (
                "/v1/vms/web/logs?lines=0",
                Some(tok),
                StatusCode::BAD_REQUEST,
            ),
            (
                "/v1/vms/web/logs?lines=10001",
                Some(tok),
                StatusCode::BAD_REQUEST,
            ),
            (
                "/v1/vms/web/logs?unit=ssh",
                Some(tok),
                StatusCode::BAD_REQUEST,
            ),
            ("/v1/other", Some(tok), StatusCode::NOT_FOUND),
        ];
        for (uri, t, want) in cases {
            let (status, body) = call(state(Some(tok), &j), uri, t).await;
            assert_eq!(status, want, "{uri} {t:?}: {body}");
            if status != StatusCode::OK {
                assert!(body.contains("\"error\""), "{uri}: {body}");
            }
        }
        let (status, body) = call(state(None, &j), "/v1/vms/web/logs?lines=3", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            "{\"ts_us\":1,\"source\":\"console\",\"message\":\"hello\"}\n\
             {\"ts_us\":2,\"source\":\"unit\",\"message\":\"Started.\"}\n"
        );
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap_or_default();
        assert_eq!(
            args.trim(),
            "--unit blixard-vm-web.service --output json --all --lines 3 --no-pager --quiet"
        );
    }
}
