//! API helpers the test areas share: creating VMs through leader changes, waiting for states
//! and registrations, and printing agent logs when a test fails.

use std::time::Duration;

use blixard_api::{Capacity, Client, Host, HostRegistration, Hypervisor, Vm, VmSpec, VmState};

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

/// Creates `spec`, retrying while the cluster has no leader; a 409 after a retry means an
/// earlier attempt landed.
pub async fn create(c: &Client, spec: &VmSpec) -> anyhow::Result<()> {
    let r = wait::until(&format!("create {}", spec.name), DEADLINE, || async {
        match c.create_vm(spec).await {
            Ok(_) => Ok(Some(Ok(()))),
            Err(e) if e.status() == Some(409) => Ok(Some(Ok(()))),
            Err(e) if e.status() == Some(503) || e.status().is_none() => Err(e.to_string()),
            Err(e) => Ok(Some(Err(e))),
        }
    })
    .await?;
    Ok(r?)
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
