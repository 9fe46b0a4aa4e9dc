//! The systems under test, started by the benchmark itself on loopback: a 3-node Blixard
//! control plane (release `blixard-control` processes) and a 3-member etcd, each in a temporary
//! directory with free ports. Dropping either kills its processes with SIGKILL.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tempfile::TempDir;

/// A free loopback port (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A short-lived HTTP client for control requests of the benchmark itself (not the load).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap_or_else(|e| panic!("building an HTTP client: {e}"))
}

/// Resident set size and cumulative CPU time of a process, from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub cpu_ticks: u64,
}

pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("odd stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).context("utime")?;
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).context("stime")?;
    Ok(ProcSample {
        rss_kib,
        cpu_ticks: utime + stime,
    })
}

/// Clock ticks per second for `/proc/*/stat` (USER_HZ; 100 on every Linux we run on).
pub const TICKS_PER_SEC: f64 = 100.0;

/// RSS at the end and mean CPU use (percent of one core) of `pid` over `window`.
pub async fn footprint(pid: u32, window: Duration) -> anyhow::Result<(f64, f64)> {
    let a = sample(pid)?;
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let b = sample(pid)?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / TICKS_PER_SEC / secs * 100.0;
    Ok((b.rss_kib as f64 / 1024.0, cpu))
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One `blixard-control` process.
pub struct ControlProc {
    pub id: u64,
    pub url: String,
    listen: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A Blixard control plane of real processes.
pub struct BlixardCluster {
    _dir: TempDir,
    pub nodes: Vec<ControlProc>,
    initial: String,
    extra: Vec<String>,
    bin: PathBuf,
}

impl BlixardCluster {
    /// Starts `n` nodes with `extra` flags and waits until one leads and all agree.
    pub async fn start(bin_dir: &Path, n: usize, extra: &[String]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("blixard-bench-")
            .tempdir()?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let port = free_port()?;
            nodes.push(ControlProc {
                id,
                url: format!("http://127.0.0.1:{port}"),
                listen: format!("127.0.0.1:{port}"),
                data_dir: dir.path().join(format!("n{id}")),
                log: dir.path().join(format!("n{id}.log")),
                child: None,
            });
        }
        let initial = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.url))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = BlixardCluster {
            _dir: dir,
            nodes,
            initial,
            extra: extra.to_vec(),
            bin: bin_dir.join("blixard-control"),
        };
        if !c.bin.exists() {
            bail!(
                "{} is missing: run `cargo build --release --workspace --bins` (bench/setup.sh does)",
                c.bin.display()
            );
        }
        for i in 0..n {
            c.spawn(i)?;
        }
        c.wait_leader(Duration::from_secs(30)).await?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)?;
        let child = Command::new(&self.bin)
            .arg("--node-id")
            .arg(n.id.to_string())
            .arg("--listen")
            .arg(&n.listen)
            .arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--initial-cluster")
            .arg(&self.initial)
            .args(&self.extra)
            .env(
                "BLIXARD_LOG",
                std::env::var("BLIXARD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning blixard-control")?;
        n.child = Some(child);
        Ok(())
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// SIGKILLs node `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)
    }

    /// Node `i`'s whole log (appended to across its restarts).
    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// `GET /v1/cluster/status` of node `i`.
    pub async fn status(&self, i: usize) -> Option<Value> {
        let r = http()
            .get(format!("{}/v1/cluster/status", self.nodes[i].url))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// Waits until every running node names the same running leader; returns its index.
    pub async fn wait_leader(&self, deadline: Duration) -> anyhow::Result<usize> {
        let r = wait_for(
            "the control nodes to agree on a leader",
            deadline,
            || async {
                let mut leader = None;
                for i in 0..self.nodes.len() {
                    if !self.is_running(i) {
                        continue;
                    }
                    let l = self.status(i).await?.get("leader")?.as_u64()?;
                    if leader.is_some_and(|x| x != l) {
                        return None;
                    }
                    leader = Some(l);
                }
                leader
                    .and_then(|l| self.nodes.iter().position(|n| n.id == l))
                    .filter(|i| self.is_running(*i))
            },
        )
        .await;
        r.with_context(|| {
            let tail: Vec<String> = self
                .nodes
                .iter()
                .map(|n| {
                    let t = std::fs::read_to_string(&n.log).unwrap_or_default();
                    let lines: Vec<&str> = t.lines().collect();
                    format!(
                        "--- node {}:\n{}",
                        n.id,
                        lines[lines.len().saturating_sub(15)..].join("\n")
                    )
                })
                .collect();
            tail.join("\n")
        })
    }
}

impl Drop for BlixardCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::env::var_os("BLIXARD_BENCH_LOG").is_some() {
            for n in &self.nodes {
                let to = std::env::temp_dir().join(format!("blixard-bench-n{}.log", n.id));
                let _ = std::fs::copy(&n.log, &to);
                eprintln!("  node {} log kept in {}", n.id, to.display());
            }
        }
    }
}

/// A 3-member etcd on loopback with its default durability (fsync on every commit).
pub struct EtcdCluster {
    _dir: TempDir,
    pub client_urls: Vec<String>,
    children: Vec<Child>,
}

impl EtcdCluster {
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let etcd = which("etcd").context(
            "etcd is not installed: run bench/setup.sh (apt-get install etcd-server etcd-client)",
        )?;
        let dir = tempfile::Builder::new().prefix("etcd-bench-").tempdir()?;
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..n {
            peers.push(format!("http://127.0.0.1:{}", free_port()?));
            clients.push(format!("http://127.0.0.1:{}", free_port()?));
        }
        let initial = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("e{}={p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = Vec::new();
        for i in 0..n {
            let log = std::fs::File::create(dir.path().join(format!("e{}.log", i + 1)))?;
            let child = Command::new(&etcd)
                .arg("--name")
                .arg(format!("e{}", i + 1))
                .arg("--data-dir")
                .arg(dir.path().join(format!("e{}", i + 1)))
                .arg("--listen-client-urls")
                .arg(&clients[i])
                .arg("--advertise-client-urls")
                .arg(&clients[i])
                .arg("--listen-peer-urls")
                .arg(&peers[i])
                .arg("--initial-advertise-peer-urls")
                .arg(&peers[i])
                .arg("--initial-cluster")
                .arg(&initial)
                .arg("--initial-cluster-token")
                .arg("blixard-bench")
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--log-level")
                .arg("warn")
                .arg("--logger")
                .arg("zap")
                .env_remove("ETCD_DATA_DIR")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawning etcd")?;
            children.push(child);
        }
        let c = EtcdCluster {
            _dir: dir,
            client_urls: clients,
            children,
        };
        c.leader(Duration::from_secs(30)).await?;
        Ok(c)
    }

    /// The client URL of the current leader (every member must answer).
    pub async fn leader(&self, deadline: Duration) -> anyhow::Result<String> {
        wait_for("etcd to elect a leader", deadline, || async {
            let mut leader = None;
            let mut own = Vec::new();
            for u in &self.client_urls {
                let v: Value = http()
                    .post(format!("{u}/v3/maintenance/status"))
                    .body("{}")
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let l = v.get("leader")?.as_str()?.to_string();
                let me = v.get("header")?.get("member_id")?.as_str()?.to_string();
                if l == "0" || leader.as_ref().is_some_and(|x| *x != l) {
                    return None;
                }
                leader = Some(l);
                own.push(me);
            }
            let l = leader?;
            let i = own.iter().position(|m| *m == l)?;
            Some(self.client_urls[i].clone())
        })
        .await
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
