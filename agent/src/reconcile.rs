//! Desired (the host's assignments) + observed (the units systemd has) → actions.
//!
//! [`reconcile`] is a pure function over plain data: it starts what is assigned and missing,
//! stops what is running and no longer wanted, leaves everything else alone, and says which
//! observed state to report for each assigned VM (only when it differs from the last report).
//! Running it twice on the same input gives the same actions, and on the state those actions
//! produce, none but reports.
//!
//! A VM whose unit ended on its own is not restarted by the host: the end is remembered with
//! the assignment generation in force ([`Ended`]) and reported; only a newer generation (a
//! start, a restart or a new placement decided by the cluster) starts it again. A unit whose
//! generation (from its description) is older than the assignment's is an old incarnation:
//! it is stopped, and the current one started once it is gone.

use std::collections::{BTreeMap, BTreeSet};

use blixard_api::{Assignment, DesiredState, TaskEnd, VmState, VmStatusReport};

/// A unit's `ActiveState`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ActiveState {
    Active,
    Reloading,
    Inactive,
    Failed,
    Activating,
    Deactivating,
    /// Any other state (`maintenance`, `refreshing`, states of future systemd versions).
    Other(String),
}

impl ActiveState {
    pub fn parse(s: &str) -> ActiveState {
        match s {
            "active" => ActiveState::Active,
            "reloading" => ActiveState::Reloading,
            "inactive" => ActiveState::Inactive,
            "failed" => ActiveState::Failed,
            "activating" => ActiveState::Activating,
            "deactivating" => ActiveState::Deactivating,
            other => ActiveState::Other(other.to_string()),
        }
    }

    /// Whether the unit's process is (or is about to be) running.
    pub fn is_up(&self) -> bool {
        matches!(
            self,
            ActiveState::Active
                | ActiveState::Reloading
                | ActiveState::Activating
                | ActiveState::Other(_)
        )
    }

    /// Whether the unit has ended (and is about to be collected).
    pub fn is_ended(&self) -> bool {
        matches!(self, ActiveState::Inactive | ActiveState::Failed)
    }
}

/// A VM unit as systemd has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedUnit {
    pub vm: String,
    pub active: ActiveState,
    pub sub_state: String,
    /// The assignment generation the unit was started for; `None` for units of agents that
    /// did not record it.
    pub generation: Option<u64>,
}

/// How a VM's unit ended on its own, recorded from systemd's signals before the unit was
/// collected, with the assignment generation that was in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub generation: u64,
    /// `Stopped` (clean exit) or `Failed`.
    pub state: VmState,
    pub reason: String,
    /// systemd's account of the main process's end, when its signals gave one.
    pub exit: Option<MainExit>,
    /// For a task: its end as reported (see [`crate::task_end`]).
    pub task_end: Option<TaskEnd>,
}

/// A service's `Result`, `ExecMainCode` (a `CLD_*` code: 1 exited, 2 killed, 3 dumped) and
/// `ExecMainStatus` (the exit status or the signal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MainExit {
    pub result: String,
    pub code: i32,
    pub status: i32,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the VM's unit (a no-op if it already runs).
    Start(Assignment),
    /// Stop the VM's unit (a no-op if it is gone).
    Stop { vm: String },
    /// Tell the control plane the VM's observed state.
    Report { vm: String, report: VmStatusReport },
}

/// Everything [`reconcile`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The host's assignments (from the control plane).
    pub desired: &'a [Assignment],
    /// The host's `blixard-vm-*` units (from systemd).
    pub observed: &'a [ObservedUnit],
    /// Units that ended on their own, by VM.
    pub ended: &'a BTreeMap<String, Ended>,
    /// The last report the control plane accepted, by VM.
    pub reported: &'a BTreeMap<String, VmStatusReport>,
    /// VMs whose unit this agent saw running and whose end it has not processed yet. systemd
    /// can list a unit as ended (or already collected) before its signals have been read:
    /// such a unit is left alone, and not reported, until its end is known.
    pub ending: &'a BTreeSet<String>,
}

/// The actions that bring the host to its assignments: stops first, then starts, then
/// reports, each in VM-name order.
pub fn reconcile(input: &Input<'_>) -> Vec<Action> {
    let observed: BTreeMap<&str, &ObservedUnit> =
        input.observed.iter().map(|u| (u.vm.as_str(), u)).collect();
    let mut desired: BTreeMap<&str, &Assignment> = BTreeMap::new();
    for a in input.desired {
        // The first assignment of a name wins; the control plane never sends two.
        desired.entry(a.spec.name.as_str()).or_insert(a);
    }

    let mut stops = BTreeSet::new();
    let mut starts = Vec::new();
    let mut reports = Vec::new();

    for (&vm, unit) in &observed {
        if !desired.contains_key(vm) && unit.active.is_up() {
            stops.insert(vm.to_string());
        }
    }

    for (&vm, &a) in &desired {
        let unit = observed.get(vm).copied();
        let ended = input.ended.get(vm).filter(|e| e.generation >= a.generation);
        let gone = unit.is_none_or(|u| u.active.is_ended());
        let old_incarnation = unit
            .is_some_and(|u| u.active.is_up() && u.generation.is_some_and(|g| g < a.generation));
        if old_incarnation {
            // Stop it; the current generation starts once it is gone. Nothing to report yet.
            stops.insert(vm.to_string());
            continue;
        }
        if a.desired == DesiredState::Running
            && gone
            && ended.is_none()
            && input.ending.contains(vm)
        {
            continue;
        }
        let (state, reason): (VmState, Option<String>) = match (a.desired, unit.map(|u| &u.active))
        {
            (DesiredState::Running, None) => match ended {
                Some(e) => (e.state, Some(e.reason.clone())),
                None => {
                    starts.push(Action::Start(a.clone()));
                    (VmState::Starting, None)
                }
            },
            (DesiredState::Running, Some(ActiveState::Active | ActiveState::Reloading)) => {
                (VmState::Running, None)
            }
            (DesiredState::Running, Some(ActiveState::Activating | ActiveState::Other(_))) => {
                (VmState::Starting, None)
            }
            (DesiredState::Running, Some(ActiveState::Deactivating)) => (VmState::Stopping, None),
            // Ended but not collected yet: report the end; start again once it is gone.
            (DesiredState::Running, Some(s @ (ActiveState::Inactive | ActiveState::Failed))) => {
                match ended {
                    Some(e) => (e.state, Some(e.reason.clone())),
                    None if *s == ActiveState::Failed => {
                        let sub = unit.map(|u| u.sub_state.as_str()).unwrap_or("failed");
                        (VmState::Failed, Some(format!("unit failed ({sub})")))
                    }
                    None => (VmState::Stopped, None),
                }
            }
            (DesiredState::Stopped, None | Some(ActiveState::Inactive | ActiveState::Failed)) => {
                (VmState::Stopped, None)
            }
            (DesiredState::Stopped, Some(ActiveState::Deactivating)) => (VmState::Stopping, None),
            (DesiredState::Stopped, Some(_)) => {
                stops.insert(vm.to_string());
                (VmState::Stopping, None)
            }
        };
        let task_end = match ended {
            Some(e) if (e.state, Some(&e.reason)) == (state, reason.as_ref()) => e.task_end.clone(),
            _ => None,
        };
        let report = VmStatusReport {
            state,
            reason,
            generation: a.generation,
            task_end,
        };
        if input.reported.get(vm) != Some(&report) {
            reports.push(Action::Report {
                vm: vm.to_string(),
                report,
            });
        }
    }

    let mut actions: Vec<Action> = stops.into_iter().map(|vm| Action::Stop { vm }).collect();
    actions.extend(starts);
    actions.extend(reports);
    actions
}

/// The observed end of a service from its `Result`, `ExecMainCode` and `ExecMainStatus`
/// properties: `(Stopped, …)` for a clean exit, `(Failed, reason)` otherwise, e.g.
/// `exit-code status=203/EXEC` when the binary cannot be executed.
pub fn describe_end(result: &str, exec_main_code: i32, exec_main_status: i32) -> (VmState, String) {
    // ExecMainCode is a CLD_* code: 1 exited, 2 killed, 3 dumped.
    let how = match exec_main_code {
        1 => format!(
            "status={}{}",
            exec_main_status,
            exit_status_name(exec_main_status)
        ),
        2 | 3 => format!("signal={}", signal_name(exec_main_status)),
        _ => String::new(),
    };
    let with = |what: &str| {
        if how.is_empty() {
            what.to_string()
        } else {
            format!("{what} {how}")
        }
    };
    match result {
        "success" if exec_main_code == 1 && exec_main_status == 0 => {
            (VmState::Stopped, "exited status=0".to_string())
        }
        "success" if exec_main_code == 2 => (VmState::Stopped, with("stopped")),
        "success" | "" => (VmState::Stopped, with("exited")),
        other => (VmState::Failed, with(other)),
    }
}

/// systemd's names of its own exit statuses (`EXIT_EXEC` etc.), which say why a unit never
/// got to run its command.
fn exit_status_name(status: i32) -> &'static str {
    match status {
        200 => "/CHDIR",
        201 => "/NICE",
        202 => "/FDS",
        203 => "/EXEC",
        204 => "/MEMORY",
        205 => "/LIMITS",
        206 => "/OOM_ADJUST",
        207 => "/SIGNAL_MASK",
        208 => "/STDIN",
        209 => "/STDOUT",
        210 => "/CHROOT",
        214 => "/SETSCHEDULER",
        216 => "/GROUP",
        217 => "/USER",
        218 => "/CAPABILITIES",
        219 => "/CGROUP",
        226 => "/NAMESPACE",
        _ => "",
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "HUP",
        2 => "INT",
        3 => "QUIT",
        4 => "ILL",
        6 => "ABRT",
        7 => "BUS",
        8 => "FPE",
        9 => "KILL",
        11 => "SEGV",
        13 => "PIPE",
        14 => "ALRM",
        15 => "TERM",
        _ => return signal.to_string(),
    };
    format!("SIG{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::tests::spec;
    use blixard_api::Hypervisor;

    fn assign(vm: &str, desired: DesiredState, generation: u64) -> Assignment {
        Assignment {
            spec: spec(vm, Hypervisor::Process),
            desired,
            generation,
        }
    }

    fn unit(vm: &str, active: &str) -> ObservedUnit {
        let sub = match active {
            "active" => "running",
            "activating" => "start",
            "deactivating" => "stop-sigterm",
            "failed" => "failed",
            _ => "dead",
        };
        ObservedUnit {
            vm: vm.into(),
            active: ActiveState::parse(active),
            sub_state: sub.into(),
            generation: None,
        }
    }

    fn report(state: VmState, reason: Option<&str>, generation: u64) -> VmStatusReport {
        VmStatusReport {
            state,
            reason: reason.map(String::from),
            generation,
            task_end: None,
        }
    }

    fn run(
        desired: &[Assignment],
        observed: &[ObservedUnit],
        ended: &BTreeMap<String, Ended>,
        reported: &BTreeMap<String, VmStatusReport>,
    ) -> Vec<Action> {
        reconcile(&Input {
            desired,
            observed,
            ended,
            reported,
            ending: &BTreeSet::new(),
        })
    }

    /// (desired, observed ActiveState or None for absent, start?, stop?, reported state, reason)
    type Row = (
        DesiredState,
        Option<&'static str>,
        bool,
        bool,
        VmState,
        Option<&'static str>,
    );

    /// Every desired state × every observed state of one assigned VM, nothing remembered.
    #[test]
    fn desired_by_observed_table() {
        use DesiredState::{Running as R, Stopped as S};
        // (desired, observed ActiveState or None for absent, start?, stop?, reported state, reason)
        let table: &[Row] = &[
            (R, None, true, false, VmState::Starting, None),
            (R, Some("active"), false, false, VmState::Running, None),
            (R, Some("reloading"), false, false, VmState::Running, None),
            (R, Some("activating"), false, false, VmState::Starting, None),
            (
                R,
                Some("deactivating"),
                false,
                false,
                VmState::Stopping,
                None,
            ),
            (
                R,
                Some("failed"),
                false,
                false,
                VmState::Failed,
                Some("unit failed (failed)"),
            ),
            (R, Some("inactive"), false, false, VmState::Stopped, None),
            (
                R,
                Some("maintenance"),
                false,
                false,
                VmState::Starting,
                None,
            ),
            (S, None, false, false, VmState::Stopped, None),
            (S, Some("active"), false, true, VmState::Stopping, None),
            (S, Some("reloading"), false, true, VmState::Stopping, None),
            (S, Some("activating"), false, true, VmState::Stopping, None),
            (
                S,
                Some("deactivating"),
                false,
                false,
                VmState::Stopping,
                None,
            ),
            (S, Some("failed"), false, false, VmState::Stopped, None),
            (S, Some("inactive"), false, false, VmState::Stopped, None),
            (S, Some("maintenance"), false, true, VmState::Stopping, None),
        ];
        for &(desired, observed, start, stop, state, reason) in table {
            let a = assign("web", desired, 3);
            let units: Vec<ObservedUnit> = observed.map(|s| unit("web", s)).into_iter().collect();
            let actions = run(
                std::slice::from_ref(&a),
                &units,
                &BTreeMap::new(),
                &BTreeMap::new(),
            );
            let case = format!("{desired:?} × {observed:?}: {actions:?}");
            assert_eq!(actions.contains(&Action::Start(a.clone())), start, "{case}");
            assert_eq!(
                actions.contains(&Action::Stop { vm: "web".into() }),
                stop,
                "{case}"
            );
            let want = Action::Report {
                vm: "web".into(),
                report: report(state, reason, 3),
            };
            assert!(actions.contains(&want), "{case}");
            assert_eq!(
                actions.len(),
                1 + usize::from(start) + usize::from(stop),
                "{case}"
            );
        }
    }

    /// Units nobody assigned are stopped unless they are already ending; nothing is reported.
    #[test]
    fn unassigned_units_are_stopped() {
        for (observed, stop) in [
            ("active", true),
            ("reloading", true),
            ("activating", true),
            ("maintenance", true),
            ("deactivating", false),
            ("failed", false),
            ("inactive", false),
        ] {
            let actions = run(
                &[],
                &[unit("old", observed)],
                &BTreeMap::new(),
                &BTreeMap::new(),
            );
            let want: Vec<Action> = if stop {
                vec![Action::Stop { vm: "old".into() }]
            } else {
                vec![]
            };
            assert_eq!(actions, want, "{observed}");
        }
    }

    /// An end recorded for the current (or a newer) generation is reported and not restarted;
    /// an end from an older generation does not hold a newer start back.
    #[test]
    fn ended_units_restart_only_for_a_newer_generation() {
        let failed = Ended {
            generation: 4,
            state: VmState::Failed,
            reason: "exit-code status=203/EXEC".into(),
            exit: None,
            task_end: None,
        };
        let ended = BTreeMap::from([("web".to_string(), failed)]);
        // (assignment generation, observed, expect start, reported state)
        let cases = [
            (4, None, false, VmState::Failed),
            (3, None, false, VmState::Failed),
            (5, None, true, VmState::Starting),
            (4, Some("failed"), false, VmState::Failed),
            (4, Some("inactive"), false, VmState::Failed),
            (4, Some("active"), false, VmState::Running),
        ];
        for (generation, observed, start, state) in cases {
            let a = assign("web", DesiredState::Running, generation);
            let units: Vec<ObservedUnit> = observed.map(|s| unit("web", s)).into_iter().collect();
            let actions = run(std::slice::from_ref(&a), &units, &ended, &BTreeMap::new());
            assert_eq!(
                actions.contains(&Action::Start(a)),
                start,
                "gen {generation} {observed:?}"
            );
            let reported = actions.iter().find_map(|x| match x {
                Action::Report { report, .. } => Some(report.state),
                _ => None,
            });
            assert_eq!(reported, Some(state), "gen {generation} {observed:?}");
        }
        // A failure is reported with its reason.
        let a = assign("web", DesiredState::Running, 4);
        let actions = run(&[a], &[], &ended, &BTreeMap::new());
        assert_eq!(
            actions,
            vec![Action::Report {
                vm: "web".into(),
                report: report(VmState::Failed, Some("exit-code status=203/EXEC"), 4)
            }]
        );
        // Stopping a VM that failed reports it stopped.
        let a = assign("web", DesiredState::Stopped, 4);
        let actions = run(&[a], &[], &ended, &BTreeMap::new());
        assert_eq!(
            actions,
            vec![Action::Report {
                vm: "web".into(),
                report: report(VmState::Stopped, None, 4)
            }]
        );
    }

    /// Reports already accepted are not sent again; a new generation is a new report.
    #[test]
    fn reports_are_deduplicated() {
        let a = assign("web", DesiredState::Running, 2);
        let units = [unit("web", "active")];
        let reported = BTreeMap::from([("web".to_string(), report(VmState::Running, None, 2))]);
        assert_eq!(run(&[a], &units, &BTreeMap::new(), &reported), vec![]);
        let a = assign("web", DesiredState::Running, 3);
        assert_eq!(
            run(&[a], &units, &BTreeMap::new(), &reported),
            vec![Action::Report {
                vm: "web".into(),
                report: report(VmState::Running, None, 3)
            }]
        );
    }

    /// Applying the actions and reconciling again yields nothing more: the converged host is
    /// a fixed point.
    #[test]
    fn converged_host_is_a_fixed_point() {
        let desired = vec![
            assign("a", DesiredState::Running, 1),
            assign("b", DesiredState::Stopped, 1),
            assign("c", DesiredState::Running, 7),
        ];
        let observed = vec![
            unit("b", "active"),
            unit("c", "active"),
            unit("z", "active"),
        ];
        let first = run(&desired, &observed, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(
            first
                .iter()
                .filter(|a| !matches!(a, Action::Report { .. }))
                .cloned()
                .collect::<Vec<_>>(),
            vec![
                Action::Stop { vm: "b".into() },
                Action::Stop { vm: "z".into() },
                Action::Start(desired[0].clone()),
            ]
        );
        // What systemd has after the actions, and what the control plane accepted.
        let observed = vec![unit("a", "active"), unit("c", "active")];
        let mut reported = BTreeMap::new();
        for a in run(&desired, &observed, &BTreeMap::new(), &BTreeMap::new()) {
            match a {
                Action::Report { vm, report } => {
                    reported.insert(vm, report);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            run(&desired, &observed, &BTreeMap::new(), &reported),
            vec![]
        );
    }

    /// A unit the agent saw running that is now ended or gone, with no end recorded yet, is
    /// waited for: neither restarted nor reported until its signals say how it ended.
    #[test]
    fn ending_units_are_waited_for() {
        let a = assign("web", DesiredState::Running, 2);
        let ending = BTreeSet::from(["web".to_string()]);
        for observed in [None, Some("failed"), Some("inactive")] {
            let units: Vec<ObservedUnit> = observed.map(|s| unit("web", s)).into_iter().collect();
            let input = Input {
                desired: std::slice::from_ref(&a),
                observed: &units,
                ended: &BTreeMap::new(),
                reported: &BTreeMap::new(),
                ending: &ending,
            };
            assert_eq!(reconcile(&input), vec![], "{observed:?}");
        }
        // Still running, or its end known: business as usual.
        let units = [unit("web", "active")];
        let input = Input {
            desired: std::slice::from_ref(&a),
            observed: &units,
            ended: &BTreeMap::new(),
            reported: &BTreeMap::new(),
            ending: &ending,
        };
        assert_eq!(reconcile(&input).len(), 1);
        let ended = BTreeMap::from([(
            "web".to_string(),
            Ended {
                generation: 2,
                state: VmState::Failed,
                reason: "x".into(),
                exit: None,
                task_end: None,
            },
        )]);
        let input = Input {
            desired: std::slice::from_ref(&a),
            observed: &[],
            ended: &ended,
            reported: &BTreeMap::new(),
            ending: &ending,
        };
        assert_eq!(
            reconcile(&input),
            vec![Action::Report {
                vm: "web".into(),
                report: report(VmState::Failed, Some("x"), 2)
            }]
        );
    }

    /// A running unit of an older generation is stopped, without a report; once it is gone
    /// the current generation starts. A unit of the same or a newer generation, or one that
    /// does not say, is adopted.
    #[test]
    fn old_incarnations_are_stopped_before_the_current_one_starts() {
        let a = assign("web", DesiredState::Running, 5);
        // (unit generation, active state, expect stop, expect start)
        let cases = [
            (Some(4), "active", true, false),
            (Some(4), "activating", true, false),
            (Some(5), "active", false, false),
            (Some(6), "active", false, false),
            (None, "active", false, false),
            (Some(4), "deactivating", false, false),
        ];
        for (generation, active, stop, start) in cases {
            let mut u = unit("web", active);
            u.generation = generation;
            let actions = run(
                std::slice::from_ref(&a),
                &[u],
                &BTreeMap::new(),
                &BTreeMap::new(),
            );
            let case = format!("{generation:?} {active}: {actions:?}");
            assert_eq!(
                actions.contains(&Action::Stop { vm: "web".into() }),
                stop,
                "{case}"
            );
            assert_eq!(actions.contains(&Action::Start(a.clone())), start, "{case}");
            if stop {
                assert_eq!(actions.len(), 1, "{case}");
            }
        }
        // Gone: the current one starts.
        let actions = run(
            std::slice::from_ref(&a),
            &[],
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert!(actions.contains(&Action::Start(a)));
    }

    #[test]
    fn duplicate_assignments_count_once() {
        let a = assign("web", DesiredState::Running, 1);
        let actions = run(
            &[a.clone(), a.clone()],
            &[],
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(
            actions
                .iter()
                .filter(|x| matches!(x, Action::Start(_)))
                .count(),
            1
        );
    }

    #[test]
    fn ends_are_described() {
        let cases = [
            ("success", 1, 0, VmState::Stopped, "exited status=0"),
            (
                "exit-code",
                1,
                203,
                VmState::Failed,
                "exit-code status=203/EXEC",
            ),
            ("exit-code", 1, 3, VmState::Failed, "exit-code status=3"),
            ("signal", 2, 9, VmState::Failed, "signal signal=SIGKILL"),
            (
                "core-dump",
                3,
                11,
                VmState::Failed,
                "core-dump signal=SIGSEGV",
            ),
            ("success", 2, 15, VmState::Stopped, "stopped signal=SIGTERM"),
            ("timeout", 0, 0, VmState::Failed, "timeout"),
            ("oom-kill", 2, 9, VmState::Failed, "oom-kill signal=SIGKILL"),
            ("resources", 0, 0, VmState::Failed, "resources"),
        ];
        for (result, code, status, state, reason) in cases {
            assert_eq!(
                describe_end(result, code, status),
                (state, reason.to_string()),
                "{result} {code} {status}"
            );
        }
    }
}
