#!/bin/bash
# Builds the Debian package `blixard` from binaries that are ALREADY built; compiles nothing.
#
#   cargo build --workspace --bins --release && packaging/build-deb.sh
#   cargo build --workspace --bins && packaging/build-deb.sh --profile dev    # what the tests do
#
# Options: --profile PROFILE (default release; dev means target/debug)
#          --bin-dir DIR    (take the binaries from DIR instead of the profile's directory)
#          --out DIR        (default <target dir>/debian)
# Prints the path of the .deb as the last line of stdout.
#
# Needs cargo-deb (`cargo install cargo-deb --locked`; tests/ct/setup.sh installs it),
# dpkg-dev and help2man. The package layout is [package.metadata.deb] in control/Cargo.toml;
# the changelog, copyright and maintainer scripts are in packaging/debian/. Binaries are
# stripped (lintian: unstripped-binary-or-object). `lintian` on the result reports nothing
# (`deb_is_lintian_clean` in tests/tests/suite/t60_packaging.rs).
#
# Besides the binaries, it stages <target>/deb-stage.PID/release/deb-share/, which becomes /usr/share:
# doc/blixard/README.md always; bash/zsh/fish completions when `blixardctl completions SHELL`
# prints them; man pages: blixardctl.1 from `blixardctl man` (roff on stdout), blixard-control.1
# and blixard-agent.1 from their --help by help2man.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=release
OUT=
BIN=
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE=$2; shift 2;;
    --bin-dir) BIN=$2; shift 2;;
    --out) OUT=$2; shift 2;;
    -h|--help) sed -n '2,22p' "$0"; exit 0;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2;;
  esac
done
command -v cargo-deb >/dev/null || { echo "build-deb.sh: cargo-deb is not installed: run tests/ct/setup.sh or cargo install cargo-deb --locked" >&2; exit 1; }
command -v dpkg-shlibdeps >/dev/null || { echo "build-deb.sh: dpkg-shlibdeps missing: apt-get install dpkg-dev" >&2; exit 1; }
command -v help2man >/dev/null || { echo "build-deb.sh: help2man missing (man pages of the daemons): apt-get install help2man" >&2; exit 1; }

cd "$ROOT"
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
case "$PROFILE" in dev|test) PROFILE_DIR=debug;; bench) PROFILE_DIR=release;; *) PROFILE_DIR=$PROFILE;; esac
BIN=${BIN:-$TARGET_DIR/$PROFILE_DIR}
for b in blixard-control blixard-agent blixardctl; do
  if [ ! -x "$BIN/$b" ]; then
    flag=""; [ "$PROFILE" = release ] && flag=" --release"
    [ "$PROFILE" = dev ] || [ "$PROFILE" = release ] || flag=" --profile $PROFILE"
    echo "build-deb.sh: $BIN/$b is missing: run cargo build --workspace --bins$flag first" >&2
    exit 1
  fi
done
OUT=${OUT:-$TARGET_DIR/debian}
mkdir -p "$OUT"

# cargo-deb packages target/release/*: whatever the profile, stage the binaries (hard links)
# and the /usr/share tree in <target>/deb-stage.PID/release and point cargo-deb there. (Its
# own --profile dev is deprecated; the tests package debug builds.)
STAGE="$TARGET_DIR/deb-stage.$$"
TMP=$(mktemp -d)
trap 'rm -rf "$STAGE" "$TMP"' EXIT
mkdir -p "$STAGE/release"
for b in blixard-control blixard-agent blixardctl; do
  ln "$BIN/$b" "$STAGE/release/$b" 2>/dev/null || cp "$BIN/$b" "$STAGE/release/$b"
done
SHARE="$STAGE/release/deb-share"
mkdir -p "$SHARE/doc/blixard"
cp packaging/README.md "$SHARE/doc/blixard/README.md"
CTL="$BIN/blixardctl"
if "$CTL" completions bash > "$TMP/bash" 2>/dev/null && [ -s "$TMP/bash" ] \
   && "$CTL" completions zsh > "$TMP/zsh" 2>/dev/null && [ -s "$TMP/zsh" ] \
   && "$CTL" completions fish > "$TMP/fish" 2>/dev/null && [ -s "$TMP/fish" ]; then
  mkdir -p "$SHARE/bash-completion/completions" "$SHARE/zsh/vendor-completions" \
           "$SHARE/fish/vendor_completions.d"
  cp "$TMP/bash" "$SHARE/bash-completion/completions/blixardctl"
  cp "$TMP/zsh" "$SHARE/zsh/vendor-completions/_blixardctl"
  cp "$TMP/fish" "$SHARE/fish/vendor_completions.d/blixardctl.fish"
  echo "build-deb.sh: packaging shell completions" >&2
else
  echo "build-deb.sh: blixardctl has no 'completions SHELL' subcommand: no shell completions in the package" >&2
fi
if "$CTL" man > "$TMP/blixardctl.1" 2>/dev/null && head -c 200 "$TMP/blixardctl.1" | grep -q '^\.TH'; then
  mkdir -p "$SHARE/man/man1"
  gzip -9n < "$TMP/blixardctl.1" > "$SHARE/man/man1/blixardctl.1.gz"
  echo "build-deb.sh: packaging man page blixardctl.1" >&2
else
  echo "build-deb.sh: blixardctl has no 'man' subcommand: no man page in the package" >&2
fi
# the daemons' man pages, from their --help and --version
for b in "blixard-control:a node of the Blixard control plane (Raft, scheduler, HTTP API)" \
         "blixard-agent:the Blixard host agent (runs assigned VMs as systemd units)"; do
  name=${b%%:*}
  mkdir -p "$SHARE/man/man1"
  help2man --no-info --section 1 --source Blixard --name "${b#*:}" \
    --output "$TMP/$name.1" "$BIN/$name"
  gzip -9n < "$TMP/$name.1" > "$SHARE/man/man1/$name.1.gz"
  echo "build-deb.sh: packaging man page $name.1" >&2
done

# --compress-system: the gzip/xz tools, not cargo-deb's built-in compressor, which took
# 7-10 minutes here for the 135 MB of debug binaries (the tools: 4 s).
# Debug builds are large and only feed the tests: gzip, fast.
speed=(--compress-system --strip)
[ "$PROFILE" = release ] || speed+=(--fast -Z gz)
CARGO_TARGET_DIR="$STAGE" cargo deb -p blixard-control --no-build --output "$OUT" "${speed[@]}" >&2
ls -t "$OUT"/blixard_*.deb | head -1
