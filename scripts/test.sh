#!/bin/bash
# Runs Blixard's whole test suite: unit tests, the storage suite, and the multi-process
# integration suite (real control nodes, real systemd managers, real agents).
# Needs root (simulated hosts use namespaces and cgroups). Installs what it needs first.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
tests/ct/setup.sh
# The kernel + initramfs the QEMU tests boot (cached under /var/cache/blixard-test/guest).
tests/guest/build.sh
# The integration suite runs the binaries next to it, so build them first.
cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi
