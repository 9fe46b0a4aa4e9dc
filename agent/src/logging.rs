//! Logging: to the journal when its socket exists (structured fields such as `vm` and `host`
//! become the journal fields `VM=` and `HOST=`), to stderr otherwise. `RUST_LOG` filters (default `info`).

use std::io::IsTerminal;
use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where the logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Journal,
    Stderr,
}

/// Installs the global subscriber; `force_stderr` skips the journal even when it exists.
pub fn init(force_stderr: bool) -> Target {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if !force_stderr && Path::new(JOURNAL_SOCKET).exists() {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer
                .with_syslog_identifier("blixard-agent".to_string())
                .with_field_prefix(None);
            if tracing_subscriber::registry()
                .with(filter())
                .with(layer)
                .try_init()
                .is_ok()
            {
                return Target::Journal;
            }
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(fmt)
        .try_init();
    Target::Stderr
}
