//! Placement and lifecycle across hosts: 3 real control nodes, 3 simulated hosts (real
//! `systemd --user` managers) with real agents, checked from outside through the API, the CLI
//! and each host's manager over D-Bus.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use blixard_agent::systemd::{Systemd, SystemdClient};
use blixard_api::{Client, HostStatus, VmState};
use blixard_tests::cluster::{Cluster, ClusterOptions};
use blixard_tests::host::SimHost;
use blixard_tests::vms::{create, process_spec, wait_registered, wait_state, with_logs, DEADLINE};
use blixard_tests::wait;

/// A cluster that declares hosts down after 2 s without heartbeats (agents beat every 0.5 s).
async fn cluster() -> anyhow::Result<Cluster> {
    let opts = ClusterOptions {
        extra_args: vec!["--host-ttl-ms".into(), "2000".into()],
        ..Default::default()
    };
    Cluster::start_with(3, opts).await
}

/// Starts `n` hosts named `p1..pn` with agents (with a `slot` label naming each).
async fn hosts(c: &Cluster, prefix: &str, n: usize) -> anyhow::Result<Vec<SimHost>> {
    let mut out = Vec::new();
    for i in 1..=n {
        let name = format!("{prefix}{i}");
        let mut h = SimHost::start(&name).await?;
        h.spawn_agent(&c.endpoints(), &format!("[labels]\nslot = \"{name}\"\n"))?;
        out.push(h);
    }
    let client = c.client();
    for h in &out {
        wait_registered(&client, h.name(), 1).await?;
    }
    Ok(out)
}

/// The VMs whose units each host's manager has, by host.
async fn units(hosts: &[SimHost]) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut out = BTreeMap::new();
    for h in hosts {
        let sd = Systemd::connect_address(&h.bus_address()).await?;
        let vms = sd
            .list_vm_units()
            .await?
            .into_iter()
            .filter(|u| u.active.is_up())
            .map(|u| u.vm)
            .collect();
        out.insert(h.name().to_string(), vms);
    }
    Ok(out)
}

/// Fails if any VM's unit is up on two hosts at once.
fn assert_nothing_twice(units: &BTreeMap<String, BTreeSet<String>>) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (host, vms) in units {
        for vm in vms {
            if let Some(other) = seen.insert(vm, host) {
                panic!("{vm} runs on both {other} and {host}: {units:?}");
            }
        }
    }
}

/// Waits until every VM in `names` is running in the API and its unit is up on its host only.
async fn wait_converged(
    c: &Client,
    hosts: &[SimHost],
    names: &[String],
) -> anyhow::Result<BTreeMap<String, String>> {
    wait::until("VMs running on their hosts only", DEADLINE, || async {
        let vms = c.list_vms().await.map_err(|e| e.to_string())?;
        let mut placed = BTreeMap::new();
        for n in names {
            let vm = vms
                .iter()
                .find(|v| &v.spec.name == n)
                .ok_or(format!("{n} missing"))?;
            if vm.state != VmState::Running {
                return Err(format!("{n} is {} ({:?})", vm.state.as_str(), vm.reason));
            }
            placed.insert(n.clone(), vm.host.clone().unwrap_or_default());
        }
        let u = units(hosts).await.map_err(|e| e.to_string())?;
        assert_nothing_twice(&u);
        for (vm, host) in &placed {
            if !u.get(host).is_some_and(|s| s.contains(vm)) {
                return Err(format!("{vm} not up on {host}: {u:?}"));
            }
        }
        Ok(Some(placed))
    })
    .await
}

/// 12 VMs of mixed sizes, 3 of them in an anti-affinity group, on 3 hosts: every host stays
/// within its memory and (4× overcommitted) vCPUs, the group is spread, and a VM that fits
/// nowhere stays pending with the reason.
#[tokio::test]
async fn t30_mixed_sizes_and_anti_affinity_respect_capacity() -> anyhow::Result<()> {
    let c = cluster().await?;
    let client = c.client();
    let hs = hosts(&c, "p", 3).await?;
    let refs: Vec<&SimHost> = hs.iter().collect();
    with_logs(&refs, async {
        let cap = client.get_host("p1").await?.capacity;
        let m = cap.memory_mib;
        let mut specs = Vec::new();
        for i in 1..=3 {
            let mut s = process_spec(&format!("db-{i}"), m / 4);
            s.anti_affinity = Some("db".into());
            specs.push(s);
            specs.push(process_spec(&format!("big-{i}"), m / 2));
        }
        for i in 1..=6 {
            specs.push(process_spec(&format!("small-{i}"), m / 16));
        }
        for s in &specs {
            create(&client, s).await?;
        }
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let placed = wait_converged(&client, &hs, &names).await?;
        let mut mem: BTreeMap<&str, u64> = BTreeMap::new();
        let mut cpu: BTreeMap<&str, u32> = BTreeMap::new();
        for s in &specs {
            let h = placed[&s.name].as_str();
            *mem.entry(h).or_default() += s.memory_mib;
            *cpu.entry(h).or_default() += s.vcpus;
        }
        for (h, used) in &mem {
            let host = client.get_host(h).await?;
            assert!(
                *used <= host.capacity.memory_mib,
                "{h}: {used} MiB > {}",
                host.capacity.memory_mib
            );
            assert!(cpu[h] <= host.capacity.vcpus * 4, "{h}: {} vCPUs", cpu[h]);
        }
        let db_hosts: BTreeSet<&str> = (1..=3)
            .map(|i| placed[&format!("db-{i}")].as_str())
            .collect();
        assert_eq!(
            db_hosts.len(),
            3,
            "anti-affinity group spread over 3 hosts: {placed:?}"
        );
        // One more VM of half a host fits nowhere now.
        create(&client, &process_spec("too-big", m / 2)).await?;
        let vm = wait::until(
            "too-big to stay pending with a reason",
            DEADLINE,
            || async {
                let vm = client.get_vm("too-big").await.map_err(|e| e.to_string())?;
                Ok((vm.state == VmState::Pending
                    && vm
                        .reason
                        .as_deref()
                        .is_some_and(|r| r.contains("no host fits")))
                .then_some(vm))
            },
        )
        .await?;
        assert!(
            vm.reason
                .as_deref()
                .is_some_and(|r| r.contains("short of memory")),
            "{:?}",
            vm.reason
        );
        Ok(())
    })
    .await
}

/// Killing a whole host (manager, agent and every unit at once) moves its VMs to the other
/// hosts within seconds; when the host comes back it runs none of them, and it takes new VMs.
#[tokio::test]
async fn t31_whole_host_loss_moves_vms_and_the_host_comes_back_fenced() -> anyhow::Result<()> {
    let c = cluster().await?;
    let client = c.client();
    let mut hs = hosts(&c, "q", 3).await?;
    let names: Vec<String> = (1..=6).map(|i| format!("mv-{i}")).collect();
    let refs: Vec<&SimHost> = hs.iter().collect();
    let placed = with_logs(&refs, async {
        for n in &names {
            create(&client, &process_spec(n, 64)).await?;
        }
        wait_converged(&client, &hs, &names).await
    })
    .await?;
    let victim = placed.values().next().cloned().unwrap_or_default();
    let i = hs
        .iter()
        .position(|h| h.name() == victim)
        .ok_or_else(|| anyhow::anyhow!("no host {victim}"))?;
    let moved: Vec<String> = placed
        .iter()
        .filter(|(_, h)| **h == victim)
        .map(|(v, _)| v.clone())
        .collect();
    let t0 = Instant::now();
    hs[i].kill()?;
    let after = wait::until("the lost host's VMs to run elsewhere", DEADLINE, || async {
        let vms = client.list_vms().await.map_err(|e| e.to_string())?;
        for m in &moved {
            let vm = vms.iter().find(|v| &v.spec.name == m).ok_or("missing")?;
            if vm.state != VmState::Running || vm.host.as_deref() == Some(victim.as_str()) {
                return Err(format!("{m} {} on {:?}", vm.state.as_str(), vm.host));
            }
        }
        Ok(Some(vms))
    })
    .await?;
    eprintln!(
        "host loss → {} VMs running elsewhere in {:?}",
        moved.len(),
        t0.elapsed()
    );
    assert_eq!(client.get_host(&victim).await?.status, HostStatus::Down);
    assert_eq!(after.len(), names.len());

    // The host comes back (a fresh manager, as after a reboot) with its agent.
    let mut back = SimHost::start(&victim).await?;
    back.spawn_agent(&c.endpoints(), &format!("[labels]\nslot = \"{victim}\"\n"))?;
    hs[i] = back;
    wait_registered(&client, &victim, 2).await?;
    wait::until("the host to be up again", DEADLINE, || async {
        let h = client.get_host(&victim).await.map_err(|e| e.to_string())?;
        Ok((h.status == HostStatus::Up).then_some(()))
    })
    .await?;
    let u = units(&hs).await?;
    assert!(
        u[&victim].is_empty(),
        "the returning host runs nothing: {u:?}"
    );
    assert_nothing_twice(&u);
    // Its capacity is usable again: a VM that must run there does.
    let mut pinned = process_spec("pinned", 64);
    pinned.constraints.insert("slot".into(), victim.clone());
    create(&client, &pinned).await?;
    wait_state(&client, "pinned", VmState::Running, Some(&victim)).await?;
    let all: Vec<String> = names
        .iter()
        .cloned()
        .chain(["pinned".to_string()])
        .collect();
    wait_converged(&client, &hs, &all).await?;
    Ok(())
}

/// Draining a host moves every VM off it (stopped there before it starts elsewhere: never on
/// two hosts at once), refuses new placements there, and undrain opens it again. The drain is
/// `blixardctl host drain --wait`, which follows it to the end with real agents.
#[tokio::test]
async fn t32_drain_moves_everything_and_nothing_runs_twice() -> anyhow::Result<()> {
    let c = cluster().await?;
    let client = c.client();
    let hs = hosts(&c, "d", 3).await?;
    let names: Vec<String> = (1..=6).map(|i| format!("dr-{i}")).collect();
    let refs: Vec<&SimHost> = hs.iter().collect();
    with_logs(&refs, async {
        for n in &names {
            create(&client, &process_spec(n, 64)).await?;
        }
        let placed = wait_converged(&client, &hs, &names).await?;
        let target = placed.values().next().cloned().unwrap_or_default();
        let t0 = Instant::now();
        let cli = tokio::process::Command::new(blixard_tests::binaries::binary("blixardctl"))
            .env("BLIXARD_ENDPOINTS", c.endpoints().join(","))
            .args(["host", "drain", &target, "--deadline", "60", "--wait"])
            .args(["--timeout", "120"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        // Watch every manager while the VMs move: a VM must never be up on two hosts.
        let after = wait::until("every VM off the drained host", DEADLINE, || async {
            let u = units(&hs).await.map_err(|e| e.to_string())?;
            assert_nothing_twice(&u);
            let vms = client.list_vms().await.map_err(|e| e.to_string())?;
            let done = vms
                .iter()
                .all(|v| v.state == VmState::Running && v.host.as_deref() != Some(target.as_str()))
                && u[&target].is_empty();
            Ok(done.then_some(vms))
        })
        .await?;
        eprintln!("drain of {target} took {:?}", t0.elapsed());
        let out = tokio::time::timeout(DEADLINE, cli.wait_with_output()).await??;
        let progress = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success()
                && progress.contains(&format!("host {target}: drained, no VMs left")),
            "drain --wait: {}\n{progress}",
            out.status
        );
        assert_eq!(after.len(), names.len(), "nothing lost");
        wait_converged(&client, &hs, &names).await?;
        assert_eq!(client.get_host(&target).await?.status, HostStatus::Draining);
        // New VMs avoid the draining host; after undrain it takes them again.
        let mut pinned = process_spec("pinned", 64);
        pinned.constraints.insert("slot".into(), target.clone());
        create(&client, &pinned).await?;
        let vm = wait_state(&client, "pinned", VmState::Pending, None).await?;
        assert!(vm.host.is_none());
        client.undrain_host(&target).await?;
        wait_state(&client, "pinned", VmState::Running, Some(&target)).await?;
        Ok(())
    })
    .await
}

fn run_cli(endpoints: &[String], args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(
        std::process::Command::new(blixard_tests::binaries::binary("blixardctl"))
            .env("BLIXARD_ENDPOINTS", endpoints.join(","))
            .args(args)
            .output()?,
    )
}

/// `blixardctl apply --prune` makes the cluster match the file; `--dry-run` only prints the
/// plan and changes nothing.
#[tokio::test]
async fn t33_apply_prune_converges_and_dry_run_changes_nothing() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let client = c.client();
    let hs = hosts(&c, "a", 1).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("vms.toml");
    let vm = |name: &str, mem: u64| {
        format!("[[vm]]\nname = \"{name}\"\nvcpus = 1\nmemory_mib = {mem}\nhypervisor = \"process\"\n\n")
    };
    std::fs::write(
        &file,
        [vm("app-1", 64), vm("app-2", 64), vm("app-3", 64)].concat(),
    )?;
    let f = file.to_string_lossy().to_string();
    let out = run_cli(&c.endpoints(), &["apply", "-f", &f])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = ["app-1", "app-2", "app-3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    wait_converged(&client, &hs, &names).await?;

    // The file changes: app-2 grows, app-3 goes, app-4 comes.
    std::fs::write(
        &file,
        [vm("app-1", 64), vm("app-2", 128), vm("app-4", 64)].concat(),
    )?;
    let before = client.list_vms().await?;
    let out = run_cli(
        &c.endpoints(),
        &["apply", "-f", &f, "--prune", "--dry-run", "-o", "json"],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: blixard_api::Plan = serde_json::from_slice(&out.stdout)?;
    let names_of =
        |items: &[blixard_api::PlanItem]| items.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
    assert_eq!(names_of(&plan.create), vec!["app-4"]);
    assert_eq!(names_of(&plan.update), vec!["app-2"]);
    assert_eq!(plan.update[0].changes, vec!["memory_mib"]);
    assert_eq!(names_of(&plan.delete), vec!["app-3"]);
    assert_eq!(
        plan.create[0].host.as_deref(),
        Some("a1"),
        "the plan says where it would go"
    );
    let after = client.list_vms().await?;
    let strip = |v: &[blixard_api::Vm]| {
        v.iter()
            .map(|v| (v.spec.clone(), v.generation))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&before), strip(&after), "--dry-run changed nothing");

    let out = run_cli(&c.endpoints(), &["apply", "-f", &f, "--prune"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<String> = ["app-1", "app-2", "app-4"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    wait_converged(&client, &hs, &want).await?;
    let vms = client.list_vms().await?;
    assert_eq!(
        vms.iter().map(|v| v.spec.name.clone()).collect::<Vec<_>>(),
        want
    );
    assert_eq!(
        vms.iter()
            .find(|v| v.spec.name == "app-2")
            .map(|v| v.spec.memory_mib),
        Some(128)
    );
    // Applying the same file again changes nothing.
    let out = run_cli(
        &c.endpoints(),
        &["apply", "-f", &f, "--prune", "--dry-run", "-o", "json"],
    )?;
    let plan: blixard_api::Plan = serde_json::from_slice(&out.stdout)?;
    assert!(
        plan.create.is_empty() && plan.update.is_empty() && plan.delete.is_empty(),
        "{plan:?}"
    );
    Ok(())
}

/// The VMs whose units each host's manager has in any state but ended (a unit that is
/// stopping still runs its processes), by host.
async fn alive_units(hosts: &[SimHost]) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    use blixard_agent::reconcile::ActiveState;
    let mut out = BTreeMap::new();
    for h in hosts {
        let sd = Systemd::connect_address(&h.bus_address()).await?;
        let vms = sd
            .list_vm_units()
            .await?
            .into_iter()
            .filter(|u| !matches!(u.active, ActiveState::Inactive | ActiveState::Failed))
            .map(|u| u.vm)
            .collect();
        out.insert(h.name().to_string(), vms);
    }
    Ok(out)
}

/// A drain whose VM does not stop in time (its process ignores SIGTERM, so systemd kills it
/// only after `stop_timeout_secs`) keeps the VM on its host past the deadline, saying it waits
/// for the host to confirm the stop; once the host has stopped it, it runs elsewhere. It is
/// never alive on two hosts.
#[tokio::test]
async fn t34_a_drain_past_its_deadline_waits_for_the_confirmed_stop() -> anyhow::Result<()> {
    let c = cluster().await?;
    let client = c.client();
    let mut hs = Vec::new();
    for i in 1..=2 {
        let name = format!("w{i}");
        let mut h = SimHost::start(&name).await?;
        h.spawn_agent(
            &c.endpoints(),
            &format!(
                "process_command = [\"/bin/sh\", \"-c\", \"trap '' TERM; while :; do sleep 1; done\"]\n\
                 [labels]\nslot = \"{name}\"\n[vm_unit]\nstop_timeout_secs = 15\ngraceful_stop_secs = 1\n"
            ),
        )?;
        hs.push(h);
    }
    for h in &hs {
        wait_registered(&client, h.name(), 1).await?;
    }
    let refs: Vec<&SimHost> = hs.iter().collect();
    with_logs(&refs, async {
        let names = vec!["stubborn".to_string()];
        create(&client, &process_spec("stubborn", 64)).await?;
        let placed = wait_converged(&client, &hs, &names).await?;
        let target = placed["stubborn"].clone();
        client.drain_host(&target, Some(1)).await?;
        let want = format!(
            "host {target} draining; deadline passed, waiting for {target} to confirm the VM stopped"
        );
        let vm = wait::until("the overdue VM to wait on its host", DEADLINE, || async {
            let u = alive_units(&hs).await.map_err(|e| e.to_string())?;
            assert_nothing_twice(&u);
            let vm = client.get_vm("stubborn").await.map_err(|e| e.to_string())?;
            let waiting = vm.host.as_deref() == Some(target.as_str())
                && vm.reason.as_deref() == Some(want.as_str());
            if !waiting {
                return Err(format!("{} on {:?}: {:?}", vm.state.as_str(), vm.host, vm.reason));
            }
            // Still alive there: the host has not stopped it, so it may not run elsewhere.
            if !u[&target].contains("stubborn") {
                return Err(format!("the unit on {target} is gone already: {u:?}"));
            }
            Ok(Some(vm))
        })
        .await?;
        assert_eq!(vm.state, VmState::Stopping);
        assert!(vm.evicting.is_some());
        // Once systemd has killed it and the host reported the stop, it runs on the other host.
        wait::until("the VM to run on the other host", DEADLINE, || async {
            let u = alive_units(&hs).await.map_err(|e| e.to_string())?;
            assert_nothing_twice(&u);
            let vm = client.get_vm("stubborn").await.map_err(|e| e.to_string())?;
            let moved = vm.state == VmState::Running
                && vm.host.as_deref().is_some_and(|h| h != target)
                && !u[&target].contains("stubborn");
            Ok(moved.then_some(()))
        })
        .await?;
        wait_converged(&client, &hs, &names).await?;
        Ok(())
    })
    .await
}

/// A host lost with an `on_host_loss = stay` VM on it keeps the VM assigned (it is not placed
/// elsewhere while the host may be alive); `blixardctl host declare-gone` says what it does
/// and moves it at once; the host stays down.
#[tokio::test]
async fn t35_declare_gone_moves_a_stay_vm_off_its_lost_host() -> anyhow::Result<()> {
    let c = cluster().await?;
    let client = c.client();
    let mut hs = hosts(&c, "g", 2).await?;
    let mut spec = process_spec("sticky", 64);
    spec.on_host_loss = Some(blixard_api::OnHostLoss::Stay);
    let refs: Vec<&SimHost> = hs.iter().collect();
    let placed = with_logs(&refs, async {
        create(&client, &spec).await?;
        wait_converged(&client, &hs, &["sticky".to_string()]).await
    })
    .await?;
    let victim = placed["sticky"].clone();
    let i = hs
        .iter()
        .position(|h| h.name() == victim)
        .ok_or_else(|| anyhow::anyhow!("no host {victim}"))?;
    hs[i].kill()?;
    let lost = format!(
        "host {victim} lost; on_host_loss=stay: waiting for the host to come back or to be declared gone"
    );
    wait::until(
        "the host down, its stay VM still on it",
        DEADLINE,
        || async {
            let h = client.get_host(&victim).await.map_err(|e| e.to_string())?;
            let vm = client.get_vm("sticky").await.map_err(|e| e.to_string())?;
            if vm.host.as_deref() != Some(victim.as_str()) {
                panic!("a stay VM left its lost host: {vm:?}");
            }
            Ok(
                (h.status == HostStatus::Down && vm.reason.as_deref() == Some(lost.as_str()))
                    .then_some(()),
            )
        },
    )
    .await?;

    let out = run_cli(&c.endpoints(), &["host", "declare-gone", "nope"])?;
    assert_eq!(out.status.code(), Some(3), "unknown host: not found");
    let out = run_cli(&c.endpoints(), &["host", "declare-gone", &victim])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("sticky"), "{text}");
    assert!(text.contains("may run twice"), "{text}");
    let other: Vec<&SimHost> = hs.iter().filter(|h| h.name() != victim).collect();
    with_logs(&other, async {
        let vm = wait_state(&client, "sticky", VmState::Running, None).await?;
        assert_ne!(vm.host.as_deref(), Some(victim.as_str()));
        assert_eq!(client.get_host(&victim).await?.status, HostStatus::Down);
        Ok(())
    })
    .await
}

/// `declare-gone` is an operator's word, never an agent's (403 even for its own host), its
/// input is checked at admission (400), an unknown host is 404, and a host declared gone
/// stays down: its agent's heartbeats are answered 404 until it registers again.
#[tokio::test]
async fn t36_declare_gone_is_operator_only_and_keeps_the_host_down() -> anyhow::Result<()> {
    use blixard_tests::cluster::{AGENT_TOKENS, OPERATOR_TOKEN};
    let (c, _ca) = Cluster::start_secure(3).await?;
    let eps = c.endpoints();
    let op = c.client_with(&eps, Some(OPERATOR_TOKEN));
    let (h1, t1) = AGENT_TOKENS[0];
    let agent = c.client_with(&eps, Some(t1));
    let status =
        |r: Result<blixard_api::Host, blixard_api::ClientError>| r.err().and_then(|e| e.status());
    agent
        .register_host(&blixard_tests::vms::process_host(h1))
        .await?;
    assert_eq!(status(agent.declare_host_gone(h1).await), Some(403));
    assert_eq!(status(op.declare_host_gone("Not_A_Label").await), Some(400));
    assert_eq!(status(op.declare_host_gone("nope").await), Some(404));
    assert_eq!(op.declare_host_gone(h1).await?.status, HostStatus::Down);
    assert_eq!(status(agent.heartbeat(h1).await), Some(404));
    assert_eq!(op.get_host(h1).await?.status, HostStatus::Down);
    let back = agent
        .register_host(&blixard_tests::vms::process_host(h1))
        .await?;
    assert_eq!((back.status, back.epoch), (HostStatus::Up, 2));
    agent.heartbeat(h1).await?;
    Ok(())
}

/// Lists page and filter (issue 19): through the API with `limit` and the continue token,
/// across writes between pages, by host, state and label, with bad parameters refused; and
/// through `blixardctl vm list --host H --state S -l k=v`, which follows the pages.
#[tokio::test]
async fn t37_lists_page_and_filter_by_host_state_and_label() -> anyhow::Result<()> {
    use blixard_api::{HostSelector, VmSelector};
    // Hosts registered by the test itself, no agents: a long TTL keeps them up.
    let opts = ClusterOptions {
        extra_args: vec!["--host-ttl-ms".into(), "3600000".into()],
        ..Default::default()
    };
    let c = Cluster::start_with(3, opts).await?;
    let client = c.client();
    for (id, zone) in [("la", "a"), ("lb", "b")] {
        let mut reg = blixard_tests::vms::process_host(id);
        reg.capacity.memory_mib = 64 * 1024;
        reg.capacity.vcpus = 64;
        reg.labels.insert("zone".into(), zone.into());
        client.register_host(&reg).await?;
    }
    for i in 0..25 {
        let mut s = process_spec(&format!("l-{i:02}"), 64);
        s.constraints
            .insert("zone".into(), if i % 2 == 0 { "a" } else { "b" }.into());
        if i % 5 == 0 {
            s.labels.insert("tier".into(), "web".into());
        }
        create(&client, &s).await?;
    }
    // A VM that fits nowhere stays pending.
    let mut huge = process_spec("l-huge", 4 << 20);
    huge.labels.insert("tier".into(), "web".into());
    create(&client, &huge).await?;

    // Every page in turn; a VM created between pages before the token is not answered, one
    // deleted after it is not either, everything else exactly once and in order.
    let all = VmSelector::default();
    let (first, token) = client.list_vms_page(&all, 10, None).await?;
    assert_eq!(first.len(), 10);
    let token = token.ok_or_else(|| anyhow::anyhow!("a full first page has a token"))?;
    create(&client, &process_spec("l-00a", 64)).await?;
    client.delete_vm("l-24").await?;
    let mut names: Vec<String> = first.iter().map(|v| v.spec.name.clone()).collect();
    let mut token = Some(token);
    let mut pages = 1;
    while let Some(t) = token {
        let (page, next) = client.list_vms_page(&all, 10, Some(&t)).await?;
        names.extend(page.iter().map(|v| v.spec.name.clone()));
        token = next;
        pages += 1;
    }
    let mut want: Vec<String> = (0..24).map(|i| format!("l-{i:02}")).collect();
    want.push("l-huge".into());
    assert_eq!(names, want);
    assert_eq!(pages, 3);

    // Filters, alone and together.
    let on_a = VmSelector {
        host: Some("la".into()),
        ..Default::default()
    };
    let (page, next) = client.list_vms_page(&on_a, 100, None).await?;
    assert!(next.is_none());
    let mut expect_a: Vec<String> = (0..24)
        .filter(|i| i % 2 == 0)
        .map(|i| format!("l-{i:02}"))
        .collect();
    expect_a.insert(1, "l-00a".into());
    let got: Vec<String> = page.iter().map(|v| v.spec.name.clone()).collect();
    // l-00a has no constraint: it may be on either host.
    let got_without: Vec<&String> = got.iter().filter(|n| *n != "l-00a").collect();
    let expect_without: Vec<&String> = expect_a.iter().filter(|n| *n != "l-00a").collect();
    assert_eq!(got_without, expect_without);
    let web_pending = VmSelector {
        state: Some(VmState::Pending),
        labels: [("tier".to_string(), "web".to_string())].into(),
        ..Default::default()
    };
    let (page, _) = client.list_vms_page(&web_pending, 100, None).await?;
    assert_eq!(
        page.iter()
            .map(|v| v.spec.name.as_str())
            .collect::<Vec<_>>(),
        ["l-huge"]
    );
    let zone_b = HostSelector {
        labels: [("zone".to_string(), "b".to_string())].into(),
        ..Default::default()
    };
    let (hosts, _) = client.list_hosts_page(&zone_b, 1, None).await?;
    assert_eq!(
        hosts.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
        ["lb"]
    );

    // Bad parameters: 400, with the field named.
    let base = c.nodes[0].url.clone();
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("continue=..%2Fx", "continue"),
        ("label=tier", "label"),
        ("state=sleeping", ""),
        ("host=Not_A_Label", "host"),
        ("page=2", ""),
    ] {
        let r = reqwest::Client::new()
            .get(format!("{base}/v1/vms?{query}"))
            .timeout(DEADLINE)
            .send()
            .await?;
        let status = r.status().as_u16();
        let body = r.text().await?;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(field), "{query}: {body}");
    }

    // The CLI follows the pages (2 per request here) and filters on the server.
    let ctl = blixard_tests::binaries::binary("blixardctl");
    let out = std::process::Command::new(&ctl)
        .env("BLIXARD_ENDPOINTS", c.endpoints().join(","))
        .args(["vm", "list", "--page-size", "2", "-l", "tier=web"])
        .args(["--state", "pending", "-o", "json"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<blixard_api::Vm> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.len(), 1);
    let out = std::process::Command::new(&ctl)
        .env("BLIXARD_ENDPOINTS", c.endpoints().join(","))
        .args(["vm", "list", "--page-size", "3", "--host", "lb"])
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("NAME"), "{table}");
    assert!(rows[1..].iter().all(|r| r.contains(" lb ")), "{table}");
    let on_b = client
        .list_vms_page(
            &VmSelector {
                host: Some("lb".into()),
                ..Default::default()
            },
            100,
            None,
        )
        .await?
        .0
        .len();
    assert_eq!(
        rows.len() - 1,
        on_b,
        "one header, then every VM on lb: {table}"
    );
    Ok(())
}
