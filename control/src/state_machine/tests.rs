//! Table tests of the pure state machine.

use super::*;
use blixard_api::{Capacity, Hypervisor, PlacementStrategy};

pub(crate) fn spec(name: &str) -> VmSpec {
    VmSpec {
        on_host_loss: None,
        name: name.into(),
        vcpus: 1,
        memory_mib: 128,
        hypervisor: Hypervisor::Process,
        kernel: None,
        initrd: None,
        cmdline: None,
        disks: vec![],
        nics: vec![],
        restart_policy: RestartPolicy::Always,
        constraints: Default::default(),
        labels: Default::default(),
        anti_affinity: None,
        strategy: PlacementStrategy::Spread,
        max_restarts: None,
        restart_window_secs: None,
        task: None,
    }
}

fn reg(id: &str) -> HostRegistration {
    HostRegistration {
        fence: None,
        id: id.into(),
        address: String::new(),
        capacity: Capacity {
            vcpus: 4,
            memory_mib: 4096,
            disk_gib: 10,
            kvm: false,
        },
        labels: Default::default(),
        hypervisors: vec![Hypervisor::Process],
        agent_url: None,
    }
}

fn create(name: &str) -> Command {
    Command::CreateVm {
        spec: spec(name),
        now_ms: 1,
        idempotency_key: None,
        placement: None,
    }
}

fn place(vm: &str, host: &str, generation: u64) -> Command {
    Command::Place {
        placements: vec![Placement {
            vm: vm.into(),
            host: host.into(),
            generation,
        }],
        unplaced: vec![],
        now_ms: 3,
        overcommit: Some(Overcommit::default()),
        capacity_rev: None,
    }
}

fn report(host: &str, vm: &str, state: VmState, generation: u64, now_ms: u64) -> Command {
    Command::ReportVmStatus {
        host: host.into(),
        name: vm.into(),
        report: VmStatusReport {
            state,
            reason: Some(format!("{state:?}")),
            generation,
            task_end: None,
        },
        now_ms,
    }
}

fn desired(name: &str, d: DesiredState) -> Command {
    Command::SetDesired {
        name: name.into(),
        desired: d,
        now_ms: 5,
        expected_generation: None,
    }
}

/// Applies commands at indexes 1.. and returns the responses; after each, the index kept by
/// the applies must equal the one built from the rows.
fn run(state: &mut ClusterState, cmds: &[Command]) -> Vec<Response> {
    let base = state.events.back().map(|e| e.index).unwrap_or(0);
    cmds.iter()
        .enumerate()
        .map(|(i, c)| {
            let index = base + i as u64 + 1;
            let r = apply(state, index, c).0;
            assert_index_current(state, index);
            r
        })
        .collect()
}

/// The invariant of `crate::state_index`: kept by updates = built from the rows.
pub(crate) fn assert_index_current(state: &ClusterState, index: u64) {
    let built = StateIndex::build(state.vms.values(), index);
    assert!(
        state.index == built,
        "index drifted from the rows at {index}:\nkept {:?}\nbuilt {built:?}",
        state.index
    );
}

/// One host `h1` with VM `a` placed and running at generation 2.
fn running() -> ClusterState {
    let mut s = ClusterState::default();
    run(
        &mut s,
        &[
            Command::RegisterHost {
                registration: reg("h1"),
                now_ms: 1,
            },
            create("a"),
            place("a", "h1", 1),
            report("h1", "a", VmState::Running, 2, 4),
        ],
    );
    assert_eq!(s.vms["a"].state, VmState::Running);
    s
}

#[test]
fn create_place_report_stop_delete() {
    let mut s = running();
    let vm = &s.vms["a"];
    assert_eq!((vm.host.as_deref(), vm.generation), (Some("h1"), 2));
    let r = run(&mut s, &[desired("a", DesiredState::Stopped)]);
    assert!(matches!(&r[0], Response::Vm(v) if v.state == VmState::Stopping));
    let rev = s.host_revision("h1");
    let r = run(&mut s, &[report("h1", "a", VmState::Stopped, 3, 6)]);
    assert!(matches!(&r[0], Response::Vm(v) if v.state == VmState::Stopped && v.generation == 3));
    let r = run(
        &mut s,
        &[Command::DeleteVm {
            name: "a".into(),
            now_ms: 6,
            expected_generation: None,
        }],
    );
    assert!(matches!(r[0], Response::Vm(_)));
    assert!(s.vms.is_empty());
    assert!(s.host_revision("h1") > rev);
}

#[test]
fn refusals() {
    let mut s = ClusterState::default();
    let out = run(
        &mut s,
        &[
            create("a"),
            create("a"),
            Command::DeleteVm {
                name: "zz".into(),
                now_ms: 3,
                expected_generation: None,
            },
            Command::Heartbeat {
                host: "nope".into(),
                now_ms: 4,
            },
            report("h9", "a", VmState::Running, 0, 5),
            desired("x", DesiredState::Stopped),
            Command::DeleteVm {
                name: "a".into(),
                now_ms: 6,
                expected_generation: Some(7),
            },
            Command::UpdateVm {
                spec: spec("a"),
                expected_generation: Some(9),
                now_ms: 7,
            },
            Command::DrainHost {
                host: "nope".into(),
                deadline_ms: 1,
                now_ms: 8,
            },
        ],
    );
    assert!(matches!(
        out[1],
        Response::Error(ApplyError::AlreadyExists(_))
    ));
    assert!(matches!(out[2], Response::Error(ApplyError::NotFound(_))));
    assert!(matches!(out[3], Response::Error(ApplyError::NotFound(_))));
    assert!(matches!(out[4], Response::Error(ApplyError::Conflict(_))));
    assert!(matches!(out[5], Response::Error(ApplyError::NotFound(_))));
    assert!(matches!(out[6], Response::Error(ApplyError::Conflict(_))));
    assert!(matches!(out[7], Response::Error(ApplyError::Conflict(_))));
    assert!(matches!(out[8], Response::Error(ApplyError::NotFound(_))));
}

#[test]
fn idempotent_create_returns_the_first_vm() {
    let mut s = ClusterState::default();
    let k = Some("key-1".to_string());
    let out = run(
        &mut s,
        &[
            Command::CreateVm {
                spec: spec("a"),
                now_ms: 1,
                idempotency_key: k.clone(),
                placement: None,
            },
            Command::CreateVm {
                spec: spec("a"),
                now_ms: 2,
                idempotency_key: k.clone(),
                placement: None,
            },
            Command::CreateVm {
                spec: spec("a"),
                now_ms: 3,
                idempotency_key: Some("other".into()),
                placement: None,
            },
        ],
    );
    assert!(matches!(&out[0], Response::Vm(v) if v.created_ms == 1));
    assert!(matches!(&out[1], Response::Existing(v) if v.created_ms == 1));
    assert!(matches!(
        out[2],
        Response::Error(ApplyError::AlreadyExists(_))
    ));
    assert_eq!(s.vms.len(), 1);
}

fn keyed_create(name: &str, memory_mib: u64, key: &str, now_ms: u64) -> Command {
    let mut sp = spec(name);
    sp.memory_mib = memory_mib;
    Command::CreateVm {
        spec: sp,
        now_ms,
        idempotency_key: Some(key.into()),
        placement: None,
    }
}

#[test]
fn an_idempotency_key_is_bound_to_its_request_and_outlives_a_delete() {
    let mut s = ClusterState::default();
    let out = run(
        &mut s,
        &[
            keyed_create("a", 128, "k1", 1),
            // The same key with another body: refused, whatever the name.
            keyed_create("a", 256, "k1", 2),
            keyed_create("b", 128, "k1", 3),
            // The same request again: the VM it made.
            keyed_create("a", 128, "k1", 4),
        ],
    );
    assert!(matches!(&out[0], Response::Vm(_)));
    assert!(
        matches!(&out[1], Response::Error(ApplyError::KeyMismatch(m)) if m.contains("created vm a"))
    );
    assert!(matches!(
        &out[2],
        Response::Error(ApplyError::KeyMismatch(_))
    ));
    assert!(matches!(&out[3], Response::Existing(v) if v.spec.name == "a"));
    assert!(!s.vms.contains_key("b"));
    // Deleted: a retry within the retention is refused, not a second create.
    let deleted_at = 10;
    let out = run(
        &mut s,
        &[
            Command::DeleteVm {
                name: "a".into(),
                now_ms: deleted_at,
                expected_generation: None,
            },
            keyed_create("a", 128, "k1", deleted_at + 1),
            keyed_create("a", 256, "k1", deleted_at + 2),
        ],
    );
    assert!(
        matches!(&out[1], Response::Error(ApplyError::KeySpent(m)) if m.contains("deleted since"))
    );
    assert!(matches!(
        &out[2],
        Response::Error(ApplyError::KeyMismatch(_))
    ));
    assert!(s.vms.is_empty());
    // A new key creates it again; the old one goes once its retention has passed.
    let out = run(
        &mut s,
        &[
            keyed_create("a", 128, "k2", deleted_at + 3),
            Command::DeleteVm {
                name: "a".into(),
                now_ms: deleted_at + 4,
                expected_generation: None,
            },
            keyed_create("c", 64, "k3", deleted_at + KEY_RETENTION_MS - 1),
        ],
    );
    assert!(matches!(&out[0], Response::Vm(_)));
    assert!(s.keys.contains_key("k1"));
    run(
        &mut s,
        &[keyed_create("d", 64, "k4", deleted_at + KEY_RETENTION_MS)],
    );
    assert!(!s.keys.contains_key("k1"));
    assert!(s.keys.contains_key("k2"), "k2's VM was deleted later");
    run(
        &mut s,
        &[keyed_create(
            "a",
            128,
            "k1",
            deleted_at + KEY_RETENTION_MS + 1,
        )],
    );
    assert!(s.vms.contains_key("a"));
    // Rebuilt from the rows (a restart), the expiry order and old-style keys come back.
    let mut back = ClusterState {
        hosts: s.hosts.clone(),
        vms: s.vms.clone(),
        keys: s.keys.clone(),
        ..Default::default()
    };
    back.rebuild_derived(99);
    assert_eq!(back.key_expiry, s.key_expiry);
    back.keys.clear();
    back.rebuild_derived(99);
    assert_eq!(
        back.keys
            .get("k1")
            .map(|r| (r.vm.as_str(), r.request_sha256.is_none())),
        Some(("a", true))
    );
}

#[test]
fn request_fingerprints_are_pinned() {
    // Bound keys are compared across nodes and versions: the encoding must not drift. This is
    // SHA-256 of {"name":"a","vcpus":1,"memory_mib":128,"hypervisor":"process",
    // "restart_policy":"always","strategy":"spread"}.
    assert_eq!(
        request_sha256(&spec("a")),
        "2d7dd9900641f5a9cd7bec9f8937e52e3fd9acf818c0a2a029230d4d412d9de2"
    );
    assert_ne!(request_sha256(&spec("a")), request_sha256(&spec("b")));
    assert_eq!(request_sha256(&spec("a")).len(), 64);
}

#[test]
fn stale_or_bad_placements_are_dropped() {
    let mut s = ClusterState::default();
    run(
        &mut s,
        &[
            Command::RegisterHost {
                registration: reg("h1"),
                now_ms: 1,
            },
            create("a"),
            Command::SetHostStatus {
                host: "h1".into(),
                status: HostStatus::Down,
                now_ms: 3,
            },
        ],
    );
    let (r, _) = apply(
        &mut s,
        10,
        &Command::Place {
            placements: vec![
                Placement {
                    vm: "a".into(),
                    host: "h1".into(),
                    generation: 1,
                },
                Placement {
                    vm: "ghost".into(),
                    host: "h1".into(),
                    generation: 1,
                },
            ],
            unplaced: vec![],
            now_ms: 4,
            overcommit: None,
            capacity_rev: None,
        },
    );
    assert_eq!(
        r,
        Response::Placed {
            placed: 0,
            unplaced: 0
        }
    );
    assert_eq!(s.vms["a"].host, None);
}

#[test]
fn stop_before_placement_and_start_again() {
    let mut s = ClusterState::default();
    run(&mut s, &[create("a"), desired("a", DesiredState::Stopped)]);
    assert_eq!(s.vms["a"].state, VmState::Stopped);
    run(&mut s, &[desired("a", DesiredState::Running)]);
    assert_eq!(s.vms["a"].state, VmState::Pending);
    assert_eq!(s.vms["a"].generation, 3);
}

/// (policy, reported end, expect a restart)
#[test]
fn restart_policies() {
    let cases = [
        (RestartPolicy::Always, VmState::Failed, true),
        (RestartPolicy::Always, VmState::Stopped, true),
        (RestartPolicy::OnFailure, VmState::Failed, true),
        (RestartPolicy::OnFailure, VmState::Stopped, false),
        (RestartPolicy::Never, VmState::Failed, false),
        (RestartPolicy::Never, VmState::Stopped, false),
    ];
    for (policy, end, restart) in cases {
        let mut s = running();
        if let Some(vm) = s.vms.get_mut("a") {
            vm.spec.restart_policy = policy;
        }
        run(&mut s, &[report("h1", "a", end, 2, 10)]);
        let vm = &s.vms["a"];
        if restart {
            assert_eq!(
                (vm.state, vm.generation),
                (VmState::Scheduled, 3),
                "{policy:?} {end:?}"
            );
            assert_eq!(vm.restarts, vec![10]);
        } else {
            assert_eq!((vm.state, vm.generation), (end, 2), "{policy:?} {end:?}");
        }
    }
}

#[test]
fn crash_loop_ends_failed_and_the_window_forgets() {
    let mut s = running();
    if let Some(vm) = s.vms.get_mut("a") {
        vm.spec.max_restarts = Some(3);
        vm.spec.restart_window_secs = Some(60);
    }
    // Three failures within the window are restarted, the fourth is not.
    for (i, t) in [1_000u64, 2_000, 3_000].iter().enumerate() {
        let g = s.vms["a"].generation;
        run(&mut s, &[report("h1", "a", VmState::Failed, g, *t)]);
        assert_eq!(s.vms["a"].state, VmState::Scheduled, "failure {i}");
    }
    let g = s.vms["a"].generation;
    run(&mut s, &[report("h1", "a", VmState::Failed, g, 4_000)]);
    let vm = &s.vms["a"];
    assert_eq!(vm.state, VmState::Failed);
    assert!(
        vm.reason
            .as_deref()
            .is_some_and(|r| r.contains("giving up")),
        "{:?}",
        vm.reason
    );
    // `vm start` gives it a fresh budget.
    run(&mut s, &[desired("a", DesiredState::Running)]);
    assert_eq!(s.vms["a"].state, VmState::Scheduled);
    assert!(s.vms["a"].restarts.is_empty());
    // Failures spread wider than the window never give up.
    let mut t = 100_000;
    for _ in 0..10 {
        let g = s.vms["a"].generation;
        run(&mut s, &[report("h1", "a", VmState::Failed, g, t)]);
        assert_eq!(s.vms["a"].state, VmState::Scheduled);
        t += 61_000;
    }
}

#[test]
fn stale_reports_are_ignored() {
    let mut s = running();
    run(&mut s, &[report("h1", "a", VmState::Failed, 2, 10)]);
    assert_eq!(s.vms["a"].generation, 3);
    // The same failure again (an agent retrying its report) changes nothing.
    run(&mut s, &[report("h1", "a", VmState::Failed, 2, 11)]);
    assert_eq!(
        (s.vms["a"].state, s.vms["a"].generation),
        (VmState::Scheduled, 3)
    );
}

#[test]
fn host_loss_moves_or_fails_its_vms() {
    let mut s = running();
    run(
        &mut s,
        &[Command::CreateVm {
            spec: VmSpec {
                restart_policy: RestartPolicy::Never,
                ..spec("n")
            },
            now_ms: 1,
            idempotency_key: None,
            placement: None,
        }],
    );
    run(&mut s, &[place("n", "h1", 1)]);
    run(
        &mut s,
        &[Command::SetHostStatus {
            host: "h1".into(),
            status: HostStatus::Down,
            now_ms: 20,
        }],
    );
    let a = &s.vms["a"];
    assert_eq!((a.state, a.host.as_deref()), (VmState::Pending, None));
    assert!(a
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("host h1 lost")));
    let n = &s.vms["n"];
    assert_eq!((n.state, n.host.as_deref()), (VmState::Failed, None));
    // The host's agent, back, is refused: it must stop its copy (fencing).
    let r = run(&mut s, &[report("h1", "a", VmState::Running, 2, 21)]);
    assert!(matches!(r[0], Response::Error(ApplyError::Conflict(_))));
    // A heartbeat brings the host back up.
    run(
        &mut s,
        &[Command::Heartbeat {
            host: "h1".into(),
            now_ms: 22,
        }],
    );
    assert_eq!(s.hosts["h1"].status, HostStatus::Up);
}

#[test]
fn drain_stops_first_then_frees_the_vm() {
    let mut s = running();
    run(
        &mut s,
        &[Command::DrainHost {
            host: "h1".into(),
            deadline_ms: 1_000,
            now_ms: 10,
        }],
    );
    assert_eq!(s.hosts["h1"].status, HostStatus::Draining);
    let vm = &s.vms["a"];
    assert_eq!(
        (vm.state, vm.host.as_deref(), vm.generation),
        (VmState::Stopping, Some("h1"), 3)
    );
    assert!(vm.evicting.is_some());
    // Still assigned (as stopped) until the host confirms.
    run(&mut s, &[report("h1", "a", VmState::Stopped, 3, 11)]);
    let vm = &s.vms["a"];
    assert_eq!(
        (vm.state, vm.host.as_deref(), vm.evicting.is_some()),
        (VmState::Pending, None, false)
    );
    // Undrain.
    run(
        &mut s,
        &[Command::SetHostStatus {
            host: "h1".into(),
            status: HostStatus::Up,
            now_ms: 12,
        }],
    );
    assert_eq!(
        (s.hosts["h1"].status, s.hosts["h1"].drain_deadline_ms),
        (HostStatus::Up, None)
    );
}

#[test]
fn unassign_after_deadline_only_at_the_same_generation() {
    let mut s = running();
    run(
        &mut s,
        &[Command::DrainHost {
            host: "h1".into(),
            deadline_ms: 1_000,
            now_ms: 10,
        }],
    );
    let r = run(
        &mut s,
        &[Command::Unassign {
            vms: vec![VmRef {
                vm: "a".into(),
                generation: 1,
            }],
            reason: "late".into(),
            now_ms: 11,
            keep_on_live_host: None,
        }],
    );
    assert_eq!(r[0], Response::Count(0));
    let r = run(
        &mut s,
        &[Command::Unassign {
            vms: vec![VmRef {
                vm: "a".into(),
                generation: 3,
            }],
            reason: "drain deadline passed".into(),
            now_ms: 11,
            keep_on_live_host: None,
        }],
    );
    // An entry from before `keep_on_live_host` applies as it always did: the VM is taken off.
    assert_eq!(r[0], Response::Count(1));
    assert_eq!(s.vms["a"].host, None);
}

fn overdue(vm: &str, generation: u64, now_ms: u64) -> Command {
    Command::Unassign {
        vms: vec![VmRef {
            vm: vm.into(),
            generation,
        }],
        reason: "eviction deadline passed".into(),
        now_ms,
        keep_on_live_host: Some(true),
    }
}

/// Past its deadline, an evicted VM on a host that is not down stays assigned (the host has
/// not confirmed the stop) and says why, once; when the host is declared down it is freed.
#[test]
fn an_overdue_eviction_never_takes_a_vm_off_a_live_host() {
    let drain = Command::DrainHost {
        host: "h1".into(),
        deadline_ms: 1_000,
        now_ms: 10,
    };
    let mut update = spec("a");
    update.memory_mib = 256;
    let update = Command::UpdateVm {
        spec: update,
        expected_generation: None,
        now_ms: 10,
    };
    let cases = [
        (
            "drain",
            drain,
            "host h1 draining; deadline passed, waiting for h1 to confirm the VM stopped",
        ),
        (
            "update",
            update,
            "spec updated; deadline passed, waiting for h1 to confirm the VM stopped",
        ),
    ];
    for (name, evict, want) in cases {
        let mut s = running();
        run(&mut s, &[evict]);
        let r = run(&mut s, &[overdue("a", 3, 2_000)]);
        assert_eq!(r[0], Response::Count(0), "{name}");
        let vm = &s.vms["a"];
        assert_eq!(
            (vm.host.as_deref(), vm.state, vm.reason.as_deref()),
            (Some("h1"), VmState::Stopping, Some(want)),
            "{name}"
        );
        assert!(vm.evicting.is_some(), "{name}");
        // The same again writes nothing.
        let (_, touched) = apply(&mut s, 100, &overdue("a", 3, 2_500));
        assert_eq!(touched, Touched::default(), "{name}");
        // The host's confirmation still completes the eviction.
        let mut confirmed = s.clone();
        run(
            &mut confirmed,
            &[report("h1", "a", VmState::Stopped, 3, 3_000)],
        );
        assert_eq!(confirmed.vms["a"].host, None, "{name}");
        // A host declared down frees it too.
        run(
            &mut s,
            &[Command::SetHostStatus {
                host: "h1".into(),
                status: HostStatus::Down,
                now_ms: 3_000,
            }],
        );
        let vm = &s.vms["a"];
        assert_eq!(
            (vm.host.as_deref(), vm.state),
            (None, VmState::Pending),
            "{name}"
        );
    }
}

#[test]
fn update_of_a_running_vm_moves_it() {
    let mut s = running();
    let mut bigger = spec("a");
    bigger.memory_mib = 256;
    let r = run(
        &mut s,
        &[Command::UpdateVm {
            spec: bigger.clone(),
            expected_generation: Some(2),
            now_ms: 10,
        }],
    );
    assert!(matches!(&r[0], Response::Vm(v) if v.generation == 3 && v.state == VmState::Stopping));
    // Same spec again: nothing changes.
    let r = run(
        &mut s,
        &[Command::UpdateVm {
            spec: bigger,
            expected_generation: None,
            now_ms: 11,
        }],
    );
    assert!(matches!(&r[0], Response::Vm(v) if v.generation == 3));
}

#[test]
fn events_are_kept_in_order_and_resumable() {
    let mut s = running();
    let all = s.events_after(0).unwrap_or_default();
    let kinds: Vec<EventKind> = all.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::HostRegistered,
            EventKind::VmCreated,
            EventKind::VmPlaced,
            EventKind::VmState
        ]
    );
    let after = s.events_after(all[1].index).unwrap_or_default();
    assert_eq!(after.len(), 2);
    s.rebuild_derived(100);
    assert!(s.events_after(5).is_none());
    assert_eq!(s.events_after(100), Some(vec![]));
}

/// Pins the serialized form of every command: changing it breaks old logs and snapshots.
#[test]
fn command_encoding_is_stable() {
    let cases = [
        (
            Command::DeleteVm {
                name: "a".into(),
                now_ms: 7,
                expected_generation: None,
            },
            r#"{"type":"delete_vm","name":"a","now_ms":7}"#,
        ),
        (
            desired("a", DesiredState::Stopped),
            r#"{"type":"set_desired","name":"a","desired":"stopped","now_ms":5}"#,
        ),
        (
            Command::Heartbeat {
                host: "h".into(),
                now_ms: 2,
            },
            r#"{"type":"heartbeat","host":"h","now_ms":2}"#,
        ),
        (
            Command::SetHostStatus {
                host: "h".into(),
                status: HostStatus::Down,
                now_ms: 3,
            },
            r#"{"type":"set_host_status","host":"h","status":"down","now_ms":3}"#,
        ),
        (
            Command::Place {
                placements: vec![Placement {
                    vm: "a".into(),
                    host: "h".into(),
                    generation: 1,
                }],
                unplaced: vec![Unplaced {
                    vm: "b".into(),
                    reason: "r".into(),
                }],
                now_ms: 4,
                overcommit: None,
                capacity_rev: None,
            },
            r#"{"type":"place","placements":[{"vm":"a","host":"h","generation":1}],"unplaced":[{"vm":"b","reason":"r"}],"now_ms":4}"#,
        ),
        (
            Command::Place {
                placements: vec![],
                unplaced: vec![],
                now_ms: 4,
                overcommit: Some(Overcommit {
                    cpu_permille: 4000,
                    memory_permille: 1500,
                }),
                capacity_rev: None,
            },
            r#"{"type":"place","placements":[],"unplaced":[],"now_ms":4,"overcommit":{"cpu_permille":4000,"memory_permille":1500}}"#,
        ),
        (
            Command::Place {
                placements: vec![],
                unplaced: vec![],
                now_ms: 4,
                overcommit: None,
                capacity_rev: Some(7),
            },
            r#"{"type":"place","placements":[],"unplaced":[],"now_ms":4,"capacity_rev":7}"#,
        ),
        (
            Command::DrainHost {
                host: "h".into(),
                deadline_ms: 9,
                now_ms: 4,
            },
            r#"{"type":"drain_host","host":"h","deadline_ms":9,"now_ms":4}"#,
        ),
        (
            Command::Unassign {
                vms: vec![VmRef {
                    vm: "a".into(),
                    generation: 2,
                }],
                reason: "r".into(),
                now_ms: 4,
                keep_on_live_host: None,
            },
            r#"{"type":"unassign","vms":[{"vm":"a","generation":2}],"reason":"r","now_ms":4}"#,
        ),
        (
            Command::Unassign {
                vms: vec![],
                reason: "r".into(),
                now_ms: 4,
                keep_on_live_host: Some(true),
            },
            r#"{"type":"unassign","vms":[],"reason":"r","now_ms":4,"keep_on_live_host":true}"#,
        ),
        (
            Command::DeclareHostGone {
                host: "h".into(),
                now_ms: 5,
            },
            r#"{"type":"declare_host_gone","host":"h","now_ms":5}"#,
        ),
        (
            Command::Batch {
                commands: vec![Command::Heartbeat {
                    host: "h".into(),
                    now_ms: 2,
                }],
            },
            r#"{"type":"batch","commands":[{"type":"heartbeat","host":"h","now_ms":2}]}"#,
        ),
    ];
    for (cmd, json) in cases {
        assert_eq!(serde_json::to_string(&cmd).ok().as_deref(), Some(json));
        let back: Command = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, cmd);
    }
    // A registration from before `agent_url` existed decodes, and one with it round-trips.
    let old_reg = r#"{"type":"register_host","registration":{"id":"h","address":"","capacity":{"vcpus":4,"memory_mib":4096,"disk_gib":10,"kvm":false},"labels":{},"hypervisors":["process"]},"now_ms":1}"#;
    let reg_cmd = |agent_url: Option<&str>| Command::RegisterHost {
        registration: HostRegistration {
            agent_url: agent_url.map(str::to_string),
            ..reg("h")
        },
        now_ms: 1,
    };
    assert_eq!(
        serde_json::to_string(&reg_cmd(None)).ok().as_deref(),
        Some(old_reg)
    );
    let back: Command = serde_json::from_str(old_reg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, reg_cmd(None));
    let new_reg = old_reg.replace(
        r#""hypervisors":["process"]}"#,
        r#""hypervisors":["process"],"agent_url":"http://127.0.0.1:7101"}"#,
    );
    let with_url = reg_cmd(Some("http://127.0.0.1:7101"));
    assert_eq!(
        serde_json::to_string(&with_url).ok().as_deref(),
        Some(new_reg.as_str())
    );
    let back: Command = serde_json::from_str(&new_reg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, with_url);
    let create = r#"{"type":"create_vm","spec":{"name":"a","vcpus":1,"memory_mib":128,"hypervisor":"process","restart_policy":"always","strategy":"spread"},"now_ms":1}"#;
    assert_eq!(
        serde_json::to_string(&create_cmd()).ok().as_deref(),
        Some(create)
    );
    let stay = create.replace(
        r#""strategy":"spread"}"#,
        r#""strategy":"spread","on_host_loss":"stay"}"#,
    );
    let stay_cmd = Command::CreateVm {
        spec: VmSpec {
            on_host_loss: Some(OnHostLoss::Stay),
            ..spec("a")
        },
        now_ms: 1,
        idempotency_key: None,
        placement: None,
    };
    assert_eq!(
        serde_json::to_string(&stay_cmd).ok().as_deref(),
        Some(stay.as_str())
    );
    let back: Command = serde_json::from_str(&stay).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, stay_cmd);
}

fn create_cmd() -> Command {
    create("a")
}

/// A registered host record with 1 vCPU, 1 MiB and 1 GiB, for other modules' tests.
pub(crate) fn host_record(id: &str, status: blixard_api::HostStatus) -> blixard_api::Host {
    blixard_api::Host {
        fence: None,
        id: id.into(),
        address: String::new(),
        capacity: blixard_api::Capacity {
            vcpus: 1,
            memory_mib: 1,
            disk_gib: 1,
            kvm: false,
        },
        labels: Default::default(),
        hypervisors: vec![],
        status,
        last_heartbeat_ms: 0,
        registered_ms: 0,
        drain_deadline_ms: None,
        epoch: 1,
        agent_url: None,
    }
}

/// A VM running on `host` at generation 2, for other modules' tests.
pub(crate) fn running_vm(name: &str, host: &str) -> Vm {
    let mut s = running();
    let mut vm = s.vms.remove("a").unwrap_or_else(|| panic!("no vm"));
    vm.spec.name = name.into();
    vm.host = Some(host.into());
    vm
}

/// A batch applied at index `i` gives the same state, the same responses in order and the
/// same touched rows as its commands applied one by one at `i`, including commands that see
/// each other's effects (an idempotent repeat, a delete of a VM created just before).
#[test]
fn a_batch_applies_like_its_commands_in_order() {
    let mut keyed = create("k");
    if let Command::CreateVm {
        idempotency_key, ..
    } = &mut keyed
    {
        *idempotency_key = Some("key-1".into());
    }
    let cases: Vec<(&str, ClusterState, Vec<Command>)> = vec![
        ("empty", ClusterState::default(), vec![]),
        (
            "create then place then report",
            ClusterState::default(),
            vec![
                Command::RegisterHost {
                    registration: reg("h1"),
                    now_ms: 1,
                },
                create("a"),
                place("a", "h1", 1),
                report("h1", "a", VmState::Running, 2, 4),
            ],
        ),
        (
            "idempotent repeat and a duplicate",
            ClusterState::default(),
            vec![keyed.clone(), keyed, create("b"), create("b")],
        ),
        (
            "create then delete",
            ClusterState::default(),
            vec![
                create("c"),
                Command::DeleteVm {
                    name: "c".into(),
                    now_ms: 3,
                    expected_generation: None,
                },
            ],
        ),
        (
            "stop a running vm and refuse an unknown one",
            running(),
            vec![
                desired("a", DesiredState::Stopped),
                desired("nope", DesiredState::Stopped),
            ],
        ),
    ];
    for (name, start, cmds) in cases {
        let index = 50;
        let mut one_by_one = start.clone();
        let mut touched = Touched::default();
        let mut responses = Vec::new();
        for c in &cmds {
            let (r, t) = apply(&mut one_by_one, index, c);
            touched.merge(t);
            responses.push(r);
        }
        let mut batched = start;
        let (r, t) = apply(
            &mut batched,
            index,
            &Command::Batch {
                commands: cmds.clone(),
            },
        );
        assert_eq!(r, Response::Batch(responses), "{name}: responses");
        assert_eq!(t, touched, "{name}: touched");
        assert_eq!(batched, one_by_one, "{name}: state");
        assert_eq!(batched.events, one_by_one.events, "{name}: events");
    }
}

#[test]
fn a_batch_inside_a_batch_is_refused_alone() {
    let mut s = ClusterState::default();
    let inner = Command::Batch {
        commands: vec![create("x")],
    };
    let (r, _) = apply(
        &mut s,
        1,
        &Command::Batch {
            commands: vec![inner, create("y")],
        },
    );
    let Response::Batch(rs) = r else {
        panic!("not a batch response: {r:?}");
    };
    assert!(matches!(rs[0], Response::Error(ApplyError::Conflict(_))));
    assert!(matches!(rs[1], Response::Vm(_)));
    assert!(!s.vms.contains_key("x"));
    assert!(s.vms.contains_key("y"));
}

/// A stop of an older incarnation (or of an unknown one, generation 0) never completes an
/// eviction: only the host's confirmation that the current generation stopped does.
#[test]
fn only_a_stop_of_the_current_generation_completes_an_eviction() {
    for (generation, completes) in [(2, false), (0, false), (3, true)] {
        let mut s = running();
        run(
            &mut s,
            &[Command::DrainHost {
                host: "h1".into(),
                deadline_ms: 1_000,
                now_ms: 10,
            }],
        );
        assert_eq!(s.vms["a"].generation, 3);
        run(
            &mut s,
            &[report("h1", "a", VmState::Stopped, generation, 11)],
        );
        let vm = &s.vms["a"];
        if completes {
            assert_eq!((vm.host.as_deref(), vm.state), (None, VmState::Pending));
        } else {
            assert_eq!(
                (vm.host.as_deref(), vm.state, vm.evicting.is_some()),
                (Some("h1"), VmState::Stopping, true),
                "a stop at generation {generation} must not free the VM"
            );
        }
    }
}

fn vm_spec(name: &str, memory_mib: u64, f: impl FnOnce(&mut VmSpec)) -> VmSpec {
    let mut s = spec(name);
    s.memory_mib = memory_mib;
    f(&mut s);
    s
}

/// Every placement is checked again where it is applied, by the scheduler's rule, against
/// the state at that index and the placements before it in the same command; one that no
/// longer fits leaves its VM pending with the reason. A `Place` without the ratios (written
/// before they were carried) applies as it always did.
#[test]
fn placements_are_checked_again_when_applied() {
    struct Case {
        name: &'static str,
        /// Applied after `h1` (4 vCPUs, 4096 MiB, process) registered and the VMs were created.
        between: Vec<Command>,
        vms: Vec<VmSpec>,
        place: Vec<(&'static str, &'static str)>,
        overcommit: Option<Overcommit>,
        /// (vm, host, the start of its reason)
        want: Vec<(&'static str, Option<&'static str>, Option<&'static str>)>,
    }
    let oc = Some(Overcommit::default());
    let small = |h: &str, mem: u64| Command::RegisterHost {
        registration: HostRegistration {
            capacity: Capacity {
                vcpus: 4,
                memory_mib: mem,
                disk_gib: 10,
                kvm: false,
            },
            ..reg(h)
        },
        now_ms: 2,
    };
    let drain = Command::DrainHost {
        host: "h1".into(),
        deadline_ms: 100,
        now_ms: 2,
    };
    let down = Command::SetHostStatus {
        host: "h1".into(),
        status: HostStatus::Down,
        now_ms: 2,
    };
    let db = |n: &str| vm_spec(n, 128, |s| s.anti_affinity = Some("db".into()));
    let cases = vec![
        Case {
            name: "fits",
            between: vec![],
            vms: vec![spec("a")],
            place: vec![("a", "h1")],
            overcommit: oc,
            want: vec![("a", Some("h1"), None)],
        },
        Case {
            name: "host draining since the decision",
            between: vec![drain.clone()],
            vms: vec![spec("a")],
            place: vec![("a", "h1")],
            overcommit: oc,
            want: vec![(
                "a",
                None,
                Some("placement on h1 no longer fits: host is draining"),
            )],
        },
        Case {
            name: "host down since the decision",
            between: vec![down.clone()],
            vms: vec![spec("a")],
            place: vec![("a", "h1")],
            overcommit: oc,
            want: vec![(
                "a",
                None,
                Some("placement on h1 no longer fits: host is down"),
            )],
        },
        Case {
            name: "unknown host",
            between: vec![],
            vms: vec![spec("a")],
            place: vec![("a", "h9")],
            overcommit: oc,
            want: vec![(
                "a",
                None,
                Some("placement on h9 no longer fits: host not registered"),
            )],
        },
        Case {
            name: "capacity shrunk by a registration since the decision",
            between: vec![small("h1", 100)],
            vms: vec![spec("a")],
            place: vec![("a", "h1")],
            overcommit: oc,
            want: vec![(
                "a",
                None,
                Some("placement on h1 no longer fits: not enough memory"),
            )],
        },
        Case {
            name: "two placements in one command overcommit the host",
            between: vec![small("h1", 200)],
            vms: vec![spec("a"), spec("b")],
            place: vec![("a", "h1"), ("b", "h1")],
            overcommit: oc,
            want: vec![
                ("a", Some("h1"), None),
                (
                    "b",
                    None,
                    Some("placement on h1 no longer fits: not enough memory"),
                ),
            ],
        },
        Case {
            name: "vCPUs under the overcommit ratio",
            between: vec![],
            vms: vec![
                vm_spec("a", 1, |s| s.vcpus = 12),
                vm_spec("b", 1, |s| s.vcpus = 4),
                vm_spec("c", 1, |s| s.vcpus = 1),
            ],
            place: vec![("a", "h1"), ("b", "h1"), ("c", "h1")],
            overcommit: oc,
            want: vec![
                ("a", Some("h1"), None),
                ("b", Some("h1"), None),
                (
                    "c",
                    None,
                    Some("placement on h1 no longer fits: not enough vCPUs"),
                ),
            ],
        },
        Case {
            name: "anti-affinity within one command",
            between: vec![],
            vms: vec![db("a"), db("b")],
            place: vec![("a", "h1"), ("b", "h1")],
            overcommit: oc,
            want: vec![
                ("a", Some("h1"), None),
                (
                    "b",
                    None,
                    Some(
                        "placement on h1 no longer fits: its anti-affinity group is already there",
                    ),
                ),
            ],
        },
        Case {
            name: "a refused placement does not count against the host",
            between: vec![small("h1", 200)],
            vms: vec![vm_spec("big", 300, |_| {}), spec("a")],
            place: vec![("big", "h1"), ("a", "h1")],
            overcommit: oc,
            want: vec![
                (
                    "big",
                    None,
                    Some("placement on h1 no longer fits: not enough memory"),
                ),
                ("a", Some("h1"), None),
            ],
        },
        Case {
            name: "label constraint",
            between: vec![],
            vms: vec![vm_spec("a", 128, |s| {
                s.constraints.insert("zone".into(), "a".into());
            })],
            place: vec![("a", "h1")],
            overcommit: oc,
            want: vec![(
                "a",
                None,
                Some("placement on h1 no longer fits: host lacks required labels"),
            )],
        },
        Case {
            name: "hypervisor",
            between: vec![],
            vms: vec![vm_spec("a", 128, |s| s.hypervisor = Hypervisor::Qemu)],
            place: vec![("a", "h1")],
            overcommit: oc,
            want: vec![(
                "a",
                None,
                Some("placement on h1 no longer fits: host lacks the hypervisor"),
            )],
        },
        Case {
            name: "old entry: no capacity re-check",
            between: vec![small("h1", 200)],
            vms: vec![spec("a"), spec("b"), db("c"), db("d")],
            place: vec![("a", "h1"), ("b", "h1"), ("c", "h1"), ("d", "h1")],
            overcommit: None,
            want: vec![
                ("a", Some("h1"), None),
                ("b", Some("h1"), None),
                ("c", Some("h1"), None),
                ("d", Some("h1"), None),
            ],
        },
        Case {
            name: "old entry: a draining host is skipped silently",
            between: vec![drain],
            vms: vec![spec("a")],
            place: vec![("a", "h1")],
            overcommit: None,
            want: vec![("a", None, Some("waiting for placement"))],
        },
    ];
    for c in cases {
        let mut s = ClusterState::default();
        let mut cmds = vec![Command::RegisterHost {
            registration: reg("h1"),
            now_ms: 1,
        }];
        cmds.extend(c.vms.iter().map(|spec| Command::CreateVm {
            spec: spec.clone(),
            now_ms: 1,
            idempotency_key: None,
            placement: None,
        }));
        cmds.extend(c.between);
        run(&mut s, &cmds);
        let placements = c
            .place
            .iter()
            .map(|(vm, host)| Placement {
                vm: vm.to_string(),
                host: host.to_string(),
                generation: 1,
            })
            .collect::<Vec<_>>();
        let n = placements.len();
        let r = run(
            &mut s,
            &[Command::Place {
                placements,
                unplaced: vec![],
                now_ms: 3,
                overcommit: c.overcommit,
                capacity_rev: None,
            }],
        );
        let placed = c.want.iter().filter(|w| w.1.is_some()).count();
        if c.overcommit.is_some() {
            assert_eq!(
                r[0],
                Response::Placed {
                    placed,
                    unplaced: n - placed
                },
                "{}",
                c.name
            );
        }
        for (vm, host, reason) in c.want {
            let v = &s.vms[vm];
            assert_eq!(v.host.as_deref(), host, "{}: {vm}", c.name);
            match reason {
                Some(r) => {
                    assert_eq!(v.reason.as_deref(), Some(r), "{}: {vm}", c.name);
                    assert_eq!(v.state, VmState::Pending, "{}: {vm}", c.name);
                    assert_eq!(v.generation, 1, "{}: {vm}", c.name);
                }
                None => assert_eq!(v.state, VmState::Scheduled, "{}: {vm}", c.name),
            }
        }
    }
}

/// `h1` with `mv` (on_host_loss move) and `st` (stay, restart policy never) placed and running.
fn running_move_and_stay() -> ClusterState {
    let mut s = ClusterState::default();
    let stay = VmSpec {
        on_host_loss: Some(OnHostLoss::Stay),
        restart_policy: RestartPolicy::Never,
        ..spec("st")
    };
    run(
        &mut s,
        &[
            Command::RegisterHost {
                registration: reg("h1"),
                now_ms: 1,
            },
            create("mv"),
            Command::CreateVm {
                spec: stay,
                now_ms: 1,
                idempotency_key: None,
                placement: None,
            },
            place("mv", "h1", 1),
            place("st", "h1", 1),
            report("h1", "mv", VmState::Running, 2, 4),
            report("h1", "st", VmState::Running, 2, 4),
        ],
    );
    s
}

const STAY_LOST: &str =
    "host h1 lost; on_host_loss=stay: waiting for the host to come back or to be declared gone";

/// A host declared down: its `move` VMs are placed again, its `stay` VMs stay assigned to it
/// (they may still run there) and say so, and are not pending. When the host comes back (a
/// heartbeat or a registration), they are still there, no longer waiting.
#[test]
fn stay_vms_wait_for_their_lost_host() {
    let back_by: [(&str, Command); 3] = [
        (
            "heartbeat",
            Command::Heartbeat {
                host: "h1".into(),
                now_ms: 30,
            },
        ),
        (
            "registration",
            Command::RegisterHost {
                registration: reg("h1"),
                now_ms: 30,
            },
        ),
        (
            "status up",
            Command::SetHostStatus {
                host: "h1".into(),
                status: HostStatus::Up,
                now_ms: 30,
            },
        ),
    ];
    for (name, back) in back_by {
        let mut s = running_move_and_stay();
        run(
            &mut s,
            &[Command::SetHostStatus {
                host: "h1".into(),
                status: HostStatus::Down,
                now_ms: 20,
            }],
        );
        let mv = &s.vms["mv"];
        assert_eq!((mv.host.as_deref(), mv.state), (None, VmState::Pending));
        let st = &s.vms["st"];
        assert_eq!(
            (
                st.host.as_deref(),
                st.state,
                st.generation,
                st.reason.as_deref()
            ),
            (Some("h1"), VmState::Running, 2, Some(STAY_LOST))
        );
        let pending: Vec<&str> = crate::scheduler::pending(&s)
            .iter()
            .map(|v| v.spec.name.as_str())
            .collect();
        assert_eq!(pending, ["mv"]);
        run(&mut s, &[back]);
        assert_eq!(s.hosts["h1"].status, HostStatus::Up, "{name}");
        let st = &s.vms["st"];
        assert_eq!(
            (st.host.as_deref(), st.generation, st.reason.as_deref()),
            (Some("h1"), 2, None),
            "{name}"
        );
        // Its agent's reports are accepted as before.
        let r = run(&mut s, &[report("h1", "st", VmState::Stopped, 2, 31)]);
        assert!(
            matches!(&r[0], Response::Vm(v) if v.state == VmState::Stopped),
            "{name}"
        );
    }
}

/// A `stay` VM being drained when its host is lost stays too, past its deadline.
#[test]
fn an_overdue_eviction_of_a_stay_vm_on_a_lost_host_keeps_it() {
    let mut s = running_move_and_stay();
    run(
        &mut s,
        &[
            Command::DrainHost {
                host: "h1".into(),
                deadline_ms: 100,
                now_ms: 10,
            },
            Command::SetHostStatus {
                host: "h1".into(),
                status: HostStatus::Down,
                now_ms: 20,
            },
        ],
    );
    let g = s.vms["st"].generation;
    let r = run(&mut s, &[overdue("st", g, 200)]);
    assert_eq!(r[0], Response::Count(0));
    let st = &s.vms["st"];
    assert_eq!(
        (st.host.as_deref(), st.reason.as_deref()),
        (Some("h1"), Some(STAY_LOST))
    );
    assert!(crate::leader_loop::overdue_evictions(&s, 300).is_empty());
}

/// Declaring a host gone takes every VM off it, `stay` ones included (placed again, or failed
/// for restart policy never), and the host stays down: its heartbeats are refused as from an
/// unknown host until its agent registers again.
#[test]
fn declare_host_gone_frees_every_vm_and_keeps_the_host_down() {
    let mut s = running_move_and_stay();
    let rev = s.host_revision("h1");
    let r = run(
        &mut s,
        &[Command::DeclareHostGone {
            host: "h1".into(),
            now_ms: 20,
        }],
    );
    assert!(matches!(&r[0], Response::Host(h) if h.status == HostStatus::Down));
    assert!(s.host_revision("h1") > rev);
    let mv = &s.vms["mv"];
    assert_eq!(
        (mv.host.as_deref(), mv.state, mv.reason.as_deref()),
        (
            None,
            VmState::Pending,
            Some("host h1 declared gone; waiting for placement")
        )
    );
    let st = &s.vms["st"];
    assert_eq!((st.host.as_deref(), st.state), (None, VmState::Failed));
    let mut pending_stay = running_move_and_stay();
    if let Some(v) = pending_stay.vms.get_mut("st") {
        v.spec.restart_policy = RestartPolicy::Always;
    }
    run(
        &mut pending_stay,
        &[Command::DeclareHostGone {
            host: "h1".into(),
            now_ms: 20,
        }],
    );
    assert_eq!(
        (
            pending_stay.vms["st"].host.as_deref(),
            pending_stay.vms["st"].state
        ),
        (None, VmState::Pending)
    );
    // The old agent, if it was alive after all, is refused and must register again.
    let r = run(
        &mut s,
        &[
            Command::Heartbeat {
                host: "h1".into(),
                now_ms: 21,
            },
            Command::SetHostStatus {
                host: "h1".into(),
                status: HostStatus::Up,
                now_ms: 21,
            },
            report("h1", "mv", VmState::Running, 2, 21),
        ],
    );
    assert!(r.iter().all(|r| matches!(r, Response::Error(_))), "{r:?}");
    assert!(matches!(r[0], Response::Error(ApplyError::NotFound(_))));
    assert_eq!(s.hosts["h1"].status, HostStatus::Down);
    let epoch = s.hosts["h1"].epoch;
    run(
        &mut s,
        &[
            Command::RegisterHost {
                registration: reg("h1"),
                now_ms: 22,
            },
            Command::Heartbeat {
                host: "h1".into(),
                now_ms: 23,
            },
        ],
    );
    let h = &s.hosts["h1"];
    assert_eq!((h.status, h.epoch), (HostStatus::Up, epoch + 1));
    // Unknown hosts.
    let r = run(
        &mut s,
        &[Command::DeclareHostGone {
            host: "nope".into(),
            now_ms: 24,
        }],
    );
    assert!(matches!(r[0], Response::Error(ApplyError::NotFound(_))));
}

/// A create carrying the leader's placement is placed in the same entry, checked as a `Place`
/// would be; one that no longer fits stays pending with the reason.
#[test]
fn a_create_with_its_placement_is_placed_in_the_same_entry_if_it_still_fits() {
    let with = |name: &str, host: &str| Command::CreateVm {
        spec: spec(name),
        now_ms: 1,
        idempotency_key: None,
        placement: Some(crate::state_machine::Admitted::Placed {
            host: host.into(),
            overcommit: Overcommit::default(),
        }),
    };
    let mut s = ClusterState::default();
    let out = run(
        &mut s,
        &[
            Command::RegisterHost {
                registration: reg("h1"),
                now_ms: 1,
            },
            with("a", "h1"),
            with("b", "nowhere"),
        ],
    );
    assert!(matches!(&out[1], Response::Vm(v) if v.host.as_deref() == Some("h1")));
    let a = &s.vms["a"];
    assert_eq!((a.state, a.generation), (VmState::Scheduled, 2));
    let b = &s.vms["b"];
    assert_eq!((b.state, b.host.as_deref()), (VmState::Pending, None));
    assert!(
        b.reason
            .as_deref()
            .is_some_and(|r| r.contains("no longer fits")),
        "{:?}",
        b.reason
    );
}

fn task_spec(name: &str, f: impl FnOnce(&mut blixard_api::TaskSpec, &mut VmSpec)) -> VmSpec {
    let mut s = spec(name);
    let mut t = blixard_api::TaskSpec::default();
    f(&mut t, &mut s);
    s.task = Some(t);
    s
}

fn task_end(
    state: VmState,
    generation: u64,
    reason: TaskEndReason,
    exit_status: Option<i32>,
    now_ms: u64,
) -> Command {
    Command::ReportVmStatus {
        host: "h1".into(),
        name: "t".into(),
        report: VmStatusReport {
            state,
            reason: Some("ended".into()),
            generation,
            task_end: Some(TaskEnd {
                reason,
                exit_status,
                detail: None,
                console: vec!["line 1".into(), "line 2".into()],
            }),
        },
        now_ms,
    }
}

/// Host `h1` with task `t` (spec from `spec`) placed at generation 2 and reported running
/// at 4.
fn running_task(spec: VmSpec) -> ClusterState {
    let mut s = ClusterState::default();
    run(
        &mut s,
        &[
            Command::RegisterHost {
                registration: reg("h1"),
                now_ms: 1,
            },
            Command::CreateVm {
                spec,
                now_ms: 1,
                idempotency_key: None,
                placement: None,
            },
            place("t", "h1", 1),
            report("h1", "t", VmState::Running, 2, 4),
        ],
    );
    assert_eq!(s.vms["t"].state, VmState::Running);
    assert_eq!(s.vms["t"].task_started_ms, Some(4));
    s
}

#[test]
fn task_ends_become_results() {
    use TaskEndReason::*;
    struct Case {
        what: &'static str,
        spec: VmSpec,
        ends: Vec<(VmState, TaskEndReason, Option<i32>)>,
        // The VM's state, host, summary and restarts after the last end.
        state: VmState,
        host: Option<&'static str>,
        summary: &'static str,
    }
    let cases = [
        Case {
            what: "exit 0 succeeds and leaves the host",
            spec: task_spec("t", |_, _| {}),
            ends: vec![(VmState::Stopped, Exited, Some(0))],
            state: VmState::Stopped,
            host: None,
            summary: "succeeded: exited with status 0",
        },
        Case {
            what: "exit 3 fails, no retry by default (restart policy does not apply)",
            spec: task_spec("t", |_, s| s.restart_policy = RestartPolicy::Always),
            ends: vec![(VmState::Failed, Exited, Some(3))],
            state: VmState::Failed,
            host: None,
            summary: "failed: exited with status 3",
        },
        Case {
            what: "timed out",
            spec: task_spec("t", |t, _| t.timeout_secs = Some(2)),
            ends: vec![(VmState::Failed, TimedOut, None)],
            state: VmState::Failed,
            host: None,
            summary: "failed: timed out after 2 s",
        },
        Case {
            what: "a failure runs again within max_restarts",
            spec: task_spec("t", |_, s| s.max_restarts = Some(1)),
            ends: vec![(VmState::Failed, Exited, Some(1))],
            state: VmState::Scheduled,
            host: Some("h1"),
            summary: "failed: exited with status 1",
        },
        Case {
            what: "and then no more",
            spec: task_spec("t", |_, s| s.max_restarts = Some(1)),
            ends: vec![
                (VmState::Failed, Exited, Some(1)),
                (VmState::Failed, Exited, Some(2)),
            ],
            state: VmState::Failed,
            host: None,
            summary: "failed: exited with status 2",
        },
        Case {
            what: "a success is never run again",
            spec: task_spec("t", |_, s| s.max_restarts = Some(5)),
            ends: vec![(VmState::Stopped, Exited, Some(0))],
            state: VmState::Stopped,
            host: None,
            summary: "succeeded: exited with status 0",
        },
        Case {
            what: "could not start",
            spec: task_spec("t", |_, _| {}),
            ends: vec![(VmState::Failed, CouldNotStart, None)],
            state: VmState::Failed,
            host: None,
            summary: "failed: could not start",
        },
        Case {
            what: "fenced on its host: host lost, not run again",
            spec: task_spec("t", |_, s| s.max_restarts = Some(3)),
            ends: vec![(VmState::Failed, HostLost, None)],
            state: VmState::Failed,
            host: None,
            summary: "failed: host h1 lost",
        },
        Case {
            what: "fenced, rerun allowed: runs again, uncounted",
            spec: task_spec("t", |t, _| t.rerun_on_host_loss = true),
            ends: vec![(VmState::Failed, HostLost, None)],
            state: VmState::Scheduled,
            host: Some("h1"),
            summary: "failed: host h1 lost",
        },
    ];
    for c in cases {
        let mut s = running_task(c.spec);
        let mut now = 10;
        for (state, reason, status) in &c.ends {
            let g = s.vms["t"].generation;
            run(&mut s, &[task_end(*state, g, *reason, *status, now)]);
            now += 10;
        }
        let vm = &s.vms["t"];
        assert_eq!(vm.state, c.state, "{}", c.what);
        assert_eq!(vm.host.as_deref(), c.host, "{}", c.what);
        let r = vm.task_result.as_ref().expect(c.what);
        assert_eq!(r.summary(), c.summary, "{}", c.what);
        assert_eq!(r.host.as_deref(), Some("h1"), "{}", c.what);
        assert_eq!(r.console, vec!["line 1", "line 2"], "{}", c.what);
        assert_eq!(vm.task_finished(), c.host.is_none(), "{}", c.what);
        if vm.task_finished() {
            assert_eq!(vm.reason.as_deref(), Some(c.summary), "{}", c.what);
            // Nothing the old host says changes it any more.
            let late = task_end(VmState::Failed, vm.generation, Exited, Some(9), 99);
            let before = s.vms["t"].clone();
            let r = run(&mut s, &[late]);
            assert!(matches!(r[0], Response::Error(ApplyError::Conflict(_))));
            assert_eq!(s.vms["t"], before, "{}", c.what);
        }
    }
}

#[test]
fn a_task_whose_host_is_lost_fails_or_runs_elsewhere_when_allowed() {
    let down = Command::SetHostStatus {
        host: "h1".into(),
        status: HostStatus::Down,
        now_ms: 20,
    };
    let mut s = running_task(task_spec("t", |_, s| s.max_restarts = Some(3)));
    let rev = s.host_revision("h1");
    run(&mut s, std::slice::from_ref(&down));
    let vm = &s.vms["t"];
    assert_eq!((vm.state, vm.host.as_deref()), (VmState::Failed, None));
    let r = vm.task_result.as_ref().expect("a result");
    assert_eq!(r.reason, TaskEndReason::HostLost);
    assert_eq!(r.summary(), "failed: host h1 lost");
    assert_eq!((r.started_ms, r.ended_ms), (Some(4), 20));
    assert!(s.host_revision("h1") > rev);

    let mut s = running_task(task_spec("t", |t, _| t.rerun_on_host_loss = true));
    run(&mut s, &[down]);
    let vm = &s.vms["t"];
    assert_eq!((vm.state, vm.host.as_deref()), (VmState::Pending, None));
    assert!(vm.task_result.is_none());

    // Declared gone: the same.
    let mut s = running_task(task_spec("t", |_, _| {}));
    run(
        &mut s,
        &[Command::DeclareHostGone {
            host: "h1".into(),
            now_ms: 30,
        }],
    );
    assert_eq!(s.vms["t"].state, VmState::Failed);
    assert_eq!(
        s.vms["t"].task_result.as_ref().map(|r| r.summary()),
        Some("failed: host h1 declared gone".to_string())
    );
}

#[test]
fn finished_tasks_expire_after_their_retention() {
    let mut s = running_task(task_spec("t", |_, _| {}));
    run(
        &mut s,
        &[task_end(
            VmState::Stopped,
            2,
            TaskEndReason::Exited,
            Some(0),
            100,
        )],
    );
    s.vms.insert("a".into(), running_vm("a", "h1"));
    s.index.update("a", s.vms.get("a"), 5);
    assert!(expired_tasks(&s, 1099, 1000).is_empty());
    let expired = expired_tasks(&s, 1100, 1000);
    assert_eq!(
        expired,
        vec![VmRef {
            vm: "t".into(),
            generation: 3
        }]
    );
    // A task running again (vm start) is not collected.
    run(&mut s, &[desired("t", DesiredState::Running)]);
    assert_eq!(s.vms["t"].state, VmState::Pending);
    assert!(expired_tasks(&s, 5000, 1000).is_empty());
}

#[test]
fn task_encodings_are_stable_and_old_reports_decode() {
    let create = Command::CreateVm {
        spec: task_spec("t", |t, _| {
            t.timeout_secs = Some(60);
            t.rerun_on_host_loss = true;
        }),
        now_ms: 1,
        idempotency_key: None,
        placement: None,
    };
    let json = r#"{"type":"create_vm","spec":{"name":"t","vcpus":1,"memory_mib":128,"hypervisor":"process","restart_policy":"always","strategy":"spread","task":{"timeout_secs":60,"rerun_on_host_loss":true}},"now_ms":1}"#;
    assert_eq!(serde_json::to_string(&create).ok().as_deref(), Some(json));
    let end = task_end(VmState::Failed, 2, TaskEndReason::TimedOut, None, 5);
    let json = r#"{"type":"report_vm_status","host":"h1","name":"t","report":{"state":"failed","reason":"ended","generation":2,"task_end":{"reason":"timed-out","console":["line 1","line 2"]}},"now_ms":5}"#;
    assert_eq!(serde_json::to_string(&end).ok().as_deref(), Some(json));
    let back: Command = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, end);
    // A report from before tasks decodes without `task_end`.
    let old = r#"{"type":"report_vm_status","host":"h1","name":"a","report":{"state":"running","generation":2},"now_ms":5}"#;
    let back: Command = serde_json::from_str(old).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(back, Command::ReportVmStatus { report, .. } if report.task_end.is_none()));
}

#[test]
fn a_drain_lets_a_task_run_to_its_end() {
    let mut s = running_task(task_spec("t", |_, _| {}));
    run(
        &mut s,
        &[Command::DrainHost {
            host: "h1".into(),
            deadline_ms: 1000,
            now_ms: 10,
        }],
    );
    let vm = &s.vms["t"];
    assert_eq!(
        (vm.state, vm.host.as_deref()),
        (VmState::Running, Some("h1"))
    );
    assert!(vm.evicting.is_none());
    run(
        &mut s,
        &[task_end(
            VmState::Stopped,
            2,
            TaskEndReason::Exited,
            Some(0),
            20,
        )],
    );
    assert!(s.vms["t"].task_finished());
    assert_eq!(s.vms["t"].host, None);
}

fn unplaced(vm: &str, capacity_rev: Option<u64>) -> Command {
    Command::Place {
        placements: vec![],
        unplaced: vec![Unplaced {
            vm: vm.into(),
            reason: "no host fits: 1 host short of memory".into(),
        }],
        now_ms: 6,
        overcommit: Some(Overcommit::default()),
        capacity_rev,
    }
}

#[test]
fn a_vm_that_fits_nowhere_is_tried_again_only_after_capacity_changes() {
    let mut s = running();
    let mut big = spec("big");
    big.memory_mib = 100_000;
    let create_big = Command::CreateVm {
        spec: big,
        now_ms: 5,
        idempotency_key: None,
        placement: None,
    };
    run(&mut s, &[create_big]);
    assert!(scheduler::any_pending(&s));
    // Decided on an older capacity: not blocked, it is tried again.
    let rev = s.index.capacity_rev();
    run(&mut s, &[unplaced("big", Some(rev - 1))]);
    assert!(scheduler::any_pending(&s));
    // Decided on the current one: blocked, but still listed as pending.
    run(&mut s, &[unplaced("big", Some(rev))]);
    assert!(!scheduler::any_pending(&s));
    assert!(s.index.is_blocked("big"));
    assert_eq!(scheduler::pending(&s).len(), 1);
    // An entry from before the revision was carried blocks nothing.
    let mut t = running();
    run(&mut t, &[create("p"), unplaced("p", None)]);
    assert!(scheduler::any_pending(&t));
    // A report that changes nothing on the host keeps it blocked; a VM leaving the host frees
    // capacity, so it is tried again.
    run(&mut s, &[report("h1", "a", VmState::Running, 2, 7)]);
    assert!(s.index.is_blocked("big"));
    run(
        &mut s,
        &[Command::DeleteVm {
            name: "a".into(),
            now_ms: 8,
            expected_generation: None,
        }],
    );
    assert!(scheduler::any_pending(&s));
    // Blocked again; a host registering is a capacity change too.
    let rev = s.index.capacity_rev();
    run(&mut s, &[unplaced("big", Some(rev))]);
    assert!(!scheduler::any_pending(&s));
    run(
        &mut s,
        &[Command::RegisterHost {
            registration: reg("h2"),
            now_ms: 9,
        }],
    );
    assert!(scheduler::any_pending(&s));
    // Blocked again; an update of the VM itself (a new generation) is tried at once.
    let rev = s.index.capacity_rev();
    run(&mut s, &[unplaced("big", Some(rev))]);
    assert!(s.index.is_blocked("big"));
    let mut smaller = spec("big");
    smaller.memory_mib = 99_000;
    run(
        &mut s,
        &[Command::UpdateVm {
            spec: smaller,
            expected_generation: None,
            now_ms: 10,
        }],
    );
    assert!(!s.index.is_blocked("big"));
    assert!(scheduler::any_pending(&s));
}

#[test]
fn the_index_follows_hosts_keys_evictions_and_deletes() {
    let mut s = running();
    let keyed = Command::CreateVm {
        spec: spec("k"),
        now_ms: 5,
        idempotency_key: Some("key-1".into()),
        placement: None,
    };
    run(&mut s, &[keyed.clone(), place("k", "h1", 1)]);
    assert_eq!(s.keys.get("key-1").map(|r| r.vm.as_str()), Some("k"));
    assert_eq!(
        s.assigned_to("h1")
            .map(|v| v.spec.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "k"]
    );
    assert_eq!(
        s.index.load("h1").map(|l| (l.vcpus, l.memory_mib)),
        Some((2, 256))
    );
    // A drain puts both under eviction; the index lists them for the leader's timer.
    run(
        &mut s,
        &[Command::DrainHost {
            host: "h1".into(),
            deadline_ms: 100,
            now_ms: 6,
        }],
    );
    assert_eq!(s.index.evicting().collect::<Vec<_>>(), ["a", "k"]);
    // Deleted: gone from every index, the key with it.
    run(
        &mut s,
        &[Command::DeleteVm {
            name: "k".into(),
            now_ms: 7,
            expected_generation: None,
        }],
    );
    assert!(s.keys.get("key-1").is_some_and(|r| r.deleted_ms == Some(7)));
    assert_eq!(s.index.evicting().collect::<Vec<_>>(), ["a"]);
    assert_eq!(s.index.load("h1").map(|l| l.vcpus), Some(1));
}

#[test]
fn a_restore_never_takes_a_generation_back() {
    let mut s = running();
    let current = s.vms["a"].generation;
    let mut old_a = s.vms["a"].clone();
    old_a.generation = 1;
    let mut b = running_vm("b", "h1");
    b.generation = 5;
    let hosts: Vec<Host> = s.hosts.values().cloned().collect();
    let out = run(
        &mut s,
        &[Command::RestoreState {
            hosts,
            vms: vec![old_a, b],
            now_ms: 9,
        }],
    );
    assert_eq!(out[0], Response::Count(2));
    assert_eq!(s.vms["a"].generation, current + 1);
    assert_eq!(s.vms["b"].generation, 5);
    assert_eq!(
        s.assigned_to("h1")
            .map(|v| v.spec.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
}
