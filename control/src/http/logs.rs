//! `GET /v1/vms/{name}/logs`: a VM's console and unit lines, from the journal of the host that
//! runs it. Any control node serves it by forwarding to that host's agent (as Nomad's servers
//! forward alloc logs to the client running the alloc) and streaming the agent's NDJSON back.
//!
//! [`target`] picks the agent from the cluster state (pure, table-tested); the handler only
//! validates, resolves, proxies and maps failures to errors that name the host.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use blixard_api::types::codes;
use blixard_api::{validate, ErrorBody, HostStatus, DEFAULT_LOG_LINES, MAX_LOG_LINES};
use serde::Deserialize;

use super::error::ApiError;
use crate::node::ControlNode;
use crate::state_machine::ClusterState;

/// How long the agent may take to start answering (a read without `follow` also ends
/// within [`READ_TIMEOUT`]).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole of a read without `follow`.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The query of `GET /v1/vms/{name}/logs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    pub lines: Option<u32>,
    pub follow: Option<bool>,
}

/// Where a VM's logs are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub agent_url: String,
}

/// The agent that can serve `name`'s logs, or the error that says why none can.
pub fn target(s: &ClusterState, name: &str) -> Result<Target, ApiError> {
    let vm = s
        .vms
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("vm {name} not found")))?;
    let Some(host_id) = vm.host.as_deref() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            codes::CONFLICT,
            format!("vm {name} is not placed on any host, so it has no logs yet"),
        ));
    };
    let unavailable = |m: String| ApiError::new(StatusCode::BAD_GATEWAY, codes::UNAVAILABLE, m);
    let host = s
        .hosts
        .get(host_id)
        .ok_or_else(|| unavailable(format!("host {host_id} of vm {name} is not registered")))?;
    if host.status == HostStatus::Down {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::UNAVAILABLE,
            format!("host {host_id} of vm {name} is down; its logs are unreachable"),
        ));
    }
    let agent_url = host.agent_url.clone().ok_or_else(|| {
        unavailable(format!(
            "the agent of host {host_id} serves no API (api_listen is not set), so vm {name}'s logs cannot be read"
        ))
    })?;
    Ok(Target {
        host: host_id.to_string(),
        agent_url,
    })
}

fn bad_gateway(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, codes::UNAVAILABLE, message)
}

/// The handler: validate, resolve the host, proxy the agent's stream.
#[utoipa::path(get, path = "/v1/vms/{name}/logs", tag = "vms",
    params(("name" = String, Path, description = "the VM's name (a DNS label)"), LogsQuery),
    responses((status = 200, body = blixard_api::LogLine, content_type = "application/x-ndjson",
        description = "one LogLine per line; with follow=true, until the client hangs up"),
        super::openapi::Errors))]
pub async fn vm_logs(
    State(node): State<Arc<ControlNode>>,
    Path(name): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
    _: super::strict::NoBody,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    validate::dns_label("name", &name)?;
    let lines = q.lines.unwrap_or(DEFAULT_LOG_LINES);
    if !(1..=MAX_LOG_LINES).contains(&lines) {
        return Err(ApiError::invalid(format!(
            "lines must be between 1 and {MAX_LOG_LINES}"
        )));
    }
    let follow = q.follow.unwrap_or(false);
    node.read_barrier().await?;
    let t = node.state.read(|s| target(s, &name))?;
    let url = format!(
        "{}/v1/vms/{name}/logs?lines={lines}&follow={follow}",
        t.agent_url.trim_end_matches('/')
    );
    let mut req = node.agent_http.get(&url);
    if let Some(token) = node.tokens.as_ref().and_then(|tk| tk.agent_token(&t.host)) {
        req = req.bearer_auth(token);
    }
    if !follow {
        req = req.timeout(READ_TIMEOUT);
    }
    let resp = match tokio::time::timeout(ANSWER_TIMEOUT, req.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(host = %t.host, %url, error = %e, "agent unreachable for logs");
            return Err(bad_gateway(format!(
                "cannot reach the agent of host {} at {}: {}",
                t.host,
                t.agent_url,
                if e.is_connect() {
                    "connection failed"
                } else if e.is_timeout() {
                    "timed out"
                } else {
                    "request failed"
                }
            )));
        }
        Err(_) => {
            return Err(bad_gateway(format!(
                "the agent of host {} at {} did not answer within {}s",
                t.host,
                t.agent_url,
                ANSWER_TIMEOUT.as_secs()
            )))
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let detail = match resp.bytes().await {
            Ok(b) => serde_json::from_slice::<ErrorBody>(&b)
                .map(|e| e.error.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&b).chars().take(200).collect()),
            Err(_) => String::new(),
        };
        tracing::warn!(host = %t.host, %status, %detail, "agent refused a logs request");
        return Err(bad_gateway(format!(
            "the agent of host {} answered HTTP {}: {detail}",
            t.host,
            status.as_u16()
        )));
    }
    // Chunks pass through as they come; the stream ends at the agent's end or its first
    // error. Dropping the response (the client went away) drops the agent connection,
    // which ends the agent's journalctl.
    let stream = futures::stream::unfold(Some(resp), |resp| async move {
        let mut resp = resp?;
        match resp.chunk().await {
            Ok(Some(b)) => Some((Ok(b), Some(resp))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::tests::{host_record, running_vm};

    #[test]
    fn target_table() {
        let mut s = ClusterState::default();
        let vm = running_vm("web", "h1");
        let host = |status, url: Option<&str>| blixard_api::Host {
            agent_url: url.map(str::to_string),
            ..host_record("h1", status)
        };
        let url = Some("http://127.0.0.1:9");
        // (vm host: None = no vm, Some(None) = unplaced), host record, outcome
        type Case<'a> = (
            Option<Option<&'a str>>,
            Option<blixard_api::Host>,
            Result<(), u16>,
        );
        let cases: Vec<Case> = vec![
            (None, None, Err(404)),
            (Some(None), None, Err(409)),
            (Some(Some("h1")), None, Err(502)),
            (
                Some(Some("h1")),
                Some(host(HostStatus::Down, url)),
                Err(503),
            ),
            (Some(Some("h1")), Some(host(HostStatus::Up, None)), Err(502)),
            (Some(Some("h1")), Some(host(HostStatus::Up, url)), Ok(())),
            (
                Some(Some("h1")),
                Some(host(HostStatus::Draining, url)),
                Ok(()),
            ),
        ];
        for (vm_host, h, want) in cases {
            s.vms.clear();
            s.hosts.clear();
            if let Some(vh) = vm_host {
                let mut v = vm.clone();
                v.host = vh.map(str::to_string);
                s.vms.insert("web".into(), v);
            }
            if let Some(h) = h {
                s.hosts.insert("h1".into(), h);
            }
            match (target(&s, "web"), want) {
                (Ok(t), Ok(())) => assert_eq!(
                    t,
                    Target {
                        host: "h1".into(),
                        agent_url: "http://127.0.0.1:9".into()
                    }
                ),
                (Err(e), Err(code)) => {
                    assert_eq!(e.status.as_u16(), code, "{vm_host:?}: {}", e.message);
                    if code != 404 && code != 409 {
                        assert!(e.message.contains("host h1"), "{}", e.message);
                    }
                }
                (got, want) => panic!("{vm_host:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
