//! Placement: cluster view + pending VMs → placements, as a pure, deterministic function.
//!
//! The leader runs it whenever VMs are pending and commits the result through Raft as one
//! `Place` command (a batch). Rules:
//! - a host must be `up`, run the VM's hypervisor, and carry every label the VM requires;
//! - the host's vCPUs and memory, times the overcommit ratios, are never exceeded by the VMs
//!   assigned to it (every assigned VM holds its reservation, running or not);
//! - no two VMs of one anti-affinity group share a host;
//! - among the hosts that fit, `spread` picks the one with the most free memory, `binpack`
//!   the one with the least; ties break on the host id, so equal input gives equal output.
//!
//! The rules themselves are one function, [`fit`], which the state machine also runs when it
//! applies a `Place` (a placement decided on a lagging state may no longer fit at its index).

use std::collections::BTreeMap;
use std::ops::Bound;

use blixard_api::{DesiredState, Host, HostStatus, PlacementStrategy, Vm, VmSpec, VmState};
use serde::{Deserialize, Serialize};

use crate::state_index::PendingKey;
use crate::state_machine::{ClusterState, Placement, Unplaced};

/// How far a host's resources may be promised beyond what it has, in thousandths (4000 = 4×).
/// Integers, not floats: the leader carries them in every `Place` it proposes, and each node
/// re-checks the placements with them, so every node must compute the same limits bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overcommit {
    pub cpu_permille: u64,
    pub memory_permille: u64,
}

impl Default for Overcommit {
    fn default() -> Self {
        Overcommit {
            cpu_permille: 4_000,
            memory_permille: 1_000,
        }
    }
}

/// What the VMs assigned to a host reserve (every assigned VM holds its reservation, running
/// or not), and the anti-affinity groups among them, each with how many of its VMs are there
/// (so that taking one off keeps the others counted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub groups: BTreeMap<String, u32>,
}

impl Load {
    pub fn add(&mut self, spec: &VmSpec) {
        self.add_share(&Share::of(spec));
    }

    /// Puts one VM's share on.
    pub fn add_share(&mut self, v: &Share) {
        self.vcpus += u64::from(v.vcpus);
        self.memory_mib += v.memory_mib;
        if let Some(g) = &v.group {
            *self.groups.entry(g.clone()).or_default() += 1;
        }
    }

    /// Takes off what [`Load::add_share`] of the same share put on.
    pub fn remove_share(&mut self, v: &Share) {
        self.vcpus = self.vcpus.saturating_sub(u64::from(v.vcpus));
        self.memory_mib = self.memory_mib.saturating_sub(v.memory_mib);
        if let Some(g) = &v.group {
            if let Some(n) = self.groups.get_mut(g) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.groups.remove(g);
                }
            }
        }
    }
}

/// The part of a VM's spec a host's [`Load`] counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub group: Option<String>,
}

impl Share {
    pub fn of(spec: &VmSpec) -> Self {
        Share {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            group: spec.anti_affinity.clone(),
        }
    }
}

/// The load on each host that `wanted` accepts, from the state's index.
pub fn host_loads(state: &ClusterState, wanted: impl Fn(&str) -> bool) -> BTreeMap<String, Load> {
    state
        .index
        .loads()
        .iter()
        .filter(|(h, _)| wanted(h))
        .map(|(h, l)| (h.clone(), l.clone()))
        .collect()
}

/// Placements checked one after another against a state, each accepted one counted against
/// the next (the re-check on apply; usable by any command that places VMs).
pub struct PlacementCheck {
    oc: Overcommit,
    loads: BTreeMap<String, Load>,
}

impl PlacementCheck {
    /// The loads of the hosts `wanted` accepts, from `state`'s index.
    pub fn new(state: &ClusterState, oc: Overcommit, wanted: impl Fn(&str) -> bool) -> Self {
        PlacementCheck {
            oc,
            loads: host_loads(state, wanted),
        }
    }

    /// Whether `spec` fits on `host` by [`fit`], given `state`'s hosts and the placements
    /// admitted so far; if so it is counted on the host, else the reason.
    pub fn admit(&mut self, state: &ClusterState, host: &str, spec: &VmSpec) -> Result<(), String> {
        let Some(h) = state.hosts.get(host) else {
            return Err("host not registered".into());
        };
        let load = self.loads.entry(host.to_string()).or_default();
        match fit(h, Limits::of(h, self.oc), load, spec) {
            Ok(_) => {
                load.add(spec);
                Ok(())
            }
            Err(Reject::NotUp) => Err(format!("host is {}", h.status.as_str())),
            Err(r) => Err(r.why().to_string()),
        }
    }
}

/// A host's vCPUs and memory times the overcommit ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub vcpus: u64,
    pub memory_mib: u64,
}

impl Limits {
    pub fn of(host: &Host, oc: Overcommit) -> Self {
        let scale = |v: u64, permille: u64| {
            u64::try_from(u128::from(v) * u128::from(permille) / 1000).unwrap_or(u64::MAX)
        };
        Limits {
            vcpus: scale(u64::from(host.capacity.vcpus), oc.cpu_permille),
            memory_mib: scale(host.capacity.memory_mib, oc.memory_permille),
        }
    }
}

/// The placement rule: whether `spec` fits on `host` (its `limits`, with `load` already on
/// it), and if so the fraction of memory left free after it; the first rule it breaks
/// otherwise. Used by the scheduler to choose and by the state machine to re-check.
pub fn fit(host: &Host, limits: Limits, load: &Load, spec: &VmSpec) -> Result<f64, Reject> {
    if host.status != HostStatus::Up {
        return Err(Reject::NotUp);
    }
    if !host.hypervisors.is_empty() && !host.hypervisors.contains(&spec.hypervisor) {
        return Err(Reject::Hypervisor);
    }
    if !spec
        .constraints
        .iter()
        .all(|(k, v)| host.labels.get(k) == Some(v))
    {
        return Err(Reject::Labels);
    }
    if spec
        .anti_affinity
        .as_ref()
        .is_some_and(|g| load.groups.contains_key(g))
    {
        return Err(Reject::AntiAffinity);
    }
    if load.vcpus + u64::from(spec.vcpus) > limits.vcpus {
        return Err(Reject::Cpu);
    }
    let mem_after = load.memory_mib + spec.memory_mib;
    if mem_after > limits.memory_mib {
        return Err(Reject::Memory);
    }
    Ok((limits.memory_mib - mem_after) as f64 / limits.memory_mib.max(1) as f64)
}

/// Why one host was rejected for one VM; counted into the pending reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reject {
    NotUp,
    Hypervisor,
    Labels,
    AntiAffinity,
    Cpu,
    Memory,
}

impl Reject {
    fn describe(self) -> &'static str {
        match self {
            Reject::NotUp => "not up",
            Reject::Hypervisor => "without the hypervisor",
            Reject::Labels => "missing required labels",
            Reject::AntiAffinity => "already running its anti-affinity group",
            Reject::Cpu => "short of vCPUs",
            Reject::Memory => "short of memory",
        }
    }

    /// The broken rule, said of one host.
    pub fn why(self) -> &'static str {
        match self {
            Reject::NotUp => "host not up",
            Reject::Hypervisor => "host lacks the hypervisor",
            Reject::Labels => "host lacks required labels",
            Reject::AntiAffinity => "its anti-affinity group is already there",
            Reject::Cpu => "not enough vCPUs",
            Reject::Memory => "not enough memory",
        }
    }
}

/// A host as the scheduler sees it: its limits, computed once per pass, and the load placed
/// on it so far.
struct Slot<'a> {
    host: &'a Host,
    limits: Limits,
    load: Load,
}

impl<'a> Slot<'a> {
    fn new(host: &'a Host, oc: Overcommit) -> Self {
        Slot {
            host,
            limits: Limits::of(host, oc),
            load: Load::default(),
        }
    }

    fn check(&self, spec: &VmSpec) -> Result<f64, Reject> {
        fit(self.host, self.limits, &self.load, spec)
    }
}

/// VMs that want to run and have no host, oldest first (blocked or not).
pub fn pending(state: &ClusterState) -> Vec<&Vm> {
    state
        .index
        .all_pending()
        .filter_map(|(_, name)| state.vms.get(name))
        .collect()
}

/// Waits for a host: unplaced, meant to run, and not ended.
pub fn is_pending(vm: &Vm) -> bool {
    vm.host.is_none() && vm.desired == DesiredState::Running && vm.state == VmState::Pending
}

/// Whether any VM waits for a host and is to be tried (not blocked since the last capacity
/// change).
pub fn any_pending(state: &ClusterState) -> bool {
    !state.index.open_pending().is_empty()
}

/// Where a round stopped: the order key of the last VM it considered, so the next round goes
/// on after it and VMs that no host fits cannot starve younger ones behind them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor(Option<PendingKey>);

/// The next `max` pending VMs to try, in placement order after `after`, wrapping around to
/// the oldest; in O(max · log pending), from the index.
fn pending_window<'a>(state: &'a ClusterState, after: &Cursor, max: usize) -> Vec<&'a Vm> {
    let open = state.index.open_pending();
    let (later, wrapped) = match &after.0 {
        Some(c) => (
            open.range((Bound::Excluded(c.clone()), Bound::Unbounded)),
            open.range(..=c.clone()),
        ),
        None => (
            open.range::<PendingKey, _>(..),
            open.range(..(0, String::new())),
        ),
    };
    later
        .chain(wrapped)
        .take(max)
        .filter_map(|(_, name)| state.vms.get(name))
        .collect()
}

/// Places every pending VM it can. Returns placements and, for the rest, the reason.
pub fn schedule(state: &ClusterState, oc: Overcommit) -> (Vec<Placement>, Vec<Unplaced>) {
    schedule_oldest(state, oc, usize::MAX)
}

/// Like [`schedule`], for only the `max` oldest pending VMs: the same placements for them as a
/// full pass would give (a VM's placement depends only on the VMs before it), in a time
/// bounded by `max` × hosts, so the leader holds the state for a short while per round.
pub fn schedule_oldest(
    state: &ClusterState,
    oc: Overcommit,
    max: usize,
) -> (Vec<Placement>, Vec<Unplaced>) {
    let (p, u, _) = schedule_window(state, oc, &Cursor::default(), max);
    (p, u)
}

/// One leader round: like [`schedule_oldest`] for the `max` pending VMs after `after` (see
/// [`Cursor`]), with the cursor for the next round (back to the oldest once a round has seen
/// every pending VM).
pub fn schedule_window(
    state: &ClusterState,
    oc: Overcommit,
    after: &Cursor,
    max: usize,
) -> (Vec<Placement>, Vec<Unplaced>, Cursor) {
    // Hosts in id order (ties go to the first), as a vector: the inner loop below runs
    // VMs × hosts times and must not look anything up by name.
    let mut slots: Vec<Slot> = state.hosts.values().map(|h| Slot::new(h, oc)).collect();
    let index: BTreeMap<&str, usize> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| (s.host.id.as_str(), i))
        .collect();
    for (h, load) in state.index.loads() {
        if let Some(&i) = index.get(h.as_str()) {
            slots[i].load = load.clone();
        }
    }
    let mut placements = Vec::new();
    let mut unplaced = Vec::new();
    let window = pending_window(state, after, max);
    let next = match window.last() {
        Some(last) if window.len() == max => {
            Cursor(Some((last.created_ms, last.spec.name.clone())))
        }
        _ => Cursor::default(),
    };
    for vm in window {
        let mut best: Option<(f64, usize)> = None;
        let mut rejects: BTreeMap<Reject, usize> = BTreeMap::new();
        for (i, slot) in slots.iter().enumerate() {
            match slot.check(&vm.spec) {
                Ok(free) => {
                    let score = match vm.spec.strategy {
                        PlacementStrategy::Spread => free,
                        PlacementStrategy::Binpack => -free,
                    };
                    // Strictly greater: on a tie the first host id wins.
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, i));
                    }
                }
                Err(r) => *rejects.entry(r).or_default() += 1,
            }
        }
        match best {
            Some((_, i)) => {
                let slot = &mut slots[i];
                slot.load.add(&vm.spec);
                placements.push(Placement {
                    vm: vm.spec.name.clone(),
                    host: slot.host.id.clone(),
                    generation: vm.generation,
                });
            }
            None => {
                unplaced.push(Unplaced {
                    vm: vm.spec.name.clone(),
                    reason: no_fit_reason(state.hosts.is_empty(), &rejects),
                });
            }
        }
    }
    (placements, unplaced, next)
}

/// Why a VM fits no host: the hosts that rejected it, counted by the rule they broke.
pub fn no_fit_reason(no_hosts: bool, rejects: &BTreeMap<Reject, usize>) -> String {
    if no_hosts {
        return "no hosts registered".to_string();
    }
    let parts: Vec<String> = rejects
        .iter()
        .map(|(r, n)| format!("{n} {} {}", host_word(*n), r.describe()))
        .collect();
    format!("no host fits: {}", parts.join(", "))
}

fn host_word(n: usize) -> &'static str {
    if n == 1 {
        "host"
    } else {
        "hosts"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blixard_api::{Capacity, Hypervisor, RestartPolicy};

    fn host(id: &str, vcpus: u32, mem: u64) -> Host {
        Host {
            fence: None,
            id: id.into(),
            address: String::new(),
            capacity: Capacity {
                vcpus,
                memory_mib: mem,
                disk_gib: 10,
                kvm: false,
            },
            labels: Default::default(),
            hypervisors: vec![],
            status: HostStatus::Up,
            last_heartbeat_ms: 0,
            registered_ms: 0,
            drain_deadline_ms: None,
            epoch: 1,
            agent_url: None,
        }
    }

    fn vm(name: &str, vcpus: u32, mem: u64, created: u64) -> Vm {
        Vm {
            spec: VmSpec {
                on_host_loss: None,
                name: name.into(),
                vcpus,
                memory_mib: mem,
                hypervisor: Hypervisor::Qemu,
                kernel: Some("k".into()),
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
            },
            desired: DesiredState::Running,
            state: VmState::Pending,
            reason: None,
            host: None,
            generation: 1,
            since_ms: 0,
            created_ms: created,
            mod_index: 0,
            restarts: vec![],
            evicting: None,
            idempotency_key: None,
            task_result: None,
            task_started_ms: None,
        }
    }

    fn state(hosts: Vec<Host>, vms: Vec<Vm>) -> ClusterState {
        let mut s = ClusterState {
            hosts: hosts.into_iter().map(|h| (h.id.clone(), h)).collect(),
            vms: vms.into_iter().map(|v| (v.spec.name.clone(), v)).collect(),
            ..Default::default()
        };
        s.reindex(0);
        s
    }

    fn placed(p: &[Placement]) -> Vec<(String, String)> {
        p.iter().map(|p| (p.vm.clone(), p.host.clone())).collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// VMs that no host fits cannot starve younger ones: the next round goes on after them.
    #[test]
    fn rounds_move_past_vms_no_host_fits() {
        let mut s = state(
            vec![host("h1", 4, 1024)],
            vec![
                vm("big1", 1, 4096, 1),
                vm("big2", 1, 4096, 2),
                vm("big3", 1, 4096, 3),
                vm("small", 1, 512, 4),
            ],
        );
        let oc = Overcommit::default();
        let (p, u, c) = schedule_window(&s, oc, &Cursor::default(), 2);
        assert!(p.is_empty());
        assert_eq!(
            u.iter().map(|u| u.vm.as_str()).collect::<Vec<_>>(),
            ["big1", "big2"]
        );
        let (p, u, c) = schedule_window(&s, oc, &c, 2);
        assert_eq!(placed(&p), pairs(&[("small", "h1")]));
        assert_eq!(u.len(), 1);
        // Once `small` is placed, the next round wraps around to the oldest.
        if let Some(v) = s.vms.get_mut("small") {
            v.host = Some("h1".into());
        }
        s.index.update("small", s.vms.get("small"), 1);
        let (_, u, c) = schedule_window(&s, oc, &c, 2);
        assert_eq!(
            u.iter().map(|u| u.vm.as_str()).collect::<Vec<_>>(),
            ["big1", "big2"]
        );
        assert_eq!(c, Cursor(Some((2, "big2".into()))));
        // Fewer pending than a window: everything is seen and the cursor resets.
        let (_, u, c) = schedule_window(&s, oc, &c, 5);
        assert_eq!(u.len(), 3);
        assert_eq!(c, Cursor::default());
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            hosts: Vec<Host>,
            vms: Vec<Vm>,
            want: Vec<(&'static str, &'static str)>,
            unplaced: usize,
        }
        let mut down = host("h1", 4, 1024);
        down.status = HostStatus::Down;
        let mut draining = host("h1", 4, 1024);
        draining.status = HostStatus::Draining;
        let mut labelled = host("h2", 4, 1024);
        labelled.labels.insert("zone".into(), "a".into());
        let mut wants_zone = vm("a", 1, 100, 1);
        wants_zone
            .spec
            .constraints
            .insert("zone".into(), "a".into());
        let mut g1 = vm("a", 1, 100, 1);
        g1.spec.anti_affinity = Some("db".into());
        let mut g2 = vm("b", 1, 100, 2);
        g2.spec.anti_affinity = Some("db".into());
        let mut g3 = vm("c", 1, 100, 3);
        g3.spec.anti_affinity = Some("db".into());
        let mut bp1 = vm("a", 1, 100, 1);
        bp1.spec.strategy = PlacementStrategy::Binpack;
        let mut bp2 = vm("b", 1, 100, 2);
        bp2.spec.strategy = PlacementStrategy::Binpack;
        let mut stopped = vm("s", 1, 100, 1);
        stopped.desired = DesiredState::Stopped;
        let mut qemu_only = host("h1", 4, 1024);
        qemu_only.hypervisors = vec![Hypervisor::Process];
        let cases = vec![
            Case {
                name: "no hosts",
                hosts: vec![],
                vms: vec![vm("a", 1, 100, 1)],
                want: vec![],
                unplaced: 1,
            },
            Case {
                name: "spread alternates",
                hosts: vec![host("h1", 4, 1024), host("h2", 4, 1024)],
                vms: vec![vm("a", 1, 100, 1), vm("b", 1, 100, 2), vm("c", 1, 100, 3)],
                want: vec![("a", "h1"), ("b", "h2"), ("c", "h1")],
                unplaced: 0,
            },
            Case {
                name: "binpack fills one host",
                hosts: vec![host("h1", 4, 1024), host("h2", 4, 1024)],
                vms: vec![bp1, bp2],
                want: vec![("a", "h1"), ("b", "h1")],
                unplaced: 0,
            },
            Case {
                name: "memory is never overcommitted",
                hosts: vec![host("h1", 64, 1000)],
                vms: vec![vm("a", 1, 600, 1), vm("b", 1, 600, 2)],
                want: vec![("a", "h1")],
                unplaced: 1,
            },
            Case {
                name: "cpu overcommit 4x",
                hosts: vec![host("h1", 1, 100_000)],
                vms: (0..5).map(|i| vm(&format!("v{i}"), 1, 10, i)).collect(),
                want: vec![("v0", "h1"), ("v1", "h1"), ("v2", "h1"), ("v3", "h1")],
                unplaced: 1,
            },
            Case {
                name: "down host",
                hosts: vec![down],
                vms: vec![vm("a", 1, 1, 1)],
                want: vec![],
                unplaced: 1,
            },
            Case {
                name: "draining host",
                hosts: vec![draining],
                vms: vec![vm("a", 1, 1, 1)],
                want: vec![],
                unplaced: 1,
            },
            Case {
                name: "labels",
                hosts: vec![host("h1", 4, 1024), labelled],
                vms: vec![wants_zone],
                want: vec![("a", "h2")],
                unplaced: 0,
            },
            Case {
                name: "anti-affinity",
                hosts: vec![host("h1", 4, 1024), host("h2", 4, 1024)],
                vms: vec![g1, g2, g3],
                want: vec![("a", "h1"), ("b", "h2")],
                unplaced: 1,
            },
            Case {
                name: "stopped vms are not placed",
                hosts: vec![host("h1", 4, 1024)],
                vms: vec![stopped],
                want: vec![],
                unplaced: 0,
            },
            Case {
                name: "hypervisor support",
                hosts: vec![qemu_only],
                vms: vec![vm("a", 1, 1, 1)],
                want: vec![],
                unplaced: 1,
            },
        ];
        for c in cases {
            let st = state(c.hosts, c.vms);
            let (p, u) = schedule(&st, Overcommit::default());
            assert_eq!(placed(&p), pairs(&c.want), "{}", c.name);
            assert_eq!(u.len(), c.unplaced, "{}: {u:?}", c.name);
            // Deterministic: the same input gives the same output.
            assert_eq!(schedule(&st, Overcommit::default()), (p, u), "{}", c.name);
        }
    }

    #[test]
    fn reason_names_the_shortage() {
        let st = state(vec![host("h1", 4, 100)], vec![vm("a", 1, 600, 1)]);
        let (_, u) = schedule(&st, Overcommit::default());
        assert_eq!(u[0].reason, "no host fits: 1 host short of memory");
    }

    #[test]
    fn limits_are_capacity_times_the_ratios_rounded_down() {
        let oc = Overcommit {
            cpu_permille: 1_500,
            memory_permille: 1_100,
        };
        assert_eq!(
            Limits::of(&host("h1", 3, 1_001), oc),
            Limits {
                vcpus: 4,
                memory_mib: 1_101
            }
        );
    }

    #[test]
    fn existing_assignments_count() {
        let mut a = vm("a", 1, 600, 1);
        a.host = Some("h1".into());
        let st = state(
            vec![host("h1", 4, 1000), host("h2", 4, 1000)],
            vec![a, vm("b", 1, 600, 2)],
        );
        let (p, _) = schedule(&st, Overcommit::default());
        assert_eq!(placed(&p), pairs(&[("b", "h2")]));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use blixard_api::{Capacity, Hypervisor, RestartPolicy};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn host(i: usize, vcpus: u32, mem: u64, status: u8, zone: u8) -> Host {
        Host {
            fence: None,
            id: format!("h{i}"),
            address: String::new(),
            capacity: Capacity {
                vcpus,
                memory_mib: mem,
                disk_gib: 1,
                kvm: false,
            },
            labels: [("zone".to_string(), format!("z{zone}"))].into(),
            hypervisors: vec![],
            status: match status {
                0 => HostStatus::Down,
                1 => HostStatus::Draining,
                _ => HostStatus::Up,
            },
            last_heartbeat_ms: 0,
            registered_ms: 0,
            drain_deadline_ms: None,
            epoch: 1,
            agent_url: None,
        }
    }

    fn vm(
        i: usize,
        vcpus: u32,
        mem: u64,
        group: Option<u8>,
        zone: Option<u8>,
        binpack: bool,
    ) -> Vm {
        Vm {
            spec: VmSpec {
                on_host_loss: None,
                name: format!("v{i}"),
                vcpus,
                memory_mib: mem,
                hypervisor: Hypervisor::Process,
                kernel: None,
                initrd: None,
                cmdline: None,
                disks: vec![],
                nics: vec![],
                restart_policy: RestartPolicy::Always,
                constraints: zone
                    .map(|z| [("zone".to_string(), format!("z{z}"))].into())
                    .unwrap_or_default(),
                labels: Default::default(),
                anti_affinity: group.map(|g| format!("g{g}")),
                strategy: if binpack {
                    PlacementStrategy::Binpack
                } else {
                    PlacementStrategy::Spread
                },
                max_restarts: None,
                restart_window_secs: None,
                task: None,
            },
            desired: DesiredState::Running,
            state: VmState::Pending,
            reason: None,
            host: None,
            generation: 1,
            since_ms: 0,
            created_ms: i as u64,
            mod_index: 0,
            restarts: vec![],
            evicting: None,
            idempotency_key: None,
            task_result: None,
            task_started_ms: None,
        }
    }

    prop_compose! {
        fn cluster()(
            hosts in prop::collection::vec((1u32..8, 256u64..8192, 0u8..4, 0u8..2), 0..8),
            vms in prop::collection::vec(
                (1u32..6, 16u64..3000, prop::option::of(0u8..3), prop::option::of(0u8..2), any::<bool>()),
                0..40,
            ),
        ) -> ClusterState {
            let mut s = ClusterState::default();
            for (i, (c, m, st, z)) in hosts.into_iter().enumerate() {
                let h = host(i, c, m, st, z);
                s.hosts.insert(h.id.clone(), h);
            }
            for (i, (c, m, g, z, b)) in vms.into_iter().enumerate() {
                let v = vm(i, c, m, g, z, b);
                s.vms.insert(v.spec.name.clone(), v);
            }
            s.reindex(0);
            s
        }
    }

    proptest! {
        /// Whatever the input: no host is overcommitted beyond the ratios, no placement goes
        /// to a host that is not up or lacks a required label, no group shares a host, every
        /// pending VM is either placed or given a reason, and the result is deterministic.
        #[test]
        fn placements_respect_every_rule(s in cluster()) {
            let oc = Overcommit::default();
            let (placements, unplaced) = schedule(&s, oc);
            prop_assert_eq!(schedule(&s, oc), (placements.clone(), unplaced.clone()));
            prop_assert_eq!(placements.len() + unplaced.len(), pending(&s).len());
            let mut cpu: BTreeMap<&str, u64> = BTreeMap::new();
            let mut mem: BTreeMap<&str, u64> = BTreeMap::new();
            let mut groups: BTreeSet<(String, String)> = BTreeSet::new();
            for p in &placements {
                let h = &s.hosts[&p.host];
                let v = &s.vms[&p.vm];
                prop_assert_eq!(h.status, HostStatus::Up);
                for (k, val) in &v.spec.constraints {
                    prop_assert_eq!(h.labels.get(k), Some(val));
                }
                if let Some(g) = &v.spec.anti_affinity {
                    prop_assert!(groups.insert((g.clone(), p.host.clone())), "group {} twice on {}", g, p.host);
                }
                *cpu.entry(&p.host).or_default() += u64::from(v.spec.vcpus);
                *mem.entry(&p.host).or_default() += v.spec.memory_mib;
            }
            for (h, used) in &mem {
                let cap = &s.hosts[*h].capacity;
                prop_assert!(*used <= cap.memory_mib);
                prop_assert!(cpu[h] <= u64::from(cap.vcpus) * 4);
            }
            // The state machine re-checks them with the same rule, so it accepts every one.
            let n = placements.len();
            let mut applied = s.clone();
            let (r, _) = crate::state_machine::apply(
                &mut applied,
                1,
                &crate::state_machine::Command::Place {
                    placements,
                    unplaced,
                    now_ms: 1,
                    overcommit: Some(oc),
                    capacity_rev: None,
                },
            );
            prop_assert_eq!(
                r,
                crate::state_machine::Response::Placed { placed: n, unplaced: pending(&s).len() - n }
            );
        }

        /// A round over the `max` oldest pending VMs decides them exactly as a full pass does,
        /// and leaves the rest alone.
        #[test]
        fn a_partial_round_agrees_with_the_full_pass(s in cluster(), max in 0usize..12) {
            let oc = Overcommit::default();
            let first: BTreeSet<String> =
                pending(&s).iter().take(max).map(|v| v.spec.name.clone()).collect();
            let (placements, unplaced) = schedule(&s, oc);
            let want = (
                placements.into_iter().filter(|p| first.contains(&p.vm)).collect::<Vec<_>>(),
                unplaced.into_iter().filter(|u| first.contains(&u.vm)).collect::<Vec<_>>(),
            );
            prop_assert_eq!(schedule_oldest(&s, oc, max), want);
        }

        /// Successive rounds (nothing applied between them) see every pending VM within
        /// ceil(pending / max) rounds; a round that reaches the youngest fills up from the
        /// oldest.
        #[test]
        fn rounds_cover_every_pending_vm(s in cluster(), max in 1usize..6) {
            let oc = Overcommit::default();
            let all: BTreeSet<String> = pending(&s).iter().map(|v| v.spec.name.clone()).collect();
            let mut seen = BTreeSet::new();
            let mut cursor = Cursor::default();
            for _ in 0..all.len().div_ceil(max) {
                let (p, u, next) = schedule_window(&s, oc, &cursor, max);
                prop_assert_eq!(p.len() + u.len(), max.min(all.len()));
                seen.extend(p.into_iter().map(|p| p.vm));
                seen.extend(u.into_iter().map(|u| u.vm));
                cursor = next;
            }
            prop_assert_eq!(seen, all);
        }
    }
}
