//! Real control-plane nodes for tests: `blixard-control` processes on loopback ports, each
//! with its own data directory, killed with SIGKILL and restarted on demand.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use blixard_api::{Client, ClusterStatus};
use tempfile::TempDir;

use crate::binaries::binary;
use crate::wait;

/// Options of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub snapshot_every: u64,
    /// Bearer tokens and TLS (a fresh CA and certificate made with `openssl`).
    pub secure: bool,
    /// Start nodes with `--fault-injection`, so [`Cluster::set_isolated`] can partition them.
    pub fault_injection: bool,
    /// More flags for every node, e.g. `--host-ttl-ms 2000`.
    pub extra_args: Vec<String>,
    /// Data directories of the first nodes (e.g. on file systems the test mounted); the
    /// others get one in the cluster's temporary directory.
    pub data_dirs: Vec<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            snapshot_every: 10_000,
            secure: false,
            fault_injection: false,
            extra_args: vec![],
            data_dirs: vec![],
        }
    }
}

/// Token values a secure test cluster accepts.
pub const OPERATOR_TOKEN: &str = "operator-token-for-tests-0001";
pub const PEER_TOKEN: &str = "peer-token-for-tests-00000001";
/// `(host, token)` pairs of the agent token file.
pub const AGENT_TOKENS: &[(&str, &str)] = &[
    ("h1", "agent-token-h1-for-tests-0001"),
    ("h2", "agent-token-h2-for-tests-0001"),
];

/// Writes a CA and a certificate for 127.0.0.1 signed by it into `dir`.
fn make_certs(dir: &std::path::Path) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=blixard-test-ca",
    ]);
    run(&ca)?;
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&csr)?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ])?;
    Ok(())
}

/// One node process.
pub struct NodeProc {
    pub id: u64,
    pub url: String,
    pub listen: String,
    pub data_dir: PathBuf,
    log: PathBuf,
    join: bool,
    child: Option<Child>,
}

/// A cluster of real control nodes. Dropping it kills every node.
pub struct Cluster {
    dir: TempDir,
    pub nodes: Vec<NodeProc>,
    initial: String,
    opts: ClusterOptions,
}

/// Where [`free_port`] keeps the last port it handed out, shared by every test process.
const PORT_COUNTER: &str = "/tmp/blixard-test-ports";
/// Test nodes' ports: below the kernel's ephemeral range (32768 and up by default), so no
/// `bind(0)` or outgoing connection of another process can take a node's port while the node
/// is down for a restart (a port from `bind(0)` could be, and a concurrent test's node then
/// answered in its place).
const TEST_PORTS: std::ops::Range<u32> = 20_000..32_000;

/// A free loopback port for a control node, never handed out twice within 12,000 calls on
/// this machine: the next of [`TEST_PORTS`] after the last one any test process took (under
/// a lock on [`PORT_COUNTER`]) that is free to bind now.
pub fn free_port() -> anyhow::Result<u16> {
    use std::io::{Read, Seek, Write};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(PORT_COUNTER)?;
    let mut f = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {PORT_COUNTER}: {e}"))?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    let mut n: u32 = text.trim().parse().unwrap_or(0);
    let span = TEST_PORTS.end - TEST_PORTS.start;
    for _ in 0..span {
        n = (n + 1) % span;
        let port = u16::try_from(TEST_PORTS.start + n)?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            f.set_len(0)?;
            f.rewind()?;
            write!(f, "{n}")?;
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {TEST_PORTS:?}")
}

impl Cluster {
    /// Starts `n` nodes forming one cluster and waits until every node sees the same leader.
    pub async fn start(n: usize) -> anyhow::Result<Cluster> {
        Self::start_with(n, ClusterOptions::default()).await
    }

    pub async fn start_with(n: usize, opts: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("blixard-cluster-")
            .tempdir()?;
        if opts.secure {
            make_certs(dir.path())?;
            std::fs::write(dir.path().join("operators"), format!("{OPERATOR_TOKEN}\n"))?;
            std::fs::write(dir.path().join("peer"), format!("{PEER_TOKEN}\n"))?;
            let agents: String = AGENT_TOKENS
                .iter()
                .map(|(h, t)| format!("{h} {t}\n"))
                .collect();
            std::fs::write(dir.path().join("agents"), agents)?;
        }
        let scheme = if opts.secure { "https" } else { "http" };
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let port = free_port()?;
            nodes.push(NodeProc {
                id,
                url: format!("{scheme}://127.0.0.1:{port}"),
                listen: format!("127.0.0.1:{port}"),
                data_dir: opts
                    .data_dirs
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| dir.path().join(format!("n{id}"))),
                log: dir.path().join(format!("n{id}.log")),
                join: false,
                child: None,
            });
        }
        let initial = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.url))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            nodes,
            initial,
            opts,
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        c.wait_converged(Duration::from_secs(30)).await?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)?;
        let mut cmd = Command::new(binary("blixard-control"));
        cmd.arg("--node-id")
            .arg(n.id.to_string())
            .arg("--listen")
            .arg(&n.listen)
            .arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--snapshot-every")
            .arg(self.opts.snapshot_every.to_string())
            .env("BLIXARD_LOG", "info,openraft=warn")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if n.join {
            cmd.arg("--join");
        } else {
            cmd.arg("--initial-cluster").arg(&self.initial);
        }
        cmd.args(&self.opts.extra_args);
        if self.opts.fault_injection {
            cmd.arg("--fault-injection");
        }
        if self.opts.secure {
            let d = self.dir.path();
            cmd.arg("--operator-token-file").arg(d.join("operators"));
            cmd.arg("--agent-token-file").arg(d.join("agents"));
            cmd.arg("--peer-token-file").arg(d.join("peer"));
            cmd.arg("--tls-cert-file").arg(d.join("node.pem"));
            cmd.arg("--tls-key-file").arg(d.join("node.key"));
            cmd.arg("--tls-ca-file").arg(d.join("ca.pem"));
        }
        n.child = Some(cmd.spawn().context("spawning blixard-control")?);
        Ok(())
    }

    /// Adds a node process started with `--join` (not yet a member: add it through the API).
    pub fn spawn_joiner(&mut self) -> anyhow::Result<usize> {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let port = free_port()?;
        let scheme = if self.opts.secure { "https" } else { "http" };
        self.nodes.push(NodeProc {
            id,
            url: format!("{scheme}://127.0.0.1:{port}"),
            listen: format!("127.0.0.1:{port}"),
            data_dir: self.dir.path().join(format!("n{id}")),
            log: self.dir.path().join(format!("n{id}.log")),
            join: true,
            child: None,
        });
        let i = self.nodes.len() - 1;
        self.spawn(i)?;
        Ok(i)
    }

    /// Every node's URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// A client over every node.
    pub fn client(&self) -> Client {
        self.client_with(
            &self.endpoints(),
            self.opts.secure.then_some(OPERATOR_TOKEN),
        )
    }

    /// A client of node `i` only (an operator's, on a secure cluster).
    pub fn node_client(&self, i: usize) -> Client {
        self.client_with(
            &[self.nodes[i].url.clone()],
            self.opts.secure.then_some(OPERATOR_TOKEN),
        )
    }

    /// The CA file of a secure cluster.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.opts.secure.then(|| self.dir.path().join("ca.pem"))
    }

    /// `n` nodes with TLS and tokens ([`ClusterOptions::secure`]), and the CA file that
    /// agents and clients trust.
    pub async fn start_secure(n: usize) -> anyhow::Result<(Cluster, PathBuf)> {
        let c = Cluster::start_with(
            n,
            ClusterOptions {
                secure: true,
                ..ClusterOptions::default()
            },
        )
        .await?;
        let ca = c
            .ca_file()
            .ok_or_else(|| anyhow::anyhow!("a secure cluster has a CA"))?;
        Ok((c, ca))
    }

    /// A client over `endpoints` with this cluster's CA and the given token.
    pub fn client_with(&self, endpoints: &[String], token: Option<&str>) -> Client {
        Client::with_ca(endpoints, self.ca_file().as_deref())
            .unwrap_or_else(|e| panic!("client: {e}"))
            .with_bearer(token.map(str::to_string))
    }

    /// Makes node `i` refuse all Raft traffic to `peers` (node ids; empty heals), through
    /// `POST /raft/faults` with the peer token. Needs [`ClusterOptions::fault_injection`]. A
    /// partition between A and B is B isolated on A and A on B; a restart heals a node. Ends
    /// any fsync stall on that node (the body replaces every switch).
    pub async fn set_isolated(&self, i: usize, peers: &[u64]) -> anyhow::Result<()> {
        self.set_faults(i, peers, 0).await
    }

    /// Sets node `i`'s fault switches: the peers it must not talk to, and milliseconds added
    /// to every commit of its Raft log (a disk with a slow fsync). Replaces the previous ones.
    pub async fn set_faults(
        &self,
        i: usize,
        isolate: &[u64],
        fsync_stall_ms: u64,
    ) -> anyhow::Result<()> {
        self.post_faults(
            i,
            serde_json::json!({ "isolate": isolate, "fsync_stall_ms": fsync_stall_ms }),
        )
        .await
    }

    /// Makes node `i` die at once when it reaches `point` (`snapshot_build`,
    /// `snapshot_written`, `log_purge`, `save_vote`, `forward_answered`; see `blixard_control::faults`), with no
    /// other fault switch set.
    pub async fn set_crash_point(&self, i: usize, point: &str) -> anyhow::Result<()> {
        self.post_faults(i, serde_json::json!({ "crash_at": point }))
            .await
    }

    async fn post_faults(&self, i: usize, body: serde_json::Value) -> anyhow::Result<()> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(5));
        if let Some(ca) = self.ca_file() {
            b = blixard_api::tls::trust_only(b, &ca)?;
        }
        let url = format!("{}/raft/faults", self.nodes[i].url);
        let mut req = b.build()?.post(&url).json(&body);
        if self.opts.secure {
            req = req.bearer_auth(PEER_TOKEN);
        }
        let resp = req.send().await.with_context(|| format!("POST {url}"))?;
        anyhow::ensure!(resp.status().is_success(), "{url}: HTTP {}", resp.status());
        Ok(())
    }

    /// Kills node `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts node `i` with its data directory.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)
    }

    /// Makes node `i` start with `--join` (no initial membership) from its next start on, as
    /// a node rebuilt from an empty data directory does.
    pub fn set_join(&mut self, i: usize, join: bool) {
        self.nodes[i].join = join;
    }

    /// Waits for node `i`'s process to exit on its own (e.g. refusing to start) and returns
    /// its exit status; `None` if it is still running after `deadline` or was not started.
    pub async fn wait_exit(
        &mut self,
        i: usize,
        deadline: Duration,
    ) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let status = self.nodes[i].child.as_mut()?.try_wait().ok().flatten();
            if let Some(s) = status {
                self.nodes[i].child = None;
                return Some(s);
            }
            if start.elapsed() > deadline {
                return None;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Node `i`'s whole log.
    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// The last lines of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Status of node `i`, if it answers.
    pub async fn status(&self, i: usize) -> Option<ClusterStatus> {
        self.node_client(i).cluster_status().await.ok()
    }

    /// Waits until every running node reports the same leader, and returns its index.
    pub async fn wait_converged(&self, deadline: Duration) -> anyhow::Result<usize> {
        let start = Instant::now();
        let r = wait::until("every node to agree on a leader", deadline, || async {
            let mut leader = None;
            for i in 0..self.nodes.len() {
                if !self.is_running(i) {
                    continue;
                }
                let s = self
                    .status(i)
                    .await
                    .ok_or(format!("node {} not answering", i + 1))?;
                let l = s.leader.ok_or(format!("node {} has no leader", i + 1))?;
                if leader.is_some_and(|x| x != l) {
                    return Err(format!("nodes disagree on the leader ({leader:?} vs {l})"));
                }
                leader = Some(l);
            }
            // A killed node may still be named leader until the others notice.
            Ok(leader
                .and_then(|l| self.nodes.iter().position(|n| n.id == l))
                .filter(|i| self.is_running(*i)))
        })
        .await;
        match r {
            Ok(i) => {
                eprintln!("cluster converged in {:?}", start.elapsed());
                Ok(i)
            }
            Err(e) => {
                let logs: Vec<String> = (0..self.nodes.len())
                    .map(|i| format!("--- node {}:\n{}", i + 1, self.log_tail(i)))
                    .collect();
                Err(e.context(logs.join("\n")))
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::env::var_os("BLIXARD_KEEP_HOSTS").is_some() {
            // Keep the nodes' logs and data for a post-mortem, as the hosts' are kept.
            self.dir.disable_cleanup(true);
            eprintln!("kept cluster at {}", self.dir.path().display());
        }
    }
}

/// Writes `host`'s agent token (one of [`AGENT_TOKENS`]) to `path`, as an agent's
/// `token_file` reads it, and returns it.
pub fn write_agent_token(host: &str, path: &Path) -> anyhow::Result<&'static str> {
    let (_, token) = AGENT_TOKENS
        .iter()
        .find(|(h, _)| *h == host)
        .ok_or_else(|| anyhow::anyhow!("no agent token for {host}"))?;
    std::fs::write(path, format!("{token}\n"))?;
    Ok(token)
}
