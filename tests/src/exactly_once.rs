//! The checker of the fault suite with hosts: "a VM runs on exactly one host".
//!
//! Pure functions over what the run recorded: each VM's active intervals per host, as the
//! hosts' systemd managers reported them ([`crate::unit_log`]), on one clock (CLOCK_REALTIME
//! microseconds), and what the clients were told. It finds
//! 1. [`overlaps`]: a VM active on two different hosts at the same time (no tolerance: an
//!    overlap of 1 µs counts; intervals that only touch do not);
//! 2. [`convergence`]: after the faults heal, a VM desired running that no live host runs, one
//!    that several run, or a unit of a VM the cluster no longer has;
//! 3. [`lost_creates`]: an acknowledged create, never deleted, that the cluster no longer has;
//!
//! and counts [`moves`]: a VM's interval ending on one host and its next one starting on
//! another.

use std::collections::{BTreeMap, BTreeSet};

/// One activation of a VM's unit on a host: from the unit leaving `inactive` to it entering
/// `inactive` or `failed` again (its processes can only exist in between). `end_us` is `None`
/// while it is still active.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interval {
    pub vm: String,
    pub host: String,
    pub start_us: u64,
    pub end_us: Option<u64>,
}

impl Interval {
    /// The end, with an open interval ending at `now_us`.
    pub fn end_or(&self, now_us: u64) -> u64 {
        self.end_us.unwrap_or(now_us)
    }
}

/// A VM active on two hosts at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub vm: String,
    pub first: Interval,
    pub second: Interval,
    /// When both ran: `[from_us, to_us)`.
    pub from_us: u64,
    pub to_us: u64,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let span = |i: &Interval| match i.end_us {
            Some(e) => format!("[{}, {}]", i.start_us, e),
            None => format!("[{}, still active]", i.start_us),
        };
        write!(
            f,
            "VM {} ran on {} {} and on {} {}: both from {} to {} µs ({} ms)",
            self.vm,
            self.first.host,
            span(&self.first),
            self.second.host,
            span(&self.second),
            self.from_us,
            self.to_us,
            (self.to_us - self.from_us) / 1000
        )
    }
}

/// Every pair of intervals of one VM on two different hosts that share a moment, open
/// intervals running until `now_us`. Sorted by VM and time.
pub fn overlaps(intervals: &[Interval], now_us: u64) -> Vec<Overlap> {
    let mut by_vm: BTreeMap<&str, Vec<&Interval>> = BTreeMap::new();
    for i in intervals {
        by_vm.entry(&i.vm).or_default().push(i);
    }
    let mut out = Vec::new();
    for (vm, mut list) in by_vm {
        list.sort_by_key(|i| (i.start_us, i.end_or(now_us)));
        for (n, a) in list.iter().enumerate() {
            for b in &list[n + 1..] {
                if b.start_us >= a.end_or(now_us) {
                    break;
                }
                if a.host == b.host {
                    continue;
                }
                let from = a.start_us.max(b.start_us);
                let to = a.end_or(now_us).min(b.end_or(now_us));
                if from < to {
                    out.push(Overlap {
                        vm: vm.to_string(),
                        first: (*a).clone(),
                        second: (*b).clone(),
                        from_us: from,
                        to_us: to,
                    });
                }
            }
        }
    }
    out
}

/// How many times a VM's next interval (by start) is on another host than the one before.
pub fn moves(intervals: &[Interval]) -> usize {
    let mut by_vm: BTreeMap<&str, Vec<&Interval>> = BTreeMap::new();
    for i in intervals {
        by_vm.entry(&i.vm).or_default().push(i);
    }
    by_vm
        .values_mut()
        .map(|list| {
            list.sort_by_key(|i| i.start_us);
            list.windows(2).filter(|w| w[0].host != w[1].host).count()
        })
        .sum()
}

/// What is wrong with the end state: `desired` are the VMs the cluster has and wants running,
/// `existing` every VM it has, `running` the VMs each live host's manager has active. Empty
/// when each desired VM runs on exactly one host and nothing else runs.
pub fn convergence(
    desired: &BTreeSet<String>,
    existing: &BTreeSet<String>,
    running: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut on: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (host, vms) in running {
        for vm in vms {
            on.entry(vm).or_default().push(host);
        }
    }
    let mut out = Vec::new();
    for vm in desired {
        match on.get(vm.as_str()).map(Vec::as_slice) {
            None | Some([]) => out.push(format!("{vm} is desired running and runs nowhere")),
            Some([_]) => {}
            Some(hosts) => out.push(format!("{vm} runs on several hosts: {hosts:?}")),
        }
    }
    for (vm, hosts) in &on {
        if !existing.contains(*vm) {
            out.push(format!(
                "{vm} runs on {hosts:?} but the cluster has no such VM"
            ));
        } else if !desired.contains(*vm) {
            out.push(format!("{vm} runs on {hosts:?} but is not desired running"));
        }
    }
    out
}

/// Acknowledged creates that no delete was ever sent for and that the cluster does not have.
pub fn lost_creates(
    acknowledged: &BTreeSet<String>,
    delete_sent: &BTreeSet<String>,
    existing: &BTreeSet<String>,
) -> Vec<String> {
    acknowledged
        .iter()
        .filter(|vm| !delete_sent.contains(*vm) && !existing.contains(*vm))
        .map(|vm| format!("the acknowledged create of {vm} was lost"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(vm: &str, host: &str, start: u64, end: Option<u64>) -> Interval {
        Interval {
            vm: vm.into(),
            host: host.into(),
            start_us: start,
            end_us: end,
        }
    }

    fn set(xs: &[&str]) -> BTreeSet<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn overlaps_table() {
        struct Case {
            name: &'static str,
            intervals: Vec<Interval>,
            /// (vm, first host, second host, from, to)
            want: Vec<(&'static str, &'static str, &'static str, u64, u64)>,
        }
        let cases = [
            Case {
                name: "nothing",
                intervals: vec![],
                want: vec![],
            },
            Case {
                name: "one host, back to back",
                intervals: vec![iv("a", "h1", 0, Some(10)), iv("a", "h1", 10, Some(20))],
                want: vec![],
            },
            Case {
                name: "a move that touches is no overlap",
                intervals: vec![iv("a", "h1", 0, Some(10)), iv("a", "h2", 10, None)],
                want: vec![],
            },
            Case {
                name: "a move with a gap",
                intervals: vec![iv("a", "h1", 0, Some(10)), iv("a", "h2", 15, Some(30))],
                want: vec![],
            },
            Case {
                name: "1 µs of overlap counts",
                intervals: vec![iv("a", "h1", 0, Some(11)), iv("a", "h2", 10, Some(30))],
                want: vec![("a", "h1", "h2", 10, 11)],
            },
            Case {
                name: "an old copy still running while the new one runs",
                intervals: vec![iv("a", "h2", 500, None), iv("a", "h1", 0, None)],
                want: vec![("a", "h1", "h2", 500, 1000)],
            },
            Case {
                name: "other VMs do not overlap each other",
                intervals: vec![iv("a", "h1", 0, None), iv("b", "h2", 0, None)],
                want: vec![],
            },
            Case {
                name: "one long interval against two short ones",
                intervals: vec![
                    iv("a", "h1", 0, Some(100)),
                    iv("a", "h2", 10, Some(20)),
                    iv("a", "h3", 50, Some(60)),
                ],
                want: vec![("a", "h1", "h2", 10, 20), ("a", "h1", "h3", 50, 60)],
            },
            Case {
                name: "contained in a same-host interval, then another host",
                intervals: vec![
                    iv("a", "h1", 0, Some(5)),
                    iv("a", "h1", 5, Some(40)),
                    iv("a", "h2", 30, Some(50)),
                ],
                want: vec![("a", "h1", "h2", 30, 40)],
            },
        ];
        for c in cases {
            let got: Vec<_> = overlaps(&c.intervals, 1000)
                .into_iter()
                .map(|o| (o.vm, o.first.host, o.second.host, o.from_us, o.to_us))
                .collect();
            let want: Vec<_> = c
                .want
                .iter()
                .map(|(v, a, b, f, t)| (v.to_string(), a.to_string(), b.to_string(), *f, *t))
                .collect();
            assert_eq!(got, want, "{}", c.name);
        }
    }

    #[test]
    fn overlap_message_names_vm_hosts_and_times() {
        let o = &overlaps(
            &[
                iv("web", "h1", 1_000, None),
                iv("web", "h2", 3_000, Some(9_000)),
            ],
            10_000,
        )[0];
        let s = o.to_string();
        for part in ["web", "h1", "h2", "still active", "3000", "9000", "(6 ms)"] {
            assert!(s.contains(part), "{s} lacks {part}");
        }
    }

    #[test]
    fn moves_table() {
        let cases: [(&str, Vec<Interval>, usize); 4] = [
            ("none", vec![], 0),
            (
                "restarts on one host are no moves",
                vec![iv("a", "h1", 0, Some(1)), iv("a", "h1", 2, None)],
                0,
            ),
            (
                "there and back",
                vec![
                    iv("a", "h2", 10, Some(20)),
                    iv("a", "h1", 0, Some(5)),
                    iv("a", "h1", 30, None),
                ],
                2,
            ),
            (
                "per VM",
                vec![
                    iv("a", "h1", 0, Some(5)),
                    iv("b", "h2", 6, None),
                    iv("a", "h1", 7, None),
                ],
                0,
            ),
        ];
        for (name, ivs, want) in cases {
            assert_eq!(moves(&ivs), want, "{name}");
        }
    }

    #[test]
    fn convergence_table() {
        let running = |pairs: &[(&str, &[&str])]| -> BTreeMap<String, BTreeSet<String>> {
            pairs
                .iter()
                .map(|(h, vms)| (h.to_string(), set(vms)))
                .collect()
        };
        type Case = (
            &'static str,
            BTreeSet<String>,
            BTreeSet<String>,
            BTreeMap<String, BTreeSet<String>>,
            usize,
        );
        let cases: [Case; 6] = [
            (
                "all good",
                set(&["a", "b"]),
                set(&["a", "b"]),
                running(&[("h1", &["a"]), ("h2", &["b"])]),
                0,
            ),
            ("empty", set(&[]), set(&[]), running(&[("h1", &[])]), 0),
            (
                "missing",
                set(&["a", "b"]),
                set(&["a", "b"]),
                running(&[("h1", &["a"])]),
                1,
            ),
            (
                "twice",
                set(&["a"]),
                set(&["a"]),
                running(&[("h1", &["a"]), ("h2", &["a"])]),
                1,
            ),
            (
                "deleted yet running",
                set(&[]),
                set(&[]),
                running(&[("h1", &["x"])]),
                1,
            ),
            (
                "stopped yet running",
                set(&[]),
                set(&["a"]),
                running(&[("h1", &["a"])]),
                1,
            ),
        ];
        for (name, desired, existing, run, want) in cases {
            let got = convergence(&desired, &existing, &run);
            assert_eq!(got.len(), want, "{name}: {got:?}");
        }
    }

    #[test]
    fn lost_creates_table() {
        let cases = [
            ("kept", set(&["a"]), set(&[]), set(&["a"]), 0),
            ("lost", set(&["a", "b"]), set(&[]), set(&["a"]), 1),
            ("deleted", set(&["a"]), set(&["a"]), set(&[]), 0),
            ("never acknowledged", set(&[]), set(&[]), set(&[]), 0),
        ];
        for (name, acked, deleted, existing, want) in cases {
            assert_eq!(
                lost_creates(&acked, &deleted, &existing).len(),
                want,
                "{name}"
            );
        }
    }
}
