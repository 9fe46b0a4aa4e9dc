//! Reading a VM's lines from the host's journal, as plain data: the `journalctl` arguments
//! for a VM ([`journalctl_args`]) and the parser of its `-o json` output ([`parse_entry`]).
//!
//! No IO here: [`crate::agent_api`] runs `journalctl` and feeds its lines through this module.
//! Only names valid as VM names are accepted, so only units `blixard-vm-*` are ever read.

use blixard_api::{unit_name, validate, LogLine, LogSource, MAX_LOG_LINES};
use serde_json::Value;

/// Errors of building a query or parsing an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The name is not a VM name.
    #[error("invalid vm name: {0}")]
    Name(String),
    /// `lines` is outside 1..=MAX_LOG_LINES.
    #[error("lines must be between 1 and {MAX_LOG_LINES}, not {0}")]
    Lines(u32),
    /// A line of journalctl's output is not a JSON object.
    #[error("journal entry is not a JSON object: {0}")]
    NotAnObject(String),
    /// The entry has no usable `__REALTIME_TIMESTAMP`.
    #[error("journal entry has no realtime timestamp")]
    NoTimestamp,
}

/// Which systemd manager runs the VM units, for finding its messages about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    /// PID 1: its messages carry `UNIT=`, which `--unit` matches.
    System,
    /// A user manager (test hosts, rootless use): its messages carry `USER_UNIT=`, which only
    /// `--user-unit` matches.
    User,
}

/// The arguments (without the program) of `journalctl` printing the last `lines` entries of
/// `vm`'s unit as JSON, and with `follow` the new ones as they come.
pub fn journalctl_args(
    vm: &str,
    lines: u32,
    follow: bool,
    manager: Manager,
) -> Result<Vec<String>, JournalError> {
    validate::dns_label("name", vm).map_err(|e| JournalError::Name(e.message))?;
    if !(1..=MAX_LOG_LINES).contains(&lines) {
        return Err(JournalError::Lines(lines));
    }
    let unit = unit_name(vm);
    let mut args = vec!["--unit".to_string(), unit.clone()];
    if manager == Manager::User {
        // Matches are ORed: the unit's output (`_SYSTEMD_UNIT`) and the manager's messages.
        args.extend(["--user-unit".to_string(), unit]);
    }
    args.extend([
        "--output".into(),
        "json".into(),
        // Full field values: without it, values over 4 KiB print as null.
        "--all".into(),
        "--lines".into(),
        lines.to_string(),
        "--no-pager".into(),
        "--quiet".into(),
    ]);
    if follow {
        args.push("--follow".into());
    }
    Ok(args)
}

/// One field value of journalctl's JSON output: a string, an array of bytes (a value that is
/// not UTF-8), or null (a value journalctl would not print).
pub fn field_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) if items.iter().all(Value::is_u64) => {
            let bytes: Vec<u8> = items
                .iter()
                .filter_map(Value::as_u64)
                .map(|b| u8::try_from(b).unwrap_or(b'?'))
                .collect();
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        // A field set more than once is an array of values: keep them, one a line.
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().filter_map(field_text).collect();
            (!parts.is_empty()).then(|| parts.join("\n"))
        }
        _ => None,
    }
}

/// Parses one line of `journalctl -o json`. `Ok(None)` for an entry without a printable
/// message (MESSAGE null or absent), which is skipped.
///
/// An entry is systemd's own message about the unit when it carries `UNIT=` or `USER_UNIT=`
/// (systemd stamps those on what it logs about a unit, the unit's processes cannot); every
/// other entry is the VM's console output.
pub fn parse_entry(line: &str) -> Result<Option<LogLine>, JournalError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|_| JournalError::NotAnObject(line.chars().take(80).collect()))?;
    let Value::Object(map) = v else {
        return Err(JournalError::NotAnObject(line.chars().take(80).collect()));
    };
    let ts_us = map
        .get("__REALTIME_TIMESTAMP")
        .and_then(field_text)
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or(JournalError::NoTimestamp)?;
    let Some(message) = map.get("MESSAGE").and_then(field_text) else {
        return Ok(None);
    };
    let source = if map.contains_key("UNIT") || map.contains_key("USER_UNIT") {
        LogSource::Unit
    } else {
        LogSource::Console
    };
    Ok(Some(LogLine {
        ts_us,
        source,
        message,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_table() {
        type Case<'a> = (&'a str, u32, bool, Result<&'a [&'a str], JournalError>);
        let cases: [Case; 6] = [
            (
                "web",
                10,
                false,
                Ok(&[
                    "--unit",
                    "blixard-vm-web.service",
                    "--output",
                    "json",
                    "--all",
                    "--lines",
                    "10",
                    "--no-pager",
                    "--quiet",
                ]),
            ),
            (
                "web",
                MAX_LOG_LINES,
                true,
                Ok(&[
                    "--unit",
                    "blixard-vm-web.service",
                    "--output",
                    "json",
                    "--all",
                    "--lines",
                    "10000",
                    "--no-pager",
                    "--quiet",
                    "--follow",
                ]),
            ),
            ("web", 0, false, Err(JournalError::Lines(0))),
            (
                "web",
                MAX_LOG_LINES + 1,
                false,
                Err(JournalError::Lines(MAX_LOG_LINES + 1)),
            ),
            (
                "ssh.service",
                1,
                false,
                Err(JournalError::Name(String::new())),
            ),
            ("-f", 1, false, Err(JournalError::Name(String::new()))),
        ];
        for (vm, lines, follow, want) in cases {
            let got = journalctl_args(vm, lines, follow, Manager::System);
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{vm} {lines} {follow}"),
                (Err(JournalError::Name(_)), Err(JournalError::Name(_))) => {}
                (g, w) => assert_eq!(g.map(|_| ()), w.map(|_| ()), "{vm} {lines}"),
            }
        }
        for bad in ["", "../x", "a b", "UPPER", "x;rm", "a*"] {
            assert!(
                journalctl_args(bad, 1, false, Manager::User).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            journalctl_args("web", 5, false, Manager::User).ok(),
            Some(
                [
                    "--unit",
                    "blixard-vm-web.service",
                    "--user-unit",
                    "blixard-vm-web.service",
                    "--output",
                    "json",
                    "--all",
                    "--lines",
                    "5",
                    "--no-pager",
                    "--quiet",
                ]
                .map(String::from)
                .to_vec()
            )
        );
    }

    #[test]
    fn parse_table() {
        let console = |ts, m: &str| {
            Ok(Some(LogLine {
                ts_us: ts,
                source: LogSource::Console,
                message: m.into(),
            }))
        };
        let cases: Vec<(&str, Result<Option<LogLine>, JournalError>)> = vec![
            (
                r#"{"__REALTIME_TIMESTAMP":"1700000000000001","MESSAGE":"hello","_SYSTEMD_UNIT":"blixard-vm-a.service","_PID":"42"}"#,
                console(1_700_000_000_000_001, "hello"),
            ),
            // Not UTF-8: an array of bytes.
            (
                r#"{"__REALTIME_TIMESTAMP":"5","MESSAGE":[104,105,255]}"#,
                console(5, "hi\u{fffd}"),
            ),
            // Too large or unprintable: skipped.
            (r#"{"__REALTIME_TIMESTAMP":"5","MESSAGE":null}"#, Ok(None)),
            (r#"{"__REALTIME_TIMESTAMP":"5"}"#, Ok(None)),
            // A field set twice.
            (
                r#"{"__REALTIME_TIMESTAMP":"6","MESSAGE":["a",[98]]}"#,
                console(6, "a\nb"),
            ),
            (
                r#"{"__REALTIME_TIMESTAMP":"7","MESSAGE":"Started blixard-vm-a.service.","UNIT":"blixard-vm-a.service","_PID":"1"}"#,
                Ok(Some(LogLine {
                    ts_us: 7,
                    source: LogSource::Unit,
                    message: "Started blixard-vm-a.service.".into(),
                })),
            ),
            (
                r#"{"__REALTIME_TIMESTAMP":"8","MESSAGE":"x.service: Failed with result 'exit-code'.","USER_UNIT":"blixard-vm-a.service"}"#,
                Ok(Some(LogLine {
                    ts_us: 8,
                    source: LogSource::Unit,
                    message: "x.service: Failed with result 'exit-code'.".into(),
                })),
            ),
            (r#"{"MESSAGE":"x"}"#, Err(JournalError::NoTimestamp)),
            (
                r#"{"__REALTIME_TIMESTAMP":"soon","MESSAGE":"x"}"#,
                Err(JournalError::NoTimestamp),
            ),
            (
                "-- No entries --",
                Err(JournalError::NotAnObject("-- No entries --".into())),
            ),
            ("[1,2]", Err(JournalError::NotAnObject("[1,2]".into()))),
        ];
        for (line, want) in cases {
            assert_eq!(parse_entry(line), want, "{line}");
        }
    }
}
