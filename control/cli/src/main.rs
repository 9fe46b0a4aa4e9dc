//! `blixardctl`: the command-line client of the Blixard HTTP API.
//!
//! Every command talks to the control plane through `blixard_api::Client`, prints a table or
//! JSON (`-o json`), and exits with a code scripts can trust (see `--help`).

/// `println!` for everything the CLI prints on stdout, through [`stdout::line`]: a reader
/// that went away (`blixardctl vm list | head -1`) ends the program quietly instead of the
/// panic `println!` gives.
macro_rules! outln {
    () => {
        $crate::stdout::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::stdout::line(format_args!($($arg)*))
    };
}

mod apply;
mod output;
mod run;
mod stdout;
mod wait;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use blixard_api::{
    validate, AddMember, Client, ClientError, DiskFormat, DiskSpec, HostSelector, HostStatus,
    Hypervisor, NicSpec, OnHostLoss, PlacementStrategy, RestartPolicy, VmSelector, VmSpec, VmState,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use output::{print_hosts, print_json, print_members, print_status, print_vm, print_vms, Format};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the request failed (bad input, refused by the cluster)
  2  usage error
  3  not found
  4  conflict (already exists, changed meanwhile)
  5  control plane unreachable or without a leader (or, for vm logs, the VM's host)
  6  --wait timed out
  7  rate limited: this client sent too many requests; retry after the time given
vm run exits with its task's exit status once it ended (0 succeeded), or:
  124  the task timed out
  125  the task's host was lost
  126  the task could not start
  1    the task failed without an exit status (killed by a signal, guest kernel panic)";

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
    /// File holding an operator bearer token.
    #[arg(long, env = "BLIXARD_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// CA bundle (PEM) to check https:// endpoints against.
    #[arg(long, env = "BLIXARD_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
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
    /// Make the cluster's VMs match a file (TOML `[[vm]]` tables or a JSON list of specs).
    Apply {
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Also delete VMs the file does not declare.
        #[arg(long)]
        prune: bool,
        /// Print the plan (creates, changes, placements, deletes) and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
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
    /// Rebuild a member whose data is lost or damaged: remove it, wait for the node to answer
    /// at URL (start it with an empty data directory and --join meanwhile), add it back.
    Rebuild {
        id: u64,
        url: String,
        /// How long to wait for the fresh node, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Save or restore the cluster's hosts and VMs.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Write the current hosts and VMs to FILE (JSON).
    Save { file: PathBuf },
    /// Replace every host and VM with FILE's (disaster recovery).
    Restore { file: PathBuf },
}

/// Waiting for a VM to settle.
#[derive(clap::Args, Clone, Copy)]
struct WaitArgs {
    /// Wait until the VM is running (or stopped), showing progress; fail with the reason.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
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
enum OnHostLossArg {
    /// Fenced on a cut-off host and placed elsewhere once its host's lease expires: never
    /// runs twice, but stops while no control node can be reached.
    Move,
    /// Never fenced or moved while its host may be alive; placed again only when the host
    /// comes back without it or is declared gone.
    Stay,
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
    /// What happens when the VM's host stops answering (default move).
    #[arg(long, value_enum)]
    on_host_loss: Option<OnHostLossArg>,
    /// Required host label KEY=VALUE; repeatable.
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    /// A label of the VM's own, KEY=VALUE, to select it by (`vm list -l`); repeatable.
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
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
    Create {
        #[command(flatten)]
        args: Box<CreateArgs>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Run a task: create it, print its console while it runs, print its result, and exit
    /// with its exit status (124 timed out, 125 host lost, 126 could not start, 1 failed
    /// without a status).
    Run {
        #[command(flatten)]
        args: Box<CreateArgs>,
        /// How long it may run (e.g. 90s, 10m, 1h); its host stops it then.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<u64>,
        /// Delete the task once its result was printed.
        #[arg(long)]
        rm: bool,
        /// Run it again on another host if its host is lost (only for a task that is safe
        /// to run twice); otherwise it ends failed: host lost.
        #[arg(long)]
        rerun_on_host_loss: bool,
    },
    /// List VMs, oldest name first; the table is printed page by page as it arrives.
    List(VmListArgs),
    /// Show one VM, with its last console lines when its host can be reached.
    Show { name: String },
    /// Print a VM's console and unit lines from its host's journal (`-o json`: NDJSON).
    Logs {
        name: String,
        /// Keep printing new lines until interrupted (Ctrl-C).
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many of the last lines to print first (1-10000).
        #[arg(short = 'n', long, default_value_t = 100,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(blixard_api::MAX_LOG_LINES)))]
        lines: u32,
    },
    /// Delete a VM (its unit is stopped).
    Delete { name: String },
    /// Start a stopped VM (or one that failed).
    Start {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stop a VM (it stays on its host).
    Stop {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stop a VM, wait until it stopped, and start it again.
    Restart {
        name: String,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

/// Filters of `vm list`, applied by the control plane.
#[derive(Args)]
struct VmListArgs {
    /// Only VMs assigned to this host.
    #[arg(long)]
    host: Option<String>,
    /// Only VMs in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// Only VMs with this label, KEY=VALUE; repeatable (all must match).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// VMs fetched per request (1-10000).
    #[arg(long, default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=blixard_api::validate::MAX_PAGE as i64))]
    page_size: u32,
}

/// Filters of `host list`.
#[derive(Args)]
struct HostListArgs {
    /// Only hosts with this status.
    #[arg(long, value_enum)]
    status: Option<HostStatusArg>,
    /// Only hosts with this label, KEY=VALUE; repeatable (all must match).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// Hosts fetched per request (1-10000).
    #[arg(long, default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=blixard_api::validate::MAX_PAGE as i64))]
    page_size: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Pending,
    Scheduled,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl From<StateArg> for VmState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => VmState::Pending,
            StateArg::Scheduled => VmState::Scheduled,
            StateArg::Starting => VmState::Starting,
            StateArg::Running => VmState::Running,
            StateArg::Stopping => VmState::Stopping,
            StateArg::Stopped => VmState::Stopped,
            StateArg::Failed => VmState::Failed,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum HostStatusArg {
    Up,
    Down,
    Draining,
}

impl From<HostStatusArg> for HostStatus {
    fn from(s: HostStatusArg) -> Self {
        match s {
            HostStatusArg::Up => HostStatus::Up,
            HostStatusArg::Down => HostStatus::Down,
            HostStatusArg::Draining => HostStatus::Draining,
        }
    }
}

/// Fetches a list page by page (`fetch` gets the previous page's continue token), handing
/// each page to `each` as it arrives.
async fn each_page<T, F, Fut>(mut fetch: F, mut each: impl FnMut(Vec<T>)) -> Result<(), ClientError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<String>), ClientError>>,
{
    let mut token = None;
    loop {
        let (items, next) = fetch(token).await?;
        each(items);
        match next {
            Some(t) => token = Some(t),
            None => return Ok(()),
        }
    }
}

/// `KEY=VALUE` arguments of `flag`, as a map.
fn key_values(flag: &str, args: Vec<String>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .with_context(|| format!("--{flag} {a}: expected KEY=VALUE"))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[derive(Subcommand)]
enum HostCmd {
    /// List hosts, in id order; the table is printed page by page as it arrives.
    List(HostListArgs),
    /// Show one host.
    Show { name: String },
    /// Move every VM off a host (stop, place elsewhere, start) and refuse new ones.
    Drain {
        name: String,
        /// How long VMs get to stop, e.g. 90s, 5m, 1h. A VM is never taken off a host that has
        /// not confirmed its stop: past the deadline it stays there, its reason says why, until
        /// the host confirms, is declared down, or is declared gone.
        #[arg(long, value_parser = parse_duration)]
        deadline: Option<u64>,
        /// Follow the drain until no VM is left on the host, showing how many are left and
        /// which (on stderr); exit 6 if some are still there at --timeout.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, e.g. 90s, 10m (default: the deadline plus 5 minutes).
        #[arg(long, value_parser = parse_duration, requires = "wait")]
        timeout: Option<u64>,
    },
    /// Let a drained host take VMs again.
    Undrain { name: String },
    /// Tell the cluster a host is gone for good (powered off, destroyed): use it only when
    /// the host is known to be off.
    #[command(long_about = DECLARE_GONE_HELP)]
    DeclareGone { name: String },
}

const DECLARE_GONE_HELP: &str = "\
Tell the cluster a host is gone for good. Use it only when the host is known to be off \
(powered off, destroyed, its disks wiped).

Every VM assigned to the host is taken off it at once and placed on other hosts, including \
VMs with on_host_loss=stay, which otherwise wait for their host to come back. The host is \
marked down and stays down until its agent registers again.

If the host is in fact still running, its VMs may run twice (there and on their new hosts) \
until its agent reaches the control plane again and is told to stop them.";

/// Parses `90`, `90s`, `5m`, `1h` into seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 5m or 1h"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
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
    let constraints = key_values("constraint", a.constraints)?;
    let labels = key_values("label", a.labels)?;
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
        labels,
        anti_affinity: a.anti_affinity,
        strategy: match a.strategy {
            StrategyArg::Spread => PlacementStrategy::Spread,
            StrategyArg::Binpack => PlacementStrategy::Binpack,
        },
        max_restarts: a.max_restarts,
        restart_window_secs: a.restart_window,
        on_host_loss: a.on_host_loss.map(|o| match o {
            OnHostLossArg::Move => OnHostLoss::Move,
            OnHostLossArg::Stay => OnHostLoss::Stay,
        }),
        task: None,
    })
}

/// Runs the command; the exit status on success (0, or a task's for `vm run`).
async fn run(cli: Cli) -> anyhow::Result<u8> {
    let out = cli.output;
    let token = match &cli.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let endpoints: Vec<&str> = cli.endpoints.split(',').collect();
    let ca = cli.ca_file.clone();
    let client = move || -> anyhow::Result<Client> {
        Ok(Client::with_ca(&endpoints, ca.as_deref())?.with_bearer(token.clone()))
    };
    match cli.command {
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into a buffer first: generate() panics on a write error (e.g. a closed pipe).
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "blixardctl", &mut buf);
            stdout::bytes(&buf);
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut buf)?;
            stdout::bytes(&buf);
        }
        Cmd::Cluster(c) => {
            let client = client()?;
            match c {
                ClusterCmd::Status => print_status(out, &client.cluster_status().await?),
                ClusterCmd::Members => print_members(out, &client.members().await?),
                ClusterCmd::Add { id, url } => {
                    let m = AddMember { id, addr: url };
                    validate::add_member(&m)?;
                    print_members(out, &client.add_member(&m).await?)
                }
                ClusterCmd::Remove { id } => print_members(out, &client.remove_member(id).await?),
                ClusterCmd::Rebuild { id, url, timeout } => {
                    let m = AddMember { id, addr: url };
                    validate::add_member(&m)?;
                    // Removed first: a voter restarted empty would count towards a quorum
                    // with entries and votes it no longer has.
                    if client.members().await?.iter().any(|x| x.id == id) {
                        client.remove_member(id).await?;
                        eprintln!("removed node {id}");
                    }
                    eprintln!(
                        "waiting for node {id} at {}: start it with an empty data directory \
                         and --join",
                        m.addr
                    );
                    let fresh = Client::with_ca(&[m.addr.as_str()], cli.ca_file.as_deref())?;
                    let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
                    // Any HTTP answer will do: a node waiting to be added has no leader (503).
                    while let Err(ClientError::Unreachable(e)) = fresh.health().await {
                        if std::time::Instant::now() > deadline {
                            anyhow::bail!(
                                "node {id} did not answer at {} within {timeout} s: {e}",
                                m.addr
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    print_members(out, &client.add_member(&m).await?)
                }
                ClusterCmd::Snapshot(SnapshotCmd::Save { file }) => {
                    let snap = client.save_snapshot().await?;
                    let text = serde_json::to_string_pretty(&snap)?;
                    std::fs::write(&file, text)
                        .with_context(|| format!("cannot write {}", file.display()))?;
                    outln!(
                        "saved {} hosts and {} VMs at index {} to {}",
                        snap.hosts.len(),
                        snap.vms.len(),
                        snap.index,
                        file.display()
                    );
                }
                ClusterCmd::Snapshot(SnapshotCmd::Restore { file }) => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    let snap: blixard_api::StateSnapshot = serde_json::from_str(&text)
                        .with_context(|| format!("{}", file.display()))?;
                    let r = client.restore_snapshot(&snap).await?;
                    match out {
                        Format::Json => print_json(&r),
                        Format::Table => {
                            outln!("restored {} VMs from {}", snap.vms.len(), file.display())
                        }
                    }
                }
            }
        }
        Cmd::Vm(c) => {
            // `vm run` follows the console on a client of its own.
            let console_client = client()?;
            let client = client()?;
            match c {
                VmCmd::Create { args, wait } => {
                    let spec = spec_from_args(*args)?;
                    validate::vm_spec(&spec)?;
                    // A retry of this very command (same key) never makes a second VM.
                    let key = format!("{}-{}", spec.name, std::process::id());
                    let vm = client.create_vm_idempotent(&spec, &key).await?;
                    finish(&client, out, vm, wait, blixard_api::VmState::Running).await?
                }
                VmCmd::Run {
                    args,
                    timeout,
                    rm,
                    rerun_on_host_loss,
                } => {
                    let mut spec = spec_from_args(*args)?;
                    let task = spec.task.get_or_insert_with(Default::default);
                    task.timeout_secs = timeout.or(task.timeout_secs);
                    task.rerun_on_host_loss |= rerun_on_host_loss;
                    validate::vm_spec(&spec)?;
                    return run::run(&client, console_client, out, spec, rm).await;
                }
                VmCmd::List(a) => {
                    let sel = VmSelector {
                        host: a.host,
                        state: a.state.map(VmState::from),
                        labels: key_values("label", a.labels)?,
                    };
                    let mut pages = output::Pages::new(out);
                    let (c, sel) = (&client, &sel);
                    each_page(
                        |t| async move { c.list_vms_page(sel, a.page_size, t.as_deref()).await },
                        |vms| pages.vms(vms),
                    )
                    .await?;
                    pages.finish_vms();
                }
                VmCmd::Show { name } => {
                    let vm = client.get_vm(&name).await?;
                    print_vm(out, &vm);
                    if out == Format::Table && vm.host.is_some() {
                        print_console_tail(&last_console_lines(&client, &name).await);
                    } else if let (Format::Table, Some(r)) = (out, &vm.task_result) {
                        print_console_tail(&Ok(r.console.clone()));
                    }
                }
                VmCmd::Logs {
                    name,
                    follow,
                    lines,
                } => {
                    let timeout = (!follow).then_some(LOGS_TIMEOUT);
                    let mut stream = client.vm_logs(&name, Some(lines), follow, timeout).await?;
                    while let Some(line) = stream.next_line().await? {
                        print_log_line(out, &line);
                    }
                }
                VmCmd::Delete { name } => {
                    let vm = client.delete_vm(&name).await?;
                    match out {
                        Format::Json => print_json(&vm),
                        Format::Table => outln!("deleted {}", vm.spec.name),
                    }
                }
                VmCmd::Start { name, wait } => {
                    let vm = client.start_vm(&name).await?;
                    finish(&client, out, vm, wait, blixard_api::VmState::Running).await?
                }
                VmCmd::Stop { name, wait } => {
                    let vm = client.stop_vm(&name).await?;
                    finish(&client, out, vm, wait, blixard_api::VmState::Stopped).await?
                }
                VmCmd::Restart { name, timeout } => {
                    let w = WaitArgs {
                        wait: true,
                        timeout,
                    };
                    let vm = client.stop_vm(&name).await?;
                    wait::until_state(&client, vm, blixard_api::VmState::Stopped, timeout).await?;
                    let vm = client.start_vm(&name).await?;
                    finish(&client, out, vm, w, blixard_api::VmState::Running).await?
                }
            }
        }
        Cmd::Host(c) => {
            let client = client()?;
            match c {
                HostCmd::List(a) => {
                    let sel = HostSelector {
                        status: a.status.map(HostStatus::from),
                        labels: key_values("label", a.labels)?,
                    };
                    let mut pages = output::Pages::new(out);
                    let (c, sel) = (&client, &sel);
                    each_page(
                        |t| async move { c.list_hosts_page(sel, a.page_size, t.as_deref()).await },
                        |hosts| pages.hosts(hosts),
                    )
                    .await?;
                    pages.finish_hosts();
                }
                HostCmd::Show { name } => {
                    let host = client.get_host(&name).await?;
                    print_hosts(out, std::slice::from_ref(&host));
                    if out == Format::Table {
                        let vms: Vec<blixard_api::Vm> = client
                            .list_vms()
                            .await?
                            .into_iter()
                            .filter(|v| v.host.as_deref() == Some(name.as_str()))
                            .collect();
                        outln!();
                        print_vms(out, &vms);
                    }
                }
                HostCmd::Drain {
                    name,
                    deadline,
                    wait,
                    timeout,
                } => {
                    let host = client.drain_host(&name, deadline).await?;
                    let host = if wait {
                        let timeout = timeout.unwrap_or_else(|| {
                            deadline
                                .unwrap_or(DEFAULT_DRAIN_DEADLINE_SECS)
                                .saturating_add(DRAIN_WAIT_MARGIN_SECS)
                        });
                        wait::until_drained(&client, &name, timeout).await?
                    } else {
                        host
                    };
                    print_hosts(out, &[host])
                }
                HostCmd::Undrain { name } => print_hosts(out, &[client.undrain_host(&name).await?]),
                HostCmd::DeclareGone { name } => {
                    let moved: Vec<String> = client
                        .list_vms()
                        .await?
                        .into_iter()
                        .filter(|v| v.host.as_deref() == Some(name.as_str()))
                        .map(|v| v.spec.name)
                        .collect();
                    let host = client.declare_host_gone(&name).await?;
                    if out == Format::Table {
                        outln!(
                            "host {name} declared gone: it stays down until its agent registers again."
                        );
                        if moved.is_empty() {
                            outln!("no VMs were assigned to it.");
                        } else {
                            outln!(
                                "{} VMs taken off it and placed on other hosts now: {}",
                                moved.len(),
                                moved.join(", ")
                            );
                            outln!(
                                "if {name} is in fact still running, they may run twice until its agent comes back and is told to stop them."
                            );
                        }
                    } else {
                        print_hosts(out, std::slice::from_ref(&host));
                    }
                }
            }
        }
        Cmd::Apply {
            file,
            prune,
            dry_run,
        } => {
            let client = client()?;
            apply::run(&client, out, &file, prune, dry_run).await?
        }
    }
    Ok(0)
}

/// The drain deadline the control plane applies when none is given (see `DrainRequest`).
const DEFAULT_DRAIN_DEADLINE_SECS: u64 = 300;
/// How much longer than the drain deadline `host drain --wait` waits by default.
const DRAIN_WAIT_MARGIN_SECS: u64 = 300;

/// How long `vm logs` without `-f` may take.
const LOGS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);
/// How long `vm show` waits for the console lines before saying they are unavailable.
const SHOW_LOGS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Console lines `vm show` prints.
const SHOW_LINES: usize = 10;

/// The last console lines of `name`, or why they cannot be had (best effort, bounded).
async fn last_console_lines(client: &Client, name: &str) -> Result<Vec<String>, String> {
    let read = async {
        let mut s = client
            .vm_logs(name, Some(50), false, Some(SHOW_LOGS_TIMEOUT))
            .await?;
        let mut lines = std::collections::VecDeque::new();
        while let Some(l) = s.next_line().await? {
            if l.source == blixard_api::LogSource::Console {
                lines.push_back(l.message);
                if lines.len() > SHOW_LINES {
                    lines.pop_front();
                }
            }
        }
        Ok::<_, ClientError>(Vec::from(lines))
    };
    match tokio::time::timeout(SHOW_LOGS_TIMEOUT, read).await {
        Ok(Ok(lines)) => Ok(lines),
        Ok(Err(ClientError::Api { message, .. })) => Err(message),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", SHOW_LOGS_TIMEOUT.as_secs())),
    }
}

fn print_console_tail(lines: &Result<Vec<String>, String>) {
    match lines {
        Ok(l) if l.is_empty() => outln!("console:     (no lines yet)"),
        Ok(l) => {
            outln!("console:     (last {} lines)", l.len());
            for m in l {
                outln!("  {m}");
            }
        }
        Err(why) => outln!("console:     unavailable: {why}"),
    }
}

fn print_log_line(out: Format, line: &blixard_api::LogLine) {
    match out {
        Format::Json => match serde_json::to_string(line) {
            Ok(s) => outln!("{s}"),
            Err(e) => eprintln!("blixardctl: cannot encode output: {e}"),
        },
        Format::Table => match line.source {
            blixard_api::LogSource::Console => outln!("{}", line.message),
            blixard_api::LogSource::Unit => outln!("[unit] {}", line.message),
        },
    }
}

/// Prints the VM, or with `--wait` follows it until it reaches `target`.
async fn finish(
    client: &Client,
    out: Format,
    vm: blixard_api::Vm,
    wait: WaitArgs,
    target: blixard_api::VmState,
) -> anyhow::Result<()> {
    let vm = if wait.wait {
        wait::until_state(client, vm, target, wait.timeout).await?
    } else {
        vm
    };
    print_vm(out, &vm);
    Ok(())
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Api { status: 404, .. }) => 3,
        Some(ClientError::Api { status: 409, .. }) => 4,
        Some(ClientError::Api { status: 429, .. }) => 7,
        Some(ClientError::Api {
            status: 502..=504, ..
        })
        | Some(ClientError::Unreachable(_)) => 5,
        _ if e.downcast_ref::<wait::Timeout>().is_some() => 6,
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
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("blixardctl: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
