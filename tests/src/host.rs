//! Simulated hosts: real `systemd --user` managers (written with the agent).
