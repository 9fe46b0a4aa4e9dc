//! Fixtures of Blixard's integration suite: real `blixard-control` processes on loopback
//! ([`cluster`]), real `systemd --user` managers standing in for hosts, and real agents on
//! them ([`host`]).
//!
//! The binaries under test are the ones `cargo build --workspace --bins` put next to the test
//! executable (`target/<profile>/`), or those in `$BLIXARD_BIN_DIR`.

pub mod binaries;
pub mod cluster;
pub mod container;
pub mod exactly_once;
pub mod guest;
pub mod host;
pub mod lazy_pages;
pub mod lazyfs;
pub mod linearizability;
pub mod nemesis;
pub mod proxy;
pub mod pytools;
pub mod raw;
pub mod unit_log;
pub mod vms;
pub mod wait;
