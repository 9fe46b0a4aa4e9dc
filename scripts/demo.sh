#!/bin/bash
# The local demo: builds Blixard, starts a 3-node control plane on 127.0.0.1:7001-7003, two
# simulated hosts with agents, demo VMs placed across them, and a real QEMU guest (the test
# guest of tests/guest/build.sh, under TCG) whose console it prints.
#   scripts/demo.sh [up]     install, build, start, show `blixardctl cluster status`
#   scripts/demo.sh down     stop everything the demo started
# State and logs live in .demo/ in the repository. BLIXARD_DEMO_PROFILE=debug uses debug builds.
set -eu
cd "$(dirname "$0")/.."
ROOT=$PWD
D=$ROOT/.demo
PROFILE=${BLIXARD_DEMO_PROFILE:-release}
BIN=$ROOT/target/$PROFILE
IC="1=http://127.0.0.1:7001,2=http://127.0.0.1:7002,3=http://127.0.0.1:7003"
export BLIXARD_ENDPOINTS=http://127.0.0.1:7001,http://127.0.0.1:7002,http://127.0.0.1:7003

down() {
  for p in "$D"/*.pid; do
    [ -e "$p" ] || continue
    kill "$(cat "$p")" 2>/dev/null || true
    rm -f "$p"
  done
}

wait_http() {
  for _ in $(seq 300); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

case "${1:-up}" in
down)
  down
  echo "demo stopped (data kept in $D; remove it for a fresh start)"
  ;;
up)
  scripts/install-deps.sh
  if [ "$PROFILE" = debug ]; then cargo build --bins --locked; else cargo build --release --bins --locked; fi
  GUEST=$(tests/guest/build.sh)
  down
  mkdir -p "$D"
  for i in 1 2 3; do
    nohup "$BIN/blixard-control" --node-id "$i" --listen "127.0.0.1:700$i" \
      --data-dir "$D/control-$i" --initial-cluster "$IC" >"$D/control-$i.log" 2>&1 &
    echo $! >"$D/control-$i.pid"
  done
  wait_http http://127.0.0.1:7001/v1/health
  # Two simulated hosts (real systemd --user managers in their own namespaces) with agents.
  nohup "$BIN/blixard-devhosts" --dir "$D/hosts" --hosts 2 --endpoints "$BLIXARD_ENDPOINTS" \
    --guest "$GUEST" >"$D/devhosts.log" 2>&1 &
  echo $! >"$D/devhosts.pid"
  for _ in $(seq 300); do
    [ "$("$BIN/blixardctl" host list -o json 2>/dev/null | grep -c '"status": "up"')" -ge 2 ] && break
    sleep 0.1
  done
  echo
  "$BIN/blixardctl" cluster status
  echo
  "$BIN/blixardctl" host list
  echo
  # Demo VMs: a trivial long-lived process per VM, spread over the hosts by the scheduler.
  for n in 1 2 3 4; do
    "$BIN/blixardctl" vm show "demo-$n" >/dev/null 2>&1 ||
      "$BIN/blixardctl" vm create "demo-$n" --hypervisor process --memory 64 --wait --timeout 60 >/dev/null
  done
  # A real guest: the Debian cloud kernel and a busybox initramfs under QEMU (TCG).
  "$BIN/blixardctl" vm show guest-1 >/dev/null 2>&1 ||
    "$BIN/blixardctl" vm create guest-1 --hypervisor qemu --memory 128 --kernel vmlinuz \
      --initrd initrd.gz --cmdline "console=ttyS0 reboot=t panic=-1 quiet" --wait --timeout 60 >/dev/null
  "$BIN/blixardctl" vm list
  echo
  # Its console, from its host's journal, through any control node and the host's agent.
  echo "blixardctl vm logs guest-1:"
  for _ in $(seq 600); do
    out=$("$BIN/blixardctl" vm logs guest-1 -n 200 2>/dev/null || true)
    case "$out" in *BLIXARD-GUEST-HEARTBEAT*) printf '%s\n' "$out" | sed 's/^/  /'; break ;; esac
    sleep 0.2
  done
  echo
  echo "The control plane is up. Try:"
  echo "  export PATH=$BIN:\$PATH BLIXARD_ENDPOINTS=$BLIXARD_ENDPOINTS"
  echo "  blixardctl cluster members"
  echo "  blixardctl vm create web-1 --hypervisor process --memory 64 --wait"
  echo "  blixardctl vm list"
  echo "  blixardctl host drain host1 && blixardctl vm list"
  echo "  blixardctl vm logs guest-1 -f      # the guest's console, from any node"
  echo "  blixardctl vm show guest-1         # host, state, last console lines"
  echo "Stop it with: scripts/demo.sh down"
  ;;
*)
  echo "usage: scripts/demo.sh [up|down]" >&2
  exit 2
  ;;
esac
