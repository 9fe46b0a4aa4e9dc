//! Simulated hosts: each one a real `systemd --user` manager with its own journal, in its own
//! mount, UTS and cgroup namespaces and cgroup subtree, and the real agent running "on" it.
//!
//! A host stays in the root network namespace, so its agent reaches control nodes on
//! 127.0.0.1 and nothing is ever sent elsewhere. Hosts are independent: each has a temporary
//! base directory and a cgroup named after the test process and a counter, so tests run in
//! parallel (nextest runs each test as its own process). The cgroups nest under the test
//! process's own, in every hierarchy the host joins: the unified one, `name=systemd`, and the
//! v1 `memory pids cpu cpuacct blkio devices freezer` controllers, without which the manager
//! silently ignores `MemoryMax=` (in hybrid cgroup mode systemd applies it through the v1
//! memory controller, so two managers sharing one subtree would also share `/app.slice`).
//!
//! The shell side lives in `tests/sim/`: `host-start.sh` joins the cgroups and unshares,
//! `host-inner.sh` sets up `/run/systemd`, journald and the cgroup mounts and execs the
//! manager, `host-exec.sh` runs a command on the host. Dropping a [`SimHost`] kills every
//! process of the host (`cgroup.kill`) and removes its cgroups; its base directory goes too
//! unless `BLIXARD_KEEP_HOSTS` is set.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;

use crate::binaries::binary;
use crate::wait;

/// How long a host may take to answer on its bus (a loaded 2-core machine).
pub const START_DEADLINE: Duration = Duration::from_secs(30);

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// v1 controllers a host joins (cpuset is left out: it needs cpus/mems set first).
const V1_CONTROLLERS: [&str; 7] = [
    "memory", "pids", "cpu", "cpuacct", "blkio", "devices", "freezer",
];

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn sim_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sim")
}

/// One cgroup hierarchy the host has a directory in.
#[derive(Debug, Clone)]
struct Hierarchy {
    /// `unified`, `systemd` or a v1 controller name.
    name: String,
    /// The host's directory in it.
    dir: PathBuf,
}

/// The cgroup path of this process in each hierarchy, from `/proc/self/cgroup`:
/// `0::/x` is the unified one, `N:name=systemd:/x` and `N:memory:/x` the v1 ones.
fn own_cgroups() -> anyhow::Result<Vec<(String, String)>> {
    let text = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let name = match controllers {
            "" => "unified".to_string(),
            "name=systemd" => "systemd".to_string(),
            c => c.to_string(),
        };
        out.push((name, path.to_string()));
    }
    Ok(out)
}

/// A simulated host. See the module documentation.
pub struct SimHost {
    name: String,
    base: TempDir,
    hierarchies: Vec<Hierarchy>,
    manager: Child,
    agent: Option<Child>,
    agent_runs: usize,
    /// The agent logs to the host's journal (`-t blixard-agent`) rather than to `agent.log`.
    pub agent_logs_to_journal: bool,
    /// The agent runs as production runs it: a unit of the host's manager
    /// ([`AGENT_UNIT`], `Type=notify`, `KillMode=process`), rather than a child of the test.
    pub agent_as_unit: bool,
}

/// The agent's unit on a host whose agent runs as a unit ([`SimHost::agent_as_unit`]).
pub const AGENT_UNIT: &str = "blixard-agent.service";

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost")
            .field("name", &self.name)
            .field("base", &self.base.path())
            .finish()
    }
}

impl SimHost {
    /// Starts host `name` (a DNS label; it becomes the hostname and the agent's host id) and
    /// waits until its manager answers on its bus.
    pub async fn start(name: &str) -> anyhow::Result<SimHost> {
        check_name(name)?;
        let base = tempfile::Builder::new()
            .prefix(&format!("blixard-{name}-"))
            .tempdir()?;
        Self::start_at(name, base).await
    }

    /// Like [`SimHost::start`], with the base directory (`NAME-XXXXXX`) under `parent`, kept
    /// when the host is dropped (for the local demo: its journal and agent log stay).
    pub async fn start_in(name: &str, parent: &Path) -> anyhow::Result<SimHost> {
        check_name(name)?;
        fs::create_dir_all(parent)?;
        let mut base = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(parent)?;
        base.disable_cleanup(true);
        Self::start_at(name, base).await
    }

    async fn start_at(name: &str, base: TempDir) -> anyhow::Result<SimHost> {
        let b = base.path();
        for d in ["run-systemd", "journal", "home", "data", "run", "images"] {
            fs::create_dir_all(b.join(d))?;
        }
        fs::create_dir(b.join("xdg"))?;
        fs::set_permissions(
            b.join("xdg"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        fs::write(
            b.join("journald.conf"),
            "[Journal]\nStorage=volatile\nReadKMsg=no\nRateLimitBurst=0\nForwardToSyslog=no\n",
        )?;

        let id = format!(
            "blixard-sim-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut hierarchies = Vec::new();
        let mut controllers = Vec::new();
        for (h, own) in own_cgroups()? {
            let wanted = h == "unified" || h == "systemd" || V1_CONTROLLERS.contains(&h.as_str());
            let mount = Path::new(CGROUP_ROOT).join(&h);
            if !wanted || !mount.is_dir() {
                continue;
            }
            let dir = mount.join(own.trim_start_matches('/')).join(&id);
            fs::create_dir_all(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            if V1_CONTROLLERS.contains(&h.as_str()) {
                controllers.push(h.clone());
            }
            hierarchies.push(Hierarchy { name: h, dir });
        }
        if !hierarchies.iter().any(|h| h.name == "unified") {
            bail!("no unified cgroup hierarchy at {CGROUP_ROOT}/unified: simulated hosts need hybrid cgroups");
        }

        let log = fs::File::create(b.join("manager.log"))?;
        let mut cmd = Command::new("bash");
        cmd.arg(sim_dir().join("host-start.sh"))
            .arg(b)
            .arg(name)
            .args(hierarchies.iter().map(|h| &h.dir))
            .env("BLIXARD_SIM_CONTROLLERS", controllers.join(" "))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let manager = cmd.spawn().context("starting host-start.sh")?;
        let mut host = SimHost {
            name: name.to_string(),
            base,
            hierarchies,
            manager,
            agent: None,
            agent_runs: 0,
            agent_logs_to_journal: false,
            agent_as_unit: false,
        };
        host.wait_ready().await?;
        Ok(host)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let address = self.bus_address();
        let log = self.base.path().join("manager.log");
        let started = Instant::now();
        let res = wait::until(
            &format!("host {} manager on its bus", self.name),
            START_DEADLINE,
            || {
                let address = address.clone();
                let exited = self.manager.try_wait().ok().flatten();
                let log = log.clone();
                async move {
                    if let Some(status) = exited {
                        let text = fs::read_to_string(&log).unwrap_or_default();
                        return Err(format!("manager exited ({status}): {text}"));
                    }
                    match system_state(&address).await {
                        Ok(s) if s == "running" || s == "degraded" => Ok(Some(())),
                        Ok(s) => Err(format!("SystemState={s}")),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await;
        if res.is_ok() {
            eprintln!("host {} up in {:?}", self.name, started.elapsed());
        }
        res
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's base directory (journal, logs, the agent's data).
    pub fn base_dir(&self) -> &Path {
        self.base.path()
    }

    pub fn manager_pid(&self) -> u32 {
        self.manager.id()
    }

    /// `unix:path=…/xdg/bus`: the manager's session bus.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.base.path().join("xdg/bus").display())
    }

    /// The environment a client of this host's manager needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "XDG_RUNTIME_DIR".into(),
                self.base.path().join("xdg").display().to_string(),
            ),
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.bus_address()),
        ]
    }

    /// A D-Bus connection to the host's manager.
    pub async fn connect(&self) -> anyhow::Result<zbus::Connection> {
        Ok(
            zbus::connection::Builder::address(self.bus_address().as_str())
                .build()
                .await?,
        )
    }

    /// A command that runs `program` on the host: in its cgroup subtree (so [`SimHost::kill`]
    /// takes it down too), its mount and UTS namespaces, with [`SimHost::env`] set.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let mut dirs = Vec::new();
        for h in self
            .hierarchies
            .iter()
            .filter(|h| h.name == "unified" || h.name == "systemd")
        {
            let d = h.dir.join("extra");
            fs::create_dir_all(&d).with_context(|| format!("creating cgroup {}", d.display()))?;
            dirs.push(d.display().to_string());
        }
        let mut cmd = Command::new("bash");
        cmd.arg(sim_dir().join("host-exec.sh"))
            .arg(self.manager_pid().to_string())
            .arg(self.base.path().join("xdg"))
            .arg(dirs.join(":"))
            .arg(program)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// The agent's image directory (`images` under the base directory).
    pub fn image_dir(&self) -> PathBuf {
        self.base.path().join("images")
    }

    /// The journal directory, for `journalctl -D`.
    pub fn journal_dir(&self) -> PathBuf {
        self.base.path().join("journal")
    }

    /// `journalctl -D <journal> --no-pager -o cat ARGS…`: the host's journal as text.
    pub fn journal(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("journalctl")
            .arg("-D")
            .arg(self.journal_dir())
            .args(["--no-pager", "-o", "cat"])
            .args(args)
            .output()
            .context("running journalctl")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The path of the agent's config file.
    pub fn agent_config_path(&self) -> PathBuf {
        self.base.path().join("agent.toml")
    }

    /// The agent configuration this host uses: its name, the endpoints, directories under the
    /// base directory, the session bus, `/bin/sleep infinity` as the `process` hypervisor,
    /// fast heartbeats, then `extra` (TOML text, e.g. `memory_reserve_mib = 0`).
    pub fn agent_config(&self, endpoints: &[String], extra: &str) -> String {
        let b = self.base.path();
        let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
        format!(
            "host_id = {:?}\ncontrol_endpoints = [{}]\ndata_dir = {:?}\nruntime_dir = {:?}\n\
             image_dir = {:?}\nsystemd_bus = \"session\"\nheartbeat_interval_ms = 500\n\
             memory_reserve_mib = 0\n{}\n",
            self.name,
            list.join(", "),
            b.join("data").display().to_string(),
            b.join("run").display().to_string(),
            b.join("images").display().to_string(),
            if extra.contains("process_command") {
                extra.to_string()
            } else {
                format!("process_command = [\"/bin/sleep\", \"infinity\"]\n{extra}")
            }
        )
    }

    /// Writes the agent's config and starts `blixard-agent --config …` on the host. Its
    /// output goes to `agent.log` in the base directory (appended to across restarts).
    pub fn spawn_agent(&mut self, endpoints: &[String], extra: &str) -> anyhow::Result<()> {
        self.spawn_agent_with_env(endpoints, extra, &[])
    }

    /// [`SimHost::spawn_agent`] with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn spawn_agent_with_env(
        &mut self,
        endpoints: &[String],
        extra: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        if self.agent.is_some() {
            bail!("the agent of {} is already running", self.name);
        }
        fs::write(
            self.agent_config_path(),
            self.agent_config(endpoints, extra),
        )?;
        let log_path = self.base.path().join("agent.log");
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        self.agent_runs += 1;
        writeln!(log, "---- agent run {} ----", self.agent_runs)?;
        let mut args = vec![
            "--config".to_string(),
            self.agent_config_path().display().to_string(),
        ];
        if !self.agent_logs_to_journal {
            args.push("--log-stderr".into());
        }
        const RUST_LOG: &str = "info,blixard_agent=debug";
        if self.agent_as_unit {
            // As `units/blixard-agent.service` runs it, minus the hardening a user manager
            // cannot apply; no `Restart=`, so a killed agent stays down until respawned.
            let _ = self.systemctl(&["reset-failed", AGENT_UNIT]);
            let mut cmd = self.command("systemd-run")?;
            cmd.args(["--user", "--no-block", "--quiet", "--collect"])
                .arg(format!("--unit={AGENT_UNIT}"))
                .args(["--service-type=notify", "-p", "NotifyAccess=main"])
                .args(["-p", "KillMode=process", "-p", "TimeoutStopSec=30s"])
                .arg("-p")
                .arg(format!("StandardOutput=append:{}", log_path.display()))
                .arg("-p")
                .arg(format!("StandardError=append:{}", log_path.display()))
                .arg(format!("--setenv=RUST_LOG={RUST_LOG}"));
            for (k, v) in self
                .env()
                .into_iter()
                .chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            {
                cmd.arg(format!("--setenv={k}={v}"));
            }
            let out = cmd
                .arg("--")
                .arg(binary("blixard-agent"))
                .args(&args)
                .output()
                .context("running systemd-run for the agent")?;
            if !out.status.success() {
                bail!(
                    "systemd-run of the agent on {}: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            return Ok(());
        }
        let mut cmd = self.command(binary("blixard-agent"))?;
        cmd.args(&args)
            .env("RUST_LOG", RUST_LOG)
            .envs(env.iter().copied())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.agent = Some(cmd.spawn().context("starting blixard-agent")?);
        Ok(())
    }

    /// `systemctl --user ARGS…` on the host; its stdout.
    pub fn systemctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command("systemctl")?
            .arg("--user")
            .args(args)
            .output()
            .context("running systemctl")?;
        if !out.status.success() {
            bail!(
                "systemctl --user {} on {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The agent unit's `ActiveState` (`inactive` when it is not loaded).
    fn agent_unit_state(&self) -> String {
        self.systemctl(&["show", "-p", "ActiveState", "--value", AGENT_UNIT])
            .unwrap_or_default()
    }

    /// The agent's process id, if it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        if self.agent_as_unit {
            return self
                .systemctl(&["show", "-p", "MainPID", "--value", AGENT_UNIT])
                .ok()
                .and_then(|p| p.parse().ok())
                .filter(|&p| p != 0);
        }
        self.agent.as_ref().map(Child::id)
    }

    /// Whether the agent process has exited (and how).
    pub fn agent_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.agent
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILLs the agent (its VMs are systemd's and must survive).
    pub fn kill_agent(&mut self) -> anyhow::Result<()> {
        if self.agent_as_unit {
            // `KillMode=process`: only the agent's main process, as production's unit does.
            let _ = self.systemctl(&["kill", "--signal=SIGKILL", AGENT_UNIT]);
            let deadline = Instant::now() + START_DEADLINE;
            while matches!(
                self.agent_unit_state().as_str(),
                "active" | "activating" | "deactivating" | "reloading"
            ) {
                if Instant::now() > deadline {
                    bail!("the agent unit of {} did not stop after SIGKILL", self.name);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.systemctl(&["reset-failed", AGENT_UNIT]);
            return Ok(());
        }
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERMs the agent and waits for it to exit.
    pub async fn stop_agent(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.agent.take() else {
            bail!("no agent running")
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = wait::until("the agent to exit after SIGTERM", START_DEADLINE, || {
            let r = child.try_wait().map_err(|e| e.to_string());
            async move { r }
        })
        .await;
        if status.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// The agent's output so far.
    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.base.path().join("agent.log")).unwrap_or_default()
    }

    /// The manager's own output (errors of the start scripts).
    pub fn manager_log(&self) -> String {
        fs::read_to_string(self.base.path().join("manager.log")).unwrap_or_default()
    }

    fn unified(&self) -> Option<&Path> {
        self.hierarchies
            .iter()
            .find(|h| h.name == "unified")
            .map(|h| h.dir.as_path())
    }

    /// Kills every process of the host at once (manager, journald, bus, units, agent): a host
    /// crash. Waits until its cgroups are empty.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(dir) = self.unified() {
            if dir.join("cgroup.kill").exists() {
                fs::write(dir.join("cgroup.kill"), "1").context("writing cgroup.kill")?;
            }
        }
        let _ = self.manager.kill();
        let _ = self.manager.wait();
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.hierarchies.iter().any(|h| subtree_has_procs(&h.dir)) {
            if Instant::now() > deadline {
                bail!("host {} still has processes after cgroup.kill", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("dropping host {}: {e:#}", self.name);
        }
        for h in &self.hierarchies {
            remove_cgroup_tree(&h.dir);
        }
        if std::env::var_os("BLIXARD_KEEP_HOSTS").is_some() {
            // Keep the base directory (journal, agent.log) for a post-mortem.
            self.base.disable_cleanup(true);
            eprintln!("kept host {} at {}", self.name, self.base.path().display());
        }
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!("host name {name:?} must be a DNS label");
    }
    Ok(())
}

fn subtree_has_procs(dir: &Path) -> bool {
    if fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty()) {
        return true;
    }
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .any(|e| e.path().is_dir() && subtree_has_procs(&e.path()))
        })
        .unwrap_or(false)
}

/// Removes a cgroup directory and its children, deepest first (cgroupfs only allows rmdir of
/// empty cgroups; a just-killed cgroup can stay busy for a moment).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.filter_map(Result::ok) {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.exists() && fs::remove_dir(dir).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The manager's `SystemState` at a bus address.
pub async fn system_state(address: &str) -> anyhow::Result<String> {
    let conn = zbus::connection::Builder::address(address).build().await?;
    let value = get_property(
        &conn,
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "SystemState",
    )
    .await?;
    match &*value {
        zbus::Variant::Str(s) => Ok(s.to_string()),
        other => bail!("SystemState is {other:?}"),
    }
}

/// One property of an object of the host's manager.
pub async fn get_property(
    conn: &zbus::Connection,
    path: &str,
    interface: &str,
    property: &str,
) -> anyhow::Result<zbus::OwnedVariant> {
    let proxy = zbus::fdo::PropertiesProxy::builder(conn)
        .destination("org.freedesktop.systemd1")
        .path(path.to_string())
        .build()
        .await?;
    let iface = zbus::names::InterfaceName::try_from(interface.to_string())?;
    Ok(proxy.get(iface, property).await?)
}
