#!/bin/bash
# Runs a command "on" a simulated host: in its cgroup subtree (so killing the host kills
# it too), its mount and UTS namespaces, with its session bus in the environment.
#   host-exec.sh MANAGER_PID XDG_RUNTIME_DIR CGROUP_DIRS(colon-separated) CMD...
set -eu
pid=$1; xdg=$2; cgroups=$3; shift 3
IFS=:
for d in $cgroups; do echo $$ > "$d/cgroup.procs"; done
unset IFS
exec nsenter --mount="/proc/$pid/ns/mnt" --uts="/proc/$pid/ns/uts" -- \
  env XDG_RUNTIME_DIR="$xdg" DBUS_SESSION_BUS_ADDRESS="unix:path=$xdg/bus" "$@"
