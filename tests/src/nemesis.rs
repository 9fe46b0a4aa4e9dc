//! What the two fault suites (`faults`, `hostfaults`) share: the seeded generator that makes a
//! run's choices replayable, the environment knobs, and waits on control nodes.

use std::time::Duration;

use crate::cluster::Cluster;
use crate::wait;

/// A small deterministic generator (xorshift64*), so a seed replays a run's choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `from..=to` milliseconds.
    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to.saturating_sub(from) + 1))
    }
}

/// A whole number from the environment variable `name`, if set and valid.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Waits until node `i` answers at all (so clients do not meet a refused connection).
pub async fn wait_answers(c: &Cluster, i: usize) -> anyhow::Result<()> {
    let client = c.node_client(i);
    wait::until(
        &format!("node {} to answer", i + 1),
        Duration::from_secs(30),
        || async { Ok(client.cluster_status().await.ok().map(|_| ())) },
    )
    .await
}

/// The index of the leader, as the first node that knows one sees it.
pub async fn leader(c: &Cluster) -> Option<usize> {
    for i in 0..c.nodes.len() {
        if let Some(s) = c.status(i).await {
            if let Some(l) = s.leader {
                return c.nodes.iter().position(|n| n.id == l);
            }
        }
    }
    None
}
