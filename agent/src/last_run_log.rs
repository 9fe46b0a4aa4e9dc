//! The last run's output of a VM unit, read from the host's journal with `journalctl`
//! (configured path), to tell why a QEMU VM ended (see [`crate::guest_end`]). The live
//! log stream served to operators is [`crate::journal`].
//!
//! [`last_run`] is the pure part: it keeps, from `journalctl -o json` lines, the messages of
//! the newest invocation of the unit (`_SYSTEMD_INVOCATION_ID`), so an earlier run of the same
//! VM name cannot lend its end to this one.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Errors of reading the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot run {path}")]
    Spawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} failed: {stderr}")]
    Failed { path: String, stderr: String },
}

/// How many of the unit's newest journal entries are read.
pub const TAIL: usize = 80;

/// The messages (oldest first) of the newest invocation among `json` lines of
/// `journalctl -o json`. Entries without an invocation id count as one run of their own
/// (a user manager's units have none; the caller bounds them with `--since`).
pub fn last_run(json: &str) -> Vec<String> {
    let entries: Vec<(String, String)> = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let id = v
                .get("_SYSTEMD_INVOCATION_ID")
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_string();
            // A string, or bytes for a message that is not UTF-8.
            let msg = v.get("MESSAGE").and_then(crate::journal::field_text)?;
            Some((id, msg))
        })
        .collect();
    let Some((newest, _)) = entries.last().cloned() else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter(|(id, _)| *id == newest)
        .map(|(_, m)| m)
        .collect()
}

/// The newest run's messages of `unit`, read with `journalctl` at `journalctl`; `since`
/// (when the run started, if known) keeps older runs out where the journal has no invocation
/// ids (units of a user manager).
pub async fn unit_last_run(
    journalctl: &Path,
    unit: &str,
    since: Option<SystemTime>,
) -> Result<Vec<String>, JournalError> {
    let path = journalctl.display().to_string();
    let mut cmd = tokio::process::Command::new(journalctl);
    cmd.args(["--no-pager", "-q", "-o", "json", "-n", &TAIL.to_string()]);
    if let Some(s) = since.and_then(|s| s.duration_since(UNIX_EPOCH).ok()) {
        // Whole seconds, one early: the clock of journald and ours may straddle a second.
        cmd.arg(format!("--since=@{}", s.as_secs().saturating_sub(1)));
    }
    let out = cmd
        // A unit of the system manager, or of a user manager (tests, rootless hosts).
        .arg(format!("_SYSTEMD_UNIT={unit}"))
        .arg("+")
        .arg(format!("_SYSTEMD_USER_UNIT={unit}"))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| JournalError::Spawn {
            path: path.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(JournalError::Failed {
            path,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(last_run(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_newest_invocation() {
        let json = [
            r#"{"_SYSTEMD_INVOCATION_ID":"a","MESSAGE":"old run panicked"}"#,
            r#"{"_SYSTEMD_INVOCATION_ID":"b","MESSAGE":"qemu: invalid kernel header"}"#,
            r#"{"_SYSTEMD_INVOCATION_ID":"b","MESSAGE":[104,105,255]}"#,
            "not json",
        ]
        .join("\n");
        assert_eq!(
            last_run(&json),
            vec![
                "qemu: invalid kernel header".to_string(),
                "hi\u{fffd}".to_string()
            ]
        );
        assert!(last_run("").is_empty());
        // Without invocation ids (a user manager): every entry.
        let json = [r#"{"MESSAGE":"a"}"#, r#"{"MESSAGE":"b"}"#].join("\n");
        assert_eq!(last_run(&json), vec!["a".to_string(), "b".to_string()]);
    }
}
