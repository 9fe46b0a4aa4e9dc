//! Real control-plane nodes for tests: `blixard-control` processes on loopback ports, each
//! with its own data directory, killed with SIGKILL and restarted on demand.

use std::net::TcpListener;
use std::path::PathBuf;
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
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            snapshot_every: 10_000,
        }
    }
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

/// A free loopback port (bound and released; the tiny race is acceptable in tests).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
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
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let port = free_port()?;
            nodes.push(NodeProc {
                id,
                url: format!("http://127.0.0.1:{port}"),
                listen: format!("127.0.0.1:{port}"),
                data_dir: dir.path().join(format!("n{id}")),
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
        n.child = Some(cmd.spawn().context("spawning blixard-control")?);
        Ok(())
    }

    /// Adds a node process started with `--join` (not yet a member: add it through the API).
    pub fn spawn_joiner(&mut self) -> anyhow::Result<usize> {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let port = free_port()?;
        self.nodes.push(NodeProc {
            id,
            url: format!("http://127.0.0.1:{port}"),
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
        Client::new(&self.endpoints()).unwrap_or_else(|e| panic!("client: {e}"))
    }

    /// A client of node `i` only.
    pub fn node_client(&self, i: usize) -> Client {
        Client::new(&[self.nodes[i].url.clone()]).unwrap_or_else(|e| panic!("client: {e}"))
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
    }
}
