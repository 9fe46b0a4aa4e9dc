#!/bin/bash
# Runs inside the host's fresh mount + UTS + cgroup namespaces (see host-start.sh):
# a private /run/systemd with the "booted with systemd" marker, the host's own journal,
# cgroup hierarchies remounted so the manager sees its subtree as "/", a standalone
# systemd-journald, then `systemd --user`, which brings up its own session bus at
# $XDG_RUNTIME_DIR/bus.
#   host-inner.sh BASE HOSTNAME
set -eu
B=$1
hostname "$2"

mount --bind "$B/run-systemd" /run/systemd
mkdir -p /run/systemd/system /run/systemd/journal
# journald writes to /run/log/journal (volatile storage): bind the host's journal dir there
mount -t tmpfs -o mode=755 tmpfs /run/log
mkdir -p /run/log/journal
mount --bind "$B/journal" /run/log/journal
[ -d /var/log/journal ] && mount -t tmpfs -o mode=755 tmpfs /var/log/journal
mount --bind "$B/journald.conf" /etc/systemd/journald.conf

# in our cgroup namespace, rooted at the host's subtree: remount the hierarchies so the
# manager sees itself at "/" (units then appear as /app.slice/x.service, MemoryMax= etc.
# apply through the v1 controllers, and journald attributes _SYSTEMD_UNIT=x.service)
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/unified /sys/fs/cgroup/systemd
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup/unified 2>/dev/null \
  || mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
for c in $BLIXARD_SIM_CONTROLLERS; do
  mkdir -p "/sys/fs/cgroup/$c"
  mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"
done

/lib/systemd/systemd-journald &
for _ in $(seq 200); do
  [ -S /run/systemd/journal/socket ] && [ -S /run/systemd/journal/stdout ] && break
  sleep 0.05
done

export XDG_RUNTIME_DIR=$B/xdg HOME=$B/home
unset DBUS_SESSION_BUS_ADDRESS NOTIFY_SOCKET
# --log-target=journal: not PID 1 and stderr is no journal stream, so say it
exec /lib/systemd/systemd --user --log-target=journal
