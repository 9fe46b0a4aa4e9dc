//! Why a QEMU VM ended, from the last lines its unit wrote to the journal (the guest's serial
//! console and QEMU's own stderr).
//!
//! systemd only says how the process ended (`exited status=1`), which cannot tell a guest
//! kernel panic (pvpanic with `-action panic=exit-failure`) from QEMU refusing to start, nor
//! a guest that powered off from one that rebooted (QEMU runs with `-no-reboot`).
//! [`classify`] reads the console lines (pure); [`explain`] combines that with systemd's
//! [`describe_end`](crate::reconcile::describe_end) result. Reading the journal is the
//! daemon's job.

use blixard_api::VmState;

/// What the console says about the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The kernel printed `reboot: Power down`.
    PoweredOff,
    /// The kernel printed `reboot: Restarting system` (QEMU exits instead: `-no-reboot`).
    Rebooted,
    /// `Kernel panic - not syncing: MESSAGE`.
    Panic(String),
    /// QEMU's own error, e.g. `qemu: invalid kernel header` or
    /// `qemu-system-x86_64: -kernel …: No such file or directory`.
    Qemu(String),
}

/// Longest message kept in a reason.
const MAX_MESSAGE: usize = 200;

fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(MAX_MESSAGE) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The kernel's message text without its `[    1.234567] ` timestamp.
fn kernel_text(line: &str) -> &str {
    let l = line.trim_start();
    match (l.starts_with('['), l.find("] ")) {
        (true, Some(i)) => &l[i + 2..],
        _ => l,
    }
}

/// How the console lines of one run (oldest first) say it ended; the last telling line wins.
pub fn classify<S: AsRef<str>>(lines: &[S]) -> Option<ConsoleEnd> {
    let mut end = None;
    for line in lines {
        let line = line.as_ref();
        let text = kernel_text(line);
        if let Some(msg) = text.strip_prefix("Kernel panic - not syncing:") {
            end = Some(ConsoleEnd::Panic(clip(msg)));
        } else if text.starts_with("reboot: Power down") {
            // A panic's own restart path never prints this; keep the panic if there was one.
            if !matches!(end, Some(ConsoleEnd::Panic(_))) {
                end = Some(ConsoleEnd::PoweredOff);
            }
        } else if text.starts_with("reboot: Restarting system") {
            if !matches!(end, Some(ConsoleEnd::Panic(_))) {
                end = Some(ConsoleEnd::Rebooted);
            }
        } else if let Some(msg) = qemu_error(line) {
            end = Some(ConsoleEnd::Qemu(clip(msg)));
        }
    }
    end
}

/// `qemu: MSG` or `qemu-system-<arch>: MSG`, except the note QEMU prints on SIGTERM.
fn qemu_error(line: &str) -> Option<&str> {
    let (prog, msg) = line.split_once(": ")?;
    let is_qemu = prog == "qemu" || prog.starts_with("qemu-system-");
    (is_qemu && !msg.starts_with("terminating on signal")).then_some(line)
}

/// The state and reason of an ended QEMU VM: systemd's `(state, reason)` refined by what its
/// console said.
pub fn explain(state: VmState, reason: &str, console: Option<&ConsoleEnd>) -> (VmState, String) {
    match (state, console) {
        (VmState::Stopped, Some(ConsoleEnd::PoweredOff)) => (
            VmState::Stopped,
            format!("the guest powered off ({reason})"),
        ),
        (VmState::Stopped, Some(ConsoleEnd::Rebooted)) => (
            VmState::Stopped,
            format!("the guest rebooted, which ends QEMU ({reason})"),
        ),
        // A panic is a failure however QEMU exited.
        (_, Some(ConsoleEnd::Panic(msg))) => (
            VmState::Failed,
            format!("guest kernel panic: {msg} ({reason})"),
        ),
        (VmState::Failed, Some(ConsoleEnd::Qemu(msg))) => {
            (VmState::Failed, format!("{msg} ({reason})"))
        }
        (state, _) => (state, reason.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_table() {
        let panic = [
            "BLIXARD-GUEST-PANIC",
            "[    2.481748] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
            "[    2.489073]  panic+0x118/0x2f4",
        ];
        let cases: Vec<(Vec<&str>, Option<ConsoleEnd>)> =
            vec![
            (vec![], None),
            (vec!["BLIXARD-GUEST-HEARTBEAT 3"], None),
            (
                vec!["BLIXARD-GUEST-POWEROFF", "[    2.218573] reboot: Power down"],
                Some(ConsoleEnd::PoweredOff),
            ),
            (
                vec!["[    9.1] reboot: Restarting system"],
                Some(ConsoleEnd::Rebooted),
            ),
            (
                panic.to_vec(),
                Some(ConsoleEnd::Panic(
                    "Attempted to kill init! exitcode=0x00000100".into(),
                )),
            ),
            (
                vec!["qemu: invalid kernel header"],
                Some(ConsoleEnd::Qemu("qemu: invalid kernel header".into())),
            ),
            (
                vec!["qemu-system-x86_64: -device foo: 'foo' is not a valid device model name"],
                Some(ConsoleEnd::Qemu(
                    "qemu-system-x86_64: -device foo: 'foo' is not a valid device model name"
                        .into(),
                )),
            ),
            // SIGTERM's note is not an error.
            (
                vec!["qemu-system-x86_64: terminating on signal 15 from pid 7 (<unknown process>)"],
                None,
            ),
            // Guest text that merely mentions qemu is not QEMU's.
            (vec!["my qemu: thing"], None),
        ];
        for (lines, want) in cases {
            assert_eq!(classify(&lines), want, "{lines:?}");
        }
    }

    #[test]
    fn explain_table() {
        let panic = ConsoleEnd::Panic("Attempted to kill init!".into());
        let bad = ConsoleEnd::Qemu("qemu: invalid kernel header".into());
        let cases = [
            (
                VmState::Stopped,
                "exited status=0",
                Some(ConsoleEnd::PoweredOff),
                VmState::Stopped,
                "the guest powered off (exited status=0)",
            ),
            (
                VmState::Stopped,
                "exited status=0",
                Some(ConsoleEnd::Rebooted),
                VmState::Stopped,
                "the guest rebooted, which ends QEMU (exited status=0)",
            ),
            (
                VmState::Failed,
                "exit-code status=1",
                Some(panic.clone()),
                VmState::Failed,
                "guest kernel panic: Attempted to kill init! (exit-code status=1)",
            ),
            (
                VmState::Stopped,
                "exited status=0",
                Some(panic),
                VmState::Failed,
                "guest kernel panic: Attempted to kill init! (exited status=0)",
            ),
            (
                VmState::Failed,
                "exit-code status=1",
                Some(bad.clone()),
                VmState::Failed,
                "qemu: invalid kernel header (exit-code status=1)",
            ),
            // A clean exit is not turned into a failure by an old QEMU warning.
            (
                VmState::Stopped,
                "exited status=0",
                Some(bad),
                VmState::Stopped,
                "exited status=0",
            ),
            (
                VmState::Failed,
                "signal=KILL",
                None,
                VmState::Failed,
                "signal=KILL",
            ),
        ];
        for (state, reason, console, want_state, want) in cases {
            assert_eq!(
                explain(state, reason, console.as_ref()),
                (want_state, want.to_string()),
                "{reason} {console:?}"
            );
        }
    }

    #[test]
    fn long_messages_are_clipped() {
        let long = format!("Kernel panic - not syncing: {}", "x".repeat(500));
        match classify(&[long]) {
            Some(ConsoleEnd::Panic(m)) => assert_eq!(m.chars().count(), MAX_MESSAGE + 1),
            other => panic!("{other:?}"),
        }
    }
}
