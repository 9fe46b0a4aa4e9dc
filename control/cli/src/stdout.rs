//! Writing to stdout without panicking: `println!` panics when stdout is a pipe whose reader
//! has gone (`blixardctl vm list | head -1`). Here a closed pipe ends the program quietly with
//! status 0, as `ripgrep` and friends do (the reader got what it wanted); any other write
//! error is reported and exits 1.

use std::io::{ErrorKind, Write};

/// Writes one line (`outln!` calls this).
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let result = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    check(result);
}

/// Writes bytes as they are, then flushes.
pub fn bytes(buf: &[u8]) {
    let mut out = std::io::stdout().lock();
    let result = out.write_all(buf).and_then(|()| out.flush());
    check(result);
}

fn check(result: std::io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            // stderr may be gone as well: nothing else to report to
            let _ = writeln!(std::io::stderr(), "blixardctl: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}
