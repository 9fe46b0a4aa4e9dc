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
# Needs cargo-deb (`cargo install cargo-deb --locked`; tests/ct/setup.sh installs it) and
# dpkg-dev. The package layout is [package.metadata.deb] in control/Cargo.toml.
#
# Besides the binaries, it stages <target>/deb-stage.PID/release/deb-share/, which becomes /usr/share:
# doc/blixard/README.md always; bash/zsh/fish completions when `blixardctl completions SHELL`
# prints them; man pages when `blixardctl man` prints one (roff on stdout).
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
    -h|--help) sed -n '2,18p' "$0"; exit 0;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2;;
  esac
done
command -v cargo-deb >/dev/null || { echo "build-deb.sh: cargo-deb is not installed: run tests/ct/setup.sh or cargo install cargo-deb --locked" >&2; exit 1; }
command -v dpkg-shlibdeps >/dev/null || { echo "build-deb.sh: dpkg-shlibdeps missing: apt-get install dpkg-dev" >&2; exit 1; }

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

# --compress-system: the gzip/xz tools, not cargo-deb's built-in compressor, which took
# 7-10 minutes here for the 135 MB of debug binaries (the tools: 4 s).
# Debug builds are large and only feed the tests: gzip, fast.
speed=(--compress-system)
[ "$PROFILE" = release ] || speed+=(--fast -Z gz)
CARGO_TARGET_DIR="$STAGE" cargo deb -p blixard-control --no-build --output "$OUT" "${speed[@]}" >&2
ls -t "$OUT"/blixard_*.deb | head -1
