# NixOS module for Blixard: services.blixard.control and services.blixard.agent.
#
#   imports = [ ./nixos-module ];
#   services.blixard.control = {
#     enable = true;
#     settings = {
#       node_id = 1;
#       listen = "10.0.0.1:7001";
#       advertise_url = "https://10.0.0.1:7001";
#       initial_cluster = "1=https://10.0.0.1:7001";
#       tls_cert_file = "/etc/blixard/node1.pem"; # public; the key is a credential
#       tls_ca_file = "/etc/blixard/ca.pem";
#     };
#     credentialFiles = {
#       operator-token = "/run/keys/blixard-operator-token";
#       agent-tokens = "/run/keys/blixard-agent-tokens";
#       peer-token = "/run/keys/blixard-peer-token";
#       tls-key = "/run/keys/blixard-tls-key";
#     };
#     openFirewall = true;
#   };
#   services.blixard.agent = {
#     enable = true;
#     settings = {
#       host_id = "h1";
#       control_endpoints = [ "https://10.0.0.1:7001" ];
#       ca_file = "/etc/blixard/ca.pem";
#     };
#     credentialFiles.agent-token = "/run/keys/blixard-agent-token";
#   };
#
# A control node listening beyond loopback needs tokens and TLS (as above) or
# `settings.insecure = true`; an assertion says so at evaluation time.
#
# Needs NixOS 23.05 or later (systemd.services.<name>.overrideStrategy).
#
# The services are the units shipped in units/ (installed by the package, hardening and all),
# with a drop-in that points ExecStart at the generated, build-time checked configuration and
# adds the credentials. So the NixOS services cannot drift from units/: there is one copy.
# `settings` follows RFC 42: any key the daemon understands can be set; the important ones
# are typed here.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    literalExpression
    types
    ;

  cfg = config.services.blixard;

  # networking.hostName may hold uppercase letters and `_`; a host id may not.
  defaultHostId = lib.toLower (lib.replaceStrings [ "_" ] [ "-" ] config.networking.hostName);
  isHostId = id: builtins.match "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?" id != null;

  # "127.x.y.z:port" or "[::1]:port": reachable from this machine only.
  isLoopbackListen =
    listen:
    builtins.match "127\\.[0-9.]+:[0-9]+" listen != null || builtins.match "[[]::1[]]:[0-9]+" listen != null;
  settingsFormat = pkgs.formats.toml { };

  # TOML has no null: unset optional keys are left out.
  toTOML =
    name: settings: settingsFormat.generate name (lib.filterAttrsRecursive (_: v: v != null) settings);

  # The generated file, validated by the daemon itself at build time: a bad config fails
  # `nixos-rebuild`, not the service at boot.
  checkedConfig =
    daemon: package: settings:
    pkgs.runCommand "blixard-${daemon}.toml"
      {
        nativeBuildInputs = [ package ];
        unchecked = toTOML "blixard-${daemon}-unchecked.toml" settings;
      }
      ''
        blixard-${daemon} check-config "$unchecked"
        cp "$unchecked" "$out"
      '';

  # The port of "host:port" or "[v6]:port".
  portOf = listen: lib.toInt (lib.last (lib.splitString ":" listen));

  trim =
    str:
    let
      m = builtins.match "[[:space:]]*(.*[^[:space:]])[[:space:]]*" str;
    in
    if m == null then "" else lib.head m;

  clusterIds =
    initialCluster:
    map (entry: lib.head (lib.splitString "=" entry)) (
      lib.filter (e: e != "") (map trim (lib.splitString "," initialCluster))
    );

  credentialFilesOption =
    unit: example:
    mkOption {
      type = types.attrsOf types.path;
      default = { };
      example = literalExpression example;
      description = ''
        Credentials for ${unit}: credential ID to a file outside the Nix store, passed
        with `LoadCredential=ID:FILE` and readable by the daemon as
        {file}`/run/credentials/${unit}/ID`. The IDs the daemon knows also set the
        matching `*_file` key of `settings` (unless set there).
      '';
    };

  # credential ID -> the settings key naming its file, for blixard-control
  controlCredentialKeys = {
    operator-token = "operator_token_file";
    agent-tokens = "agent_token_file";
    peer-token = "peer_token_file";
    tls-key = "tls_key_file";
  };

  packageOption =
    what:
    mkOption {
      type = types.package;
      default = pkgs.callPackage ../packaging/package.nix { };
      defaultText = literalExpression "pkgs.callPackage ../packaging/package.nix { }";
      description = "The Blixard package providing ${what} and its systemd unit.";
    };

  # The drop-in on top of the packaged unit: the packaged ExecStart reads
  # /etc/blixard/*.toml; here it is replaced by the checked file from the store.
  serviceDropIn =
    {
      daemon,
      package,
      configFile,
      credentialFiles,
      extraServiceConfig ? { },
    }:
    {
      wantedBy = [ "multi-user.target" ];
      overrideStrategy = "asDropin";
      serviceConfig = {
        ExecStart = [
          ""
          "${package}/bin/blixard-${daemon} --config ${configFile}"
        ];
        # Given files replace the packaged credstore lookups ("" resets the list).
        LoadCredential = lib.optionals (credentialFiles != { }) (
          [ "" ] ++ lib.mapAttrsToList (id: file: "${id}:${file}") credentialFiles
        );
      } // extraServiceConfig;
    };
in
{
  options.services.blixard = {
    control = {
      enable = mkEnableOption "a Blixard control plane node (blixard-control)";
      package = packageOption "blixard-control";

      settings = mkOption {
        default = { };
        description = ''
          Contents of the blixard-control configuration file, checked at build time with
          `blixard-control check-config`.
        '';
        type = types.submodule {
          freeformType = settingsFormat.type;
          options = {
            node_id = mkOption {
              type = types.ints.positive;
              example = 1;
              description = "This node's Raft id: unique in the cluster, never reused.";
            };
            listen = mkOption {
              type = types.str;
              default = "127.0.0.1:7001";
              example = "10.0.0.1:7001";
              description = "Address (host:port) of the HTTP API for clients, agents and Raft peers.";
            };
            advertise_url = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "http://10.0.0.1:7001";
              description = "URL other nodes and agents use to reach this node; default http://«listen».";
            };
            data_dir = mkOption {
              type = types.path;
              default = "/var/lib/blixard-control";
              description = "Raft log, vote and state machine (SQLite).";
            };
            initial_cluster = mkOption {
              type = types.str;
              example = "1=http://10.0.0.1:7001,2=http://10.0.0.2:7001,3=http://10.0.0.3:7001";
              description = "The founding members as id=url, comma separated; the same on every founding node.";
            };
            join = mkOption {
              type = types.bool;
              default = false;
              description = "Join a running cluster instead of founding one.";
            };
            snapshot_every = mkOption {
              type = types.ints.positive;
              default = 10000;
              description = "Snapshot the state machine every this many applied entries.";
            };
          };
        };
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the TCP port of `settings.listen` in the firewall.";
      };

      credentialFiles = credentialFilesOption "blixard-control.service" ''
        {
          operator-token = "/run/keys/blixard-operator-token"; # sets settings.operator_token_file
          agent-tokens = "/run/keys/blixard-agent-tokens"; # sets settings.agent_token_file
          peer-token = "/run/keys/blixard-peer-token"; # sets settings.peer_token_file
          tls-key = "/run/keys/blixard-tls-key"; # sets settings.tls_key_file
        }
      '';
    };

    agent = {
      enable = mkEnableOption "the Blixard host agent (blixard-agent), which runs VMs as systemd units";
      package = packageOption "blixard-agent";

      settings = mkOption {
        default = { };
        description = ''
          Contents of the blixard-agent configuration file, checked at build time with
          `blixard-agent check-config`.
        '';
        type = types.submodule {
          freeformType = settingsFormat.type;
          options = {
            host_id = mkOption {
              type = types.str;
              default = defaultHostId;
              defaultText = literalExpression ''
                lib.toLower (lib.replaceStrings [ "_" ] [ "-" ] config.networking.hostName)
              '';
              description = ''
                This host's name in the cluster: a DNS label (lowercase letters, digits and
                `-`, at most 63), unique among hosts. The default is the host name, lowercased
                and with `_` as `-`; with an empty `networking.hostName` it must be set.
              '';
            };
            control_endpoints = mkOption {
              type = types.nonEmptyListOf types.str;
              example = [ "http://10.0.0.1:7001" ];
              description = "Control plane nodes to register with.";
            };
            data_dir = mkOption {
              type = types.path;
              default = "/var/lib/blixard-agent";
              description = "The agent's own state.";
            };
            runtime_dir = mkOption {
              type = types.path;
              default = "/run/blixard-agent";
              description = "Runtime files of the VMs; survives agent restarts.";
            };
            image_dir = mkOption {
              type = types.path;
              default = "/var/lib/blixard/images";
              description = "Kernels, initrds and disk images; VM specs name files inside it only.";
            };
            systemd_bus = mkOption {
              type = types.enum [
                "system"
                "session"
              ];
              default = "system";
              description = "The systemd manager that runs the VMs.";
            };
            heartbeat_interval_ms = mkOption {
              type = types.ints.positive;
              default = 500;
              description = "How often the agent heartbeats to the control plane.";
            };
            lease_ms = mkOption {
              type = types.ints.positive;
              default = 2000;
              description = ''
                Fencing, on by default: each heartbeat a control-plane leader confirms renews
                the host's lease for this long, counted from when it was sent. Once it runs
                out, every VM with on_host_loss = move is stopped on the host (SIGTERM, then
                SIGKILL after fence_grace_ms), by the agent or, if the agent is dead, by its
                dead man's switch (blixard-fence.service). At least twice
                heartbeat_interval_ms, between 500 and 600000.
              '';
            };
            fence_grace_ms = mkOption {
              type = types.ints.unsigned;
              default = 500;
              description = "How long a fenced VM gets between SIGTERM and SIGKILL (at most 60000).";
            };
            token_file = mkOption {
              type = types.nullOr types.str;
              default =
                if cfg.agent.credentialFiles ? agent-token then
                  "/run/credentials/blixard-agent.service/agent-token"
                else
                  null;
              defaultText = literalExpression ''
                "/run/credentials/blixard-agent.service/agent-token" if credentialFiles.agent-token is set, else null
              '';
              description = "File holding the agent's auth token.";
            };
            labels = mkOption {
              type = types.attrsOf types.str;
              default = { };
              example = {
                rack = "r1";
              };
              description = "Labels for placement constraints.";
            };
            hypervisors = mkOption {
              type = types.attrsOf types.path;
              default = {
                qemu = "${pkgs.qemu_kvm}/bin/qemu-system-${pkgs.stdenv.hostPlatform.qemuArch}";
              };
              defaultText = literalExpression ''
                { qemu = "''${pkgs.qemu_kvm}/bin/qemu-system-''${pkgs.stdenv.hostPlatform.qemuArch}"; }
              '';
              description = "Hypervisor name to executable.";
            };
          };
        };
      };

      credentialFiles = credentialFilesOption "blixard-agent.service" ''
        { agent-token = "/run/keys/blixard-agent-token"; }
      '';
    };
  };

  config = mkMerge [
    (mkIf cfg.control.enable (
      let
        s = cfg.control.settings;
        configFile = checkedConfig "control" cfg.control.package s;
      in
      {
        assertions = [
          {
            assertion = s.join || lib.elem (toString s.node_id) (clusterIds s.initial_cluster);
            message = ''
              services.blixard.control: node_id ${toString s.node_id} is not in initial_cluster
              ("${s.initial_cluster}"); a founding node must be listed there (or set join = true).
            '';
          }
          {
            assertion = lib.all (id: builtins.match "[0-9]+" id != null) (clusterIds s.initial_cluster);
            message = ''
              services.blixard.control: initial_cluster must be "id=url,id=url,...", got "${s.initial_cluster}".
            '';
          }
          {
            # the same rule blixard-control applies at start-up, checked at evaluation time
            assertion =
              isLoopbackListen s.listen
              || (s.insecure or false)
              || lib.all (key: (s.${key} or null) != null) [
                "operator_token_file"
                "peer_token_file"
                "tls_cert_file"
                "tls_key_file"
                "tls_ca_file"
              ];
            message = ''
              services.blixard.control: listen = "${s.listen}" is reachable from other machines, so
              the node needs tokens and TLS: credentialFiles.operator-token, credentialFiles.peer-token
              and credentialFiles.tls-key (or the matching settings.*_file keys) plus
              settings.tls_cert_file and settings.tls_ca_file. Or set settings.insecure = true
              to allow plain, unauthenticated HTTP.
            '';
          }
          {
            assertion = !cfg.control.openFirewall || builtins.match ".*:[0-9]+" s.listen != null;
            message = "services.blixard.control: openFirewall needs a port in listen (host:port), got \"${s.listen}\".";
          }
        ];

        services.blixard.control.settings = lib.mapAttrs' (
          id: _:
          lib.nameValuePair controlCredentialKeys.${id} (
            lib.mkDefault "/run/credentials/blixard-control.service/${id}"
          )
        ) (lib.filterAttrs (id: _: controlCredentialKeys ? ${id}) cfg.control.credentialFiles);

        environment.systemPackages = [ cfg.control.package ];
        systemd.packages = [ cfg.control.package ];

        users.users.blixard-control = {
          isSystemUser = true;
          group = "blixard-control";
          home = s.data_dir;
          description = "Blixard control plane";
        };
        users.groups.blixard-control = { };

        systemd.services.blixard-control = serviceDropIn {
          daemon = "control";
          package = cfg.control.package;
          inherit configFile;
          inherit (cfg.control) credentialFiles;
          # the unit only makes its StateDirectory writable (ProtectSystem=strict)
          extraServiceConfig = lib.optionalAttrs (s.data_dir != "/var/lib/blixard-control") {
            ReadWritePaths = [ s.data_dir ];
          };
        };

        networking.firewall.allowedTCPPorts = lib.optional cfg.control.openFirewall (portOf s.listen);
      }
    ))

    (mkIf cfg.agent.enable (
      let
        s = cfg.agent.settings;
        configFile = checkedConfig "agent" cfg.agent.package s;
        # StateDirectory=, RuntimeDirectory= and ReadWritePaths= of units/blixard-agent.service
        writableInUnit = [
          "/var/lib/blixard-agent"
          "/run/blixard-agent"
          "/var/lib/blixard/images"
        ];
      in
      {
        assertions = [
          {
            assertion = isHostId s.host_id;
            message = ''
              services.blixard.agent: settings.host_id "${s.host_id}" is not a DNS label (lowercase
              letters, digits and '-', at most 63, not starting or ending with '-'). It defaults to
              networking.hostName ("${config.networking.hostName}") lowercased; set
              services.blixard.agent.settings.host_id explicitly.
            '';
          }
          {
            assertion = s.systemd_bus == "system";
            message = ''
              services.blixard.agent: settings.systemd_bus must be "system" for the NixOS service
              ("session" is for tests that drive a user manager).
            '';
          }
          {
            assertion = s.hypervisors != { };
            message = "services.blixard.agent: settings.hypervisors is empty; the host could run no VM.";
          }
        ];

        environment.systemPackages = [ cfg.agent.package ];
        systemd.packages = [ cfg.agent.package ];
        systemd.tmpfiles.rules = [
          "d ${s.image_dir} 0755 root root -"
          "d ${s.runtime_dir} 0700 root root -"
        ];

        systemd.services.blixard-agent = serviceDropIn {
          daemon = "agent";
          package = cfg.agent.package;
          inherit configFile;
          inherit (cfg.agent) credentialFiles;
          # ProtectSystem=strict: directories the unit does not already make writable
          extraServiceConfig = {
            ReadWritePaths = lib.filter (d: !(lib.elem d writableInUnit)) [
              s.data_dir
              s.runtime_dir
              s.image_dir
            ];
          };
          # The agent is restarted, never stopped, on a configuration switch; VMs are their
          # own units (blixard-vms.slice) and keep running either way.
        } // {
          stopIfChanged = false;
        };
      }
    ))
  ];
}
