//! `blixard-agent`: runs the VMs a host is assigned as transient systemd units.
//!
//! One agent runs on every host. It registers the host's capacity with the control plane,
//! heartbeats, long-polls its assignments, and reconciles them against the `blixard-vm-*`
//! units systemd has, over D-Bus. VMs are systemd's units, not the agent's children: the agent
//! can stop, crash or be upgraded while every VM keeps running, and it adopts them on start.
//!
//! The modules, pure cores first:
//! - [`config`]: the TOML configuration and its validation;
//! - [`command`]: hypervisor argv builders (the spec never picks the executable);
//! - [`unit_spec`]: VM spec → transient unit properties, as plain data;
//! - [`reconcile`]: desired + observed → actions, as plain data;
//! - [`lease`]: the host's lease and fence state, and [`unit_track`]: how each unit ended,
//!   both pure with an injected clock;
//! - [`fence_watch`]: the fence's rules (pure) and the dead man's switch
//!   (`blixard-agent fence-watch`) that enforces them from [`lease_file`] when the agent is
//!   not alive; [`started`]: the generations the agent started, across restarts;
//! - [`guest_end`]: why a QEMU VM ended, from its console's last lines (pure), read by
//!   [`last_run_log`];
//! - [`capacity`]: what the host offers;
//! - [`systemd`]: the D-Bus adapter, the only module that imports zbus;
//! - [`last_run_log`]: the last run's messages of a VM unit, from `journalctl`;
//! - [`journal`]: `journalctl` arguments for a VM and the parser of its JSON, as plain data;
//! - [`agent_api`]: the agent's HTTP API (a VM's logs from the journal, for the control plane),
//!   over HTTPS with `blixard_api::tls_server`;
//! - [`daemon`]: the loops that tie them to the control plane ([`run`]);
//! - [`qmp`]: the graceful stop of a QEMU VM (`blixard-agent qmp-powerdown`);
//! - [`notify`] and [`logging`]: sd-notify and journald/stderr logging.

pub mod agent_api;
pub mod capacity;
pub mod command;
pub mod config;
pub mod daemon;
pub mod fence_watch;
pub mod guest_end;
pub mod hypervisor;
pub mod image_path;
pub mod journal;
pub mod last_run_log;
pub mod lease;
pub mod lease_file;
pub mod logging;
pub mod notify;
pub mod qmp;
pub mod reconcile;
pub mod started;
pub mod systemd;
pub mod task_end;
pub mod unit_spec;
pub mod unit_track;
pub mod vm_owner;

pub use config::Config;
pub use daemon::{run, AgentError};

/// An error and its causes on one line: `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Some errors repeat their cause in their own message: say it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
