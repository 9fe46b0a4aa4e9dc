//! How each VM unit ended, from systemd's signals and unit lists: pure, with an injected
//! clock (`u64` milliseconds on `CLOCK_BOOTTIME`, passed in by the caller).
//!
//! systemd tells the agent about a unit twice over: its signals (`PropertiesChanged` with the
//! result, `JobRemoved`, `UnitRemoved`), and the unit list each pass reads. They race: a unit
//! can be listed as ended, or be gone, before its signals are read, and signals can come
//! after the end was processed. [`UnitTracker`] turns both into one record per end, by these
//! rules:
//! - A unit the agent asked to stop (`StopUnit`: unassigned, desired stopped, an old
//!   incarnation) ends without a record: it is not the VM's end.
//! - A unit the fence killed, and any unit of a `move` VM that ends while the host is fenced
//!   (its signals may come after its track was closed), ends as `failed` with the fence's
//!   reason at the generation in force, reported once the fence is over: the cluster decides
//!   (restart policy, new generation) whether it runs again, never the agent.
//! - Any other end is the VM's own: `stopped` for a clean exit, `failed` otherwise, with
//!   systemd's result.
//! - A unit this agent saw running that is listed as ended, or gone, with no signal yet is
//!   *ending*: left alone and not reported. After [`UNSEEN_END_MS`] without its signals its
//!   end is recorded without a result (a lost signal must not hold a VM back for ever).
//! - Signals for a unit not seen running in this session do not replace an end already
//!   recorded for it (late signals of an end that was processed).

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use blixard_api::{Assignment, DesiredState, VmState};

use crate::reconcile::{describe_end, ActiveState, Ended, MainExit, ObservedUnit};

/// How long a unit may be listed as ended before its signals arrive, in ms.
pub const UNSEEN_END_MS: u64 = 3000;

/// The reason reported for a VM whose unit ended while no agent ran.
pub const ENDED_WHILE_DOWN: &str = "the unit ended while the agent was not running";

/// What one systemd signal says about a VM unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Properties changed; only what changed is set.
    Changed {
        active_state: Option<String>,
        result: Option<String>,
        exec_main_code: Option<i32>,
        exec_main_status: Option<i32>,
    },
    /// A job of the unit finished with a result other than `done`.
    JobFailed { result: String },
    /// The unit was unloaded.
    Removed,
}

/// What the agent knows of one VM unit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Track {
    /// The generation the unit serves.
    generation: u64,
    /// The agent asked for the stop (`StopUnit`): its end is not a VM end.
    stop_requested: bool,
    /// The fence signalled it: its end is the fence's.
    fence_killed: bool,
    /// The unit reached `inactive` or `failed`; the end is recorded at the next pass.
    end_pending: bool,
    result: Option<String>,
    exec_main_code: Option<i32>,
    exec_main_status: Option<i32>,
    /// A start job that did not finish `done`.
    failed_job: Option<String>,
    /// Started or seen running in this session.
    live: bool,
    /// Since when a live unit is listed as ended or gone while its signals are not read yet.
    missing_since: Option<u64>,
    /// When this agent started the unit (bounds the journal read of its end).
    started_at: Option<SystemTime>,
}

/// How an end was taken, for the daemon's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndKind {
    /// The agent's own stop.
    Stopped,
    /// Recorded as the fence's.
    Fenced,
    /// The VM's own end, recorded.
    Exited,
    /// Listed as ended for too long without signals; recorded without a result.
    Unseen,
    /// Late signals of an end already recorded; nothing changed.
    Duplicate,
}

/// One end processed by [`UnitTracker::record_ends`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndNote {
    pub vm: String,
    pub kind: EndKind,
    /// When this agent started the unit, if it did (bounds the journal read of its end).
    pub started_at: Option<SystemTime>,
}

/// What a pass needs to know besides the unit list.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The assignment generation of each assigned VM.
    pub generations: &'a BTreeMap<String, u64>,
    /// Whether the host is fenced now.
    pub fenced: bool,
    /// VMs that are never fenced (`on_host_loss = stay`).
    pub stay: &'a BTreeSet<String>,
    /// The reason of a fenced end.
    pub fence_reason: &'a str,
}

/// What [`UnitTracker::record_ends`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// VMs whose unit is ending (see [`crate::reconcile::Input::ending`]).
    pub ending: BTreeSet<String>,
    pub ends: Vec<EndNote>,
}

/// The tracks of every VM unit, and the ends recorded.
#[derive(Debug, Clone, Default)]
pub struct UnitTracker {
    tracks: BTreeMap<String, Track>,
    ended: BTreeMap<String, Ended>,
}

impl UnitTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A unit found running when the agent started.
    pub fn adopt(&mut self, vm: &str, generation: u64) {
        self.tracks.insert(
            vm.to_string(),
            Track {
                generation,
                live: true,
                ..Track::default()
            },
        );
    }

    /// The agent started the unit of `vm` at `generation`.
    pub fn started(&mut self, vm: &str, generation: u64, at: SystemTime) {
        self.tracks.insert(
            vm.to_string(),
            Track {
                generation,
                live: true,
                started_at: Some(at),
                ..Track::default()
            },
        );
    }

    /// The agent asked systemd to stop the unit.
    pub fn stop_requested(&mut self, vm: &str) {
        self.tracks
            .entry(vm.to_string())
            .or_default()
            .stop_requested = true;
    }

    /// The fence signalled the unit.
    pub fn fence_killed(&mut self, vm: &str) {
        self.tracks.entry(vm.to_string()).or_default().fence_killed = true;
    }

    /// Whether the agent already asked for this unit's stop.
    pub fn is_stopping(&self, vm: &str) -> bool {
        self.tracks.get(vm).is_some_and(|t| t.stop_requested)
    }

    /// A signal about the unit of `vm`.
    pub fn signal(&mut self, vm: &str, signal: Signal) {
        match signal {
            Signal::Changed {
                active_state,
                result,
                exec_main_code,
                exec_main_status,
            } => {
                let t = self.tracks.entry(vm.to_string()).or_default();
                if matches!(active_state.as_deref(), Some("active" | "activating")) {
                    // A new run: what an earlier run ended with is not this run's end.
                    t.end_pending = false;
                    t.result = None;
                    t.exec_main_code = None;
                    t.exec_main_status = None;
                }
                if let Some(r) = result {
                    t.result = Some(r);
                }
                // ExecMainCode 0 is systemd's "the main process has not exited": a start
                // announces it with `Result=success`, which is no end.
                if let Some(c) = exec_main_code {
                    t.exec_main_code = (c != 0).then_some(c);
                }
                if let Some(s) = exec_main_status {
                    t.exec_main_status = Some(s);
                }
                if matches!(active_state.as_deref(), Some("inactive" | "failed")) {
                    t.end_pending = true;
                }
            }
            Signal::JobFailed { result } => {
                let t = self.tracks.entry(vm.to_string()).or_default();
                if !t.stop_requested {
                    t.failed_job = Some(result);
                    t.end_pending = true;
                }
            }
            Signal::Removed => {
                if let Some(t) = self.tracks.get_mut(vm) {
                    t.end_pending = t.end_pending || !t.stop_requested;
                }
            }
        }
    }

    /// The ends recorded, by VM.
    pub fn ended(&self) -> &BTreeMap<String, Ended> {
        &self.ended
    }

    /// Records an end the agent decided itself (a start that failed, a refined reason).
    pub fn record(&mut self, vm: &str, end: Ended) {
        self.ended.insert(vm.to_string(), end);
    }

    /// Forgets the ends of VMs no longer assigned, and the tracks of units that are gone and
    /// not assigned (their signals were missed).
    pub fn retain(&mut self, assigned: &BTreeSet<&str>, observed: &[ObservedUnit]) {
        self.ended.retain(|vm, _| assigned.contains(vm.as_str()));
        let seen: BTreeSet<&str> = observed.iter().map(|u| u.vm.as_str()).collect();
        self.tracks.retain(|vm, t| {
            t.end_pending || seen.contains(vm.as_str()) || assigned.contains(vm.as_str())
        });
    }

    /// Turns the ends seen in signals and in the unit list into [`Ended`] records.
    pub fn record_ends(
        &mut self,
        observed: &[ObservedUnit],
        cx: &Context<'_>,
        now: u64,
    ) -> Outcome {
        let by_vm: BTreeMap<&str, &ObservedUnit> =
            observed.iter().map(|u| (u.vm.as_str(), u)).collect();
        let mut out = Outcome::default();
        let vms: Vec<String> = self.tracks.keys().cloned().collect();
        for vm in vms {
            let assigned = cx.generations.get(&vm).copied().unwrap_or(0);
            let unit = by_vm.get(vm.as_str()).copied();
            let Some(t) = self.tracks.get_mut(&vm) else {
                continue;
            };
            if let Some(u) = unit.filter(|u| u.active.is_up()) {
                // Running (again): remember which generation it serves.
                t.generation = u.generation.unwrap_or(t.generation.max(assigned));
                t.live = true;
                t.missing_since = None;
                continue;
            }
            let deactivating = unit.is_some_and(|u| u.active == ActiveState::Deactivating);
            if !t.end_pending && deactivating {
                // Its stop (a QEMU guest's graceful power-off) may take a while; the end comes
                // with signals once it is done, so no "unseen end" clock runs meanwhile.
                t.missing_since = None;
                if !t.stop_requested {
                    out.ending.insert(vm);
                }
                continue;
            }
            let mut unseen = false;
            if !t.end_pending {
                if !t.live || t.stop_requested {
                    continue;
                }
                // Ended in systemd's eyes, but its signals are not here yet.
                let since = *t.missing_since.get_or_insert(now);
                if now.saturating_sub(since) < UNSEEN_END_MS {
                    out.ending.insert(vm);
                    continue;
                }
                unseen = true;
            } else if t.live
                && !t.stop_requested
                && !t.fence_killed
                && t.exec_main_code.is_none()
                && t.failed_job.is_none()
            {
                // systemd sends the unit's `ActiveState` and the service's `Result` and
                // `ExecMain*` in two signals: under load a pass can fall between them. Wait
                // (bounded) for the exit status rather than record an end without it.
                let since = *t.missing_since.get_or_insert(now);
                if now.saturating_sub(since) < UNSEEN_END_MS {
                    out.ending.insert(vm);
                    continue;
                }
            }
            let t = self.tracks.remove(&vm).unwrap_or_default();
            let generation = assigned.max(t.generation);
            let fenced = t.fence_killed || (cx.fenced && !cx.stay.contains(&vm));
            let kind = if t.stop_requested {
                EndKind::Stopped
            } else if fenced {
                self.ended.insert(
                    vm.clone(),
                    Ended {
                        generation,
                        state: VmState::Failed,
                        reason: cx.fence_reason.to_string(),
                        exit: None,
                        task_end: None,
                    },
                );
                EndKind::Fenced
            } else if !t.live && self.ended.contains_key(&vm) {
                EndKind::Duplicate
            } else {
                let (state, reason) = end_of(&t);
                let exit = t.result.clone().map(|result| MainExit {
                    result,
                    code: t.exec_main_code.unwrap_or(0),
                    status: t.exec_main_status.unwrap_or(0),
                });
                self.ended.insert(
                    vm.clone(),
                    Ended {
                        generation,
                        state,
                        reason,
                        exit,
                        task_end: None,
                    },
                );
                if unseen {
                    EndKind::Unseen
                } else {
                    EndKind::Exited
                }
            };
            out.ends.push(EndNote {
                vm,
                kind,
                started_at: t.started_at,
            });
        }
        out
    }

    /// VMs assigned `running` whose unit is gone although a previous run of the agent started
    /// it at the assigned generation (`persisted`: VM → the generation last started): the
    /// unit ended while no agent watched. Records them `failed` rather than starting them
    /// again (only a newer generation does), and returns their names.
    pub fn ended_while_down(
        &mut self,
        desired: &[Assignment],
        observed: &[ObservedUnit],
        persisted: &BTreeMap<String, u64>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for a in desired {
            let vm = &a.spec.name;
            let started_before = persisted.get(vm).is_some_and(|&g| g >= a.generation);
            let known = self.tracks.contains_key(vm)
                || observed.iter().any(|u| &u.vm == vm)
                || self
                    .ended
                    .get(vm)
                    .is_some_and(|e| e.generation >= a.generation);
            if a.desired == DesiredState::Running && started_before && !known {
                self.ended.insert(
                    vm.clone(),
                    Ended {
                        generation: a.generation,
                        state: VmState::Failed,
                        reason: ENDED_WHILE_DOWN.to_string(),
                        exit: None,
                        task_end: None,
                    },
                );
                out.push(vm.clone());
            }
        }
        out
    }
}

/// The state and reason of an end from its signals.
fn end_of(t: &Track) -> (VmState, String) {
    let (state, reason) = match (&t.result, &t.failed_job) {
        (Some(result), _) => describe_end(
            result,
            t.exec_main_code.unwrap_or(0),
            t.exec_main_status.unwrap_or(0),
        ),
        (None, Some(job)) => (VmState::Failed, format!("start job {job}")),
        (None, None) => (
            VmState::Failed,
            "the unit ended without a recorded result".to_string(),
        ),
    };
    // A failed start job says less than the service's own result.
    match (&t.failed_job, state) {
        (Some(job), VmState::Stopped) => (VmState::Failed, format!("start job {job}")),
        _ => (state, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::tests::spec;
    use blixard_api::Hypervisor;

    const FENCE: &str = "fenced: no leader-confirmed heartbeat for 2000 ms";

    fn unit(vm: &str, active: &str, generation: Option<u64>) -> ObservedUnit {
        ObservedUnit {
            vm: vm.into(),
            active: ActiveState::parse(active),
            sub_state: String::new(),
            generation,
        }
    }

    fn inactive(result: &str, code: i32, status: i32) -> Signal {
        Signal::Changed {
            active_state: Some("inactive".into()),
            result: Some(result.into()),
            exec_main_code: Some(code),
            exec_main_status: Some(status),
        }
    }

    /// One step of a scenario.
    #[derive(Debug, Clone)]
    enum Step {
        Start(u64),
        Adopt(u64),
        StopAsked,
        FenceKill,
        Sig(Signal),
        /// A pass at this time, with the unit listed (or not), fenced or not.
        Pass {
            now: u64,
            unit: Option<&'static str>,
            fenced: bool,
        },
    }

    /// What the scenario leaves: the end recorded, the notes of the last pass, whether the
    /// last pass saw the unit ending.
    type Want = (Option<(VmState, &'static str, u64)>, Vec<EndKind>, bool);

    fn run(steps: &[Step], assigned: u64, stay: bool) -> Want {
        let mut t = UnitTracker::new();
        let generations = BTreeMap::from([("web".to_string(), assigned)]);
        let stay_set: BTreeSet<String> = if stay {
            BTreeSet::from(["web".to_string()])
        } else {
            BTreeSet::new()
        };
        let mut last = Outcome::default();
        for s in steps {
            match s.clone() {
                Step::Start(g) => t.started("web", g, SystemTime::UNIX_EPOCH),
                Step::Adopt(g) => t.adopt("web", g),
                Step::StopAsked => t.stop_requested("web"),
                Step::FenceKill => t.fence_killed("web"),
                Step::Sig(sig) => t.signal("web", sig),
                Step::Pass {
                    now,
                    unit: u,
                    fenced,
                } => {
                    let units: Vec<ObservedUnit> =
                        u.map(|a| unit("web", a, None)).into_iter().collect();
                    let cx = Context {
                        generations: &generations,
                        fenced,
                        stay: &stay_set,
                        fence_reason: FENCE,
                    };
                    last = t.record_ends(&units, &cx, now);
                }
            }
        }
        let end = t.ended().get("web").map(|e| {
            let reason: &'static str = Box::leak(e.reason.clone().into_boxed_str());
            (e.state, reason, e.generation)
        });
        (
            end,
            last.ends.into_iter().map(|n| n.kind).collect(),
            last.ending.contains("web"),
        )
    }

    fn pass(now: u64, unit: Option<&'static str>, fenced: bool) -> Step {
        Step::Pass { now, unit, fenced }
    }

    #[test]
    fn unit_end_table() {
        use Step::*;
        let sigterm_exit = || Sig(inactive("success", 2, 15));
        let crash = || Sig(inactive("exit-code", 1, 3));
        // The unit's own signal, before the service's with the exit status.
        let failed_without_status = || {
            Sig(Signal::Changed {
                active_state: Some("failed".into()),
                result: None,
                exec_main_code: None,
                exec_main_status: None,
            })
        };
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Vec<Step>, u64, bool, Want)> = vec![
            (
                "an end whose exit status is still on its way waits for it",
                vec![Start(3), failed_without_status(), pass(10, None, false)],
                3,
                false,
                (None, vec![], true),
            ),
            (
                "a start's ExecMainCode=0 and Result=success are no exit status to end with",
                vec![
                    Start(4),
                    Sig(Signal::Changed {
                        active_state: Some("activating".into()),
                        result: None,
                        exec_main_code: None,
                        exec_main_status: None,
                    }),
                    Sig(Signal::Changed {
                        active_state: None,
                        result: Some("success".into()),
                        exec_main_code: Some(0),
                        exec_main_status: Some(0),
                    }),
                    failed_without_status(),
                    pass(10, None, false),
                ],
                4,
                false,
                (None, vec![], true),
            ),
            (
                "the exit status in a second signal makes the end",
                vec![
                    Start(3),
                    failed_without_status(),
                    pass(10, None, false),
                    crash(),
                    pass(20, None, false),
                ],
                3,
                false,
                (
                    Some((VmState::Failed, "exit-code status=3", 3)),
                    vec![EndKind::Exited],
                    false,
                ),
            ),
            (
                "an exit status that never comes ends the wait after the bound",
                vec![
                    Start(3),
                    Sig(Signal::Changed {
                        active_state: Some("inactive".into()),
                        result: Some("success".into()),
                        exec_main_code: None,
                        exec_main_status: None,
                    }),
                    pass(10, None, false),
                    pass(10 + UNSEEN_END_MS, None, false),
                ],
                3,
                false,
                (
                    Some((VmState::Stopped, "exited", 3)),
                    vec![EndKind::Exited],
                    false,
                ),
            ),
            (
                "a VM's own exit is recorded with systemd's result",
                vec![
                    Start(3),
                    pass(0, Some("active"), false),
                    crash(),
                    pass(10, None, false),
                ],
                3,
                false,
                (
                    Some((VmState::Failed, "exit-code status=3", 3)),
                    vec![EndKind::Exited],
                    false,
                ),
            ),
            (
                "a stop the agent asked for is no end of the VM",
                vec![Start(3), StopAsked, sigterm_exit(), pass(10, None, false)],
                3,
                false,
                (None, vec![EndKind::Stopped], false),
            ),
            (
                "a stop the agent asked for stays its own even while fenced",
                vec![Start(3), StopAsked, sigterm_exit(), pass(10, None, true)],
                3,
                false,
                (None, vec![EndKind::Stopped], false),
            ),
            (
                "the fence's kill is recorded failed with the fence's reason",
                vec![Start(3), FenceKill, sigterm_exit(), pass(10, None, true)],
                3,
                false,
                (
                    Some((VmState::Failed, FENCE, 3)),
                    vec![EndKind::Fenced],
                    false,
                ),
            ),
            (
                "the fence's kill stays the fence's when its signals come after the fence",
                vec![
                    Start(3),
                    FenceKill,
                    pass(5, Some("active"), true),
                    sigterm_exit(),
                    pass(10, None, false),
                ],
                3,
                false,
                (
                    Some((VmState::Failed, FENCE, 3)),
                    vec![EndKind::Fenced],
                    false,
                ),
            ),
            (
                "any end of a move VM while fenced is the fence's",
                vec![Adopt(2), crash(), pass(10, None, true)],
                2,
                false,
                (
                    Some((VmState::Failed, FENCE, 2)),
                    vec![EndKind::Fenced],
                    false,
                ),
            ),
            (
                "late signals while fenced, for a unit whose track was closed, are the fence's",
                vec![
                    Start(3),
                    FenceKill,
                    sigterm_exit(),
                    pass(10, None, true),
                    sigterm_exit(),
                    pass(20, None, true),
                ],
                3,
                false,
                (
                    Some((VmState::Failed, FENCE, 3)),
                    vec![EndKind::Fenced],
                    false,
                ),
            ),
            (
                "late signals after the fence do not replace the fence's record",
                vec![
                    Start(3),
                    FenceKill,
                    sigterm_exit(),
                    pass(10, None, true),
                    sigterm_exit(),
                    pass(20, None, false),
                ],
                3,
                false,
                (
                    Some((VmState::Failed, FENCE, 3)),
                    vec![EndKind::Duplicate],
                    false,
                ),
            ),
            (
                "a stay VM's end while fenced is its own",
                vec![Start(3), crash(), pass(10, None, true)],
                3,
                true,
                (
                    Some((VmState::Failed, "exit-code status=3", 3)),
                    vec![EndKind::Exited],
                    false,
                ),
            ),
            (
                "listed gone without signals: ending, and left alone",
                vec![
                    Start(3),
                    pass(0, Some("active"), false),
                    pass(100, None, false),
                    pass(2999 + 100, None, false),
                ],
                3,
                false,
                (None, vec![], true),
            ),
            (
                "gone without signals past the bound: recorded without a result",
                vec![
                    Start(3),
                    pass(0, Some("active"), false),
                    pass(100, None, false),
                    pass(3100, None, false),
                ],
                3,
                false,
                (
                    Some((
                        VmState::Failed,
                        "the unit ended without a recorded result",
                        3,
                    )),
                    vec![EndKind::Unseen],
                    false,
                ),
            ),
            (
                "an adopted unit that vanishes is not restarted: its end is recorded",
                vec![Adopt(4), pass(0, None, false), pass(3000, None, false)],
                4,
                false,
                (
                    Some((
                        VmState::Failed,
                        "the unit ended without a recorded result",
                        4,
                    )),
                    vec![EndKind::Unseen],
                    false,
                ),
            ),
            (
                "seen running again resets the unseen clock",
                vec![
                    Start(3),
                    pass(0, None, false),
                    pass(2000, Some("active"), false),
                    pass(4000, None, false),
                ],
                3,
                false,
                (None, vec![], true),
            ),
            (
                "deactivating: no clock while its stop runs",
                vec![
                    Start(3),
                    pass(0, Some("deactivating"), false),
                    pass(60_000, Some("deactivating"), false),
                ],
                3,
                false,
                (None, vec![], true),
            ),
            (
                "a failed start job is a failure",
                vec![
                    Start(3),
                    Sig(Signal::JobFailed {
                        result: "failed".into(),
                    }),
                    pass(10, None, false),
                ],
                3,
                false,
                (
                    Some((VmState::Failed, "start job failed", 3)),
                    vec![EndKind::Exited],
                    false,
                ),
            ),
            (
                "a failed start job beats a clean result",
                vec![
                    Start(3),
                    Sig(Signal::JobFailed {
                        result: "dependency".into(),
                    }),
                    Sig(inactive("success", 1, 0)),
                    pass(10, None, false),
                ],
                3,
                false,
                (
                    Some((VmState::Failed, "start job dependency", 3)),
                    vec![EndKind::Exited],
                    false,
                ),
            ),
            (
                "the end carries the newer of the unit's and the assignment's generation",
                vec![Start(3), crash(), pass(10, None, false)],
                5,
                false,
                (
                    Some((VmState::Failed, "exit-code status=3", 5)),
                    vec![EndKind::Exited],
                    false,
                ),
            ),
            (
                "a unit removed after the agent's stop leaves no record",
                vec![
                    Start(3),
                    StopAsked,
                    Sig(Signal::Removed),
                    pass(10, None, false),
                ],
                3,
                false,
                (None, vec![], false),
            ),
            (
                "a unit removed without signals ends once its exit status had time to come",
                vec![
                    Start(3),
                    Sig(Signal::Removed),
                    pass(10, None, false),
                    pass(10 + UNSEEN_END_MS, None, false),
                ],
                3,
                false,
                (
                    Some((
                        VmState::Failed,
                        "the unit ended without a recorded result",
                        3,
                    )),
                    vec![EndKind::Exited],
                    false,
                ),
            ),
        ];
        for (name, steps, assigned, stay, want) in cases {
            assert_eq!(run(&steps, assigned, stay), want, "{name}");
        }
    }

    #[test]
    fn a_running_unit_takes_its_generation_from_the_unit() {
        let mut t = UnitTracker::new();
        t.started("web", 3, SystemTime::UNIX_EPOCH);
        let generations = BTreeMap::from([("web".to_string(), 9)]);
        let cx = Context {
            generations: &generations,
            fenced: false,
            stay: &BTreeSet::new(),
            fence_reason: FENCE,
        };
        t.record_ends(&[unit("web", "active", Some(4))], &cx, 0);
        t.signal("web", inactive("exit-code", 1, 1));
        // The assignment's generation (9) is newer than the unit's (4): the end is at 9.
        t.record_ends(&[], &cx, 10);
        assert_eq!(t.ended().get("web").map(|e| e.generation), Some(9));
    }

    #[test]
    fn units_that_ended_while_the_agent_was_down_are_failed_not_restarted() {
        let a = |g| Assignment {
            spec: spec("web", Hypervisor::Process),
            desired: DesiredState::Running,
            generation: g,
        };
        // (assignment generation, persisted, unit listed, tracked, expect failed)
        let cases = [
            (3, Some(3), false, false, true),
            (3, Some(2), false, false, false),
            (3, None, false, false, false),
            (3, Some(3), true, false, false),
            (3, Some(3), false, true, false),
        ];
        for (g, persisted, listed, tracked, want) in cases {
            let mut t = UnitTracker::new();
            if tracked {
                t.started("web", g, SystemTime::UNIX_EPOCH);
            }
            let p: BTreeMap<String, u64> = persisted
                .map(|p| ("web".to_string(), p))
                .into_iter()
                .collect();
            let units: Vec<ObservedUnit> = if listed {
                vec![unit("web", "active", Some(g))]
            } else {
                vec![]
            };
            let got = t.ended_while_down(&[a(g)], &units, &p);
            assert_eq!(
                !got.is_empty(),
                want,
                "{g} {persisted:?} {listed} {tracked}"
            );
            if want {
                let e = t.ended().get("web").cloned();
                assert_eq!(
                    e.map(|e| (e.state, e.reason, e.generation)),
                    Some((VmState::Failed, ENDED_WHILE_DOWN.to_string(), g))
                );
                // Once recorded, not again.
                assert!(t.ended_while_down(&[a(g)], &units, &p).is_empty());
            }
        }
        // A stopped VM is not an end.
        let mut t = UnitTracker::new();
        let mut stopped = a(3);
        stopped.desired = DesiredState::Stopped;
        let p = BTreeMap::from([("web".to_string(), 3)]);
        assert!(t.ended_while_down(&[stopped], &[], &p).is_empty());
    }
}
