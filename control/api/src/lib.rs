//! Blixard's API crate: the wire types of the `/v1/` HTTP API, the rules that validate them,
//! and a typed client over them.
//!
//! It is shared by the control plane, the agent and the CLI, and depends on none of openraft,
//! SQLite or axum (axum only with the `server` feature, for [`tls_server`]), so the CLI stays
//! small.

pub mod client;
pub mod tls;
#[cfg(feature = "server")]
pub mod tls_server;
pub mod types;
pub mod validate;

pub use client::{Client, ClientError, LogStream};
pub use types::*;

/// Prefix of every VM's systemd unit name: `blixard-vm-<name>.service`.
pub const UNIT_PREFIX: &str = "blixard-vm-";
/// Slice that holds every VM unit.
pub const VM_SLICE: &str = "blixard-vms.slice";

/// The systemd unit name of a VM.
pub fn unit_name(vm: &str) -> String {
    format!("{UNIT_PREFIX}{vm}.service")
}

/// The VM name of a unit name, if it is a VM unit.
pub fn vm_name_of_unit(unit: &str) -> Option<&str> {
    unit.strip_prefix(UNIT_PREFIX)?
        .strip_suffix(".service")
        .filter(|n| !n.is_empty())
}
