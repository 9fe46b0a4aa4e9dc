//! The indexes the replicated state keeps for its decisions, so that none of them walks every
//! VM: per host, the VMs assigned to it and the load they reserve; the VMs waiting for a host,
//! in placement order, split into those to try and those that fit nowhere (`blocked`, tried
//! again only once capacity changes); and the VMs the leader's timers look at (evictions
//! under way, ended tasks). Idempotency keys are rows of their own (`ClusterState::keys`).
//!
//! Derived, never stored: [`StateIndex::build`] makes it from the rows when a node loads its
//! state or a snapshot, and `state_machine::apply` keeps it current by calling
//! [`StateIndex::update`] for every VM an entry touched, in the same step as the rows.
//! Pure, no IO. Invariant (checked by the state machine's tests after every apply): the index
//! kept by updates equals the one built from the rows, up to which pending VMs are blocked.

use std::collections::{BTreeMap, BTreeSet};

use blixard_api::Vm;

use crate::scheduler::{self, Load, Share};

/// Where a VM waits in placement order: oldest first, then by name.
pub type PendingKey = (u64, String);

/// What the index counted for one VM, so that an update can take it off again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    host: Option<String>,
    load: Share,
    pending: bool,
    created_ms: u64,
    generation: u64,
    /// On a host, with an eviction under way.
    evicting: bool,
    /// A task that has ended (its result is kept until it is deleted).
    task_done: bool,
}

impl Entry {
    fn of(vm: &Vm) -> Self {
        Entry {
            host: vm.host.clone(),
            load: Share::of(&vm.spec),
            pending: scheduler::is_pending(vm),
            created_ms: vm.created_ms,
            generation: vm.generation,
            evicting: vm.host.is_some() && vm.evicting.is_some(),
            task_done: vm.task_finished(),
        }
    }

    fn pending_key(&self, name: &str) -> PendingKey {
        (self.created_ms, name.to_string())
    }
}

/// The indexes over a state's VMs (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct StateIndex {
    entries: BTreeMap<String, Entry>,
    assigned: BTreeMap<String, BTreeSet<String>>,
    loads: BTreeMap<String, Load>,
    /// Pending VMs to try, in placement order.
    open: BTreeSet<PendingKey>,
    /// Pending VMs that fit no host when last tried, at capacity revision `capacity_rev`.
    blocked: BTreeSet<PendingKey>,
    evicting: BTreeSet<String>,
    tasks_done: BTreeSet<String>,
    capacity_rev: u64,
}

/// Equal when they index the same VMs the same way; which pending VMs are blocked, and since
/// when, is a scheduling hint that differs between a node that built its index from a
/// snapshot and one that kept it by updates, so it is left out.
impl PartialEq for StateIndex {
    fn eq(&self, o: &Self) -> bool {
        self.entries == o.entries
            && self.assigned == o.assigned
            && self.loads == o.loads
            && self.evicting == o.evicting
            && self.tasks_done == o.tasks_done
            && self.open.union(&self.blocked).eq(o.open.union(&o.blocked))
    }
}

impl Eq for StateIndex {}

impl StateIndex {
    /// The index of `vms`, as of log index `index` (every pending VM to be tried).
    pub fn build<'a>(vms: impl IntoIterator<Item = &'a Vm>, index: u64) -> Self {
        let mut ix = StateIndex {
            capacity_rev: index,
            ..StateIndex::default()
        };
        for vm in vms {
            ix.insert(&vm.spec.name, Entry::of(vm));
        }
        ix
    }

    /// Brings VM `name` up to date: `vm` is its row now (`None`: deleted), at log index
    /// `index`. A VM that leaves a host, or reserves less on it, changes capacity, so every
    /// blocked VM is tried again. A pending VM stays blocked while its generation stays.
    pub fn update(&mut self, name: &str, vm: Option<&Vm>, index: u64) {
        let new = vm.map(Entry::of);
        let old = self.entries.remove(name);
        let mut was_blocked = false;
        if let Some(old) = &old {
            was_blocked = self.remove(name, old);
            if old.host.is_some()
                && new
                    .as_ref()
                    .is_none_or(|n| n.host != old.host || n.load != old.load)
            {
                self.capacity_changed(index);
                was_blocked = false;
            }
        }
        if let Some(new) = new {
            let keep_blocked = was_blocked
                && old
                    .as_ref()
                    .is_some_and(|o| o.pending && o.generation == new.generation);
            let key = new.pending_key(name);
            let pending = new.pending;
            self.insert(name, new);
            if pending && keep_blocked {
                self.open.remove(&key);
                self.blocked.insert(key);
            }
        }
    }

    /// Something that may let a blocked VM fit happened at `index` (a host registered, came
    /// up, changed, or a VM left one): every blocked VM is tried again.
    pub fn capacity_changed(&mut self, index: u64) {
        self.capacity_rev = index;
        if !self.blocked.is_empty() {
            let mut b = std::mem::take(&mut self.blocked);
            self.open.append(&mut b);
        }
    }

    /// The log index of the last capacity change this index saw (see [`Self::block`]).
    pub fn capacity_rev(&self) -> u64 {
        self.capacity_rev
    }

    /// The leader found that pending VM `name` fits no host, looking at capacity revision
    /// `seen`: it is blocked, unless capacity has changed since (then it stays to be tried).
    pub fn block(&mut self, name: &str, seen: u64) {
        if seen != self.capacity_rev {
            return;
        }
        if let Some(e) = self.entries.get(name).filter(|e| e.pending) {
            let key = e.pending_key(name);
            if self.open.remove(&key) {
                self.blocked.insert(key);
            }
        }
    }

    /// The names of the VMs assigned to `host`, in name order.
    pub fn assigned_to(&self, host: &str) -> impl Iterator<Item = &str> + '_ {
        self.assigned
            .get(host)
            .into_iter()
            .flat_map(|s| s.iter().map(String::as_str))
    }

    /// The names of the VMs assigned to `host` within `range`, in name order.
    pub fn assigned_range<'a>(
        &'a self,
        host: &str,
        range: (std::ops::Bound<&'a str>, std::ops::Bound<&'a str>),
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.assigned
            .get(host)
            .into_iter()
            .flat_map(move |s| s.range::<str, _>(range).map(String::as_str))
    }

    /// What the VMs assigned to `host` reserve.
    pub fn load(&self, host: &str) -> Option<&Load> {
        self.loads.get(host)
    }

    /// Every host's load (hosts with nothing assigned are absent).
    pub fn loads(&self) -> &BTreeMap<String, Load> {
        &self.loads
    }

    /// Pending VMs to try, in placement order.
    pub fn open_pending(&self) -> &BTreeSet<PendingKey> {
        &self.open
    }

    /// How many VMs wait for a host, blocked or not.
    pub fn pending_count(&self) -> usize {
        self.open.len() + self.blocked.len()
    }

    /// Every pending VM, blocked or not, in placement order.
    pub fn all_pending(&self) -> impl Iterator<Item = &PendingKey> + '_ {
        merge_ordered(&self.open, &self.blocked)
    }

    /// Whether `name` is pending and blocked.
    pub fn is_blocked(&self, name: &str) -> bool {
        self.entries
            .get(name)
            .is_some_and(|e| e.pending && self.blocked.contains(&e.pending_key(name)))
    }

    /// The VMs on a host with an eviction under way, by name.
    pub fn evicting(&self) -> impl Iterator<Item = &str> + '_ {
        self.evicting.iter().map(String::as_str)
    }

    /// The tasks that have ended, by name.
    pub fn tasks_done(&self) -> impl Iterator<Item = &str> + '_ {
        self.tasks_done.iter().map(String::as_str)
    }

    fn insert(&mut self, name: &str, e: Entry) {
        if let Some(h) = &e.host {
            self.assigned
                .entry(h.clone())
                .or_default()
                .insert(name.to_string());
            self.loads.entry(h.clone()).or_default().add_share(&e.load);
        }
        if e.pending {
            self.open.insert(e.pending_key(name));
        }
        if e.evicting {
            self.evicting.insert(name.to_string());
        }
        if e.task_done {
            self.tasks_done.insert(name.to_string());
        }
        self.entries.insert(name.to_string(), e);
    }

    /// Takes `e`'s counts off; whether it was blocked.
    fn remove(&mut self, name: &str, e: &Entry) -> bool {
        if let Some(h) = &e.host {
            let now_empty = self.assigned.get_mut(h).is_some_and(|s| {
                s.remove(name);
                s.is_empty()
            });
            if now_empty {
                self.assigned.remove(h);
                self.loads.remove(h);
            } else if let Some(l) = self.loads.get_mut(h) {
                l.remove_share(&e.load);
            }
        }
        let mut was_blocked = false;
        if e.pending {
            let key = e.pending_key(name);
            self.open.remove(&key);
            was_blocked = self.blocked.remove(&key);
        }
        self.evicting.remove(name);
        self.tasks_done.remove(name);
        was_blocked
    }
}

/// The union of two disjoint ordered sets, in order.
fn merge_ordered<'a>(
    a: &'a BTreeSet<PendingKey>,
    b: &'a BTreeSet<PendingKey>,
) -> impl Iterator<Item = &'a PendingKey> + 'a {
    let mut a = a.iter().peekable();
    let mut b = b.iter().peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if x <= y => a.next(),
        (Some(_), Some(_)) => b.next(),
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}
