//! `blixardctl`: the command-line client of the Blixard HTTP API.
//!
//! Every command talks to the control plane through `blixard_api::Client`, prints a table or
//! JSON (`-o json`), and exits with a code scripts can trust (see `--help`).

mod output;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use blixard_api::{
    validate, AddMember, Client, ClientError, DiskFormat, DiskSpec, Hypervisor, NicSpec,
    PlacementStrategy, RestartPolicy, VmSpec,
};
use clap::{Parser, Subcommand, ValueEnum};
use output::{print_hosts, print_json, print_members, print_status, print_vm, print_vms, Format};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the request failed (bad input, refused by the cluster)
  2  usage error
  3  not found
  4  conflict (already exists, changed meanwhile)
  5  control plane unreachable or without a leader";

#[derive(Parser)]
#[command(name = "blixardctl", version, about = "Drive a Blixard cluster", after_help = EXIT_CODES)]
struct Cli {
    /// Control-plane endpoints, comma-separated.
    #[arg(
        long,
        env = "BLIXARD_ENDPOINTS",
        default_value = "http://127.0.0.1:7001",
        global = true
    )]
    endpoints: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The Raft cluster of control nodes.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Hosts running agents.
    #[command(subcommand)]
    Host(HostCmd),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Leader, term, members and indexes, as the answering node sees them.
    Status,
    /// Members from Raft's configuration.
    Members,
    /// Add a control node (started with --join) as a voter.
    Add { id: u64, url: String },
    /// Remove a control node.
    Remove { id: u64 },
}

#[derive(Clone, Copy, ValueEnum)]
enum HypervisorArg {
    Qemu,
    CloudHypervisor,
    Firecracker,
    Process,
}

#[derive(Clone, Copy, ValueEnum)]
enum RestartArg {
    Always,
    OnFailure,
    Never,
}

#[derive(Clone, Copy, ValueEnum)]
enum StrategyArg {
    Spread,
    Binpack,
}

#[derive(clap::Args)]
struct CreateArgs {
    /// VM name (DNS label).
    name: Option<String>,
    /// Read the spec from a JSON or TOML file instead of flags.
    #[arg(short = 'f', long, conflicts_with = "name")]
    file: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    #[arg(long, value_enum, default_value_t = HypervisorArg::Qemu)]
    hypervisor: HypervisorArg,
    /// Kernel image, relative to the agent's image directory.
    #[arg(long)]
    kernel: Option<String>,
    #[arg(long)]
    initrd: Option<String>,
    #[arg(long)]
    cmdline: Option<String>,
    /// Disk image: PATH[:ro][:qcow2]; repeatable.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Network interface on a host bridge: BRIDGE[=MAC]; repeatable.
    #[arg(long = "nic")]
    nics: Vec<String>,
    #[arg(long, value_enum, default_value_t = RestartArg::Always)]
    restart: RestartArg,
    /// Required host label KEY=VALUE; repeatable.
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    /// Anti-affinity group: no two VMs of a group share a host.
    #[arg(long)]
    anti_affinity: Option<String>,
    #[arg(long, value_enum, default_value_t = StrategyArg::Spread)]
    strategy: StrategyArg,
    /// Most restarts within the window before the VM is left failed.
    #[arg(long)]
    max_restarts: Option<u32>,
    /// The restart window, in seconds.
    #[arg(long)]
    restart_window: Option<u64>,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Create a VM and let the cluster place it.
    Create(Box<CreateArgs>),
    /// List VMs.
    List,
    /// Show one VM.
    Show { name: String },
    /// Delete a VM (its unit is stopped).
    Delete { name: String },
    /// Start a stopped VM.
    Start { name: String },
    /// Stop a VM (it stays assigned).
    Stop { name: String },
}

#[derive(Subcommand)]
enum HostCmd {
    /// List hosts.
    List,
    /// Show one host.
    Show { name: String },
}

fn spec_from_args(a: CreateArgs) -> anyhow::Result<VmSpec> {
    if let Some(path) = a.file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let spec: VmSpec = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?
        } else {
            serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?
        };
        return Ok(spec);
    }
    let name = a.name.context("a VM name (or -f FILE) is required")?;
    let mut disks = Vec::new();
    for d in a.disks {
        let mut parts = d.split(':');
        let path = parts.next().unwrap_or_default().to_string();
        let mut disk = DiskSpec {
            path,
            read_only: false,
            format: DiskFormat::Raw,
        };
        for opt in parts {
            match opt {
                "ro" => disk.read_only = true,
                "qcow2" => disk.format = DiskFormat::Qcow2,
                "raw" => disk.format = DiskFormat::Raw,
                other => anyhow::bail!("--disk {d}: unknown option {other:?} (ro, raw, qcow2)"),
            }
        }
        disks.push(disk);
    }
    let nics = a
        .nics
        .into_iter()
        .map(|n| match n.split_once('=') {
            Some((b, mac)) => NicSpec {
                bridge: b.into(),
                mac: Some(mac.into()),
            },
            None => NicSpec {
                bridge: n,
                mac: None,
            },
        })
        .collect();
    let mut constraints = BTreeMap::new();
    for c in a.constraints {
        let (k, v) = c
            .split_once('=')
            .with_context(|| format!("--constraint {c}: expected KEY=VALUE"))?;
        constraints.insert(k.to_string(), v.to_string());
    }
    Ok(VmSpec {
        name,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        hypervisor: match a.hypervisor {
            HypervisorArg::Qemu => Hypervisor::Qemu,
            HypervisorArg::CloudHypervisor => Hypervisor::CloudHypervisor,
            HypervisorArg::Firecracker => Hypervisor::Firecracker,
            HypervisorArg::Process => Hypervisor::Process,
        },
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        disks,
        nics,
        restart_policy: match a.restart {
            RestartArg::Always => RestartPolicy::Always,
            RestartArg::OnFailure => RestartPolicy::OnFailure,
            RestartArg::Never => RestartPolicy::Never,
        },
        constraints,
        anti_affinity: a.anti_affinity,
        strategy: match a.strategy {
            StrategyArg::Spread => PlacementStrategy::Spread,
            StrategyArg::Binpack => PlacementStrategy::Binpack,
        },
        max_restarts: a.max_restarts,
        restart_window_secs: a.restart_window,
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::from_list(&cli.endpoints)?;
    let out = cli.output;
    match cli.command {
        Cmd::Cluster(c) => match c {
            ClusterCmd::Status => print_status(out, &client.cluster_status().await?),
            ClusterCmd::Members => print_members(out, &client.members().await?),
            ClusterCmd::Add { id, url } => {
                let m = AddMember { id, addr: url };
                validate::add_member(&m)?;
                print_members(out, &client.add_member(&m).await?)
            }
            ClusterCmd::Remove { id } => print_members(out, &client.remove_member(id).await?),
        },
        Cmd::Vm(c) => match c {
            VmCmd::Create(a) => {
                let spec = spec_from_args(*a)?;
                validate::vm_spec(&spec)?;
                print_vm(out, &client.create_vm(&spec).await?)
            }
            VmCmd::List => print_vms(out, &client.list_vms().await?),
            VmCmd::Show { name } => print_vm(out, &client.get_vm(&name).await?),
            VmCmd::Delete { name } => {
                let vm = client.delete_vm(&name).await?;
                match out {
                    Format::Json => print_json(&vm),
                    Format::Table => println!("deleted {}", vm.spec.name),
                }
            }
            VmCmd::Start { name } => print_vm(out, &client.start_vm(&name).await?),
            VmCmd::Stop { name } => print_vm(out, &client.stop_vm(&name).await?),
        },
        Cmd::Host(c) => match c {
            HostCmd::List => print_hosts(out, &client.list_hosts().await?),
            HostCmd::Show { name } => print_hosts(out, &[client.get_host(&name).await?]),
        },
    }
    Ok(())
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Api { status: 404, .. }) => 3,
        Some(ClientError::Api { status: 409, .. }) => 4,
        Some(ClientError::Api { status: 503, .. }) | Some(ClientError::Unreachable(_)) => 5,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blixardctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blixardctl: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
