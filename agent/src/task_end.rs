//! How a task's run ended, as the agent reports it ([`TaskEnd`]): pure, from the unit's end
//! ([`Ended`], with systemd's `Result`/`ExecMainCode`/`ExecMainStatus`) and the run's console
//! lines.
//!
//! - systemd's `Result=timeout` is the host's `RuntimeMaxSec=` (the task's `timeout_secs`):
//!   timed out, whatever the process did on its way out.
//! - The fence's end is a lost host.
//! - A `process` task's status is its process's exit status; killed by a signal, it has none.
//!   systemd's own statuses (200–243: `EXEC`, `CHDIR`, …) mean it never ran: could not start.
//! - A QEMU guest reports its status on its console: a line `BLIXARD-TASK-EXIT=N` (0–255;
//!   the last one wins), printed before it powers off. A guest that powers off without one
//!   exited 0; a kernel panic is a failure without a status; QEMU's own error (bad kernel,
//!   missing file) is could not start.
//! - An end that was not the process's own (the unit could not be built or started) is could
//!   not start, recorded where the start failed.

use blixard_api::{bound_console, validate, Hypervisor, TaskEnd, TaskEndReason, VmState};

use crate::guest_end::{self, ConsoleEnd};
use crate::reconcile::Ended;

/// The console line by which a guest reports its task's exit status.
pub const EXIT_MARKER: &str = "BLIXARD-TASK-EXIT=";

/// The exit status a guest printed on its console (the last [`EXIT_MARKER`] line), if any.
pub fn guest_exit_status<S: AsRef<str>>(lines: &[S]) -> Option<i32> {
    lines
        .iter()
        .filter_map(|l| l.as_ref().trim().strip_prefix(EXIT_MARKER))
        .filter_map(|n| n.trim().parse::<i32>().ok())
        .rfind(|n| (0..=255).contains(n))
}

/// A task's end "could not start", with `why`.
pub fn could_not_start(why: &str) -> TaskEnd {
    TaskEnd {
        reason: TaskEndReason::CouldNotStart,
        exit_status: None,
        detail: Some(validate::printable(why, validate::MAX_REASON_LEN)),
        console: vec![],
    }
}

/// The console lines a result keeps: the newest, printable, within the bound.
pub fn console_tail(lines: &[String]) -> Vec<String> {
    let clean: Vec<String> = lines
        .iter()
        .map(|l| validate::printable(l, blixard_api::TASK_CONSOLE_BYTES))
        .collect();
    bound_console(&clean)
}

/// The end of a task of hypervisor `hv` whose unit ended as `end`, with the run's `console`
/// lines (oldest first); `fence_reason` is the reason the fence's ends carry.
pub fn classify(hv: Hypervisor, end: &Ended, console: &[String], fence_reason: &str) -> TaskEnd {
    let detail = Some(validate::printable(&end.reason, validate::MAX_REASON_LEN));
    let (reason, exit_status) = match &end.exit {
        _ if end.reason == fence_reason => (TaskEndReason::HostLost, None),
        Some(x) if x.result == "timeout" => (TaskEndReason::TimedOut, None),
        None => (TaskEndReason::Exited, None),
        Some(x) => match hv {
            Hypervisor::Qemu => match guest_end::classify(console) {
                Some(ConsoleEnd::Panic(_)) => (TaskEndReason::Exited, None),
                Some(ConsoleEnd::Qemu(_)) if end.state == VmState::Failed => {
                    (TaskEndReason::CouldNotStart, None)
                }
                _ => match guest_exit_status(console) {
                    Some(n) => (TaskEndReason::Exited, Some(n)),
                    None if end.state == VmState::Stopped => (TaskEndReason::Exited, Some(0)),
                    None => (TaskEndReason::Exited, None),
                },
            },
            _ => match (x.code, x.status) {
                (1, s) if (200..=243).contains(&s) => (TaskEndReason::CouldNotStart, None),
                (1, s) => (TaskEndReason::Exited, Some(s)),
                _ => (TaskEndReason::Exited, None),
            },
        },
    };
    // A status says it all; otherwise the reason says why there is none.
    let detail = if exit_status.is_some() { None } else { detail };
    TaskEnd {
        reason,
        exit_status,
        detail,
        console: console_tail(console),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::MainExit;

    const FENCE: &str = "fenced: no leader-confirmed heartbeat for 2000 ms";

    fn ended(state: VmState, reason: &str, exit: Option<(&str, i32, i32)>) -> Ended {
        Ended {
            generation: 1,
            state,
            reason: reason.into(),
            exit: exit.map(|(r, c, s)| MainExit {
                result: r.into(),
                code: c,
                status: s,
            }),
            task_end: None,
        }
    }

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ends_table() {
        use Hypervisor::*;
        use TaskEndReason::*;
        let powered_off = lines(&["BLIXARD-GUEST-BOOTED", "[    2.2] reboot: Power down"]);
        let with_status = lines(&[
            "BLIXARD-GUEST-BOOTED",
            "BLIXARD-TASK-EXIT=7",
            "[    2.2] reboot: Power down",
        ]);
        let panic = lines(&["[ 2.4] Kernel panic - not syncing: Attempted to kill init!"]);
        let qemu_err = lines(&["qemu-system-x86_64: -kernel nope: No such file or directory"]);
        type Case = (
            &'static str,
            Hypervisor,
            Ended,
            Vec<String>,
            TaskEndReason,
            Option<i32>,
        );
        let cases: Vec<Case> = vec![
            (
                "process exit 0",
                Process,
                ended(VmState::Stopped, "exited status=0", Some(("success", 1, 0))),
                vec![],
                Exited,
                Some(0),
            ),
            (
                "process exit 3",
                Process,
                ended(
                    VmState::Failed,
                    "exit-code status=3",
                    Some(("exit-code", 1, 3)),
                ),
                vec![],
                Exited,
                Some(3),
            ),
            (
                "killed by a signal: no status",
                Process,
                ended(
                    VmState::Failed,
                    "signal signal=KILL",
                    Some(("signal", 2, 9)),
                ),
                vec![],
                Exited,
                None,
            ),
            (
                "timed out, however it went",
                Process,
                ended(
                    VmState::Failed,
                    "timeout signal=TERM",
                    Some(("timeout", 2, 15)),
                ),
                vec![],
                TimedOut,
                None,
            ),
            (
                "systemd could not exec it",
                Process,
                ended(
                    VmState::Failed,
                    "exit-code status=203/EXEC",
                    Some(("exit-code", 1, 203)),
                ),
                vec![],
                CouldNotStart,
                None,
            ),
            (
                "fenced",
                Process,
                ended(VmState::Failed, FENCE, None),
                vec![],
                HostLost,
                None,
            ),
            (
                "guest powered off: 0",
                Qemu,
                ended(VmState::Stopped, "exited status=0", Some(("success", 1, 0))),
                powered_off,
                Exited,
                Some(0),
            ),
            (
                "guest printed its status",
                Qemu,
                ended(VmState::Stopped, "exited status=0", Some(("success", 1, 0))),
                with_status,
                Exited,
                Some(7),
            ),
            (
                "guest panicked",
                Qemu,
                ended(
                    VmState::Failed,
                    "exit-code status=1",
                    Some(("exit-code", 1, 1)),
                ),
                panic,
                Exited,
                None,
            ),
            (
                "QEMU refused",
                Qemu,
                ended(
                    VmState::Failed,
                    "exit-code status=1",
                    Some(("exit-code", 1, 1)),
                ),
                qemu_err,
                CouldNotStart,
                None,
            ),
            (
                "guest timed out",
                Qemu,
                ended(VmState::Stopped, "timeout", Some(("timeout", 1, 0))),
                lines(&["BLIXARD-GUEST-BOOTED"]),
                TimedOut,
                None,
            ),
        ];
        for (what, hv, end, console, reason, status) in cases {
            let t = classify(hv, &end, &console, FENCE);
            assert_eq!((t.reason, t.exit_status), (reason, status), "{what}");
            assert_eq!(t.detail.is_none(), status.is_some(), "{what}");
            assert_eq!(t.console, console, "{what}");
        }
    }

    #[test]
    fn the_marker_is_a_line_of_its_own_and_the_last_one_wins() {
        assert_eq!(guest_exit_status(&["x BLIXARD-TASK-EXIT=3"]), None);
        assert_eq!(guest_exit_status(&["BLIXARD-TASK-EXIT=300"]), None);
        assert_eq!(
            guest_exit_status(&["BLIXARD-TASK-EXIT=1", " BLIXARD-TASK-EXIT=42 "]),
            Some(42)
        );
        assert_eq!(guest_exit_status::<&str>(&[]), None);
    }

    #[test]
    fn console_is_bounded_and_printable() {
        let many: Vec<String> = (0..1000).map(|i| format!("line {i:04}")).collect();
        let tail = console_tail(&many);
        assert!(tail.iter().map(String::len).sum::<usize>() <= blixard_api::TASK_CONSOLE_BYTES);
        assert_eq!(tail.last().map(String::as_str), Some("line 0999"));
        let t = console_tail(&["a\u{1b}[31mred".to_string()]);
        assert!(validate::free_text("c", &t[0], 100).is_ok(), "{t:?}");
        let long = "x".repeat(10_000);
        assert_eq!(
            console_tail(&[long])[0].len(),
            blixard_api::TASK_CONSOLE_BYTES
        );
    }
}
