#!/bin/bash
# Starts one simulated host; run by tests/src/host.rs (SimHost::start).
#   host-start.sh BASE HOSTNAME CGROUP_DIR...
# Joins every CGROUP_DIR (the host's own subtree in the unified, name=systemd and v1
# controller hierarchies), then enters new mount, UTS and cgroup namespaces and runs
# host-inner.sh there, which ends as the host's `systemd --user` manager.
set -eu
base=$1; name=$2; shift 2
for d in "$@"; do echo $$ > "$d/cgroup.procs"; done
exec unshare --mount --propagation private --uts --cgroup -- \
  "$(dirname "$0")/host-inner.sh" "$base" "$name"
