//! Host liveness: leases held in the leader's memory, not in the Raft log.
//!
//! An agent heartbeats every `heartbeat_interval_ms`. The leader answers only after it has
//! confirmed that it still leads (see `leader_check`), and then renews the host's lease here,
//! in memory. Steady-state heartbeats append nothing to the log; only transitions do (a host
//! declared down, a host back up), as in Nomad, whose servers keep heartbeat timers in memory
//! and write only status changes.
//!
//! The timers are one design, shared with the agent (`agent/src/lease.rs`):
//! - the agent's lease runs `lease_ms` from when it SENT its last heartbeat that a leader
//!   confirmed; when it runs out the agent (or, if the agent is dead, its dead man's switch)
//!   SIGTERMs every `move` VM and SIGKILLs what is left `grace_ms` later;
//! - the leader counts a host's silence from when that heartbeat ARRIVED (later than it was
//!   sent) and declares the host down only once it has been silent for
//!   [`host_ttl_ms`] = `lease_ms + grace_ms + margin_ms`. So by then the host's `move` VMs
//!   have been killed, with `margin_ms` to spare for clock-rate drift, the switch's polling
//!   interval and signal delivery;
//! - a new leader knows no leases: it starts every host's silence at the moment it began to
//!   lead, so each host gets a full TTL before anything is declared down. An ordinary
//!   failover therefore never takes a host down (and never fences one: the agent's lease is
//!   longer than an election);
//! - a "down" decision and a renewal never cross: from the moment the leader decides a host
//!   is down until its proposal is resolved, the host is *going down* and no heartbeat renews
//!   it (the heartbeat waits, then finds the host down and brings it back up through the
//!   log). Otherwise a heartbeat confirmed while the down entry is in flight would renew the
//!   agent's lease, the agent would resume, and the entry would then move its VMs;
//! - a decision is its term's: the leader proposes it on itself, in the term it was made in,
//!   or not at all (`ControlNode::propose_in_term`). A leader cut off from the others decides
//!   every host is down (it hears no heartbeats); once it steps down, that decision must not
//!   reach the new leader, whose leases the hosts hold.
//!
//! Everything here is pure: times are milliseconds on the leader's monotonic clock, passed in.

use std::collections::{HashMap, HashSet};

use blixard_api::{Host, HostStatus};

/// How the leader turns a host's fence timing into its TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// The TTL of a host whose agent reported no fence timing (an agent from before leases).
    pub default_ttl_ms: u64,
    /// Added to the agent's lease + grace before its host is declared down.
    pub margin_ms: u64,
}

/// How long `host` may be silent before it is declared down.
pub fn host_ttl_ms(host: &Host, cfg: &LivenessConfig) -> u64 {
    match &host.fence {
        Some(f) => f.fenced_after_ms().saturating_add(cfg.margin_ms),
        None => cfg.default_ttl_ms,
    }
}

/// The leases of one leadership term.
#[derive(Debug, Default, Clone)]
pub struct Leases {
    /// The term these leases belong to, and when (leader clock) this node began leading it.
    term: Option<(u64, u64)>,
    /// When each host's last confirmed heartbeat arrived, in this term.
    renewed: HashMap<String, u64>,
    /// Hosts this leader decided are down whose proposal is not resolved yet.
    going_down: HashSet<String>,
}

/// What [`Leases::renew`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease runs from this heartbeat's arrival.
    Renewed,
    /// The confirmation was of another term than the one led: nothing changed.
    OtherTerm,
    /// The host is being declared down: nothing changed. Wait for [`Leases::end_down`], then
    /// read the host's record again (it is down by then, or the proposal failed).
    GoingDown,
}

impl Leases {
    /// Records that this node leads `term` at `now`. A new term forgets every lease of the
    /// old one and starts every host's silence at `now`. Returns whether the term is new.
    pub fn lead(&mut self, term: u64, now: u64) -> bool {
        match self.term {
            Some((t, _)) if t == term => false,
            _ => {
                self.term = Some((term, now));
                self.renewed.clear();
                self.going_down.clear();
                true
            }
        }
    }

    /// This node no longer leads: every lease is forgotten.
    pub fn step_down(&mut self) {
        self.term = None;
        self.renewed.clear();
        self.going_down.clear();
    }

    /// The term being led, if any.
    pub fn term(&self) -> Option<u64> {
        self.term.map(|(t, _)| t)
    }

    /// A heartbeat of `host` that arrived at `arrived` was confirmed by this node's leadership
    /// of `term`. Renewals of another term than the one led are ignored (a check that began
    /// before a step-down and ended after it), and so are renewals of a host going down.
    pub fn renew(&mut self, term: u64, host: &str, arrived: u64) -> Renewal {
        if self.term() != Some(term) {
            return Renewal::OtherTerm;
        }
        if self.going_down.contains(host) {
            return Renewal::GoingDown;
        }
        let at = self.renewed.entry(host.to_string()).or_insert(arrived);
        *at = (*at).max(arrived);
        Renewal::Renewed
    }

    /// The leader decided `host` is down and is about to propose it: until [`Self::end_down`],
    /// no heartbeat renews it.
    pub fn begin_down(&mut self, host: &str) {
        if self.term.is_some() {
            self.going_down.insert(host.to_string());
        }
    }

    /// The proposal that declares `host` down is resolved (applied, or failed).
    pub fn end_down(&mut self, host: &str) {
        self.going_down.remove(host);
    }

    /// Whether `host` is being declared down.
    pub fn is_going_down(&self, host: &str) -> bool {
        self.going_down.contains(host)
    }

    /// How long `host` has been silent at `now`, counted from its last renewal or, if it has
    /// none in this term, from when the term began. `None` while not leading.
    pub fn silent_ms(&self, host: &str, now: u64) -> Option<u64> {
        let (_, since) = self.term?;
        let last = self.renewed.get(host).copied().unwrap_or(since).max(since);
        Some(now.saturating_sub(last))
    }

    /// Hosts (up or draining) silent for longer than their TTL at `now`, by id.
    ///
    /// `wall_now` is the leader's wall clock: a host is expired only if its last recorded
    /// transition (`last_heartbeat_ms`, stamped when it registered or came back up, on any
    /// node) is also older than its TTL, so a host that just registered through a follower
    /// (whose lease this leader has not renewed yet) is not declared down at once. Both must
    /// hold, so a wall clock that jumps can delay a host's loss, never hasten it.
    pub fn expired<'a>(
        &self,
        hosts: impl IntoIterator<Item = &'a Host>,
        now: u64,
        wall_now: u64,
        cfg: &LivenessConfig,
    ) -> Vec<String> {
        hosts
            .into_iter()
            .filter(|h| h.status != HostStatus::Down)
            .filter(|h| {
                let ttl = host_ttl_ms(h, cfg);
                self.silent_ms(&h.id, now).is_some_and(|s| s > ttl)
                    && wall_now.saturating_sub(h.last_heartbeat_ms) > ttl
            })
            .map(|h| h.id.clone())
            .collect()
    }

    /// When (leader clock) the next host (up or draining) will have been silent past its
    /// TTL, if no heartbeat renews it first. `None` while not leading or with no such host.
    pub fn next_expiry<'a>(
        &self,
        hosts: impl IntoIterator<Item = &'a Host>,
        now: u64,
        cfg: &LivenessConfig,
    ) -> Option<u64> {
        hosts
            .into_iter()
            .filter(|h| h.status != HostStatus::Down)
            .filter_map(|h| {
                let silent = self.silent_ms(&h.id, now)?;
                Some(now.saturating_sub(silent) + host_ttl_ms(h, cfg) + 1)
            })
            .min()
    }

    /// Forgets the leases of hosts no longer in the state.
    pub fn retain(&mut self, known: impl Fn(&str) -> bool) {
        self.renewed.retain(|h, _| known(h));
    }

    /// Hosts expired at `now` (see [`Self::expired`]) that are not going down yet, each marked
    /// going down ([`Self::begin_down`]) in the same step, so no renewal slips in between the
    /// decision and the mark.
    pub fn take_expired<'a>(
        &mut self,
        hosts: impl IntoIterator<Item = &'a Host>,
        now: u64,
        wall_now: u64,
        cfg: &LivenessConfig,
    ) -> Vec<String> {
        let mut out = self.expired(hosts, now, wall_now, cfg);
        out.retain(|h| !self.going_down.contains(h));
        for h in &out {
            self.begin_down(h);
        }
        out
    }

    /// How many hosts hold a lease in this term.
    pub fn len(&self) -> usize {
        self.renewed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.renewed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blixard_api::FenceTiming;

    /// A wall clock far past every host's recorded transition.
    const WALL: u64 = u64::MAX / 2;

    const CFG: LivenessConfig = LivenessConfig {
        default_ttl_ms: 3_000,
        margin_ms: 500,
    };

    fn host(id: &str, status: HostStatus, fence: Option<(u64, u64)>) -> Host {
        Host {
            fence: fence.map(|(lease_ms, grace_ms)| FenceTiming { lease_ms, grace_ms }),
            ..crate::state_machine::tests_support::host_record(id, status)
        }
    }

    #[test]
    fn ttl_covers_the_agents_lease_and_grace_plus_the_margin() {
        let cases = [
            (None, 3_000),
            (Some((2_000, 500)), 3_000),
            (Some((10_000, 0)), 10_500),
            (Some((u64::MAX, 5)), u64::MAX),
        ];
        for (fence, ttl) in cases {
            assert_eq!(
                host_ttl_ms(&host("h", HostStatus::Up, fence), &CFG),
                ttl,
                "{fence:?}"
            );
        }
    }

    #[test]
    fn a_new_leader_gives_every_host_a_full_ttl() {
        let hosts = [host("a", HostStatus::Up, Some((2_000, 500)))];
        let mut l = Leases::default();
        // Not leading: nothing is ever expired.
        assert!(l.expired(&hosts, 1_000_000, WALL, &CFG).is_empty());
        assert!(l.lead(7, 100_000));
        assert!(!l.lead(7, 100_500), "same term, not new");
        assert!(l.expired(&hosts, 103_000, WALL, &CFG).is_empty());
        assert_eq!(l.expired(&hosts, 103_001, WALL, &CFG), vec!["a"]);
        assert_eq!(l.next_expiry(&hosts, 101_000, &CFG), Some(103_001));
    }

    #[test]
    fn renewals_push_expiry_and_only_count_in_their_term() {
        let hosts = [
            host("a", HostStatus::Up, Some((2_000, 500))),
            host("b", HostStatus::Draining, None),
            host("c", HostStatus::Down, None),
        ];
        let mut l = Leases::default();
        l.lead(3, 0);
        assert_eq!(l.renew(3, "a", 2_000), Renewal::Renewed);
        // A late, older confirmation never moves it back.
        assert_eq!(l.renew(3, "a", 1_000), Renewal::Renewed);
        assert_eq!(l.renew(2, "b", 2_500), Renewal::OtherTerm);
        assert_eq!(l.silent_ms("a", 4_000), Some(2_000));
        assert_eq!(l.expired(&hosts, 3_001, WALL, &CFG), vec!["b"]);
        assert_eq!(l.expired(&hosts, 5_001, WALL, &CFG), vec!["a", "b"]);
        // A new term forgets the old leases.
        assert!(l.lead(4, 10_000));
        assert_eq!(l.silent_ms("a", 10_000), Some(0));
        l.step_down();
        assert_eq!(l.silent_ms("a", 99_999), None);
        assert!(l.expired(&hosts, 99_999, WALL, &CFG).is_empty());
        assert_eq!(l.next_expiry(&hosts, 99_999, &CFG), None);
    }

    #[test]
    fn a_host_going_down_is_not_renewed_until_its_proposal_is_resolved() {
        let hosts = [
            host("a", HostStatus::Up, Some((2_000, 500))),
            host("b", HostStatus::Up, Some((2_000, 500))),
        ];
        let mut l = Leases::default();
        l.lead(1, 0);
        assert_eq!(l.renew(1, "b", 2_000), Renewal::Renewed);
        // The decision and the mark are one step: "a" is expired, "b" is not.
        assert_eq!(l.take_expired(&hosts, 3_001, WALL, &CFG), vec!["a"]);
        assert!(l.is_going_down("a") && !l.is_going_down("b"));
        // Not decided twice while its proposal is out.
        assert!(l.take_expired(&hosts, 3_500, WALL, &CFG).is_empty());
        // A heartbeat confirmed meanwhile renews nothing: the down entry may still apply.
        assert_eq!(l.renew(1, "a", 3_100), Renewal::GoingDown);
        assert_eq!(l.silent_ms("a", 3_200), Some(3_200));
        l.end_down("a");
        assert_eq!(l.renew(1, "a", 3_300), Renewal::Renewed);
        // A new term or a step-down forgets the marks with the leases.
        l.begin_down("b");
        assert!(l.lead(2, 4_000));
        assert!(!l.is_going_down("b"));
        l.begin_down("b");
        l.step_down();
        assert!(!l.is_going_down("b"));
        l.begin_down("b");
        assert!(!l.is_going_down("b"), "nothing is marked while not leading");
    }

    #[test]
    fn down_hosts_never_expire_again() {
        let hosts = [host("c", HostStatus::Down, None)];
        let mut l = Leases::default();
        l.lead(1, 0);
        assert!(l.expired(&hosts, 1_000_000, WALL, &CFG).is_empty());
        assert_eq!(l.next_expiry(&hosts, 0, &CFG), None);
    }

    #[test]
    fn a_host_that_just_registered_is_not_expired_by_an_old_term() {
        // Registered (through a follower) at wall time 50_000; this leader has led since
        // its clock's 0 and never saw a heartbeat of it.
        let mut h = host("new", HostStatus::Up, Some((2_000, 500)));
        h.last_heartbeat_ms = 50_000;
        let mut l = Leases::default();
        l.lead(1, 0);
        assert!(l.expired([&h], 60_000, 51_000, &CFG).is_empty());
        assert!(l.expired([&h], 60_000, 53_000, &CFG).is_empty());
        assert_eq!(l.expired([&h], 60_000, 53_001, &CFG), vec!["new"]);
    }
}
