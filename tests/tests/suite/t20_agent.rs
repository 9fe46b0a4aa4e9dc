//! Agent tests against real systemd managers.
