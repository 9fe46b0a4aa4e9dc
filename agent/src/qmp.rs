//! A graceful stop over QEMU's QMP socket: `blixard-agent qmp-powerdown --socket PATH
//! --timeout SECS`, which the unit of every QEMU VM runs as its `ExecStop=`.
//!
//! It reads QEMU's greeting, negotiates (`qmp_capabilities`), asks for `system_powerdown` (the
//! ACPI power button) and waits until QEMU closes the socket, i.e. has exited, up to the
//! timeout. systemd then sends SIGTERM to whatever still runs and SIGKILL after
//! `TimeoutStopSec=`. Because it is part of the unit, `systemctl stop blixard-vm-X` is graceful
//! even when the agent is down.
//!
//! The protocol part ([`parse`], [`command`]) is pure; [`powerdown`] is the thin blocking
//! shell over a [`UnixStream`] (one short-lived process per stop, so no runtime is needed).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `{"QMP": {...}}`, the first line on a connection.
    Greeting,
    /// `{"return": ...}`: a command succeeded.
    Return,
    /// `{"error": {"class": ..., "desc": ...}}`: a command failed.
    Error { class: String, desc: String },
    /// `{"event": NAME, ...}`, e.g. `POWERDOWN`, `SHUTDOWN`.
    Event(String),
}

/// Errors of the QMP exchange.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU closed the QMP socket before answering")]
    Closed,
}

/// Parses one line QEMU sent.
pub fn parse(line: &str) -> Result<Message, QmpError> {
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|e| QmpError::Protocol(format!("{e}: {}", line.trim())))?;
    let Some(o) = v.as_object() else {
        return Err(QmpError::Protocol(line.trim().to_string()));
    };
    if o.contains_key("QMP") {
        Ok(Message::Greeting)
    } else if o.contains_key("return") {
        Ok(Message::Return)
    } else if let Some(e) = o.get("error") {
        let field = |k: &str| e.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        Ok(Message::Error {
            class: field("class"),
            desc: field("desc"),
        })
    } else if let Some(name) = o.get("event").and_then(|e| e.as_str()) {
        Ok(Message::Event(name.to_string()))
    } else {
        Err(QmpError::Protocol(line.trim().to_string()))
    }
}

/// The line that runs QMP command `name` (no arguments).
pub fn command(name: &str) -> String {
    format!("{}\r\n", serde_json::json!({ "execute": name }))
}

/// How a powerdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// QEMU exited (closed the socket) after the power button.
    Exited,
    /// No QEMU listens on the socket: nothing to stop.
    NotRunning,
    /// The guest did not power off in time; systemd's SIGTERM comes next.
    TimedOut,
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: String,
    deadline: Instant,
}

impl Conn {
    fn io(&self, source: std::io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The next message, or `None` at end of file or when the deadline passed.
    fn next(&mut self) -> Result<Option<Message>, QmpError> {
        let mut line = String::new();
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(e))?;
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) if line.trim().is_empty() => line.clear(),
                Ok(_) => return parse(&line).map(Some),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
    }

    /// Runs `name` and waits for its answer, skipping events.
    fn execute(&mut self, name: &str) -> Result<(), QmpError> {
        self.writer
            .write_all(command(name).as_bytes())
            .map_err(|e| self.io(e))?;
        loop {
            match self.next()? {
                Some(Message::Return) => return Ok(()),
                Some(Message::Error { class, desc }) => {
                    return Err(QmpError::Command {
                        command: name.to_string(),
                        class,
                        desc,
                    })
                }
                Some(Message::Event(_)) => {}
                Some(Message::Greeting) => {
                    return Err(QmpError::Protocol("a second greeting".into()))
                }
                None => return Err(QmpError::Protocol(format!("no answer to {name} in time"))),
            }
        }
    }
}

/// Presses the ACPI power button of the QEMU behind `socket` and waits up to `timeout` for
/// QEMU to exit.
pub fn powerdown(socket: &Path, timeout: Duration) -> Result<Outcome, QmpError> {
    let path = socket.display().to_string();
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Ok(Outcome::NotRunning)
        }
        Err(source) => return Err(QmpError::Io { path, source }),
    };
    let writer = stream.try_clone().map_err(|source| QmpError::Io {
        path: path.clone(),
        source,
    })?;
    let mut c = Conn {
        reader: BufReader::new(stream),
        writer,
        path,
        deadline: Instant::now() + timeout,
    };
    match c.next() {
        Ok(Some(Message::Greeting)) => {}
        Ok(Some(other)) => return Err(QmpError::Protocol(format!("{other:?} before greeting"))),
        Ok(None) => return Ok(Outcome::TimedOut),
        // QEMU exiting just now.
        Err(QmpError::Closed) => return Ok(Outcome::Exited),
        Err(e) => return Err(e),
    }
    c.execute("qmp_capabilities")?;
    c.execute("system_powerdown")?;
    // QEMU closes the socket when it exits; until then only events arrive.
    loop {
        match c.next() {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Outcome::TimedOut),
            Err(QmpError::Closed) => return Ok(Outcome::Exited),
            Err(QmpError::Io { source, .. }) if source.kind() == ErrorKind::ConnectionReset => {
                return Ok(Outcome::Exited)
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemus_messages() {
        let cases = [
            (
                r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#,
                Message::Greeting,
            ),
            (r#"{"return": {}}"#, Message::Return),
            (
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "POWERDOWN"}"#,
                Message::Event("POWERDOWN".into()),
            ),
            (
                r#"{"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}"#,
                Message::Error {
                    class: "CommandNotFound".into(),
                    desc: "The command x has not been found".into(),
                },
            ),
            ("{\"return\": {}}\r\n", Message::Return),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line).expect(line), want, "{line}");
        }
        for bad in ["", "[]", "{\"x\": 1}", "not json"] {
            assert!(
                matches!(parse(bad), Err(QmpError::Protocol(_))),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn commands_are_one_json_line() {
        assert_eq!(
            command("qmp_capabilities"),
            "{\"execute\":\"qmp_capabilities\"}\r\n"
        );
        assert_eq!(
            command("system_powerdown"),
            "{\"execute\":\"system_powerdown\"}\r\n"
        );
    }

    #[test]
    fn a_missing_socket_means_nothing_runs() {
        let t = tempfile::tempdir().expect("tempdir");
        let got = powerdown(&t.path().join("none.qmp"), Duration::from_secs(1)).expect("ok");
        assert_eq!(got, Outcome::NotRunning);
    }

    /// A fake QEMU on a real socket: greets, answers both commands, then closes.
    #[test]
    fn powerdown_speaks_qmp_and_waits_for_the_close() {
        use std::os::unix::net::UnixListener;
        let t = tempfile::tempdir().expect("tempdir");
        let sock = t.path().join("vm.qmp");
        let listener = UnixListener::bind(&sock).expect("bind");
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let mut w = s.try_clone().expect("clone");
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .expect("greet");
            let mut got = Vec::new();
            for _ in 0..2 {
                let mut line = String::new();
                r.read_line(&mut line).expect("read");
                got.push(line);
                w.write_all(b"{\"return\": {}}\r\n").expect("return");
            }
            w.write_all(b"{\"event\": \"POWERDOWN\"}\r\n")
                .expect("event");
            got
        });
        let out = powerdown(&sock, Duration::from_secs(10)).expect("powerdown");
        assert_eq!(out, Outcome::Exited);
        let got = server.join().expect("server");
        assert_eq!(
            got,
            vec![command("qmp_capabilities"), command("system_powerdown")]
        );
    }
}
