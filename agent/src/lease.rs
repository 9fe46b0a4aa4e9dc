//! The agent's end of the host's liveness lease, and the fence that follows from it: pure.
//!
//! The clock is injected: every time is a plain `u64` of milliseconds on `CLOCK_BOOTTIME`
//! (which keeps counting while the machine is suspended), passed in by the caller. Nothing
//! here sleeps, reads a clock or does IO.
//!
//! The rules:
//! - A heartbeat the control plane answers 200 is leader-confirmed (the control plane answers
//!   only after its leader has checked that it still leads). It renews the lease to
//!   `sent_at + lease_ms`, `sent_at` being when the request was *sent*: the control plane
//!   counts its side of the lease from when it received the request, never earlier.
//! - Once `now ≥ expiry` the host is fenced: the daemon stops every `move` VM and nothing may
//!   start. A lease never held since the agent started (no lease file) is not fenced, but
//!   nothing may start either until a heartbeat is confirmed.
//! - The fence ends only when a heartbeat sent after the fence began has been confirmed *and*
//!   an assignments answer has come back whose request was sent after that confirmation
//!   arrived, at an index no lower than any seen. That answer is causally after the control
//!   plane took the host back, so it reflects every move decided while the host was silent.
//!   (Waiting only for an assignments request sent after the fence began is not enough: it
//!   may have been served before the host was declared down and its VMs moved.)
//! - An assignments answer whose index is lower than one already seen is ignored.

/// Where the lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// No lease held since the agent started (and none found from a previous run).
    Never,
    /// Held until this time (exclusive).
    Held { until: u64 },
    /// Ran out at `since`; the move VMs are to stop and nothing starts.
    Fenced { since: u64 },
}

/// What an event changed, for the daemon to act on and log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The lease ran out at `since`.
    Fenced { since: u64 },
    /// The fence that began at `since` ended; the lease is held until `until`.
    Unfenced { since: u64, until: u64 },
    /// A fenced host's heartbeat was confirmed: fetch assignments now (without waiting for a
    /// change), the last step out of the fence.
    FetchAssignments,
}

/// What to do with an assignments answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Use it; `change` says if it ended a fence.
    Accept { change: Option<Change> },
    /// Its index is lower than `seen`: an answer from a lagging or stale node. Ignore it.
    Regressed { seen: u64 },
}

/// The lease and fence state of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    lease_ms: u64,
    state: LeaseState,
    /// The highest assignments index seen.
    max_index: Option<u64>,
    /// While fenced: the latest confirmation of a heartbeat sent after the fence began, as
    /// (answered at, lease until).
    confirmed: Option<(u64, u64)>,
}

impl Lease {
    /// A lease not held yet.
    pub fn new(lease_ms: u64) -> Lease {
        Lease {
            lease_ms,
            state: LeaseState::Never,
            max_index: None,
            confirmed: None,
        }
    }

    /// The lease a previous run of the agent left (its lease file's expiry, if any): still
    /// held if it has not run out, fenced since its expiry if it has.
    pub fn resume(lease_ms: u64, expiry: Option<u64>, now: u64) -> Lease {
        let mut l = Lease::new(lease_ms);
        l.state = match expiry {
            None => LeaseState::Never,
            Some(until) if now < until => LeaseState::Held { until },
            Some(since) => LeaseState::Fenced { since },
        };
        l
    }

    pub fn state(&self) -> LeaseState {
        self.state
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    pub fn is_fenced(&self) -> bool {
        matches!(self.state, LeaseState::Fenced { .. })
    }

    /// The highest assignments index seen.
    pub fn max_index(&self) -> Option<u64> {
        self.max_index
    }

    /// Whether a VM may be started now: only under a lease that has not run out.
    pub fn may_start(&self, now: u64) -> bool {
        matches!(self.state, LeaseState::Held { until } if now < until)
    }

    /// The expiry to publish to the dead man's switch: the lease's end, or when the fence
    /// began (already past). `None` before any lease was held.
    pub fn expiry(&self) -> Option<u64> {
        match self.state {
            LeaseState::Never => None,
            LeaseState::Held { until } => Some(until),
            LeaseState::Fenced { since } => Some(since),
        }
    }

    /// When [`Lease::tick`] has something to do next.
    pub fn next_deadline(&self) -> Option<u64> {
        match self.state {
            LeaseState::Held { until } => Some(until),
            LeaseState::Never | LeaseState::Fenced { .. } => None,
        }
    }

    /// Fences once the lease has run out.
    pub fn tick(&mut self, now: u64) -> Option<Change> {
        match self.state {
            LeaseState::Held { until } if now >= until => {
                self.state = LeaseState::Fenced { since: until };
                self.confirmed = None;
                Some(Change::Fenced { since: until })
            }
            _ => None,
        }
    }

    /// A heartbeat sent at `sent_at` was answered 200 at `now`.
    pub fn heartbeat_confirmed(&mut self, sent_at: u64, now: u64) -> Option<Change> {
        // A late answer may find the lease already run out.
        let fenced = self.tick(now);
        let until = sent_at.saturating_add(self.lease_ms);
        match self.state {
            LeaseState::Never => {
                self.state = LeaseState::Held { until };
                // A confirmation that comes back after its own lease is over renews nothing.
                self.tick(now).or(fenced)
            }
            LeaseState::Held { until: old } => {
                self.state = LeaseState::Held {
                    until: old.max(until),
                };
                fenced
            }
            LeaseState::Fenced { since } => {
                if sent_at < since || until <= now {
                    return fenced;
                }
                let newest = self.confirmed.map_or(until, |(_, u)| u.max(until));
                let first = self.confirmed.is_none();
                // Keep the first answer time: an assignments request sent after it is causally
                // after the control plane took the host back.
                let answered = self.confirmed.map_or(now, |(a, _)| a);
                self.confirmed = Some((answered, newest));
                if first {
                    Some(Change::FetchAssignments)
                } else {
                    fenced
                }
            }
        }
    }

    /// An assignments answer at `index`, whose request was sent at `sent_at`, came back at
    /// `now`.
    pub fn assignments(&mut self, index: u64, sent_at: u64, now: u64) -> Verdict {
        if let Some(seen) = self.max_index.filter(|&seen| index < seen) {
            return Verdict::Regressed { seen };
        }
        self.max_index = Some(index);
        let fenced = self.tick(now);
        let change = match (self.state, self.confirmed) {
            (LeaseState::Fenced { since }, Some((answered, until)))
                if sent_at >= answered && sent_at >= since && now < until =>
            {
                self.state = LeaseState::Held { until };
                self.confirmed = None;
                Some(Change::Unfenced { since, until })
            }
            _ => fenced,
        };
        Verdict::Accept { change }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 2000;

    /// One step of a scenario.
    #[derive(Debug, Clone, Copy)]
    enum Ev {
        Tick(u64),
        /// (sent at, answered at)
        Heartbeat(u64, u64),
        /// (index, sent at, answered at)
        Assignments(u64, u64, u64),
    }

    fn step(l: &mut Lease, ev: Ev) -> Option<Change> {
        match ev {
            Ev::Tick(now) => l.tick(now),
            Ev::Heartbeat(sent, now) => l.heartbeat_confirmed(sent, now),
            Ev::Assignments(i, sent, now) => match l.assignments(i, sent, now) {
                Verdict::Accept { change } => change,
                Verdict::Regressed { .. } => None,
            },
        }
    }

    use Ev::{Assignments as A, Heartbeat as H, Tick as T};
    use LeaseState::{Fenced, Held, Never};

    /// Scenarios: events with the change and the state each one leads to.
    #[test]
    fn lease_table() {
        type Case = (&'static str, Vec<(Ev, Option<Change>, LeaseState)>);
        let cases: Vec<Case> = vec![
            (
                "renewed from when the heartbeat was sent, not answered",
                vec![
                    (H(100, 900), None, Held { until: 2100 }),
                    (T(2099), None, Held { until: 2100 }),
                    (
                        T(2100),
                        Some(Change::Fenced { since: 2100 }),
                        Fenced { since: 2100 },
                    ),
                ],
            ),
            (
                "an older heartbeat answered late never shortens the lease",
                vec![
                    (H(500, 600), None, Held { until: 2500 }),
                    (H(100, 700), None, Held { until: 2500 }),
                ],
            ),
            (
                "assignments alone keep nothing alive",
                vec![
                    (H(0, 10), None, Held { until: 2000 }),
                    (A(5, 1000, 1010), None, Held { until: 2000 }),
                    (
                        A(6, 1900, 2001),
                        Some(Change::Fenced { since: 2000 }),
                        Fenced { since: 2000 },
                    ),
                ],
            ),
            (
                "a confirmation that arrives after its own lease ran out renews nothing",
                vec![(
                    H(0, 2500),
                    Some(Change::Fenced { since: 2000 }),
                    Fenced { since: 2000 },
                )],
            ),
            (
                "fence ends on a heartbeat sent after it began, then fresh assignments",
                vec![
                    (H(0, 10), None, Held { until: 2000 }),
                    (
                        T(2000),
                        Some(Change::Fenced { since: 2000 }),
                        Fenced { since: 2000 },
                    ),
                    // Sent before the fence began: does not count.
                    (H(1900, 2100), None, Fenced { since: 2000 }),
                    // Assignments without a confirmed heartbeat: not enough.
                    (A(7, 2200, 2300), None, Fenced { since: 2000 }),
                    (
                        H(3000, 3100),
                        Some(Change::FetchAssignments),
                        Fenced { since: 2000 },
                    ),
                    // A second confirmation asks for nothing more.
                    (H(3500, 3600), None, Fenced { since: 2000 }),
                    // Sent before the confirmation arrived: may predate the host's return.
                    (A(8, 3050, 3200), None, Fenced { since: 2000 }),
                    (
                        A(8, 3100, 3300),
                        Some(Change::Unfenced {
                            since: 2000,
                            until: 5500,
                        }),
                        Held { until: 5500 },
                    ),
                ],
            ),
            (
                "a regressed index does not end a fence",
                vec![
                    (H(0, 10), None, Held { until: 2000 }),
                    (A(9, 10, 20), None, Held { until: 2000 }),
                    (
                        T(2000),
                        Some(Change::Fenced { since: 2000 }),
                        Fenced { since: 2000 },
                    ),
                    (
                        H(2500, 2600),
                        Some(Change::FetchAssignments),
                        Fenced { since: 2000 },
                    ),
                    (A(8, 2700, 2800), None, Fenced { since: 2000 }),
                    (
                        A(9, 2700, 2800),
                        Some(Change::Unfenced {
                            since: 2000,
                            until: 4500,
                        }),
                        Held { until: 4500 },
                    ),
                ],
            ),
            (
                "recovery that takes longer than the renewed lease stays fenced",
                vec![
                    (H(0, 10), None, Held { until: 2000 }),
                    (
                        T(2000),
                        Some(Change::Fenced { since: 2000 }),
                        Fenced { since: 2000 },
                    ),
                    (
                        H(2100, 2200),
                        Some(Change::FetchAssignments),
                        Fenced { since: 2000 },
                    ),
                    (A(1, 2300, 4100), None, Fenced { since: 2000 }),
                    (H(4000, 4200), None, Fenced { since: 2000 }),
                    (
                        A(2, 4300, 4400),
                        Some(Change::Unfenced {
                            since: 2000,
                            until: 6000,
                        }),
                        Held { until: 6000 },
                    ),
                ],
            ),
            (
                "nothing happens before the first confirmation",
                vec![
                    (T(100_000), None, Never),
                    (A(3, 0, 10), None, Never),
                    (H(100_000, 100_010), None, Held { until: 102_000 }),
                ],
            ),
        ];
        for (name, steps) in cases {
            let mut l = Lease::new(LEASE);
            for (i, (ev, change, state)) in steps.into_iter().enumerate() {
                let got = step(&mut l, ev);
                assert_eq!(got, change, "{name}, step {i} {ev:?}");
                assert_eq!(l.state(), state, "{name}, step {i} {ev:?}");
            }
        }
    }

    #[test]
    fn lower_indexes_are_ignored() {
        let mut l = Lease::new(LEASE);
        assert_eq!(l.assignments(5, 0, 0), Verdict::Accept { change: None });
        assert_eq!(l.assignments(5, 0, 0), Verdict::Accept { change: None });
        assert_eq!(l.assignments(4, 0, 0), Verdict::Regressed { seen: 5 });
        assert_eq!(l.max_index(), Some(5));
        assert_eq!(l.assignments(6, 0, 0), Verdict::Accept { change: None });
        assert_eq!(l.assignments(0, 0, 0), Verdict::Regressed { seen: 6 });
    }

    #[test]
    fn starts_only_under_a_running_lease() {
        let mut l = Lease::new(LEASE);
        assert!(!l.may_start(0), "never held");
        l.heartbeat_confirmed(1000, 1001);
        assert!(l.may_start(1001));
        assert!(l.may_start(2999));
        assert!(!l.may_start(3000), "run out, before any tick");
        l.tick(3000);
        assert!(!l.may_start(3000));
        assert!(l.is_fenced());
    }

    /// The lease a previous run left: held, run out, or none.
    #[test]
    fn resumed_leases() {
        let cases = [
            (None, 50, Never, None, None),
            (Some(100), 50, Held { until: 100 }, Some(100), Some(100)),
            (Some(100), 100, Fenced { since: 100 }, Some(100), None),
            (Some(100), 5000, Fenced { since: 100 }, Some(100), None),
        ];
        for (expiry, now, state, published, deadline) in cases {
            let l = Lease::resume(LEASE, expiry, now);
            assert_eq!(l.state(), state, "{expiry:?} at {now}");
            assert_eq!(l.expiry(), published, "{expiry:?} at {now}");
            assert_eq!(l.next_deadline(), deadline, "{expiry:?} at {now}");
        }
        // Starting fenced: any heartbeat sent now counts for ending it.
        let mut l = Lease::resume(LEASE, Some(100), 5000);
        assert_eq!(
            l.heartbeat_confirmed(5000, 5010),
            Some(Change::FetchAssignments)
        );
        assert_eq!(
            l.assignments(1, 5020, 5030),
            Verdict::Accept {
                change: Some(Change::Unfenced {
                    since: 100,
                    until: 7000
                })
            }
        );
        assert!(l.may_start(5030));
    }
}
