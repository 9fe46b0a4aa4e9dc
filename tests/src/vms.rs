//! API helpers the test areas share: creating VMs through leader changes, waiting for states
//! and registrations, and printing agent logs when a test fails.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;

use blixard_api::{
    Capacity, Client, ClientError, Host, HostRegistration, Hypervisor, Vm, VmSpec, VmState,
};

use crate::host::SimHost;
use crate::wait;

/// How long a test waits for the cluster and agents to act on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A registration of host `id` with 2 vCPUs, 2 GiB and the `process` hypervisor, as an agent
/// would send it (for tests that act as an agent themselves).
pub fn process_host(id: &str) -> HostRegistration {
    HostRegistration {
        id: id.into(),
        address: String::new(),
        capacity: Capacity {
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 10,
            kvm: false,
        },
        labels: Default::default(),
        hypervisors: vec![Hypervisor::Process],
        agent_url: None,
        fence: None,
    }
}

/// A spec for a `process` VM from JSON, so fields the API adds later need no change here.
pub fn process_spec(name: &str, memory_mib: u64) -> VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": memory_mib,
        "hypervisor": "process",
    }))
    .unwrap_or_else(|e| panic!("spec {name}: {e}"))
}

/// Creates `spec` and returns the VM, retrying only while the cluster cannot act on it: a 503
/// (no leader, or the leader unreachable: nothing was done) or no answer at all. Every attempt
/// carries the same idempotency key, so a retry after an attempt that did land returns the VM
/// it made; any other refusal (400, 409, ...) fails at once instead of waiting out the
/// deadline.
pub async fn create(c: &Client, spec: &VmSpec) -> anyhow::Result<Vm> {
    static ATTEMPTS: AtomicU64 = AtomicU64::new(0);
    let key = format!(
        "test-create-{}-{}",
        std::process::id(),
        ATTEMPTS.fetch_add(1, Ordering::Relaxed)
    );
    let r = wait::until(&format!("create {}", spec.name), DEADLINE, || async {
        match c.create_vm_idempotent(spec, &key).await {
            Ok(vm) => Ok(Some(Ok(vm))),
            Err(e) if retryable(&e) => Err(e.to_string()),
            Err(e) => Ok(Some(Err(e))),
        }
    })
    .await?;
    r.with_context(|| format!("create {}", spec.name))
}

/// Whether a create may be sent again: the cluster said it did nothing (503) or nobody
/// answered (the key makes a repeat of one that landed harmless).
fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Api { status, .. } => *status == 503,
        ClientError::Unreachable(_) => true,
        ClientError::Decode { .. } | ClientError::Config(_) => false,
    }
}

/// Waits until the API shows `vm` in `state` (on `host` if given) and returns it.
pub async fn wait_state(
    c: &Client,
    vm: &str,
    state: VmState,
    host: Option<&str>,
) -> anyhow::Result<Vm> {
    wait::until(
        &format!("{vm} {} in the API", state.as_str()),
        DEADLINE,
        || async {
            match c.get_vm(vm).await {
                Ok(v) if v.state == state && (host.is_none() || v.host.as_deref() == host) => {
                    Ok(Some(v))
                }
                Ok(v) => Err(format!(
                    "state {} reason {:?} host {:?}",
                    v.state.as_str(),
                    v.reason,
                    v.host
                )),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// Waits until `host` is registered with at least `epoch` and returns it.
pub async fn wait_registered(c: &Client, host: &str, epoch: u64) -> anyhow::Result<Host> {
    wait::until(
        &format!("{host} registered (epoch ≥ {epoch})"),
        DEADLINE,
        || async {
            match c.get_host(host).await {
                Ok(h) if h.epoch >= epoch => Ok(Some(h)),
                Ok(h) => Err(format!("epoch {}", h.epoch)),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// Runs `f`; when it fails, prints the last lines of every host's agent log first.
pub async fn with_logs<T>(
    hosts: &[&SimHost],
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match f.await {
        Ok(t) => Ok(t),
        Err(e) => {
            for h in hosts {
                let log = h.agent_log();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "---- agent log of {} (last 60 lines) ----\n{}",
                    h.name(),
                    lines[lines.len().saturating_sub(60)..].join("\n")
                );
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> ClientError {
        ClientError::Api {
            status,
            code: "x".into(),
            message: "x".into(),
        }
    }

    #[test]
    fn creates_are_retried_only_when_nothing_was_done_or_nobody_answered() {
        assert!(retryable(&api(503)));
        assert!(retryable(&ClientError::Unreachable("refused".into())));
        for status in [400, 401, 403, 404, 409, 413, 429, 500] {
            assert!(!retryable(&api(status)), "{status}");
        }
        assert!(!retryable(&ClientError::Config("no endpoints".into())));
    }
}
