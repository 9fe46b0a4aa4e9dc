//! `blixardctl vm run`: create a task, print its console while it runs (from its host's
//! journal, through any control node), print its result, and exit with its status
//! ([`exit_code`]). With `--rm` the task is deleted once its result was printed.
//!
//! The task's state is polled; its console is followed with `vm logs -f`'s stream from the
//! moment it is placed, reconnecting (without repeating lines) if the stream breaks. When the
//! result is in, the stream gets a moment to deliver the lines the result ends with; a run
//! whose console could not be followed at all prints the result's own console lines.

use std::time::Duration;

use blixard_api::{
    Client, ClientError, LogSource, TaskEndReason, TaskOutcome, TaskResult, Vm, VmSpec,
};
use tokio::sync::watch;

use crate::output::{print_json, Format};

/// Exit status when the task timed out.
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit status when the task's host was lost.
pub const EXIT_HOST_LOST: u8 = 125;
/// Exit status when the task could not start.
pub const EXIT_COULD_NOT_START: u8 = 126;
/// Exit status of a task that failed without an exit status (killed by a signal, guest
/// kernel panic).
pub const EXIT_NO_STATUS: u8 = 1;

/// How often the task's state is read.
const POLL: Duration = Duration::from_millis(200);
/// How long the console stream may take to deliver the result's last lines.
const DRAIN: Duration = Duration::from_secs(3);

/// The exit status `vm run` ends with for `result`.
pub fn exit_code(result: &TaskResult) -> u8 {
    match (result.outcome, result.reason, result.exit_status) {
        (TaskOutcome::Succeeded, _, _) => 0,
        (_, TaskEndReason::TimedOut, _) => EXIT_TIMED_OUT,
        (_, TaskEndReason::HostLost, _) => EXIT_HOST_LOST,
        (_, TaskEndReason::CouldNotStart, _) => EXIT_COULD_NOT_START,
        (_, TaskEndReason::Exited, Some(s)) => u8::try_from(s)
            .ok()
            .filter(|s| *s != 0)
            .unwrap_or(EXIT_NO_STATUS),
        (_, TaskEndReason::Exited, None) => EXIT_NO_STATUS,
    }
}

/// The lines of `result.console` not yet printed, given the `printed` console lines (the
/// newest last): all of them if none of the result's lines were printed, else those after
/// the last printed one.
pub fn unprinted<'a>(result: &'a [String], printed: &[String]) -> &'a [String] {
    let Some(last) = printed.last() else {
        return result;
    };
    match result.iter().rposition(|l| l == last) {
        Some(i) => &result[i + 1..],
        None => &[],
    }
}

/// Which lines of a console stream are new: a reconnected stream starts again from the
/// unit's first lines, so lines up to the last one printed are skipped. Lines are ordered by
/// their journal time, and several may share one microsecond (written together).
#[derive(Debug, Default)]
pub struct Seen {
    /// The time of the last line printed, and how many printed lines had that time.
    last: Option<(u64, usize)>,
    /// Of the current stream: lines so far at the last time.
    at_last: usize,
}

impl Seen {
    /// A new stream begins.
    pub fn reconnect(&mut self) {
        self.at_last = 0;
    }

    /// Whether the line at `ts_us` is new (and is now printed).
    pub fn is_new(&mut self, ts_us: u64) -> bool {
        match self.last {
            Some((t, _)) if ts_us < t => false,
            Some((t, n)) if ts_us == t => {
                self.at_last += 1;
                if self.at_last <= n {
                    return false;
                }
                self.last = Some((t, self.at_last));
                true
            }
            _ => {
                self.last = Some((ts_us, 1));
                self.at_last = 1;
                true
            }
        }
    }
}

/// Follows the console of `name` until told to stop, printing console lines and publishing
/// the last one in `last`; returns the lines it printed (the last ones, bounded).
async fn follow(
    client: Client,
    name: String,
    mut stop: watch::Receiver<bool>,
    last: watch::Sender<Option<String>>,
) -> Vec<String> {
    let mut printed: Vec<String> = Vec::new();
    let mut seen = Seen::default();
    while !*stop.borrow() {
        let stream = client
            .vm_logs(&name, Some(blixard_api::MAX_LOG_LINES), true, None)
            .await;
        let Ok(mut stream) = stream else {
            // Not placed yet, or its host cannot be reached: try again shortly.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        seen.reconnect();
        loop {
            let line = tokio::select! {
                l = stream.next_line() => l,
                _ = stop.changed() => return printed,
            };
            match line {
                Ok(Some(l)) if l.source == LogSource::Console && seen.is_new(l.ts_us) => {
                    outln!("{}", l.message);
                    last.send_replace(Some(l.message.clone()));
                    printed.push(l.message);
                    if printed.len() > 1000 {
                        printed.drain(..500);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    printed
}

/// Creates the task `spec` and follows it to its result; the exit status is the task's
/// ([`exit_code`]).
pub async fn run(
    client: &Client,
    console_client: Client,
    out: Format,
    spec: VmSpec,
    rm: bool,
) -> anyhow::Result<u8> {
    let name = spec.name.clone();
    let key = format!("{}-{}", name, std::process::id());
    let mut vm = client.create_vm_idempotent(&spec, &key).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let console = (out == Format::Table).then(|| {
        let (last_tx, last_rx) = watch::channel(None);
        let f = tokio::spawn(follow(console_client, name.clone(), stop_rx, last_tx));
        (f, last_rx)
    });
    let mut said = String::new();
    let result = loop {
        if vm.task_finished() {
            if let Some(r) = vm.task_result.clone() {
                break r;
            }
        }
        let line = progress(&vm);
        if line != said {
            eprintln!("{line}");
            said = line;
        }
        tokio::time::sleep(POLL).await;
        vm = match client.get_vm(&name).await {
            Ok(v) => v,
            // A leader change or a node down: the next node answers.
            Err(ClientError::Unreachable(_)) | Err(ClientError::Api { status: 503, .. }) => {
                continue
            }
            Err(e) => return Err(e.into()),
        };
    };
    if let Some((follower, mut last)) = console {
        // Give the stream a moment to deliver the lines the result ends with.
        let want = result.console.last().cloned();
        let caught_up = last.wait_for(|l| want.is_none() || *l == want);
        let _ = tokio::time::timeout(DRAIN, caught_up).await;
        let _ = stop_tx.send(true);
        let printed = follower.await.unwrap_or_default();
        for l in unprinted(&result.console, &printed) {
            outln!("{l}");
        }
    }
    match out {
        Format::Json => print_json(&vm),
        Format::Table => eprintln!("{}", summary(&vm, &result)),
    }
    if rm {
        match client.delete_vm_at(&name, vm.generation).await {
            Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
            Err(e) => eprintln!("blixardctl: task {name} not deleted: {e}"),
        }
    }
    Ok(exit_code(&result))
}

fn progress(vm: &Vm) -> String {
    let host = vm.host.as_deref().unwrap_or("-");
    match vm.reason.as_deref() {
        Some(r) if !r.is_empty() => format!(
            "task {}: {} on {host}: {r}",
            vm.spec.name,
            vm.state.as_str()
        ),
        _ => format!("task {}: {} on {host}", vm.spec.name, vm.state.as_str()),
    }
}

/// `task NAME succeeded: exited with status 0 (ran 2.1 s on h1)`.
pub fn summary(vm: &Vm, r: &TaskResult) -> String {
    let ran = r
        .started_ms
        .map(|s| format!("ran {:.1} s", r.ended_ms.saturating_sub(s) as f64 / 1000.0));
    let host = r.host.as_deref().map(|h| format!("on {h}"));
    let how: Vec<String> = [ran, host].into_iter().flatten().collect();
    if how.is_empty() {
        format!("task {} {}", vm.spec.name, r.summary())
    } else {
        format!("task {} {} ({})", vm.spec.name, r.summary(), how.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: TaskOutcome, reason: TaskEndReason, exit_status: Option<i32>) -> TaskResult {
        TaskResult {
            outcome,
            reason,
            exit_status,
            message: String::new(),
            started_ms: None,
            ended_ms: 0,
            host: None,
            generation: 1,
            console: vec![],
        }
    }

    #[test]
    fn exit_codes() {
        use TaskEndReason::*;
        use TaskOutcome::*;
        let cases = [
            (result(Succeeded, Exited, Some(0)), 0),
            (result(Failed, Exited, Some(3)), 3),
            (result(Failed, Exited, Some(255)), 255),
            (result(Failed, Exited, None), EXIT_NO_STATUS),
            (result(Failed, TimedOut, None), EXIT_TIMED_OUT),
            (result(Failed, HostLost, None), EXIT_HOST_LOST),
            (result(Failed, CouldNotStart, None), EXIT_COULD_NOT_START),
        ];
        for (r, code) in cases {
            assert_eq!(exit_code(&r), code, "{r:?}");
        }
    }

    #[test]
    fn a_reconnected_stream_repeats_nothing_and_loses_no_line_of_a_shared_time() {
        let mut seen = Seen::default();
        seen.reconnect();
        let first: Vec<bool> = [1, 2, 2, 3].iter().map(|t| seen.is_new(*t)).collect();
        assert_eq!(first, [true, true, true, true]);
        seen.reconnect();
        let again: Vec<bool> = [1, 2, 2, 3, 3, 4].iter().map(|t| seen.is_new(*t)).collect();
        assert_eq!(again, [false, false, false, false, true, true]);
        seen.reconnect();
        let third: Vec<bool> = [3, 3, 4, 4].iter().map(|t| seen.is_new(*t)).collect();
        assert_eq!(third, [false, false, false, true]);
    }

    #[test]
    fn only_unprinted_result_lines_are_printed() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let result = l(&["a", "b", "c"]);
        assert_eq!(unprinted(&result, &[]), &result[..]);
        assert_eq!(unprinted(&result, &l(&["x", "b"])), &l(&["c"])[..]);
        assert!(unprinted(&result, &l(&["c"])).is_empty());
        // Printed lines the result does not hold: the stream saw more than the result kept.
        assert!(unprinted(&result, &l(&["z"])).is_empty());
    }
}
