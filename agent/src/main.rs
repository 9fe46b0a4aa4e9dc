//! `blixard-agent`: parses the command line, sets up logging, and runs the agent library.

use std::path::PathBuf;
use std::process::ExitCode;

use blixard_agent::config::{Config, Overrides, SystemdBus};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "blixard-agent",
    version,
    about = "Blixard host agent: runs assigned VMs as systemd units",
    after_help = "Without --config the agent reads no file: the options above and their defaults \
                  apply. The packaged unit (blixard-agent.service) runs it with \
                  --config /etc/blixard/agent.toml; check that file with \
                  `blixard-agent check-config /etc/blixard/agent.toml`. Flags override the file."
)]
struct Cli {
    /// Configuration file (TOML); the packaged unit uses /etc/blixard/agent.toml. Without
    /// it, no file is read.
    #[arg(long, short = 'c', env = "BLIXARD_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// This host's name in the cluster.
    #[arg(long)]
    host_id: Option<String>,
    /// Control-plane endpoints, comma-separated (http://host:port,…).
    #[arg(long, value_delimiter = ',')]
    control_endpoints: Option<Vec<String>>,
    /// Where the agent keeps its state; the disk capacity reported is this file system's
    /// (default /var/lib/blixard-agent).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Per-boot files: the lease file, VM sockets and pid files (default /run/blixard-agent).
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Kernels, initrds and disk images; every path in a VM spec is resolved inside it
    /// (default /var/lib/blixard/images).
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// Bus of the systemd manager: system or session.
    #[arg(long)]
    systemd_bus: Option<SystemdBus>,
    /// How often the agent heartbeats to the control plane, in milliseconds (default 500).
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// How long a confirmed heartbeat keeps this host's lease, in milliseconds (default
    /// 2000, at least twice the heartbeat interval); once it runs out, `move` VMs here are
    /// stopped (fenced).
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Log to stderr even when the journal is there.
    #[arg(long)]
    log_stderr: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the agent (the default).
    Run,
    /// Checks a configuration file and exits: 0 if it is valid, 1 with the problem otherwise.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Presses a QEMU VM's ACPI power button over its QMP socket and waits until QEMU exits
    /// (the `ExecStop=` of every QEMU VM unit). Exits 0 when QEMU is gone or the time is up
    /// (systemd's SIGTERM follows), 1 on a QMP error.
    QmpPowerdown {
        /// The VM's QMP socket.
        #[arg(long)]
        socket: PathBuf,
        /// Seconds to wait for QEMU to exit.
        #[arg(long, default_value_t = 20)]
        timeout: u64,
    },
    /// Gives files the owner of a directory, then runs a command with `{uid}` and `{gid}`
    /// replaced by it: hands a VM's disks and tap devices to its dynamic user (the owner of
    /// its runtime directory) in the VM unit's privileged `ExecStartPre=`, and the disks back
    /// in its `ExecStopPost=`.
    VmOwner {
        /// The directory whose owner the files get.
        #[arg(long)]
        like: PathBuf,
        /// A file to give that owner (repeatable).
        #[arg(long)]
        chown: Vec<PathBuf>,
        /// The command to run afterwards (after `--`).
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// The dead man's switch (`blixard-fence.service`, started by the agent): watches the
    /// agent's lease file and, once the lease has run out, SIGTERMs every `blixard-vm-*` unit
    /// not listed as `stay`, then SIGKILLs it after the grace; re-arms when the lease is
    /// renewed. A missing file (no lease held this boot) fences nothing.
    FenceWatch {
        /// The lease file (`<runtime_dir>/lease`).
        #[arg(long)]
        lease_file: PathBuf,
        /// Bus of the systemd manager that runs the VMs.
        #[arg(long, default_value = "system")]
        systemd_bus: SystemdBus,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::QmpPowerdown { socket, timeout }) = &cli.command {
        let started = std::time::Instant::now();
        return match blixard_agent::qmp::powerdown(socket, std::time::Duration::from_secs(*timeout))
        {
            Ok(outcome) => {
                // The unit's journal shows how the stop went.
                println!(
                    "qmp-powerdown: {outcome:?} after {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("qmp-powerdown: {}", blixard_agent::error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::VmOwner { like, chown, argv }) = &cli.command {
        return match blixard_agent::vm_owner::run(like, chown, argv) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vm-owner: {}", blixard_agent::error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match Config::load(file).and_then(|c| c.validate().map(|()| c)) {
            Ok(c) => {
                println!(
                    "{}: ok (host {}, {} control endpoint{})",
                    file.display(),
                    c.host_id,
                    c.control_endpoints.len(),
                    if c.control_endpoints.len() == 1 {
                        ""
                    } else {
                        "s"
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("blixard-agent: {}", blixard_agent::error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::FenceWatch {
        lease_file,
        systemd_bus,
    }) = &cli.command
    {
        blixard_agent::logging::init(cli.log_stderr);
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let res = runtime.block_on(async {
            let sd = blixard_agent::systemd::Systemd::connect(*systemd_bus).await?;
            blixard_agent::fence_watch::run(sd, lease_file.clone()).await
        });
        return match res {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    blixard_agent::logging::init(cli.log_stderr);
    let mut config = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => return fail(&e),
        },
        None => Config::default(),
    };
    config.apply(Overrides {
        host_id: cli.host_id,
        control_endpoints: cli.control_endpoints,
        data_dir: cli.data_dir,
        runtime_dir: cli.runtime_dir,
        image_dir: cli.image_dir,
        systemd_bus: cli.systemd_bus,
        heartbeat_interval_ms: cli.heartbeat_interval_ms,
        lease_ms: cli.lease_ms,
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    match runtime.block_on(blixard_agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &(dyn std::error::Error + 'static)) -> ExitCode {
    let msg = blixard_agent::error_chain(e);
    tracing::error!(error = %msg, "blixard-agent failed");
    eprintln!("blixard-agent: {msg}");
    ExitCode::FAILURE
}
