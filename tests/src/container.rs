//! A booted Debian system for the packaging tests: `systemd-nspawn` of a debootstrapped
//! rootfs with a real system manager as PID 1, a system bus and journald, so that
//! `dpkg -i`, `systemctl start` and `journalctl` are tested as a user would run them.
//!
//! How it boots (the test machines' PID 1 is not systemd and they have no system bus, so
//! the container brings its own):
//! - the rootfs is built once by `tests/ct/rootfs.sh` and cached (`$BLIXARD_CT_ROOTFS`,
//!   default `/var/cache/blixard-test/rootfs`); `--volatile=overlay` keeps it pristine;
//! - nspawn starts in its own cgroup (unified and `name=systemd` hierarchies), in a private
//!   mount namespace with a tmpfs on `/run/systemd`, so it writes nothing under the
//!   machine's own `/run/systemd`; `--register=no --keep-unit` because there is no host
//!   systemd to register with;
//! - `--private-network`: the container has only its own loopback. Everything a test runs
//!   (control plane, agent, CLI) runs inside, so no test traffic can leave the machine.
//!
//! Commands run inside with `nsenter` into the container's PID 1. Dropping a [`Container`]
//! kills whatever is left of it through its cgroup.

use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::Command;

use crate::wait;

/// The rootfs cache when `$BLIXARD_CT_ROOTFS` is not set.
pub const DEFAULT_ROOTFS: &str = "/var/cache/blixard-test/rootfs";

/// How long one command inside the container may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

const CGROUP_HIERARCHIES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"];

/// The workspace root (the parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

/// Fails, naming the setup script, unless every tool is on `PATH`.
pub fn require_tools(tools: &[&str]) -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing on PATH: {}; run tests/ct/setup.sh (as root) to install the packaging test prerequisites",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Fails unless the test runs as root (booting a container needs it).
pub fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("this test boots a systemd-nspawn container and must run as root");
    }
    Ok(())
}

/// The cache of the rootfs with QEMU when `$BLIXARD_CT_QEMU_ROOTFS` is not set.
pub const DEFAULT_QEMU_ROOTFS: &str = "/var/cache/blixard-test/rootfs-qemu";

/// The cached rootfs, built by `tests/ct/rootfs.sh` on first use or when the script's
/// stamp changed (~1-2 min; serialized by a lock, so parallel callers wait for one build).
pub async fn rootfs() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("BLIXARD_CT_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOTFS));
    build_rootfs(dir, "base").await
}

/// The same rootfs plus `qemu-system-x86` and `iproute2` (for the VM sandbox test), cached
/// apart from the plain one.
pub async fn rootfs_with_qemu() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("BLIXARD_CT_QEMU_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU_ROOTFS));
    build_rootfs(dir, "qemu").await
}

async fn build_rootfs(dir: PathBuf, flavor: &str) -> anyhow::Result<PathBuf> {
    // the script returns at once when the cache is current
    let script = workspace_root().join("tests/ct/rootfs.sh");
    let out = Command::new(&script)
        .arg(&dir)
        .arg(flavor)
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            script.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(dir)
}

/// The output of a command run inside the container.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A running container. Shut it down with [`Container::shutdown`]; dropping it kills it.
pub struct Container {
    name: String,
    nspawn: Child,
    init_pid: u32,
    cgroups: Vec<PathBuf>,
    console: PathBuf,
    _dir: tempfile::TempDir,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Container {
    /// Boots `rootfs` with `binds` (host path, container path) mounted read-only, and waits
    /// until its system manager reports `running` (or `degraded`).
    pub async fn boot(rootfs: &Path, binds: &[(&Path, &str)]) -> anyhow::Result<Container> {
        require_root()?;
        require_tools(&["systemd-nspawn", "unshare", "nsenter", "setsid"])?;
        let name = format!(
            "blixard-t{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new().prefix("blixard-ct-").tempdir()?;
        let console = dir.path().join("console.log");

        let mut cgroups = Vec::new();
        for h in CGROUP_HIERARCHIES {
            let cg = Path::new(h).join("blixard-test").join(&name);
            std::fs::create_dir_all(&cg)
                .with_context(|| format!("creating cgroup {}", cg.display()))?;
            cgroups.push(cg);
        }

        let mut nspawn_args: Vec<String> = vec![
            "systemd-nspawn".into(),
            "-q".into(),
            "-D".into(),
            rootfs.display().to_string(),
            "--boot".into(),
            "--register=no".into(),
            "--keep-unit".into(),
            format!("--machine={name}"),
            format!("--hostname={name}"),
            "--volatile=overlay".into(),
            "--private-network".into(),
            "--console=read-only".into(),
        ];
        for (host, inside) in binds {
            nspawn_args.push(format!("--bind-ro={}:{inside}", host.display()));
        }

        // sh joins the cgroups, then (same process) unshare → sh → systemd-nspawn: the
        // child's pid is nspawn's, and the container's PID 1 is its child.
        let script = r#"
            echo $$ > "$1/cgroup.procs" && echo $$ > "$2/cgroup.procs" || exit 1
            shift 2
            mkdir -p /run/systemd
            exec unshare --mount --propagation private -- \
              sh -c 'mount -t tmpfs tmpfs /run/systemd && exec "$@"' sh "$@"
        "#;
        let log = std::fs::File::create(&console)?;
        // setsid: no controlling terminal, or nspawn would write the console to the
        // terminal of `cargo test` instead of console.log (not a group leader: no fork,
        // the pid stays nspawn's)
        let nspawn = StdCommand::new("setsid")
            .arg("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&cgroups[0])
            .arg(&cgroups[1])
            .args(&nspawn_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning systemd-nspawn")?;

        let mut ct = Container {
            name,
            nspawn,
            init_pid: 0,
            cgroups,
            console,
            _dir: dir,
        };
        ct.init_pid = ct.wait_for_init().await?;
        ct.wait_booted().await?;
        Ok(ct)
    }

    /// The machine name (also its hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn wait_for_init(&mut self) -> anyhow::Result<u32> {
        let pid = self.nspawn.id();
        let children = format!("/proc/{pid}/task/{pid}/children");
        let mut exited = None;
        let res = wait::until("the container's PID 1", Duration::from_secs(30), || {
            let r = match self.nspawn.try_wait() {
                Ok(Some(status)) => {
                    exited = Some(status);
                    Err(format!("systemd-nspawn exited: {status}"))
                }
                _ => {
                    // nspawn forks short-lived helpers too: PID 1 is the child that
                    // became systemd (comm "systemd")
                    let text = std::fs::read_to_string(&children).unwrap_or_default();
                    Ok(text
                        .split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok())
                        .find(|p| {
                            std::fs::read_to_string(format!("/proc/{p}/comm"))
                                .is_ok_and(|c| c.trim() == "systemd")
                        }))
                }
            };
            async move { r }
        })
        .await;
        match (res, exited) {
            (Ok(pid), None) => Ok(pid),
            (res, _) => bail!(
                "{}; console:\n{}",
                res.err().map(|e| e.to_string()).unwrap_or_default(),
                self.console_tail()
            ),
        }
    }

    async fn wait_booted(&self) -> anyhow::Result<()> {
        let res = wait::until("the container to boot", Duration::from_secs(90), || async {
            let out = self
                .exec(&["systemctl", "is-system-running"])
                .await
                .map_err(|e| e.to_string())?;
            match out.stdout.trim() {
                "running" | "degraded" => Ok(Some(())),
                other => Err(format!("SystemState {other:?} {}", out.stderr.trim())),
            }
        })
        .await;
        res.map_err(|e| anyhow::anyhow!("{e}; console:\n{}", self.console_tail()))
    }

    /// Runs `argv` inside the container (all its namespaces) and returns its output,
    /// whatever the exit status.
    pub async fn exec(&self, argv: &[&str]) -> anyhow::Result<Output> {
        let pid = self.init_pid.to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &pid, "-a", "--", "env", "-i"])
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("LANG=C.UTF-8")
            .arg("SYSTEMD_PAGER=")
            .arg("SYSTEMD_COLORS=0")
            .args(argv)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(EXEC_TIMEOUT, cmd.output())
            .await
            .with_context(|| {
                format!("{argv:?} in the container took longer than {EXEC_TIMEOUT:?}")
            })?
            .with_context(|| format!("running nsenter for {argv:?}"))?;
        Ok(Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `argv` inside the container; fails unless it exits 0. Returns stdout.
    pub async fn run(&self, argv: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(argv).await?;
        if !out.success() {
            bail!(
                "`{}` in the container exited with {:?}\nstdout: {}\nstderr: {}",
                argv.join(" "),
                out.code,
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Runs a shell script inside the container; fails unless it exits 0. Returns stdout.
    pub async fn sh(&self, script: &str) -> anyhow::Result<String> {
        self.run(&["sh", "-ec", script]).await
    }

    /// Writes `contents` to `path` inside the container.
    pub async fn write_file(&self, path: &str, contents: &str) -> anyhow::Result<()> {
        let dir = Path::new(path)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "/".into());
        // the text goes in as an argument: no quoting of the contents needed
        self.run(&[
            "sh",
            "-ec",
            r#"mkdir -p "$1"; printf '%s' "$2" > "$3""#,
            "sh",
            &dir,
            contents,
            path,
        ])
        .await
        .map(|_| ())
    }

    /// `systemctl show -p PROP --value UNIT`.
    pub async fn unit_property(&self, unit: &str, prop: &str) -> anyhow::Result<String> {
        Ok(self
            .run(&["systemctl", "show", "-p", prop, "--value", unit])
            .await?
            .trim()
            .to_string())
    }

    /// What to attach to a failure: the last journal lines and the console.
    pub async fn diagnostics(&self) -> String {
        let journal = match self
            .exec(&[
                "journalctl",
                "-b",
                "--no-pager",
                "-n",
                "200",
                "-o",
                "short-monotonic",
            ])
            .await
        {
            Ok(o) => format!("{}{}", o.stdout, o.stderr),
            Err(e) => format!("(journal unavailable: {e})"),
        };
        format!(
            "--- container {} journal (last 200 lines) ---\n{journal}\n--- console (tail) ---\n{}",
            self.name,
            self.console_tail()
        )
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Powers the container off cleanly (SIGTERM to nspawn makes PID 1 shut down) and waits
    /// for it to exit.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.nspawn.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .context("signalling systemd-nspawn")?;
        let nspawn = &mut self.nspawn;
        wait::until(
            "the container to power off",
            Duration::from_secs(60),
            || {
                let r = match nspawn.try_wait() {
                    Ok(Some(_)) => Ok(Some(())),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e.to_string()),
                };
                async move { r }
            },
        )
        .await
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if matches!(self.nspawn.try_wait(), Ok(None)) {
            // cgroup.kill takes the whole tree, nspawn and everything in the container
            let kill = self.cgroups[0].join("cgroup.kill");
            if std::fs::write(&kill, "1").is_err() {
                let _ = self.nspawn.kill();
            }
            let _ = self.nspawn.wait();
        }
        // wait (bounded) for the cgroups to empty, then remove them deepest first
        for _ in 0..100 {
            let busy = self.cgroups.iter().any(|cg| {
                std::fs::read_to_string(cg.join("cgroup.procs"))
                    .map(|p| !p.trim().is_empty())
                    .unwrap_or(false)
            });
            if !busy {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for cg in &self.cgroups {
            remove_cgroup_tree(cg);
            if let Some(parent) = cg.parent() {
                let _ = std::fs::remove_dir(parent); // blixard-test/, if now empty
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
