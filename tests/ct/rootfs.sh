#!/bin/bash
# Builds (once) the Debian bookworm rootfs that the packaging container test boots with
# systemd-nspawn: minbase + systemd, dbus and ca-certificates (a dependency of the package,
# which `dpkg -i` cannot fetch inside the offline container). Cached; rebuilt only when the
# stamp of this version of the script is missing.
#
#   tests/ct/rootfs.sh [DIR]        default ${BLIXARD_CT_ROOTFS:-/var/cache/blixard-test/rootfs}
#   tests/ct/rootfs.sh DIR qemu     the same plus qemu-system-x86 and iproute2, for the VM sandbox test
#                                   (its own directory and stamp: the plain rootfs is shared
#                                   by every test that boots one and is never rebuilt for it)
#
# Built into DIR.tmp and renamed, so an interrupted run never leaves a half rootfs behind
# the stamp. The container boots it with --volatile=overlay: it is never modified.
set -eu
D=${1:-${BLIXARD_CT_ROOTFS:-/var/cache/blixard-test/rootfs}}
FLAVOR=${2:-base}
case "$FLAVOR" in
base) STAMP_NAME=.blixard-rootfs-v2; EXTRA= ;;
qemu) STAMP_NAME=.blixard-rootfs-qemu-v1; EXTRA=,qemu-system-x86,iproute2 ;;
*) echo "unknown flavor $FLAVOR (base or qemu)" >&2; exit 2 ;;
esac
STAMP="$D/$STAMP_NAME"
[ -e "$STAMP" ] && exit 0
mkdir -p "$(dirname "$D")"
# one builder at a time (parallel tests, CI + a developer)
exec 9>"$D.lock"
flock 9
[ -e "$STAMP" ] && exit 0
command -v debootstrap >/dev/null || { echo "debootstrap missing: run tests/ct/setup.sh" >&2; exit 1; }
# the Debian archive this machine's apt is configured with
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
rm -rf "$D.tmp" "$D"
debootstrap --variant=minbase --include="systemd,systemd-sysv,dbus,ca-certificates$EXTRA" \
  bookworm "$D.tmp" "$MIRROR" >"$D.debootstrap.log" 2>&1 \
  || { echo "debootstrap failed, see $D.debootstrap.log" >&2; exit 1; }
# no getty on the console; nothing in the container waits for a network
chroot "$D.tmp" systemctl mask console-getty.service getty@tty1.service \
  systemd-networkd-wait-online.service >/dev/null 2>&1 || true
apt_clean() { rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*; }
apt_clean "$D.tmp"
touch "$D.tmp/$STAMP_NAME"
mv "$D.tmp" "$D"
