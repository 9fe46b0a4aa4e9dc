# The Blixard workspace as a Nix package: blixard-control, blixard-agent, blixardctl, the
# systemd units from units/ (ExecStart pointing into the store), sysusers/tmpfiles entries
# and the default configs. Used by nixos-module/ and callable on its own:
#
#   nix-build -E 'with import <nixpkgs> {}; callPackage ./packaging/package.nix {}'
{
  lib,
  rustPlatform,
  installShellFiles,
  help2man,
}:

let
  workspace = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "blixard";
  inherit (workspace.workspace.package) version;

  # The workspace members as listed in Cargo.toml (a new member needs no edit here), plus
  # what postInstall installs.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions (
      [
        ../Cargo.toml
        ../Cargo.lock
        ../units
        ../packaging/etc
        ../packaging/README.md
        ../LICENSE
      ]
      ++ map (member: ../. + "/${member}") workspace.workspace.members
    );
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [
    installShellFiles
    help2man
  ];

  # rusqlite is built with its bundled SQLite: no system library needed.
  # the three programs; not the suite's or the benchmarks' binaries
  cargoBuildFlags = [
    "-p"
    "blixard-control"
    "-p"
    "blixard-agent"
    "-p"
    "blixardctl"
  ];
  # The integration suite (blixard-tests) boots systemd managers and containers and the
  # benchmarks drive etcd, neither possible in the build sandbox; every other crate's unit
  # tests run.
  cargoTestFlags = [
    "--workspace"
    "--exclude"
    "blixard-tests"
    "--exclude"
    "blixard-bench"
  ];

  postInstall = ''
    install -Dm644 -t $out/lib/systemd/system \
      units/blixard-control.service units/blixard-agent.service units/blixard-vms.slice
    substituteInPlace $out/lib/systemd/system/blixard-control.service \
      --replace-fail /usr/bin/blixard-control $out/bin/blixard-control
    substituteInPlace $out/lib/systemd/system/blixard-agent.service \
      --replace-fail /usr/bin/blixard-agent $out/bin/blixard-agent
    # every unit's Documentation= names the README; here it is in the store
    install -Dm644 packaging/README.md $out/share/doc/blixard/README.md
    install -Dm644 LICENSE $out/share/doc/blixard/LICENSE
    for unit in blixard-control.service blixard-agent.service blixard-vms.slice; do
      substituteInPlace $out/lib/systemd/system/$unit \
        --replace-fail file:///usr/share/doc/blixard/README.md file://$out/share/doc/blixard/README.md
    done
    install -Dm644 units/sysusers.d/blixard.conf $out/lib/sysusers.d/blixard.conf
    install -Dm644 units/tmpfiles.d/blixard.conf $out/lib/tmpfiles.d/blixard.conf
    install -Dm644 -t $out/share/blixard/examples packaging/etc/control.toml packaging/etc/agent.toml

    # completions, once blixardctl can print them (same probe as packaging/build-deb.sh)
    if $out/bin/blixardctl completions bash > /dev/null 2>&1; then
      installShellCompletion --cmd blixardctl \
        --bash <($out/bin/blixardctl completions bash) \
        --zsh <($out/bin/blixardctl completions zsh) \
        --fish <($out/bin/blixardctl completions fish)
    fi
    if $out/bin/blixardctl man > blixardctl.1 2> /dev/null && grep -q '^\.TH' blixardctl.1; then
      installManPage blixardctl.1
    fi
    # the daemons' man pages from their --help, as packaging/build-deb.sh makes them
    help2man --no-info --section 1 --source Blixard \
      --name "a node of the Blixard control plane (Raft, scheduler, HTTP API)" \
      --output blixard-control.1 $out/bin/blixard-control
    help2man --no-info --section 1 --source Blixard \
      --name "the Blixard host agent (runs assigned VMs as systemd units)" \
      --output blixard-agent.1 $out/bin/blixard-agent
    installManPage blixard-control.1 blixard-agent.1
  '';

  meta = {
    description = "MicroVM orchestrator: openraft control plane, systemd-driven host agent and CLI";
    license = lib.licenses.asl20;
    mainProgram = "blixardctl";
    platforms = lib.platforms.linux;
  };
}
