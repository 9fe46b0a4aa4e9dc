#!/usr/bin/env bash
# Installs what blixard-bench needs beyond the workspace: etcd (the write-throughput comparison
# point), and builds the benchmark and the daemons it starts, in release mode.
# Usage: bench/setup.sh            (as root on Debian 12; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# Debian's etcd-server package starts a system etcd on 2379/2380 where systemd is PID 1; the
# benchmark runs its own members on free loopback ports and never talks to that one.

cargo build --release -p blixard-bench
cargo build --release --workspace --bins
