//! Host liveness as leases in the leader's memory: 3 real control nodes, simulated hosts
//! (real `systemd --user` managers) with real agents.
//!
//! - steady-state heartbeats append nothing to the Raft log;
//! - leader kills with hosts attached never take a host down or fence it: the VMs keep their
//!   processes;
//! - a host that goes silent is declared down once its lease (plus grace and margin) ran out,
//!   with the leader's lease times in `host show`.

use std::collections::BTreeMap;
use std::time::Duration;

use blixard_agent::systemd::{Systemd, SystemdClient};
use blixard_api::{unit_name, HostStatus, VmState};
use blixard_tests::cluster::Cluster;
use blixard_tests::host::SimHost;
use blixard_tests::vms::{create, process_spec, wait_registered, wait_state, with_logs, DEADLINE};
use blixard_tests::wait;

/// One counter or gauge of a node's `/metrics` (summed over its label sets).
async fn metric(c: &Cluster, i: usize, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{}/metrics", c.nodes[i].url))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

async fn hosts(c: &Cluster, prefix: &str, n: usize) -> anyhow::Result<Vec<SimHost>> {
    let mut out = Vec::new();
    for i in 1..=n {
        let mut h = SimHost::start(&format!("{prefix}{i}")).await?;
        h.spawn_agent(&c.endpoints(), "")?;
        out.push(h);
    }
    let client = c.client();
    for h in &out {
        wait_registered(&client, h.name(), 1).await?;
    }
    Ok(out)
}

/// Main PIDs of the VM units each host runs, by VM.
async fn pids(hosts: &[SimHost]) -> anyhow::Result<BTreeMap<String, (String, u32)>> {
    let mut out = BTreeMap::new();
    for h in hosts {
        let sd = Systemd::connect_address(&h.bus_address()).await?;
        for u in sd.list_vm_units().await? {
            if !u.active.is_up() {
                continue;
            }
            let pid = sd
                .unit_status(&unit_name(&u.vm))
                .await?
                .map(|s| s.main_pid)
                .unwrap_or(0);
            out.insert(u.vm, (h.name().to_string(), pid));
        }
    }
    Ok(out)
}

/// With hosts heartbeating and nothing else happening, the leader answers many heartbeats
/// and its log does not grow.
#[tokio::test]
async fn t90_steady_heartbeats_append_nothing_to_the_log() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let hs = hosts(&c, "hb", 2).await?;
    let refs: Vec<&SimHost> = hs.iter().collect();
    with_logs(&refs, async {
        let leader = c.wait_converged(DEADLINE).await?;
        // Let the registrations' entries settle: wait until the log stops moving while
        // heartbeats are being answered.
        let last = std::cell::Cell::new((u64::MAX, 0.0));
        let (index, beats) =
            wait::until("a quiet log with heartbeats answered", DEADLINE, || async {
                let s = c.status(leader).await.ok_or("the leader does not answer")?;
                let beats = metric(&c, leader, "blixard_host_heartbeats_total")
                    .await
                    .map_err(|e| e.to_string())?;
                let was = last.replace((s.last_log_index, beats));
                let quiet = s.last_log_index == was.0 && beats > was.1;
                Ok(quiet.then_some(was))
            })
            .await?;
        // Now at least 10 more heartbeats (2 hosts every 0.5 s: about 2.5 s).
        let (after_index, after_beats) = wait::until("10 more heartbeats", DEADLINE, || async {
            let beats = metric(&c, leader, "blixard_host_heartbeats_total")
                .await
                .map_err(|e| e.to_string())?;
            let s = c.status(leader).await.ok_or("the leader does not answer")?;
            Ok((beats >= 10.0 + last.get().1).then_some((s.last_log_index, beats)))
        })
        .await?;
        eprintln!(
            "{} heartbeats answered; log index {index} → {after_index}",
            after_beats - beats
        );
        assert_eq!(after_index, index, "steady heartbeats wrote to the log");
        assert_eq!(metric(&c, leader, "blixard_leased_hosts").await?, 2.0);
        // `host show` has the leader's lease time, not the registration's.
        let h = c.client().get_host("hb1").await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        let age = now.saturating_sub(h.last_heartbeat_ms);
        assert!(age < 5_000, "last heartbeat {age} ms ago");
        Ok(())
    })
    .await
}

/// Killing the leader (three times) while hosts run VMs never takes a host down and never
/// fences one: a new leader gives every host a full lease, and the agents' leases outlast an
/// election. The VMs keep their processes throughout.
#[tokio::test]
async fn t91_leader_kills_with_hosts_attached_fence_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let hs = hosts(&c, "lk", 2).await?;
    let client = c.client();
    let names = ["lk-a", "lk-b", "lk-c"];
    let refs: Vec<&SimHost> = hs.iter().collect();
    with_logs(&refs, async {
        for n in names {
            create(&client, &process_spec(n, 64)).await?;
        }
        for n in names {
            wait_state(&client, n, VmState::Running, None).await?;
        }
        let before = pids(&hs).await?;
        assert_eq!(before.len(), names.len(), "{before:?}");
        for round in 0..3 {
            let leader = c.wait_converged(DEADLINE).await?;
            c.kill(leader);
            let new = c.wait_converged(DEADLINE).await?;
            eprintln!(
                "round {round}: killed node {}, new leader node {}",
                leader + 1,
                new + 1
            );
            c.restart(leader)?;
            c.wait_converged(DEADLINE).await?;
            // The agents heartbeat against the new leader again.
            wait::until("the new leader to answer heartbeats", DEADLINE, || async {
                let n = metric(&c, new, "blixard_leased_hosts")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((n >= 2.0).then_some(()))
            })
            .await?;
        }
        for h in client.list_hosts().await? {
            assert_eq!(
                h.status,
                HostStatus::Up,
                "host {} went {:?}",
                h.id,
                h.status
            );
        }
        let after = pids(&hs).await?;
        assert_eq!(
            before, after,
            "a VM was stopped or moved by a leader failover"
        );
        for h in &hs {
            let log = h.agent_log();
            assert!(
                !log.contains("fencing"),
                "{} fenced during a failover:\n{log}",
                h.name()
            );
        }
        Ok(())
    })
    .await
}

/// A host whose agent is stopped (SIGTERM: its VMs stay) is declared down once its lease, the
/// fence grace and the margin have passed, and the events say so; when the agent returns the
/// host is up again.
#[tokio::test]
async fn t92_a_silent_host_is_declared_down_after_its_lease() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let mut hs = hosts(&c, "sl", 1).await?;
    let client = c.client();
    let registered = client.get_host("sl1").await?;
    hs[0].stop_agent().await?;
    let down = wait::until(
        "sl1 to be declared down",
        Duration::from_secs(30),
        || async {
            let h = client.get_host("sl1").await.map_err(|e| e.to_string())?;
            Ok((h.status == HostStatus::Down).then_some(h))
        },
    )
    .await?;
    eprintln!("sl1 down; fence timing {:?}", registered.fence);
    assert_eq!(down.fence, registered.fence);
    hs[0].spawn_agent(&c.endpoints(), "")?;
    wait::until("sl1 to be up again", DEADLINE, || async {
        let h = client.get_host("sl1").await.map_err(|e| e.to_string())?;
        Ok((h.status == HostStatus::Up).then_some(()))
    })
    .await?;
    Ok(())
}

/// Hosts that reach only a follower are leased by the leader all the same: the follower
/// gathers their heartbeats into forwards (`Forward::Heartbeats`) and hands each agent the
/// leader's answer; nothing is written to the log.
#[tokio::test]
async fn t93_heartbeats_through_a_follower_are_gathered_and_answered() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let leader = c.wait_converged(DEADLINE).await?;
    let follower = (leader + 1) % 3;
    let only_follower = vec![c.nodes[follower].url.clone()];
    let mut hs = Vec::new();
    for i in 1..=3 {
        let mut h = SimHost::start(&format!("fw{i}")).await?;
        h.spawn_agent(&only_follower, "")?;
        hs.push(h);
    }
    let refs: Vec<&SimHost> = hs.iter().collect();
    with_logs(&refs, async {
        let client = c.client();
        for h in &hs {
            wait_registered(&client, h.name(), 1).await?;
        }
        let start = metric(&c, leader, "blixard_host_heartbeats_total").await?;
        let index = c
            .status(leader)
            .await
            .ok_or_else(|| anyhow::anyhow!("the leader does not answer"))?
            .last_log_index;
        // 3 hosts every 0.5 s: 30 heartbeats in about 5 s, every one through the follower.
        wait::until("30 heartbeats answered by the leader", DEADLINE, || async {
            let beats = metric(&c, leader, "blixard_host_heartbeats_total")
                .await
                .map_err(|e| e.to_string())?;
            Ok((beats >= start + 30.0).then_some(()))
        })
        .await?;
        assert_eq!(metric(&c, leader, "blixard_leased_hosts").await?, 3.0);
        for h in &hs {
            let host = client.get_host(h.name()).await?;
            assert_eq!(host.status, blixard_api::HostStatus::Up, "{}", h.name());
            assert!(!h.agent_log().contains("fencing VM"), "{} fenced", h.name());
        }
        let after = c
            .status(leader)
            .await
            .ok_or_else(|| anyhow::anyhow!("the leader does not answer"))?
            .last_log_index;
        assert_eq!(after, index, "forwarded heartbeats wrote to the log");
        Ok(())
    })
    .await
}
