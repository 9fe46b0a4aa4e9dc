//! Typed HTTP client of the `/v1/` API, used by `blixardctl` and `blixard-agent`.
//!
//! It holds a list of control-plane endpoints and moves on to the next one when an endpoint
//! cannot be reached or has no leader, so a client keeps working while a node is down. Writes
//! sent to a follower are forwarded to the leader by the server itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{
    codes, label_selector_string, AddMember, Assignments, ClusterStatus, DrainRequest, ErrorBody,
    Events, Health, Host, HostRegistration, HostSelector, LogLine, Member, Plan, PlanRequest,
    StateSnapshot, UpdateVm, Vm, VmSelector, VmSpec, VmStatusReport, CONTINUE_HEADER,
};

/// Errors of the typed client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an API error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// No endpoint could be reached.
    #[error("no control-plane endpoint answered: {0}")]
    Unreachable(String),
    /// The answer could not be decoded.
    #[error("bad answer from {endpoint}: {message}")]
    Decode { endpoint: String, message: String },
    /// The endpoint list is empty or malformed.
    #[error("invalid endpoints: {0}")]
    Config(String),
}

impl ClientError {
    /// HTTP status of an API error, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Machine-readable code of an API error, if this is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True for a 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

/// A client over one or more control-plane endpoints.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// Index of the endpoint that answered last; tried first next time.
    preferred: AtomicUsize,
    bearer: Option<String>,
}

/// How long one request may take, unless the call says otherwise (long-polls do).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// A client over `endpoints` (`http://host:port`, no trailing path).
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Self, ClientError> {
        Self::with_ca(endpoints, None)
    }

    /// A client that, for `https://` endpoints, trusts only the CA bundle at `ca`.
    pub fn with_ca<S: AsRef<str>>(
        endpoints: &[S],
        ca: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.as_ref().trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::Config("no endpoint given".into()));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ClientError::Config(format!(
                    "{e}: must start with http:// or https://"
                )));
            }
        }
        crate::tls::install_provider();
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(2));
        if let Some(ca) = ca {
            builder = crate::tls::trust_only(builder, ca)
                .map_err(|e| ClientError::Config(e.to_string()))?;
        } else if endpoints.iter().any(|e| e.starts_with("https://")) {
            return Err(ClientError::Config(
                "https:// endpoints need a CA file (--ca-file)".into(),
            ));
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Client {
            http,
            endpoints,
            preferred: AtomicUsize::new(0),
            bearer: None,
        })
    }

    /// A client from a comma-separated endpoint list.
    pub fn from_list(list: &str) -> Result<Self, ClientError> {
        let v: Vec<&str> = list.split(',').collect();
        Self::new(&v)
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    pub fn with_bearer(mut self, token: Option<String>) -> Self {
        self.bearer = token;
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Sends one request, trying each endpoint in turn (starting with the last one that
    /// answered) while they are unreachable or answer 503.
    ///
    /// A write is only sent to the next endpoint when it cannot have arrived at the last one
    /// (the connection was refused) or when repeating it is harmless (reads, creates with an
    /// idempotency key): after a timeout or a dropped connection the cluster may have applied
    /// it, and sending it again would turn a successful create into "already exists".
    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        self.call_with(method, path, body, timeout, None).await
    }

    async fn call_with<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
        idempotency_key: Option<&str>,
    ) -> Result<T, ClientError> {
        self.exchange(method, path, body, timeout, idempotency_key)
            .await
            .map(|(_, t)| t)
    }

    /// [`Self::call_with`], with the response's headers.
    async fn exchange<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
        idempotency_key: Option<&str>,
    ) -> Result<(reqwest::header::HeaderMap, T), ClientError> {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last_err = None;
        let repeatable = method == Method::GET || idempotency_key.is_some();
        for k in 0..n {
            let i = (start + k) % n;
            let endpoint = &self.endpoints[i];
            let url = format!("{endpoint}{path}");
            let mut req = self.http.request(method.clone(), &url).timeout(timeout);
            if let Some(t) = &self.bearer {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            if let Some(k) = idempotency_key {
                req = req.header("idempotency-key", k);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(%url, error = %e, "endpoint unreachable");
                    let err = ClientError::Unreachable(format!("{endpoint}: {e}"));
                    if !(repeatable || e.is_connect()) {
                        return Err(err);
                    }
                    last_err = Some(err);
                    continue;
                }
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    let err = ClientError::Unreachable(format!("{endpoint}: {e}"));
                    if !repeatable {
                        return Err(err);
                    }
                    last_err = Some(err);
                    continue;
                }
            };
            if status.is_success() {
                self.preferred.store(i, Ordering::Relaxed);
                let bytes = if bytes.is_empty() {
                    &b"null"[..]
                } else {
                    &bytes[..]
                };
                return serde_json::from_slice(bytes)
                    .map(|t| (headers, t))
                    .map_err(|e| ClientError::Decode {
                        endpoint: endpoint.clone(),
                        message: e.to_string(),
                    });
            }
            let err = api_error(status, &bytes);
            // 504: the write may have been applied, so only a repeatable one goes on.
            if status == StatusCode::SERVICE_UNAVAILABLE
                || (repeatable && status == StatusCode::GATEWAY_TIMEOUT)
            {
                last_err = Some(err);
                continue;
            }
            return Err(err);
        }
        Err(last_err.unwrap_or_else(|| ClientError::Unreachable("no endpoint".into())))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None, DEFAULT_TIMEOUT)
            .await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body), DEFAULT_TIMEOUT)
            .await
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/v1/health").await
    }

    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        self.get("/v1/cluster/status").await
    }

    /// Streams the last `lines` (server default when `None`) console and unit lines of VM
    /// `name`, and with `follow` every new one until the stream is dropped. `timeout` bounds
    /// the whole request (`None`: no bound, as `follow` needs). Endpoints are tried in turn
    /// until one answers.
    pub async fn vm_logs(
        &self,
        name: &str,
        lines: Option<u32>,
        follow: bool,
        timeout: Option<Duration>,
    ) -> Result<LogStream, ClientError> {
        let mut path = format!("/v1/vms/{}/logs?follow={follow}", encode(name));
        if let Some(n) = lines {
            path.push_str(&format!("&lines={n}"));
        }
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last_err = None;
        for k in 0..n {
            let i = (start + k) % n;
            let endpoint = &self.endpoints[i];
            let mut req = self.http.get(format!("{endpoint}{path}"));
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            if let Some(t) = &self.bearer {
                req = req.bearer_auth(t);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last_err = Some(ClientError::Unreachable(format!("{endpoint}: {e}")));
                    continue;
                }
            };
            let status = resp.status();
            if status.is_success() {
                self.preferred.store(i, Ordering::Relaxed);
                return Ok(LogStream {
                    resp,
                    endpoint: endpoint.clone(),
                    buf: Vec::new(),
                    done: false,
                });
            }
            let bytes = resp.bytes().await.unwrap_or_default();
            let err = api_error(status, &bytes);
            // As for every read, a node without a leader passes the request on.
            if status == StatusCode::SERVICE_UNAVAILABLE {
                last_err = Some(err);
                continue;
            }
            return Err(err);
        }
        Err(last_err.unwrap_or_else(|| ClientError::Unreachable("no endpoint".into())))
    }

    pub async fn members(&self) -> Result<Vec<Member>, ClientError> {
        self.get("/v1/cluster/members").await
    }

    pub async fn add_member(&self, m: &AddMember) -> Result<Vec<Member>, ClientError> {
        self.call(
            Method::POST,
            "/v1/cluster/members",
            Some(m),
            Duration::from_secs(60),
        )
        .await
    }

    pub async fn remove_member(&self, id: u64) -> Result<Vec<Member>, ClientError> {
        let path = format!("/v1/cluster/members/{id}");
        self.call::<(), _>(Method::DELETE, &path, None, Duration::from_secs(60))
            .await
    }

    pub async fn create_vm(&self, spec: &VmSpec) -> Result<Vm, ClientError> {
        self.post("/v1/vms", spec).await
    }

    /// Creates a VM; a retry with the same `key` returns the VM the first attempt made
    /// instead of failing or creating a second one.
    pub async fn create_vm_idempotent(&self, spec: &VmSpec, key: &str) -> Result<Vm, ClientError> {
        self.call_with(
            Method::POST,
            "/v1/vms",
            Some(spec),
            DEFAULT_TIMEOUT,
            Some(key),
        )
        .await
    }

    /// Replaces a VM's spec; with `expected_generation`, only if nobody changed it meanwhile.
    pub async fn update_vm(&self, update: &UpdateVm) -> Result<Vm, ClientError> {
        let path = format!("/v1/vms/{}", encode(&update.spec.name));
        self.call(Method::PUT, &path, Some(update), DEFAULT_TIMEOUT)
            .await
    }

    /// Deletes a VM only if it is still at `generation`.
    pub async fn delete_vm_at(&self, name: &str, generation: u64) -> Result<Vm, ClientError> {
        let path = format!("/v1/vms/{}?expected_generation={generation}", encode(name));
        self.call::<(), _>(Method::DELETE, &path, None, DEFAULT_TIMEOUT)
            .await
    }

    pub async fn drain_host(
        &self,
        id: &str,
        deadline_secs: Option<u64>,
    ) -> Result<Host, ClientError> {
        self.post(
            &format!("/v1/hosts/{}/drain", encode(id)),
            &DrainRequest { deadline_secs },
        )
        .await
    }

    pub async fn undrain_host(&self, id: &str) -> Result<Host, ClientError> {
        self.post(
            &format!("/v1/hosts/{}/undrain", encode(id)),
            &serde_json::json!({}),
        )
        .await
    }

    /// Declares a host gone for good: every VM on it, `on_host_loss = stay` ones included, is
    /// placed elsewhere at once; if the host is in fact still running them they may run twice
    /// until its agent comes back and is told. The host stays down until its agent registers
    /// again.
    pub async fn declare_host_gone(&self, id: &str) -> Result<Host, ClientError> {
        self.post(
            &format!("/v1/hosts/{}/declare-gone", encode(id)),
            &serde_json::json!({}),
        )
        .await
    }

    /// Events after index `since`; waits up to `wait` for one (a long-poll).
    pub async fn events(&self, since: u64, wait: Duration) -> Result<Events, ClientError> {
        let path = format!("/v1/events?since={since}&wait_ms={}", wait.as_millis());
        self.call::<(), _>(Method::GET, &path, None, wait + DEFAULT_TIMEOUT)
            .await
    }

    /// What applying `req` would change.
    pub async fn plan(&self, req: &PlanRequest) -> Result<Plan, ClientError> {
        self.post("/v1/plan", req).await
    }

    pub async fn save_snapshot(&self) -> Result<StateSnapshot, ClientError> {
        self.get("/v1/cluster/snapshot").await
    }

    pub async fn restore_snapshot(
        &self,
        snap: &StateSnapshot,
    ) -> Result<serde_json::Value, ClientError> {
        self.call(
            Method::POST,
            "/v1/cluster/snapshot",
            Some(snap),
            Duration::from_secs(60),
        )
        .await
    }

    pub async fn list_vms(&self) -> Result<Vec<Vm>, ClientError> {
        self.get("/v1/vms").await
    }

    /// One page of the VMs `sel` selects, after `token` (the previous page's), at most
    /// `limit`; with the next page's token when more are left.
    pub async fn list_vms_page(
        &self,
        sel: &VmSelector,
        limit: u32,
        token: Option<&str>,
    ) -> Result<(Vec<Vm>, Option<String>), ClientError> {
        let mut q = vec![("limit", limit.to_string())];
        if let Some(h) = &sel.host {
            q.push(("host", h.clone()));
        }
        if let Some(st) = sel.state {
            q.push(("state", st.as_str().to_string()));
        }
        if !sel.labels.is_empty() {
            q.push(("label", label_selector_string(&sel.labels)));
        }
        self.page("/v1/vms", q, token).await
    }

    /// One page of the hosts `sel` selects (see [`Self::list_vms_page`]).
    pub async fn list_hosts_page(
        &self,
        sel: &HostSelector,
        limit: u32,
        token: Option<&str>,
    ) -> Result<(Vec<Host>, Option<String>), ClientError> {
        let mut q = vec![("limit", limit.to_string())];
        if let Some(st) = sel.status {
            q.push(("status", st.as_str().to_string()));
        }
        if !sel.labels.is_empty() {
            q.push(("label", label_selector_string(&sel.labels)));
        }
        self.page("/v1/hosts", q, token).await
    }

    async fn page<T: DeserializeOwned>(
        &self,
        path: &str,
        mut q: Vec<(&str, String)>,
        token: Option<&str>,
    ) -> Result<(Vec<T>, Option<String>), ClientError> {
        if let Some(t) = token {
            q.push(("continue", t.to_string()));
        }
        let query: Vec<String> = q
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        let path = format!("{path}?{}", query.join("&"));
        let (headers, items) = self
            .exchange::<(), Vec<T>>(Method::GET, &path, None, DEFAULT_TIMEOUT, None)
            .await?;
        let next = headers
            .get(CONTINUE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((items, next))
    }

    pub async fn get_vm(&self, name: &str) -> Result<Vm, ClientError> {
        self.get(&format!("/v1/vms/{}", encode(name))).await
    }

    pub async fn delete_vm(&self, name: &str) -> Result<Vm, ClientError> {
        let path = format!("/v1/vms/{}", encode(name));
        self.call::<(), _>(Method::DELETE, &path, None, DEFAULT_TIMEOUT)
            .await
    }

    pub async fn start_vm(&self, name: &str) -> Result<Vm, ClientError> {
        self.post(
            &format!("/v1/vms/{}/start", encode(name)),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn stop_vm(&self, name: &str) -> Result<Vm, ClientError> {
        self.post(
            &format!("/v1/vms/{}/stop", encode(name)),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn register_host(&self, reg: &HostRegistration) -> Result<Host, ClientError> {
        self.post("/v1/hosts", reg).await
    }

    pub async fn heartbeat(&self, host: &str) -> Result<Host, ClientError> {
        self.post(
            &format!("/v1/hosts/{}/heartbeat", encode(host)),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn list_hosts(&self) -> Result<Vec<Host>, ClientError> {
        self.get("/v1/hosts").await
    }

    pub async fn get_host(&self, id: &str) -> Result<Host, ClientError> {
        self.get(&format!("/v1/hosts/{}", encode(id))).await
    }

    /// The VMs assigned to `host`. With `wait_index`, the server holds the request until the
    /// host's assignments change past that index or `wait` runs out (a long-poll).
    pub async fn assignments(
        &self,
        host: &str,
        wait_index: Option<u64>,
        wait: Duration,
    ) -> Result<Assignments, ClientError> {
        let mut path = format!("/v1/hosts/{}/assignments", encode(host));
        if let Some(i) = wait_index {
            path.push_str(&format!("?wait_index={i}&wait_ms={}", wait.as_millis()));
        }
        self.call::<(), _>(Method::GET, &path, None, wait + DEFAULT_TIMEOUT)
            .await
    }

    /// Reports the observed state of one VM on `host`.
    pub async fn report_vm_status(
        &self,
        host: &str,
        vm: &str,
        report: &VmStatusReport,
    ) -> Result<Vm, ClientError> {
        let path = format!("/v1/hosts/{}/vms/{}/status", encode(host), encode(vm));
        // A reason quotes systemd or the hypervisor: make it acceptable rather than have the
        // report refused.
        let report = VmStatusReport {
            reason: report
                .reason
                .as_deref()
                .map(|r| crate::validate::printable(r, crate::validate::MAX_REASON_LEN)),
            ..report.clone()
        };
        self.call(Method::PUT, &path, Some(&report), DEFAULT_TIMEOUT)
            .await
    }
}

/// The NDJSON lines of `GET /v1/vms/{name}/logs` as they arrive (see [`Client::vm_logs`]).
#[derive(Debug)]
pub struct LogStream {
    resp: reqwest::Response,
    endpoint: String,
    buf: Vec<u8>,
    done: bool,
}

/// Longest NDJSON line accepted from the server.
const MAX_LOG_LINE_BYTES: usize = 1 << 20;

/// The error an endpoint answered with: its `{"error":{code,message}}` body, or the start of
/// whatever else it sent.
fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(b) => ClientError::Api {
            status: status.as_u16(),
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: codes::INTERNAL.into(),
            message: String::from_utf8_lossy(bytes).chars().take(200).collect(),
        },
    }
}

impl LogStream {
    /// The next line, or `None` at the end of the stream (without `follow`: after the last
    /// line asked for).
    pub async fn next_line(&mut self) -> Result<Option<LogLine>, ClientError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let line = &line[..i];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(line)
                    .map(Some)
                    .map_err(|e| ClientError::Decode {
                        endpoint: self.endpoint.clone(),
                        message: format!("log line: {e}"),
                    });
            }
            if self.done {
                return Ok(None);
            }
            if self.buf.len() > MAX_LOG_LINE_BYTES {
                return Err(ClientError::Decode {
                    endpoint: self.endpoint.clone(),
                    message: "log line over 1 MiB".into(),
                });
            }
            match self.resp.chunk().await {
                Ok(Some(b)) => self.buf.extend_from_slice(&b),
                Ok(None) => {
                    self.done = true;
                    if !self.buf.is_empty() && !self.buf.ends_with(b"\n") {
                        self.buf.push(b'\n');
                    }
                }
                Err(e) => {
                    return Err(ClientError::Unreachable(format!(
                        "{}: the log stream broke off: {e}",
                        self.endpoint
                    )))
                }
            }
        }
    }
}

/// Percent-encodes a path segment (names are validated server-side; this only keeps a bad
/// name from changing the path).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_path_segments() {
        assert_eq!(encode("web-1"), "web-1");
        assert_eq!(encode("a/b"), "a%2Fb");
        assert_eq!(encode("../x"), "..%2Fx");
    }

    /// An endpoint that reads one request and hangs up without answering, as a node killed
    /// after applying a write does; returns its URL and a counter of requests that got there.
    async fn hang_up_server() -> (String, std::sync::Arc<AtomicUsize>) {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let url = format!(
            "http://{}",
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        let seen = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            // Bounded: serves a handful of connections at most.
            for _ in 0..8 {
                let Ok((mut sock, _)) = l.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                if let Ok(n) = sock.read(&mut buf).await {
                    if n > 0 {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }
                drop(sock);
            }
        });
        (url, seen)
    }

    /// Regression (found by the fault suite's review): a write that may have reached a node
    /// which then died was sent again to the next endpoint, so a create the cluster applied
    /// came back as "already exists" (and a delete as "not found").
    #[tokio::test]
    async fn write_not_resent_after_ambiguous_failure() {
        let (a, a_seen) = hang_up_server().await;
        let (b, b_seen) = hang_up_server().await;
        let c = Client::new(&[a, b]).unwrap_or_else(|e| panic!("{e}"));
        let spec: VmSpec = serde_json::from_value(serde_json::json!(
            {"name": "w", "vcpus": 1, "memory_mib": 64, "hypervisor": "process"}
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let r = c.create_vm(&spec).await;
        assert!(matches!(r, Err(ClientError::Unreachable(_))), "{r:?}");
        assert_eq!(a_seen.load(Ordering::SeqCst), 1);
        assert_eq!(
            b_seen.load(Ordering::SeqCst),
            0,
            "the create was sent twice"
        );
        // Reads are safe to repeat elsewhere; so is a create with an idempotency key.
        let _ = c.list_vms().await;
        let seen = || (a_seen.load(Ordering::SeqCst), b_seen.load(Ordering::SeqCst));
        assert_eq!(seen(), (2, 1));
        let _ = c.create_vm_idempotent(&spec, "key-1").await;
        assert_eq!(seen(), (3, 2));
    }

    #[test]
    fn refuses_bad_endpoints() {
        assert!(Client::from_list("").is_err());
        assert!(Client::from_list("127.0.0.1:7001").is_err());
        assert!(Client::from_list("http://127.0.0.1:7001,http://127.0.0.1:7002").is_ok());
    }
}
