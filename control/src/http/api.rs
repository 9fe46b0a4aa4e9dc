//! Handlers of the client API under `/v1/`. Each one extracts, validates into a command or a
//! read, awaits the node, and maps the outcome; nothing else.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use blixard_api::types::codes;
use blixard_api::{
    validate, AddMember, Assignment, Assignments, ClusterStatus, DesiredState, DrainRequest,
    Events, Health, Host, HostRegistration, HostSelector, HostStatus, Member, Plan, PlanRequest,
    StateSnapshot, UpdateVm, Vm, VmSelector, VmSpec, VmState, VmStatusReport,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::openapi::Errors;
use crate::node::ControlNode;
use crate::state_machine::{Command, Response as SmResponse};

pub use super::strict::BODY_LIMIT;
use super::strict::{NoBody, NoQuery};
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

/// The `/v1/` routes and `/metrics`, and their OpenAPI description: each route is registered
/// with the `#[utoipa::path]` of its handler, so the description cannot name a route, method
/// or parameter the router does not serve.
fn documented() -> (Router<Arc<ControlNode>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(super::openapi::base())
        .routes(routes!(health))
        .routes(routes!(super::openapi::openapi_json))
        .routes(routes!(metrics))
        .routes(routes!(cluster_status))
        .routes(routes!(list_members, add_member))
        .routes(routes!(remove_member))
        .routes(routes!(list_vms, create_vm))
        .routes(routes!(get_vm, update_vm, delete_vm))
        .routes(routes!(start_vm))
        .routes(routes!(stop_vm))
        .routes(routes!(super::logs::vm_logs))
        .routes(routes!(list_hosts, register_host))
        .routes(routes!(get_host))
        .routes(routes!(heartbeat))
        .routes(routes!(drain_host))
        .routes(routes!(undrain_host))
        .routes(routes!(declare_host_gone))
        .routes(routes!(events))
        .routes(routes!(plan))
        .routes(routes!(save_snapshot, restore_snapshot))
        .routes(routes!(assignments))
        .routes(routes!(report_status))
        .split_for_parts()
}

/// The OpenAPI description of the routes [`routes`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().1
}

pub fn routes() -> Router<Arc<ControlNode>> {
    documented()
        .0
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // `bound_body` holds each route to its own limit; this only lets the largest through.
        .layer(DefaultBodyLimit::max(super::strict::SNAPSHOT_BODY_LIMIT))
        .layer(axum::middleware::from_fn(super::strict::bound_body))
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

#[utoipa::path(get, path = "/v1/health", tag = "cluster", security(()), responses((status = 200, body = Health, description = "the node knows a leader"), (status = 503, body = Health, description = "no leader known"), Errors))]
async fn health(State(node): Node, _: NoQuery, _: NoBody) -> Response {
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

#[utoipa::path(get, path = "/metrics", tag = "cluster", responses((status = 200, body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", description = "OpenMetrics 1.0 text"), Errors))]
async fn metrics(State(node): Node, _: NoQuery, _: NoBody) -> Response {
    node.refresh_gauges().await;
    (
        [(
            header::CONTENT_TYPE,
            // What `prometheus_client` (the Rust crate) writes: OpenMetrics 1.0, counters
            // named without `_total` in `# TYPE`, samples with it, ending in `# EOF`.
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.encode(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/cluster/status", tag = "cluster", responses((status = 200, body = ClusterStatus, description = "this node's view of the cluster"), Errors))]
async fn cluster_status(State(node): Node, _: NoQuery, _: NoBody) -> Json<ClusterStatus> {
    Json(node.status().await)
}

#[utoipa::path(get, path = "/v1/cluster/members", tag = "cluster", responses((status = 200, body = Vec<Member>, description = "success"), Errors))]
async fn list_members(State(node): Node, _: NoQuery, _: NoBody) -> Json<Vec<Member>> {
    Json(node.members())
}

#[utoipa::path(post, path = "/v1/cluster/members", tag = "cluster", request_body = AddMember, responses((status = 200, body = Vec<Member>, description = "the members after the change"), Errors))]
async fn add_member(
    State(node): Node,
    _: NoQuery,
    ApiJson(m): ApiJson<AddMember>,
) -> Result<Json<Vec<Member>>, ApiError> {
    validate::add_member(&m)?;
    if let Some(x) = node.members().iter().find(|x| x.addr == m.addr) {
        // Raft traffic to the new member would reach that member instead (found by
        // schemathesis: at this node's own address it brought the node down).
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            codes::CONFLICT,
            format!("{} is already the address of node {}", m.addr, x.id),
        ));
    }
    if node.members().iter().any(|x| x.id == m.id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            codes::ALREADY_EXISTS,
            format!("node {} is already a member", m.id),
        ));
    }
    Ok(Json(node.add_member(m).await?))
}

#[utoipa::path(delete, path = "/v1/cluster/members/{id}", tag = "cluster", params(("id" = u64, Path, description = "the node id")), responses((status = 200, body = Vec<Member>, description = "success"), Errors))]
async fn remove_member(
    State(node): Node,
    Path(id): Path<String>,
    _: NoQuery,
    _: NoBody,
) -> Result<Json<Vec<Member>>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("{id:?} is not a node id")))?;
    if !node.members().iter().any(|m| m.id == id) {
        return Err(ApiError::not_found(format!("node {id} is not a member")));
    }
    Ok(Json(node.remove_member(id).await?))
}

/// Optional `?expected_generation=N` of writes to one VM.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct GenerationQuery {
    expected_generation: Option<u64>,
}

type GenQuery = Result<Query<GenerationQuery>, axum::extract::rejection::QueryRejection>;

/// The `Idempotency-Key` header of a create, if any.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let k = v
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key: must be ASCII"))?;
    validate::idempotency_key(k)?;
    Ok(Some(k.to_string()))
}

#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = VmSpec, params(("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key answers the VM it created")), responses((status = 201, body = Vm, description = "created"), (status = 200, body = Vm, description = "created before under the same Idempotency-Key"), Errors))]
async fn create_vm(
    State(node): Node,
    _: NoQuery,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<VmSpec>,
) -> Result<impl IntoResponse, ApiError> {
    validate::vm_spec(&spec)?;
    let idempotency_key = idempotency_key(&headers)?;
    match node
        .propose(Command::CreateVm {
            spec,
            now_ms: 0,
            idempotency_key,
            // The leader places it when it admits it (`admission`).
            placement: None,
        })
        .await?
    {
        SmResponse::Existing(vm) => Ok((StatusCode::OK, Json(*vm))),
        other => Ok((StatusCode::CREATED, Json(expect_vm(other)?))),
    }
}

#[utoipa::path(put, path = "/v1/vms/{name}", tag = "vms", request_body = UpdateVm, params(("name" = String, Path, description = "the VM's name (a DNS label)")), responses((status = 200, body = Vm, description = "success"), Errors))]
async fn update_vm(
    State(node): Node,
    Path(name): Path<String>,
    _: NoQuery,
    ApiJson(update): ApiJson<UpdateVm>,
) -> Result<Json<Vm>, ApiError> {
    validate::vm_spec(&update.spec)?;
    if update.spec.name != name {
        return Err(ApiError::invalid(
            "spec.name: must match the VM in the path",
        ));
    }
    let cmd = Command::UpdateVm {
        spec: update.spec,
        expected_generation: update.expected_generation,
        now_ms: 0,
    };
    Ok(Json(expect_vm(node.propose(cmd).await?)?))
}

/// Paging and filters of `GET /v1/vms`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct VmListQuery {
    /// Most VMs in the answer (1 to 10000); without it, every selected VM. When more are left,
    /// the `Blixard-Continue` response header holds the token for the next page.
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u32>,
    /// The previous page's `Blixard-Continue` token: the page goes on after it.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    continue_token: Option<String>,
    /// Only VMs assigned to this host.
    host: Option<String>,
    /// Only VMs in this state.
    state: Option<VmState>,
    /// Only VMs with every one of these labels: `k=v` pairs separated by commas.
    label: Option<String>,
}

/// Paging and filters of `GET /v1/hosts`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct HostListQuery {
    /// Most hosts in the answer (1 to 10000); without it, every selected host. When more are
    /// left, the `Blixard-Continue` response header holds the token for the next page.
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u32>,
    /// The previous page's `Blixard-Continue` token: the page goes on after it.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    continue_token: Option<String>,
    /// Only hosts with this status.
    status: Option<HostStatus>,
    /// Only hosts with every one of these labels: `k=v` pairs separated by commas.
    label: Option<String>,
}

/// A page's size and where it starts, checked.
fn page_bounds(
    limit: Option<u32>,
    token: &Option<String>,
) -> Result<(usize, Option<String>), ApiError> {
    let limit = match limit {
        Some(l) => validate::page_limit(l)?,
        None => usize::MAX,
    };
    if let Some(t) = token {
        validate::dns_label("continue", t)?;
    }
    Ok((limit, token.clone()))
}

/// A JSON list with the next page's token in its header.
fn page_response<T: serde::Serialize>(page: crate::listing::Page<T>) -> Response {
    let mut resp = Json(page.items).into_response();
    if let Some(next) = page.next {
        if let Ok(v) = axum::http::HeaderValue::from_str(&next) {
            resp.headers_mut().insert(blixard_api::CONTINUE_HEADER, v);
        }
    }
    resp
}

#[utoipa::path(get, path = "/v1/vms", tag = "vms", params(VmListQuery), responses((status = 200, body = Vec<Vm>, description = "the selected VMs in name order", headers(("Blixard-Continue" = String, description = "present when more VMs are left: the `continue` of the next page"))), Errors))]
async fn list_vms(
    State(node): Node,
    query: Result<Query<VmListQuery>, axum::extract::rejection::QueryRejection>,
    _: NoBody,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let (limit, token) = page_bounds(q.limit, &q.continue_token)?;
    if let Some(h) = &q.host {
        validate::dns_label("host", h)?;
    }
    let sel = VmSelector {
        host: q.host,
        state: q.state,
        labels: match &q.label {
            Some(l) => validate::label_selector("label", l)?,
            None => Default::default(),
        },
    };
    node.read_barrier().await?;
    let page = node
        .state
        .read(|s| crate::listing::vms(s, &sel, token.as_deref(), limit));
    Ok(page_response(page))
}

#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path, description = "the VM's name (a DNS label)")), responses((status = 200, body = Vm, description = "success"), Errors))]
async fn get_vm(
    State(node): Node,
    Path(name): Path<String>,
    _: NoQuery,
    _: NoBody,
) -> Result<Json<Vm>, ApiError> {
    validate::dns_label("name", &name)?;
    node.read_barrier().await?;
    node.state
        .read(|s| s.vms.get(&name).cloned())
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("vm {name} not found")))
}

#[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path, description = "the VM's name (a DNS label)"), GenerationQuery), responses((status = 200, body = Vm, description = "the VM as deleted"), Errors))]
async fn delete_vm(
    State(node): Node,
    Path(name): Path<String>,
    q: GenQuery,
    _: NoBody,
) -> Result<Json<Vm>, ApiError> {
    let Query(q) = q?;
    validate::dns_label("name", &name)?;
    let cmd = Command::DeleteVm {
        name,
        now_ms: 0,
        expected_generation: q.expected_generation,
    };
    Ok(Json(expect_vm(node.propose(cmd).await?)?))
}

async fn set_desired(
    node: &ControlNode,
    name: String,
    desired: DesiredState,
    q: GenQuery,
) -> Result<Json<Vm>, ApiError> {
    let Query(q) = q?;
    validate::dns_label("name", &name)?;
    let cmd = Command::SetDesired {
        name,
        desired,
        now_ms: 0,
        expected_generation: q.expected_generation,
    };
    Ok(Json(expect_vm(node.propose(cmd).await?)?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/start", tag = "vms", params(("name" = String, Path, description = "the VM's name (a DNS label)"), GenerationQuery), responses((status = 200, body = Vm, description = "success"), Errors))]
async fn start_vm(
    State(node): Node,
    Path(name): Path<String>,
    q: GenQuery,
    _: NoBody,
) -> Result<Json<Vm>, ApiError> {
    set_desired(&node, name, DesiredState::Running, q).await
}

#[utoipa::path(post, path = "/v1/vms/{name}/stop", tag = "vms", params(("name" = String, Path, description = "the VM's name (a DNS label)"), GenerationQuery), responses((status = 200, body = Vm, description = "success"), Errors))]
async fn stop_vm(
    State(node): Node,
    Path(name): Path<String>,
    q: GenQuery,
    _: NoBody,
) -> Result<Json<Vm>, ApiError> {
    set_desired(&node, name, DesiredState::Stopped, q).await
}

#[utoipa::path(post, path = "/v1/hosts/{id}/drain", tag = "hosts", params(("id" = String, Path, description = "the host's id (a DNS label)")), request_body(content = Option<DrainRequest>, description = "optional: without it the deadline is 300 s"), responses((status = 200, body = Host, description = "success"), Errors))]
async fn drain_host(
    State(node): Node,
    Path(id): Path<String>,
    _: NoQuery,
    body: axum::body::Bytes,
) -> Result<Json<Host>, ApiError> {
    validate::dns_label("id", &id)?;
    // The body is optional: no body means the default deadline.
    let req: DrainRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DrainRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(e.to_string()))?
    };
    let secs = req.deadline_secs.unwrap_or(300);
    if secs == 0 || secs > 7 * 86_400 {
        return Err(ApiError::invalid(
            "deadline_secs: must be between 1 and 604800",
        ));
    }
    let deadline_ms = crate::node::now_ms() + secs * 1000;
    Ok(Json(expect_host(
        node.propose(Command::DrainHost {
            host: id,
            deadline_ms,
            now_ms: 0,
        })
        .await?,
    )?))
}

#[utoipa::path(post, path = "/v1/hosts/{id}/undrain", tag = "hosts", params(("id" = String, Path, description = "the host's id (a DNS label)")), responses((status = 200, body = Host, description = "success"), Errors))]
async fn undrain_host(
    State(node): Node,
    Path(id): Path<String>,
    _: NoQuery,
    _: NoBody,
) -> Result<Json<Host>, ApiError> {
    validate::dns_label("id", &id)?;
    let status = node.state.read(|s| s.hosts.get(&id).map(|h| h.status));
    match status {
        None => Err(ApiError::not_found(format!("host {id} not found"))),
        Some(HostStatus::Draining) => Ok(Json(expect_host(
            node.propose(Command::SetHostStatus {
                host: id,
                status: HostStatus::Up,
                now_ms: 0,
            })
            .await?,
        )?)),
        Some(other) => Err(ApiError::new(
            StatusCode::CONFLICT,
            codes::CONFLICT,
            format!("host {id} is {}, not draining", other.as_str()),
        )),
    }
}

/// An operator's word that a host is gone (operator scope: not an agent's to say): its VMs,
/// `on_host_loss = stay` ones included, are placed elsewhere at once, and the host stays down
/// until its agent registers again.
#[utoipa::path(post, path = "/v1/hosts/{id}/declare-gone", tag = "hosts", params(("id" = String, Path, description = "the host's id (a DNS label)")), responses((status = 200, body = Host, description = "success"), Errors))]
async fn declare_host_gone(
    State(node): Node,
    Path(id): Path<String>,
    _: NoQuery,
    _: NoBody,
) -> Result<Json<Host>, ApiError> {
    validate::dns_label("id", &id)?;
    // An unknown host is refused by the state machine itself (404), at the entry's index.
    Ok(Json(expect_host(
        node.propose(Command::DeclareHostGone {
            host: id,
            now_ms: 0,
        })
        .await?,
    )?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since: Option<u64>,
    /// Longest wait in milliseconds (at most 60000; more is read as 60000).
    #[param(maximum = 60000)]
    wait_ms: Option<u64>,
}

/// Events after `since`; with `wait_ms`, waits (a long-poll) until there is one.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery), responses((status = 200, body = Events, description = "success"), Errors))]
async fn events(
    State(node): Node,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    _: NoBody,
) -> Result<Json<Events>, ApiError> {
    let Query(q) = query?;
    node.read_barrier().await?;
    let since = q.since.unwrap_or(0);
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = node.state.subscribe();
    loop {
        let found = node.state.read(|s| s.events_after(since));
        let Some(events) = found else {
            return Err(ApiError::new(
                StatusCode::GONE,
                codes::GONE,
                format!("events after {since} are no longer kept; list the current state and resume from its index"),
            ));
        };
        if !events.is_empty() || wait.is_zero() {
            let index = events.last().map(|e| e.index).unwrap_or(since).max(since);
            return Ok(Json(Events { index, events }));
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return Ok(Json(Events {
                    index: since,
                    events: vec![],
                }))
            }
        }
    }
}

#[utoipa::path(post, path = "/v1/plan", tag = "vms", request_body = PlanRequest, responses((status = 200, body = Plan, description = "success"), Errors))]
async fn plan(
    State(node): Node,
    _: NoQuery,
    ApiJson(req): ApiJson<PlanRequest>,
) -> Result<Json<Plan>, ApiError> {
    if req.vms.len() > 10_000 {
        return Err(ApiError::invalid("vms: at most 10000 per plan"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, spec) in req.vms.iter().enumerate() {
        validate::vm_spec(spec).map_err(|e| ApiError::invalid(format!("vms[{i}].{e}")))?;
        if !seen.insert(spec.name.clone()) {
            return Err(ApiError::invalid(format!(
                "vms[{i}].name: {} is declared twice",
                spec.name
            )));
        }
    }
    node.read_barrier().await?;
    Ok(Json(
        node.state
            .read(|s| crate::plan::plan(s, &req, Default::default())),
    ))
}

#[utoipa::path(get, path = "/v1/cluster/snapshot", tag = "cluster", responses((status = 200, body = StateSnapshot, description = "success"), Errors))]
async fn save_snapshot(
    State(node): Node,
    _: NoQuery,
    _: NoBody,
) -> Result<Json<StateSnapshot>, ApiError> {
    node.read_barrier().await?;
    let index = node.state.applied_index();
    Ok(Json(node.state.read(|s| StateSnapshot {
        index,
        hosts: s.hosts.values().cloned().collect(),
        vms: s.vms.values().cloned().collect(),
    })))
}

/// The answer of a restore.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Restored {
    pub restored_vms: usize,
}

#[utoipa::path(post, path = "/v1/cluster/snapshot", tag = "cluster", request_body = StateSnapshot, responses((status = 200, body = Restored, description = "success"), Errors))]
async fn restore_snapshot(
    State(node): Node,
    _: NoQuery,
    ApiJson(snap): ApiJson<StateSnapshot>,
) -> Result<Json<Restored>, ApiError> {
    for h in &snap.hosts {
        validate::host_record(h)?;
    }
    for v in &snap.vms {
        validate::vm_record(v)?;
    }
    let cmd = Command::RestoreState {
        hosts: snap.hosts,
        vms: snap.vms,
        now_ms: 0,
    };
    match node.propose(cmd).await? {
        SmResponse::Count(n) => Ok(Json(Restored { restored_vms: n })),
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(post, path = "/v1/hosts", tag = "agent", request_body = HostRegistration, responses((status = 200, body = Host, description = "success"), Errors))]
async fn register_host(
    State(node): Node,
    _: NoQuery,
    principal: Option<axum::Extension<super::auth::Principal>>,
    ApiJson(registration): ApiJson<HostRegistration>,
) -> Result<Json<Host>, ApiError> {
    validate::host_registration(&registration)?;
    super::auth::check_host(principal.as_ref().map(|p| &p.0), &registration.id)?;
    Ok(Json(expect_host(
        node.propose(Command::RegisterHost {
            registration,
            now_ms: 0,
        })
        .await?,
    )?))
}

/// Hosts with `last_heartbeat_ms` from the leader's leases: heartbeats are kept in the
/// leader's memory, so the stored value is only the last transition (registration, return).
async fn hosts_with_leases(node: &ControlNode, only: Option<&str>) -> Result<Vec<Host>, ApiError> {
    node.read_barrier().await?;
    let mut hosts: Vec<Host> = node.state.read(|s| match only {
        Some(id) => s.hosts.get(id).cloned().into_iter().collect(),
        None => s.hosts.values().cloned().collect(),
    });
    with_leases(node, &mut hosts).await;
    Ok(hosts)
}

/// Sets `hosts`' `last_heartbeat_ms` from the leader's leases.
async fn with_leases(node: &ControlNode, hosts: &mut [Host]) {
    if hosts.is_empty() {
        return;
    }
    // Best effort: a leader change in between leaves the stored times.
    if let Ok(silence) = node.host_silence().await {
        let now = crate::node::now_ms();
        for h in hosts {
            if let Some(ms) = silence.get(&h.id) {
                h.last_heartbeat_ms = h.last_heartbeat_ms.max(now.saturating_sub(*ms));
            }
        }
    }
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", params(HostListQuery), responses((status = 200, body = Vec<Host>, description = "the selected hosts in id order", headers(("Blixard-Continue" = String, description = "present when more hosts are left: the `continue` of the next page"))), Errors))]
async fn list_hosts(
    State(node): Node,
    query: Result<Query<HostListQuery>, axum::extract::rejection::QueryRejection>,
    _: NoBody,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let (limit, token) = page_bounds(q.limit, &q.continue_token)?;
    let sel = HostSelector {
        status: q.status,
        labels: match &q.label {
            Some(l) => validate::label_selector("label", l)?,
            None => Default::default(),
        },
    };
    node.read_barrier().await?;
    let mut page = node
        .state
        .read(|s| crate::listing::hosts(s, &sel, token.as_deref(), limit));
    with_leases(&node, &mut page.items).await;
    Ok(page_response(page))
}

#[utoipa::path(get, path = "/v1/hosts/{id}", tag = "hosts", params(("id" = String, Path, description = "the host's id (a DNS label)")), responses((status = 200, body = Host, description = "success"), Errors))]
async fn get_host(
    State(node): Node,
    Path(id): Path<String>,
    _: NoQuery,
    _: NoBody,
) -> Result<Json<Host>, ApiError> {
    validate::dns_label("id", &id)?;
    hosts_with_leases(&node, Some(&id))
        .await?
        .pop()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("host {id} not found")))
}

/// A host's heartbeat. A 200 means a leader confirmed its leadership after the heartbeat
/// arrived and renewed the host's lease (in memory: nothing is written to the log unless the
/// host was down); the agent renews its own end of the lease from it.
#[utoipa::path(post, path = "/v1/hosts/{id}/heartbeat", tag = "agent", params(("id" = String, Path, description = "the host's id (a DNS label)")), responses((status = 200, body = Host, description = "success"), Errors))]
async fn heartbeat(
    State(node): Node,
    Path(id): Path<String>,
    _: NoQuery,
    _: NoBody,
) -> Result<Json<Host>, ApiError> {
    validate::dns_label("id", &id)?;
    Ok(Json(expect_host(node.heartbeat(&id).await?)?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    wait_index: Option<u64>,
    /// Longest wait in milliseconds (at most 60000; more is read as 60000).
    #[param(maximum = 60000)]
    wait_ms: Option<u64>,
}

#[utoipa::path(get, path = "/v1/hosts/{id}/assignments", tag = "agent", params(("id" = String, Path, description = "the host's id (a DNS label)"), WaitQuery), responses((status = 200, body = Assignments, description = "success"), Errors))]
async fn assignments(
    State(node): Node,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    _: NoBody,
) -> Result<Json<Assignments>, ApiError> {
    let Query(q) = query?;
    validate::dns_label("id", &id)?;
    if let Some(after) = q.wait_index {
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
    // Every answer, long-poll or not, is a linearizable read: a node cut off from the
    // leader fails here instead of answering from its frozen state, so an agent never takes
    // a stale answer for contact or acts on assignments the cluster has since changed.
    node.read_barrier().await?;
    let index = node.state.applied_index();
    node.state
        .read(|s| {
            s.hosts.get(&id)?;
            let vms = s
                .assigned_to(&id)
                .map(|vm| Assignment {
                    spec: vm.spec.clone(),
                    // A VM being moved off this host is to be stopped here.
                    desired: if vm.evicting.is_some() {
                        DesiredState::Stopped
                    } else {
                        vm.desired
                    },
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

#[utoipa::path(put, path = "/v1/hosts/{id}/vms/{name}/status", tag = "agent", params(("id" = String, Path, description = "the host's id (a DNS label)"), ("name" = String, Path, description = "the VM's name (a DNS label)")), request_body = VmStatusReport, responses((status = 200, body = Vm, description = "success"), Errors))]
async fn report_status(
    State(node): Node,
    Path((id, name)): Path<(String, String)>,
    _: NoQuery,
    ApiJson(report): ApiJson<VmStatusReport>,
) -> Result<Json<Vm>, ApiError> {
    validate::dns_label("id", &id)?;
    validate::dns_label("name", &name)?;
    validate::status_report(&report)?;
    let cmd = Command::ReportVmStatus {
        host: id,
        name,
        report,
        now_ms: 0,
    };
    Ok(Json(expect_vm(node.propose(cmd).await?)?))
}
