//! A linearizability checker for histories of operations on VM keys, in the style of Knossos
//! and Porcupine: Wing & Gong's search for a legal sequential order that respects real time,
//! with Lowe's memoisation of (linearized set, model state), run per key (P-compositionality).
//!
//! The model of one key is a register that is absent or holds a value (the test writes a
//! unique value into each spec it sends, so a value names the write that made it):
//!
//! | call        | absent                  | present(x)                      |
//! |-------------|-------------------------|---------------------------------|
//! | create(v)   | ok(v), becomes v        | already exists (409), unchanged |
//! | update(v)   | not found (404)         | ok(v), becomes v                |
//! | delete      | not found (404)         | ok(x), becomes absent           |
//! | read        | not found (404)         | ok(x)                           |
//!
//! Outcomes the client could not observe ([`Outcome::Unknown`]: timeouts, transport errors
//! after sending, 500s) complete at "infinity": the search may place them anywhere after their
//! invocation, which includes "at the very end", i.e. never. Definite failures that the server
//! promises had no effect ([`Outcome::Failed`]: 503, 400) are left out; if one did have an
//! effect, some other operation will fail to linearize. Pure: no IO, no clock.

use std::collections::{BTreeMap, HashSet};

/// A value written to a key (unique per write).
pub type Value = u64;

/// What an operation asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Create(Value),
    Update(Value),
    Delete,
    Read,
}

/// What the client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Success carrying the key's value: the value written (create, update), removed (delete)
    /// or read.
    Ok(Value),
    /// 404: the key was absent.
    NotFound,
    /// 409 on a create: the key was present.
    AlreadyExists,
    /// A refusal that promises no effect (e.g. 503 no leader).
    Failed,
    /// No answer: the operation may or may not have taken effect.
    Unknown,
}

/// One operation of a history. Times are in any monotonic unit (the suite uses nanoseconds
/// since its start); `completed` is `None` for unknown outcomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub key: String,
    pub client: usize,
    pub call: Call,
    pub outcome: Outcome,
    pub invoked: u64,
    pub completed: Option<u64>,
}

/// The verdict for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No legal order exists; `stuck` lists the operations none of which could come next at
    /// the furthest point the search reached, `linearized` how many operations with a known
    /// outcome came before them.
    Violation {
        linearized: usize,
        state: Option<Value>,
        stuck: Vec<Op>,
    },
    /// The search gave up after exploring `budget` states.
    Inconclusive {
        budget: usize,
    },
}

/// Applies `call` to `state`; returns the new state if `outcome` is legal there.
pub fn step(state: Option<Value>, call: Call, outcome: Outcome) -> Option<Option<Value>> {
    let (next, expected) = match (call, state) {
        (Call::Create(v), None) => (Some(v), Outcome::Ok(v)),
        (Call::Create(_), Some(x)) => (Some(x), Outcome::AlreadyExists),
        (Call::Update(_), None) => (None, Outcome::NotFound),
        (Call::Update(v), Some(_)) => (Some(v), Outcome::Ok(v)),
        (Call::Delete, None) => (None, Outcome::NotFound),
        (Call::Delete, Some(x)) => (None, Outcome::Ok(x)),
        (Call::Read, None) => (None, Outcome::NotFound),
        (Call::Read, Some(x)) => (Some(x), Outcome::Ok(x)),
    };
    (outcome == Outcome::Unknown || outcome == expected).then_some(next)
}

/// Default number of states the search may visit per key before it reports `Inconclusive`.
pub const DEFAULT_BUDGET: usize = 2_000_000;

/// Checks every key of `history`, each starting absent.
pub fn check(history: &[Op], budget: usize) -> BTreeMap<String, Verdict> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    by_key
        .into_iter()
        .map(|(k, ops)| (k.to_string(), check_key(ops, budget)))
        .collect()
}

/// One level of the search: the candidates for the next position and which one is next.
struct Frame {
    candidates: Vec<usize>,
    next: usize,
    state: Option<Value>,
    run: Run,
}

/// How many operations with unknown outcome were just placed in a row. Any such run can be
/// replaced by at most two of its own operations reaching the same state (one write, behind a
/// delete or a create when the write alone could not apply), and unknown operations never
/// constrain others, so the search only tries runs of one, or of two whose second operation
/// could not have applied before the first: everything else is equivalent to a shorter run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Run {
    None,
    /// One unknown operation, placed on this state.
    One(Option<Value>),
    Two,
}

/// Checks the operations of one key, starting absent.
pub fn check_key(ops: Vec<Op>, budget: usize) -> Verdict {
    // Failed operations had no effect; unknown reads tell nothing.
    let mut ops: Vec<Op> = ops
        .into_iter()
        .filter(|o| {
            o.outcome != Outcome::Failed && !(o.outcome == Outcome::Unknown && o.call == Call::Read)
        })
        .collect();
    ops.sort_by_key(|o| (o.invoked, o.completed.unwrap_or(u64::MAX)));
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    let ret: Vec<u64> = ops
        .iter()
        .map(|o| o.completed.unwrap_or(u64::MAX))
        .collect();
    // Every unknown operation can always go last, where its effect no longer matters: the
    // search is done once every known one is placed.
    let known = ops.iter().filter(|o| o.outcome != Outcome::Unknown).count();
    if known == 0 {
        return Verdict::Linearizable;
    }
    let is_known = |i: usize| ops[i].outcome != Outcome::Unknown;
    let mut done = vec![false; n];
    let mut count = 0usize;
    // Memo key: (one past the highest linearized index, unlinearized indices below it, state,
    // run of unknowns).
    type Key = (usize, Vec<u32>, Option<Value>, Run);
    let mut seen: HashSet<Key> = HashSet::new();
    let memo_key = |done: &[bool], state: Option<Value>, run: Run| -> Key {
        let hi = done.iter().rposition(|d| *d).map_or(0, |i| i + 1);
        let holes: Vec<u32> = (0..hi).filter(|i| !done[*i]).map(|i| i as u32).collect();
        (hi, holes, state, run)
    };
    // The operations that may come next: those invoked before every pending one returned.
    // Known outcomes first; an unknown one can always wait.
    let candidates = |done: &[bool]| -> Vec<usize> {
        let min_ret = (0..n)
            .filter(|i| !done[*i])
            .map(|i| ret[i])
            .min()
            .unwrap_or(u64::MAX);
        let mut c: Vec<usize> = (0..n)
            .filter(|i| !done[*i])
            .take_while(|i| ops[*i].invoked <= min_ret)
            .collect();
        c.sort_by_key(|i| (ops[*i].outcome == Outcome::Unknown, ops[*i].invoked));
        c
    };
    let mut best = (0usize, None, candidates(&done));
    seen.insert(memo_key(&done, None, Run::None));
    let mut stack = vec![Frame {
        candidates: best.2.clone(),
        next: 0,
        state: None,
        run: Run::None,
    }];
    let mut explored = 0usize;
    while let Some(top) = stack.last_mut() {
        if top.next >= top.candidates.len() {
            stack.pop();
            if let Some(parent) = stack.last() {
                let i = parent.candidates[parent.next - 1];
                done[i] = false;
                count -= usize::from(is_known(i));
            }
            continue;
        }
        let i = top.candidates[top.next];
        top.next += 1;
        let Some(state) = step(top.state, ops[i].call, ops[i].outcome) else {
            continue;
        };
        let run = if is_known(i) {
            Run::None
        } else {
            if state == top.state {
                // An unknown operation without effect here is no different from one placed
                // last.
                continue;
            }
            match top.run {
                Run::None => Run::One(top.state),
                // Only if it could not have applied on its own.
                Run::One(pre) if step(pre, ops[i].call, Outcome::Unknown) == Some(pre) => Run::Two,
                Run::One(_) | Run::Two => continue,
            }
        };
        done[i] = true;
        if is_known(i) {
            count += 1;
            if count == known {
                return Verdict::Linearizable;
            }
        }
        explored += 1;
        if explored > budget {
            return Verdict::Inconclusive { budget };
        }
        if seen.insert(memo_key(&done, state, run)) {
            let c = candidates(&done);
            if count > best.0 {
                best = (count, state, c.clone());
            }
            stack.push(Frame {
                candidates: c,
                next: 0,
                state,
                run,
            });
        } else {
            done[i] = false;
            count -= usize::from(is_known(i));
        }
    }
    Verdict::Violation {
        linearized: best.0,
        state: best.1,
        stuck: best.2.iter().map(|i| ops[*i].clone()).collect(),
    }
}

/// Checks the end state against the acknowledged creates: every key whose create was
/// acknowledged and that no delete (acknowledged or unknown) could have removed since must be
/// in `final_state`. Returns one message per missing key.
pub fn check_acknowledged_creates(
    history: &[Op],
    final_state: &BTreeMap<String, Value>,
) -> Vec<String> {
    let mut out = Vec::new();
    for c in history {
        if !matches!((c.call, c.outcome), (Call::Create(_), Outcome::Ok(_))) {
            continue;
        }
        let deleted_since = history.iter().any(|d| {
            d.key == c.key
                && d.call == Call::Delete
                && matches!(d.outcome, Outcome::Ok(_) | Outcome::Unknown)
                && d.completed.is_none_or(|t| t >= c.invoked)
        });
        if !deleted_since && !final_state.contains_key(&c.key) {
            out.push(format!(
                "acknowledged create of {} ({:?}) by client {} is lost: no delete since, \
                 absent at the end",
                c.key, c.call, c.client
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(client, call, outcome, invoked, completed)`; completed 0 means unknown.
    type Row = (usize, Call, Outcome, u64, u64);
    type Cases = Vec<(&'static str, Vec<Row>)>;

    fn h(ops: &[Row]) -> Vec<Op> {
        ops.iter()
            .map(|&(client, call, outcome, invoked, completed)| Op {
                key: "k".into(),
                client,
                call,
                outcome,
                invoked,
                completed: (completed != 0).then_some(completed),
            })
            .collect()
    }

    fn verdict(ops: &[Row]) -> Verdict {
        check_key(h(ops), DEFAULT_BUDGET)
    }

    use Call::{Create, Delete, Read, Update};
    use Outcome::{AlreadyExists, Failed, NotFound, Unknown};
    const fn ok(v: Value) -> Outcome {
        Outcome::Ok(v)
    }

    #[test]
    fn model_steps() {
        assert_eq!(step(None, Create(1), ok(1)), Some(Some(1)));
        assert_eq!(step(None, Create(1), AlreadyExists), None);
        assert_eq!(step(Some(2), Create(1), AlreadyExists), Some(Some(2)));
        assert_eq!(step(Some(2), Update(3), ok(3)), Some(Some(3)));
        assert_eq!(step(None, Update(3), NotFound), Some(None));
        assert_eq!(step(Some(2), Delete, ok(2)), Some(None));
        assert_eq!(step(Some(2), Delete, ok(3)), None);
        assert_eq!(step(None, Read, NotFound), Some(None));
        assert_eq!(step(Some(4), Read, ok(4)), Some(Some(4)));
        assert_eq!(step(Some(4), Delete, Unknown), Some(None));
    }

    #[test]
    fn linearizable_histories() {
        let cases: Cases = vec![
            ("empty", vec![]),
            (
                "sequential lifecycle",
                vec![
                    (0, Read, NotFound, 1, 2),
                    (0, Create(1), ok(1), 3, 4),
                    (1, Create(2), AlreadyExists, 5, 6),
                    (1, Update(3), ok(3), 7, 8),
                    (0, Read, ok(3), 9, 10),
                    (0, Delete, ok(3), 11, 12),
                    (1, Update(4), NotFound, 13, 14),
                    (1, Delete, NotFound, 15, 16),
                ],
            ),
            (
                "concurrent creates, one wins; the read orders before the winner",
                vec![
                    (0, Create(1), AlreadyExists, 1, 10),
                    (1, Create(2), ok(2), 2, 9),
                    (2, Read, NotFound, 3, 4),
                    (2, Read, ok(2), 11, 12),
                ],
            ),
            (
                "unknown create that took effect",
                vec![
                    (0, Create(1), Unknown, 1, 0),
                    (1, Read, NotFound, 2, 3),
                    (1, Read, ok(1), 20, 21),
                    (1, Delete, ok(1), 22, 23),
                ],
            ),
            (
                "unknown create that never took effect",
                vec![
                    (0, Create(1), Unknown, 1, 0),
                    (1, Create(2), ok(2), 5, 6),
                    (1, Read, ok(2), 7, 8),
                ],
            ),
            (
                "failed operations are ignored",
                vec![
                    (0, Create(1), Failed, 1, 2),
                    (0, Read, NotFound, 3, 4),
                    (0, Delete, Failed, 5, 6),
                ],
            ),
            (
                "two unknowns in a row: an unknown create, then an unknown update",
                vec![
                    (0, Create(1), Unknown, 1, 0),
                    (1, Update(2), Unknown, 2, 0),
                    (2, Read, ok(2), 10, 11),
                ],
            ),
            (
                "two unknowns in a row: an unknown delete, then an unknown create",
                vec![
                    (0, Create(1), ok(1), 1, 2),
                    (1, Create(2), Unknown, 3, 0),
                    (2, Delete, Unknown, 4, 0),
                    (0, Read, ok(2), 10, 11),
                ],
            ),
            (
                "unknown delete takes effect late",
                vec![
                    (0, Create(1), ok(1), 1, 2),
                    (1, Delete, Unknown, 3, 0),
                    (0, Read, ok(1), 10, 11),
                    (0, Read, NotFound, 12, 13),
                    (0, Create(5), ok(5), 14, 15),
                ],
            ),
        ];
        for (what, ops) in cases {
            assert_eq!(verdict(&ops), Verdict::Linearizable, "{what}");
        }
    }

    #[test]
    fn histories_that_are_not_linearizable() {
        let cases: Cases = vec![
            (
                "stale read after an acknowledged update",
                vec![
                    (0, Create(1), ok(1), 1, 2),
                    (0, Update(2), ok(2), 3, 4),
                    (1, Read, ok(1), 5, 6),
                ],
            ),
            (
                "acknowledged create lost",
                vec![(0, Create(1), ok(1), 1, 2), (1, Read, NotFound, 3, 4)],
            ),
            (
                "two creates both acknowledged",
                vec![(0, Create(1), ok(1), 1, 5), (1, Create(2), ok(2), 2, 6)],
            ),
            (
                "a failed (no effect) create shows up",
                vec![(0, Create(1), Failed, 1, 2), (1, Read, ok(1), 3, 4)],
            ),
            (
                "delete returns a value never written",
                vec![(0, Create(1), ok(1), 1, 2), (0, Delete, ok(9), 3, 4)],
            ),
            (
                "update of an absent key succeeds",
                vec![(0, Update(1), ok(1), 1, 2)],
            ),
            (
                "create refused as existing on an empty key",
                vec![(0, Create(1), AlreadyExists, 1, 2)],
            ),
            (
                "deleted twice",
                vec![
                    (0, Create(1), ok(1), 1, 2),
                    (0, Delete, ok(1), 3, 4),
                    (1, Delete, ok(1), 5, 6),
                ],
            ),
            (
                "reads go back in time",
                vec![
                    (0, Create(1), ok(1), 1, 2),
                    (0, Update(2), Unknown, 3, 0),
                    (1, Read, ok(2), 4, 5),
                    (1, Read, ok(1), 6, 7),
                ],
            ),
        ];
        for (what, ops) in cases {
            let v = verdict(&ops);
            assert!(matches!(v, Verdict::Violation { .. }), "{what}: {v:?}");
        }
    }

    #[test]
    fn violation_names_the_stuck_operation() {
        let v = verdict(&[
            (0, Create(1), ok(1), 1, 2),
            (0, Update(2), ok(2), 3, 4),
            (1, Read, ok(1), 5, 6),
        ]);
        match v {
            Verdict::Violation {
                linearized,
                state,
                stuck,
            } => {
                assert_eq!((linearized, state), (2, Some(2)));
                assert_eq!(stuck.len(), 1);
                assert_eq!(stuck[0].call, Read);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn many_concurrent_unknowns_stay_tractable() {
        // 40 unknown updates in flight while a client keeps reading and one of them shows up;
        // proving the variant with a stale read at the end wrong must not try their subsets.
        let mut ops = vec![(0, Create(1), ok(1), 1, 2)];
        for i in 0..40u64 {
            ops.push((1 + i as usize, Update(100 + i), Unknown, 3 + i, 0));
        }
        for i in 0..40u64 {
            ops.push((0, Read, ok(1), 100 + 2 * i, 101 + 2 * i));
        }
        ops.push((0, Read, ok(139), 500, 501));
        ops.push((0, Read, ok(139), 502, 503));
        assert_eq!(verdict(&ops), Verdict::Linearizable);
        ops.push((0, Read, ok(1), 504, 505));
        assert!(matches!(verdict(&ops), Verdict::Violation { .. }));
    }

    /// Whether some order of the known operations and a subset of the unknown ones is legal
    /// and respects real time, by trying them all (for tiny histories).
    fn brute_force(ops: &[Op]) -> bool {
        let ops: Vec<&Op> = ops
            .iter()
            .filter(|o| o.outcome != Failed && !(o.outcome == Unknown && o.call == Read))
            .collect();
        let unknown: Vec<usize> = (0..ops.len())
            .filter(|i| ops[*i].outcome == Unknown)
            .collect();
        let ret = |o: &Op| o.completed.unwrap_or(u64::MAX);
        fn perms(
            ops: &[&Op],
            left: &mut Vec<usize>,
            order: &mut Vec<usize>,
            ret: &dyn Fn(&Op) -> u64,
        ) -> bool {
            if left.is_empty() {
                let mut st = None;
                for &i in order.iter() {
                    match step(st, ops[i].call, ops[i].outcome) {
                        Some(n) => st = n,
                        None => return false,
                    }
                }
                return true;
            }
            for k in 0..left.len() {
                let i = left[k];
                // i may go next only if no remaining op returned before i was invoked.
                if left.iter().any(|&j| j != i && ret(ops[j]) < ops[i].invoked) {
                    continue;
                }
                left.remove(k);
                order.push(i);
                let found = perms(ops, left, order, ret);
                order.pop();
                left.insert(k, i);
                if found {
                    return true;
                }
            }
            false
        }
        (0u32..1 << unknown.len()).any(|mask| {
            let mut left: Vec<usize> = (0..ops.len())
                .filter(|i| {
                    ops[*i].outcome != Unknown
                        || unknown
                            .iter()
                            .position(|u| u == i)
                            .is_some_and(|p| mask & (1 << p) != 0)
                })
                .collect();
            perms(&ops, &mut left, &mut Vec::new(), &ret)
        })
    }

    #[test]
    fn agrees_with_brute_force_on_random_small_histories() {
        // xorshift: deterministic, no dependency.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut yes, mut no) = (0, 0);
        for _ in 0..3000 {
            let len = 1 + rnd(6) as usize;
            let ops: Vec<Op> = (0..len)
                .map(|c| {
                    let v = 1 + rnd(3);
                    let call = match rnd(4) {
                        0 => Create(v),
                        1 => Update(v),
                        2 => Delete,
                        _ => Read,
                    };
                    let outcome = match (call, rnd(6)) {
                        (_, 0) => Unknown,
                        (_, 1) => Failed,
                        (_, 2) => NotFound,
                        (Create(_), 3) => AlreadyExists,
                        (Create(x) | Update(x), _) => ok(x),
                        (_, _) => ok(1 + rnd(3)),
                    };
                    let invoked = rnd(20);
                    Op {
                        key: "k".into(),
                        client: c,
                        call,
                        outcome,
                        invoked,
                        completed: (outcome != Unknown).then(|| invoked + 1 + rnd(8)),
                    }
                })
                .collect();
            let want = brute_force(&ops);
            let got = check_key(ops.clone(), DEFAULT_BUDGET);
            assert_eq!(got == Verdict::Linearizable, want, "{ops:#?}\n{got:?}");
            if want {
                yes += 1
            } else {
                no += 1
            }
        }
        // Both kinds were exercised.
        assert!(yes > 300 && no > 300, "{yes} linearizable, {no} not");
    }

    #[test]
    fn keys_are_checked_apart() {
        let mut ops = h(&[(0, Create(1), ok(1), 1, 2)]);
        ops.push(Op {
            key: "other".into(),
            client: 1,
            call: Read,
            outcome: NotFound,
            invoked: 3,
            completed: Some(4),
        });
        let r = check(&ops, DEFAULT_BUDGET);
        assert!(r.values().all(|v| *v == Verdict::Linearizable), "{r:?}");
    }

    #[test]
    fn acknowledged_creates_must_survive() {
        let ops = h(&[(0, Create(1), ok(1), 1, 2), (0, Create(2), Unknown, 3, 0)]);
        assert_eq!(check_acknowledged_creates(&ops, &BTreeMap::new()).len(), 1);
        let end = BTreeMap::from([("k".to_string(), 1)]);
        assert!(check_acknowledged_creates(&ops, &end).is_empty());
        let deleted = h(&[(0, Create(1), ok(1), 1, 2), (1, Delete, Unknown, 3, 0)]);
        assert!(check_acknowledged_creates(&deleted, &BTreeMap::new()).is_empty());
        let deleted_before = h(&[(1, Delete, ok(1), 1, 2), (0, Create(1), ok(1), 3, 4)]);
        assert_eq!(
            check_acknowledged_creates(&deleted_before, &BTreeMap::new()).len(),
            1
        );
    }
}
