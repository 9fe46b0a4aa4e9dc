#!/bin/bash
# Installs the system packages Blixard's build, demo and tests need on Debian 12, as root.
# Idempotent: installs only what is missing.
#   scripts/install-deps.sh            build + demo + test packages
set -eu
pkgs=(build-essential pkg-config systemd dbus dbus-user-session iproute2 util-linux procps
      qemu-system-x86 busybox-static curl python3-venv)
need=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  # Never let a package upgrade systemd underneath the tests: install only what is missing.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (rustup.rs); this machine has none" >&2
  exit 1
fi
# Python tools the tests run as independent clients of the API: prometheus_client's parser
# reads /metrics, schemathesis checks the API against its OpenAPI description. Pinned, in
# their own venv (Debian's python, not the user's), rebuilt only when a pin changes.
venv=/var/cache/blixard-test/pyvenv
pins="prometheus-client==0.26.0 schemathesis==4.32.5 openapi-spec-validator==0.9.0"
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$pins" ]; then
  echo "installing python tools: $pins"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $pins
  echo "$pins" > "$venv/.pins"
fi
