#!/bin/bash
# Provisions what the packaging tests (tests/tests/suite/t60_packaging.rs) need on a fresh
# Debian 12 machine, as root. Idempotent; the lead calls it from .ci/run.
#
#   tests/ct/setup.sh            packages + cargo-deb + the cached container rootfs
#   BLIXARD_CT_NO_ROOTFS=1 ...   skip the debootstrap (the test builds it on first use)
#
# Installs:
#   debootstrap, systemd-container  the booted-system test (systemd-nspawn); systemd-container
#                                   is pinned to the INSTALLED systemd version, because the
#                                   newer candidate would pull a newer libsystemd-shared and
#                                   thereby upgrade systemd itself
#   nix-bin                         `nix-instantiate --parse` on nixos-module/ and packaging/
#   dpkg-dev                        dpkg-deb and friends, used by cargo-deb
#   help2man                        the daemons' man pages (packaging/build-deb.sh)
#   lintian                         the package's lint check (t60 deb_is_lintian_clean)
#   cargo-deb                       builds the .deb (cargo install --locked)
# Builds (unless BLIXARD_CT_NO_ROOTFS=1): the Debian rootfs the container test boots, at
# ${BLIXARD_CT_ROOTFS:-/var/cache/blixard-test/rootfs} (1-3 min, ~160 MB), and the same
# with QEMU and iproute2 for the VM sandbox test, at
# ${BLIXARD_CT_QEMU_ROOTFS:-/var/cache/blixard-test/rootfs-qemu} (1-2 min more).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
t0=$(date +%s)

SDV=$(dpkg-query -W -f='${Version}' systemd)
need=()
for p in debootstrap nix-bin dpkg-dev help2man lintian; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ "$(dpkg-query -W -f='${Version}' systemd-container 2>/dev/null || true)" != "$SDV" ]; then
  need+=("systemd-container=$SDV")
fi
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "packages: $(( $(date +%s) - t0 ))s"

if ! command -v cargo-deb >/dev/null 2>&1; then
  cargo install cargo-deb --locked --quiet
fi
echo "cargo-deb: $(cargo-deb --version 2>/dev/null || cargo deb --version) ($(( $(date +%s) - t0 ))s)"

if [ "${BLIXARD_CT_NO_ROOTFS:-0}" != 1 ]; then
  "$HERE/rootfs.sh"
  echo "rootfs: $(( $(date +%s) - t0 ))s"
  # the same with QEMU, for the VM sandbox test (its own cache directory)
  "$HERE/rootfs.sh" "${BLIXARD_CT_QEMU_ROOTFS:-/var/cache/blixard-test/rootfs-qemu}" qemu
  echo "rootfs with qemu: $(( $(date +%s) - t0 ))s"
fi
