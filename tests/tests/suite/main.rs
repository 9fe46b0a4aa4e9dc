//! Blixard's multi-process integration suite: one binary, numbered areas.
//!
//! Every area starts real processes (control nodes, systemd managers, agents) on loopback and
//! checks them from outside through the API or D-Bus.

mod t10_cluster;
mod t15_contract;
mod t20_agent;
mod t30_placement;
mod t40_qemu;
mod t50_logs;
mod t55_cli;
mod t60_packaging;
mod t70_security;
mod t80_safety;
mod t90_liveness;
mod t95_tasks;
