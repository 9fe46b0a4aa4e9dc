//! Placement at admission: the leader places a new VM when it admits the create, and the
//! placement travels in the create's own log entry (`Command::CreateVm { placement }`), so a
//! create takes one Raft round instead of two (the create, then a placement round). The apply
//! re-checks it by the scheduler's own rule, as every placement is re-checked; one that no
//! longer fits leaves the VM pending with the reason, for the placement loop.
//!
//! Pure, over plain data. The loads of the hosts come from the state's index (no pass over
//! the VMs); creates admitted but not applied yet hold a reservation, so concurrent creates
//! spread as the placement loop would spread them. While any VM is pending and not blocked
//! nothing is placed here: older pending VMs go first, in the placement loop's order.

use std::collections::BTreeMap;

use blixard_api::{PlacementStrategy, VmSpec};

use crate::scheduler::{fit, no_fit_reason, Limits, Load, Overcommit, Reject};
use crate::state_machine::{Admitted, ClusterState};

/// The leader's view for placing creates: loads as of an applied index, and reservations.
#[derive(Debug, Default)]
pub struct Admission {
    /// The applied index the loads were computed at.
    at_index: Option<u64>,
    /// The loads of the hosts with reservations, reservations included (the others' loads
    /// are the state's).
    loads: BTreeMap<String, Load>,
    /// Whether some VM waited for a host (and was not blocked) at that index.
    any_pending: bool,
    /// Creates admitted and not yet applied: VM → (host, spec).
    reserved: BTreeMap<String, (String, VmSpec)>,
}

impl Admission {
    /// What to decide for a new VM `spec` on `state` (applied up to `applied`), by the
    /// scheduler's rule and strategy, counting the reservations: the host (its reservation is
    /// recorded), or why no host fits (the scheduler's own words, so the placement loop does
    /// not write them again). `None` when the name is known or reserved, or when a host fits
    /// but some VM is already pending (it goes first, in the placement loop's order).
    pub fn place(
        &mut self,
        state: &ClusterState,
        applied: u64,
        oc: Overcommit,
        spec: &VmSpec,
    ) -> Option<Admitted> {
        if self.at_index != Some(applied) {
            self.refresh(state, applied);
        }
        if state.vms.contains_key(&spec.name) || self.reserved.contains_key(&spec.name) {
            return None;
        }
        let mut best: Option<(f64, &str)> = None;
        let mut rejects: BTreeMap<Reject, usize> = BTreeMap::new();
        let empty = Load::default();
        for h in state.hosts.values() {
            let load = self
                .loads
                .get(&h.id)
                .or_else(|| state.index.load(&h.id))
                .unwrap_or(&empty);
            match fit(h, Limits::of(h, oc), load, spec) {
                Ok(free) => {
                    let score = match spec.strategy {
                        PlacementStrategy::Spread => free,
                        PlacementStrategy::Binpack => -free,
                    };
                    // Strictly greater: on a tie the first host id wins, as in the scheduler.
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, h.id.as_str()));
                    }
                }
                Err(r) => *rejects.entry(r).or_default() += 1,
            }
        }
        let Some((_, host)) = best else {
            return Some(Admitted::Unplaced {
                reason: no_fit_reason(state.hosts.is_empty(), &rejects),
            });
        };
        if self.any_pending {
            return None;
        }
        let host = host.to_string();
        let load = match self.loads.get_mut(&host) {
            Some(l) => l,
            None => self
                .loads
                .entry(host.clone())
                .or_insert_with(|| state.index.load(&host).cloned().unwrap_or_default()),
        };
        load.add(spec);
        self.reserved
            .insert(spec.name.clone(), (host.clone(), spec.clone()));
        Some(Admitted::Placed {
            host,
            overcommit: oc,
        })
    }

    /// The create of `vm` was applied (or failed): its reservation ends. Its load is in the
    /// state from the next refresh on.
    pub fn release(&mut self, vm: &str) {
        self.reserved.remove(vm);
    }

    /// The state's loads plus the reservations not applied yet, for the hosts with
    /// reservations only: in O(reservations), not a pass over the VMs.
    fn refresh(&mut self, state: &ClusterState, applied: u64) {
        // An applied create is in the state now (placed or pending): drop its reservation.
        self.reserved.retain(|vm, _| !state.vms.contains_key(vm));
        let mut loads: BTreeMap<String, Load> = BTreeMap::new();
        for (host, spec) in self.reserved.values() {
            loads
                .entry(host.clone())
                .or_insert_with(|| state.index.load(host).cloned().unwrap_or_default())
                .add(spec);
        }
        self.loads = loads;
        self.any_pending = crate::scheduler::any_pending(state);
        self.at_index = Some(applied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::tests_support::{host_record, running_vm};
    use blixard_api::{HostStatus, VmState};

    fn spec(name: &str, vcpus: u32, anti: Option<&str>) -> VmSpec {
        let mut s = running_vm(name, "x").spec;
        s.vcpus = vcpus;
        s.memory_mib = 64;
        s.anti_affinity = anti.map(str::to_string);
        s
    }

    fn state(hosts: &[&str]) -> ClusterState {
        let mut s = ClusterState::default();
        for h in hosts {
            let mut r = host_record(h, HostStatus::Up);
            r.capacity.vcpus = 2;
            r.capacity.memory_mib = 1024;
            s.hosts.insert(h.to_string(), r);
        }
        s
    }

    #[test]
    fn creates_spread_counting_reservations_and_respect_the_rules() {
        let oc = Overcommit::default();
        let s = state(&["a", "b"]);
        let mut adm = Admission::default();
        // Spread: the first goes to "a" (tie: first id), the reservation sends the next to "b".
        assert_eq!(
            host(adm.place(&s, 1, oc, &spec("v1", 1, None))),
            Some("a".into())
        );
        assert_eq!(
            host(adm.place(&s, 1, oc, &spec("v2", 1, None))),
            Some("b".into())
        );
        // A name already reserved is not placed twice.
        assert_eq!(adm.place(&s, 1, oc, &spec("v1", 1, None)), None);
        // Anti-affinity counts reserved VMs too.
        assert_eq!(
            host(adm.place(&s, 1, oc, &spec("g1", 1, Some("g")))),
            Some("a".into())
        );
        assert_eq!(
            host(adm.place(&s, 1, oc, &spec("g2", 1, Some("g")))),
            Some("b".into())
        );
        assert_eq!(
            adm.place(&s, 1, oc, &spec("g3", 1, Some("g"))),
            Some(Admitted::Unplaced {
                reason: "no host fits: 2 hosts already running its anti-affinity group".into()
            })
        );
        // Nothing fits: the scheduler's reason.
        assert_eq!(
            adm.place(&s, 1, oc, &spec("huge", 10_000, None)),
            Some(Admitted::Unplaced {
                reason: "no host fits: 2 hosts short of vCPUs".into()
            })
        );
        assert_eq!(
            adm.place(&ClusterState::default(), 1, oc, &spec("x", 1, None)),
            Some(Admitted::Unplaced {
                reason: "no hosts registered".into()
            })
        );
    }

    #[test]
    fn pending_vms_go_first_and_applied_creates_end_their_reservation() {
        let oc = Overcommit::default();
        let mut s = state(&["a"]);
        let mut adm = Admission::default();
        assert_eq!(
            host(adm.place(&s, 1, oc, &spec("v1", 1, None))),
            Some("a".into())
        );
        // v1 applied and placed: its load comes from the state, not twice.
        let mut v1 = running_vm("v1", "a");
        v1.spec = spec("v1", 1, None);
        s.vms.insert("v1".into(), v1);
        s.reindex(2);
        adm.refresh(&s, 2);
        assert!(adm.reserved.is_empty());
        assert_eq!(s.index.load("a").map(|l| l.vcpus), Some(1));
        // A pending VM waits for the placement loop, and so do creates behind it that fit;
        // one that fits nowhere is told why at once.
        let mut p = running_vm("old", "a");
        p.host = None;
        p.state = VmState::Pending;
        s.vms.insert("old".into(), p);
        s.reindex(3);
        assert_eq!(adm.place(&s, 3, oc, &spec("v2", 1, None)), None);
        assert!(matches!(
            adm.place(&s, 3, oc, &spec("big", 10_000, None)),
            Some(Admitted::Unplaced { .. })
        ));
    }

    fn host(a: Option<Admitted>) -> Option<String> {
        match a {
            Some(Admitted::Placed { host, .. }) => Some(host),
            _ => None,
        }
    }
}
