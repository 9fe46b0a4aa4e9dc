//! sd-notify for `Type=notify` units: `READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`.
//!
//! Without `NOTIFY_SOCKET` every call is a no-op. A failed notification is logged and never
//! fatal: the service manager's watchdog, not the agent, decides what a silent agent means.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=…`
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `WATCHDOG=1`
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// `STOPPING=1`
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping; VMs keep running"),
    ]);
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec=`, if the manager asked for it.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .map(|d| d / 2)
        .filter(|d| !d.is_zero())
}
