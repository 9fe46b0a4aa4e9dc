//! Handlers of the client API under `/v1/`. Each one extracts, validates into a command or a
//! read, awaits the node, and maps the outcome; nothing else.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use blixard_api::types::codes;
use blixard_api::{
    validate, AddMember, Assignment, Assignments, ClusterStatus, DesiredState, Health, Host,
    HostRegistration, Member, Vm, VmSpec, VmStatusReport,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::ApiError;
use crate::node::ControlNode;
use crate::state_machine::{Command, Response as SmResponse};

/// Largest client request body.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Longest long-poll a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

type Node = State<Arc<ControlNode>>;

/// `Json<T>` whose rejections are API errors.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

pub fn routes() -> Router<Arc<ControlNode>> {
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/members", get(list_members).post(add_member))
        .route(
            "/v1/cluster/members/{id}",
            axum::routing::delete(remove_member),
        )
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/hosts", get(list_hosts).post(register_host))
        .route("/v1/hosts/{id}", get(get_host))
        .route("/v1/hosts/{id}/heartbeat", post(heartbeat))
        .route("/v1/hosts/{id}/assignments", get(assignments))
        .route("/v1/hosts/{id}/vms/{name}/status", put(report_status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::INVALID_ARGUMENT,
        "method not allowed",
    )
}

fn expect_vm(r: SmResponse) -> Result<Vm, ApiError> {
    match r {
        SmResponse::Vm(vm) => Ok(*vm),
        SmResponse::Error(e) => Err(e.into()),
        other => Err(unexpected(other)),
    }
}

fn expect_host(r: SmResponse) -> Result<Host, ApiError> {
    match r {
        SmResponse::Host(h) => Ok(*h),
        SmResponse::Error(e) => Err(e.into()),
        other => Err(unexpected(other)),
    }
}

fn unexpected(r: SmResponse) -> ApiError {
    tracing::error!(response = ?r, "unexpected state machine response");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        codes::INTERNAL,
        "internal error",
    )
}

async fn health(State(node): Node) -> Response {
    let leader = node.leader();
    let body = Health {
        status: if leader.is_some() { "ok" } else { "no-leader" }.into(),
        node_id: node.id,
        leader,
    };
    let status = if leader.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(node): Node) -> Response {
    node.refresh_gauges().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        node.metrics.encode(),
    )
        .into_response()
}

async fn cluster_status(State(node): Node) -> Json<ClusterStatus> {
    Json(node.status().await)
}

async fn list_members(State(node): Node) -> Json<Vec<Member>> {
    Json(node.members())
}

async fn add_member(
    State(node): Node,
    ApiJson(m): ApiJson<AddMember>,
) -> Result<Json<Vec<Member>>, ApiError> {
    validate::add_member(&m)?;
    if node.members().iter().any(|x| x.id == m.id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            codes::ALREADY_EXISTS,
            format!("node {} is already a member", m.id),
        ));
    }
    Ok(Json(node.add_member(m).await?))
}

async fn remove_member(
    State(node): Node,
    Path(id): Path<String>,
) -> Result<Json<Vec<Member>>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("{id:?} is not a node id")))?;
    if !node.members().iter().any(|m| m.id == id) {
        return Err(ApiError::not_found(format!("node {id} is not a member")));
    }
    Ok(Json(node.remove_member(id).await?))
}

async fn create_vm(
    State(node): Node,
    ApiJson(spec): ApiJson<VmSpec>,
) -> Result<impl IntoResponse, ApiError> {
    validate::vm_spec(&spec)?;
    let vm = expect_vm(node.propose(Command::CreateVm { spec, now_ms: 0 }).await?)?;
    Ok((StatusCode::CREATED, Json(vm)))
}

async fn list_vms(State(node): Node) -> Result<Json<Vec<Vm>>, ApiError> {
    node.read_barrier().await?;
    Ok(Json(node.state.read(|s| s.vms.values().cloned().collect())))
}

async fn get_vm(State(node): Node, Path(name): Path<String>) -> Result<Json<Vm>, ApiError> {
    validate::dns_label("name", &name)?;
    node.read_barrier().await?;
    node.state
        .read(|s| s.vms.get(&name).cloned())
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("vm {name} not found")))
}

async fn delete_vm(State(node): Node, Path(name): Path<String>) -> Result<Json<Vm>, ApiError> {
    validate::dns_label("name", &name)?;
    Ok(Json(expect_vm(
        node.propose(Command::DeleteVm { name, now_ms: 0 }).await?,
    )?))
}

async fn set_desired(
    node: &ControlNode,
    name: String,
    desired: DesiredState,
) -> Result<Json<Vm>, ApiError> {
    validate::dns_label("name", &name)?;
    Ok(Json(expect_vm(
        node.propose(Command::SetDesired {
            name,
            desired,
            now_ms: 0,
        })
        .await?,
    )?))
}

async fn start_vm(State(node): Node, Path(name): Path<String>) -> Result<Json<Vm>, ApiError> {
    set_desired(&node, name, DesiredState::Running).await
}

async fn stop_vm(State(node): Node, Path(name): Path<String>) -> Result<Json<Vm>, ApiError> {
    set_desired(&node, name, DesiredState::Stopped).await
}

async fn register_host(
    State(node): Node,
    ApiJson(registration): ApiJson<HostRegistration>,
) -> Result<Json<Host>, ApiError> {
    validate::host_registration(&registration)?;
    Ok(Json(expect_host(
        node.propose(Command::RegisterHost {
            registration,
            now_ms: 0,
        })
        .await?,
    )?))
}

async fn list_hosts(State(node): Node) -> Result<Json<Vec<Host>>, ApiError> {
    node.read_barrier().await?;
    Ok(Json(
        node.state.read(|s| s.hosts.values().cloned().collect()),
    ))
}

async fn get_host(State(node): Node, Path(id): Path<String>) -> Result<Json<Host>, ApiError> {
    validate::dns_label("id", &id)?;
    node.read_barrier().await?;
    node.state
        .read(|s| s.hosts.get(&id).cloned())
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("host {id} not found")))
}

async fn heartbeat(State(node): Node, Path(id): Path<String>) -> Result<Json<Host>, ApiError> {
    validate::dns_label("id", &id)?;
    Ok(Json(expect_host(
        node.propose(Command::Heartbeat {
            host: id,
            now_ms: 0,
        })
        .await?,
    )?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    wait_index: Option<u64>,
    wait_ms: Option<u64>,
}

async fn assignments(
    State(node): Node,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Assignments>, ApiError> {
    let Query(q) = query?;
    validate::dns_label("id", &id)?;
    match q.wait_index {
        None => node.read_barrier().await?,
        Some(after) => {
            let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000)).min(MAX_WAIT);
            let mut rx = node.state.subscribe();
            let deadline = tokio::time::Instant::now() + wait;
            while node.state.read(|s| s.host_revision(&id)) <= after {
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
        }
    }
    let index = node.state.applied_index();
    node.state
        .read(|s| {
            s.hosts.get(&id)?;
            let vms = s
                .assigned_to(&id)
                .map(|vm| Assignment {
                    spec: vm.spec.clone(),
                    desired: vm.desired,
                    generation: vm.generation,
                })
                .collect();
            Some(Assignments {
                host: id.clone(),
                index,
                vms,
            })
        })
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("host {id} not registered")))
}

async fn report_status(
    State(node): Node,
    Path((id, name)): Path<(String, String)>,
    ApiJson(report): ApiJson<VmStatusReport>,
) -> Result<Json<Vm>, ApiError> {
    validate::dns_label("id", &id)?;
    validate::dns_label("name", &name)?;
    if let Some(r) = &report.reason {
        if r.len() > 1024 {
            return Err(ApiError::invalid("reason: must be at most 1024 characters"));
        }
    }
    let cmd = Command::ReportVmStatus {
        host: id,
        name,
        report,
        now_ms: 0,
    };
    Ok(Json(expect_vm(node.propose(cmd).await?)?))
}
