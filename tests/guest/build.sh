#!/bin/bash
# Builds the test guest of the QEMU tests (tests/tests/suite/t40_qemu.rs) and the demo on a
# fresh Debian 12 machine, as root: the Debian cloud kernel's vmlinuz (the package
# linux-image-cloud-amd64 depends on, fetched with `apt-get download` and unpacked with
# `dpkg -x`, never installed) and a busybox initramfs.
#
#   tests/guest/build.sh            build into the cache unless it is already there
#   BLIXARD_GUEST_DIR=DIR ...       cache directory (default /var/cache/blixard-test/guest)
#
# Output: $DIR/current -> $DIR/<kernel version>-<script hash>/{vmlinuz,initrd.gz}; the hash
# covers this script, so editing /init rebuilds. Quick and idempotent when cached (prints
# the directory and exits). Needs busybox-static and apt (scripts/install-deps.sh).
#
# The guest's /init prints `BLIXARD-GUEST-BOOTED uptime=…`, then `BLIXARD-GUEST-HEARTBEAT n`
# every 2 s. Kernel command line switches:
#   blixard.exit=poweroff   power off by itself right after the marker
#   blixard.exit=panic      init exits: the kernel panics (with pvpanic loaded, QEMU sees it)
#   blixard.status=N        a task: print `BLIXARD-TASK-EXIT=N` (the line by which a guest
#                           reports its task's exit status to the agent), then power off
#   blixard.sleep=S         sleep S seconds (after the marker, before any exit above)
#   blixard.nobutton=1      ignore the ACPI power button (a stop then ends with SIGTERM)
#   blixard.debug=1         print what the kernel found (ACPI, input devices, modules)
#   blixard.net=1           load virtio-net, bring every ethN up, print `BLIXARD-GUEST-NET-UP`
# Always: loads pvpanic (mmio+pci), evdev and the ACPI `button` module, and runs a watcher that
# powers the guest off (`BLIXARD-GUEST-POWER-BUTTON`, then `poweroff -f`) when the ACPI
# power button is pressed (QMP `system_powerdown`).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${BLIXARD_GUEST_DIR:-/var/cache/blixard-test/guest}
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9

HASH=$(sha256sum "$HERE/build.sh" | cut -c1-12)
# Fast path: a finished build of this script exists. The kernel version is only checked when
# asked (BLIXARD_GUEST_REFRESH=1), so that a cached run needs no network.
if [ "${BLIXARD_GUEST_REFRESH:-0}" != 1 ] && [ -e "$DIR/current/.done" ] \
   && [ "$(cat "$DIR/current/.script-hash" 2>/dev/null)" = "$HASH" ]; then
  readlink -f "$DIR/current"
  exit 0
fi

t0=$(date +%s)
PKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$PKG" ]; then
  apt-get update -qq
  PKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
[ -n "$PKG" ] || { echo "cannot find the package linux-image-cloud-amd64 depends on" >&2; exit 1; }
VER=$(apt-cache show "$PKG" | awk '/^Version:/{print $2; exit}')
OUT="$DIR/$PKG-$VER-$HASH"
if [ -e "$OUT/.done" ]; then
  ln -sfn "$(basename "$OUT")" "$DIR/current"
  readlink -f "$DIR/current"
  exit 0
fi

W=$(mktemp -d); chmod 755 "$W"; trap 'rm -rf "$W"' EXIT
(cd "$W" && apt-get download -qq -o APT::Sandbox::User=root "$PKG" >/dev/null)
dpkg -x "$W"/"$PKG"_*.deb "$W/x"
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
cp "$W"/x/boot/vmlinuz-* "$OUT.tmp/vmlinuz"
MOD=$(ls -d "$W"/x/lib/modules/*)
KV=$(basename "$MOD")

R=$W/root
mkdir -p "$R"/{bin,dev,proc,sys,tmp,etc,lib/modules}
cp /bin/busybox "$R/bin/busybox"
# Modules, in load order (virtio_ring before virtio). Compressed modules are unpacked, since
# busybox insmod may not read them.
mods="drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_mmio
  drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci
  net/core/failover drivers/net/net_failover drivers/net/virtio_net
  drivers/input/evdev drivers/acpi/button drivers/misc/pvpanic/pvpanic drivers/misc/pvpanic/pvpanic-mmio
  drivers/misc/pvpanic/pvpanic-pci"
for m in $mods; do
  src=$(ls "$MOD/kernel/$m".ko* 2>/dev/null | head -1 || true)
  [ -n "$src" ] || { echo "module $m missing in $KV" >&2; continue; }
  case "$src" in
    *.xz) xz -dc "$src" > "$R/lib/modules/$(basename "$m").ko" ;;
    *.zst) zstd -qdc "$src" > "$R/lib/modules/$(basename "$m").ko" ;;
    *) cp "$src" "$R/lib/modules/$(basename "$m").ko" ;;
  esac
done

cat > "$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
load() { [ -e "/lib/modules/$1.ko" ] && insmod "/lib/modules/$1.ko" 2>/dev/null; }
echo "BLIXARD-GUEST-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
CMDLINE=" $(cat /proc/cmdline) "
for m in pvpanic pvpanic-mmio pvpanic-pci evdev button; do load "$m"; done

# The ACPI power button: the `button` module makes an input device named "Power Button";
# any event on it powers the guest off.
power_button() {
  for i in $(seq 50); do
    for d in /sys/class/input/input*; do
      [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ] || continue
      ev=$(ls -d "$d"/event* 2>/dev/null | head -1)
      [ -n "$ev" ] || continue
      dev=/dev/input/$(basename "$ev")
      echo "BLIXARD-GUEST-POWER-BUTTON-READY $dev"
      # An input event is 24 bytes; the first read returns once the button is pressed.
      dd if="$dev" bs=24 count=1 of=/dev/null 2>/dev/null
      echo "BLIXARD-GUEST-POWER-BUTTON"
      poweroff -f
    done
    sleep 0.2
  done
  echo "BLIXARD-GUEST-NO-POWER-BUTTON"
}
case "$CMDLINE" in
  *" blixard.nobutton=1 "*) echo "BLIXARD-GUEST-IGNORES-POWER-BUTTON" ;;
  *) power_button & ;;
esac
case "$CMDLINE" in *" blixard.debug=1 "*)
  dmesg | grep -i -E "acpi|button|input|ged|pvpanic" | head -40
  ls /sys/class/input /sys/bus/platform/devices; lsmod
esac

case "$CMDLINE" in *" blixard.net=1 "*)
  for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net; do load "$m"; done
  for i in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
  ip link set lo up
  for n in /sys/class/net/eth*; do ip link set "$(basename "$n")" up; done
  echo "BLIXARD-GUEST-NET-UP $(ip -o link show eth0 2>&1 | head -1)"
esac

arg() { for w in $CMDLINE; do case "$w" in "$1"=*) echo "${w#*=}"; return;; esac; done; }
S=$(arg blixard.sleep); [ -n "$S" ] && sleep "$S"
N=$(arg blixard.status)
if [ -n "$N" ]; then echo "BLIXARD-GUEST-TASK-DONE"; echo "BLIXARD-TASK-EXIT=$N"; poweroff -f; fi
case "$CMDLINE" in
  *" blixard.exit=poweroff "*) echo "BLIXARD-GUEST-POWEROFF"; poweroff -f ;;
  *" blixard.exit=panic "*) echo "BLIXARD-GUEST-PANIC"; exit 1 ;;
esac
i=0
while true; do i=$((i+1)); echo "BLIXARD-GUEST-HEARTBEAT $i"; sleep 2; done
INIT
chmod +x "$R/init"
(cd "$R" && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -9 > "$OUT.tmp/initrd.gz")
echo "$HASH" > "$OUT.tmp/.script-hash"
echo "$PKG $VER" > "$OUT.tmp/.kernel"
touch "$OUT.tmp/.done"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
ln -sfn "$(basename "$OUT")" "$DIR/current"
# Builds of an older kernel are no longer used. Builds of other versions of this script
# are kept: other checkouts on this machine may be using them at this moment.
for old in "$DIR"/linux-image-*; do
  case "$old" in "$DIR/$PKG-$VER-"*) continue ;; esac
  [ -L "$old" ] || rm -rf "$old"
done
echo "guest built in $(( $(date +%s) - t0 ))s: $OUT" >&2
readlink -f "$DIR/current"
