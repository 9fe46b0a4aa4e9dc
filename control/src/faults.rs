//! Fault switches for tests: the set of peers this process must not talk to, a stall added
//! to every commit of the Raft log (a disk whose fsync is slow), and a point at which the
//! process dies at once (a power cut at a hard moment, when its disk loses what was not
//! synced: the power-cut tests run nodes on `blixard-lazyfs`).
//!
//! Only a node started with `--fault-injection` lets `POST /raft/faults` change them, so a
//! production node always has none. Outgoing Raft RPCs ([`crate::network`]) and forwards
//! to the leader ([`crate::node`]) to an isolated peer fail as if it were unreachable, before
//! anything is sent. A partition between A and B is B isolated on A and A on B; an empty set
//! heals. The set is process-wide and lives in memory only: a restarted node starts healed.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::RwLock;
use std::time::Duration;

/// Whether any peer is isolated (a lock-free fast path for every RPC).
static ACTIVE: AtomicBool = AtomicBool::new(false);
static ISOLATED: RwLock<BTreeSet<u64>> = RwLock::new(BTreeSet::new());
/// Milliseconds the log writer sleeps before each commit (0: none).
static FSYNC_STALL_MS: AtomicU64 = AtomicU64::new(0);

/// Where a node started with `--fault-injection` can be told to die (`std::process::abort`,
/// no clean-up, as kill -9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashPoint {
    /// A snapshot was encoded, before it is written.
    SnapshotBuild,
    /// A snapshot was written and synced, before openraft learns of it (and purges the log).
    SnapshotWritten,
    /// A log transaction holding a purge is about to commit.
    LogPurge,
    /// A log transaction holding a vote is about to commit.
    SaveVote,
    /// The leader ran a forwarded request and is about to answer the follower.
    ForwardAnswered,
}

const CRASH_POINTS: [CrashPoint; 5] = [
    CrashPoint::SnapshotBuild,
    CrashPoint::SnapshotWritten,
    CrashPoint::LogPurge,
    CrashPoint::SaveVote,
    CrashPoint::ForwardAnswered,
];

/// 0: none; otherwise 1 + the index of the point in [`CRASH_POINTS`].
static CRASH_AT: AtomicU8 = AtomicU8::new(0);

/// Sets the point at which this process dies (`None`: nowhere).
pub fn set_crash_point(point: Option<CrashPoint>) {
    let code = point
        .and_then(|p| CRASH_POINTS.iter().position(|c| *c == p))
        .map(|i| i as u8 + 1)
        .unwrap_or(0);
    CRASH_AT.store(code, Ordering::SeqCst);
}

/// The point at which this process dies, if one is set.
pub fn crash_point() -> Option<CrashPoint> {
    match CRASH_AT.load(Ordering::Relaxed) {
        0 => None,
        c => CRASH_POINTS.get(c as usize - 1).copied(),
    }
}

/// Dies at once if `point` is the crash point.
pub fn crash_if(point: CrashPoint) {
    if crash_point() == Some(point) {
        eprintln!("fault injection: dying at {point:?}");
        std::process::abort();
    }
}

/// Makes every commit of the Raft log take `ms` longer (0 ends the stall).
pub fn set_fsync_stall(ms: u64) {
    FSYNC_STALL_MS.store(ms, Ordering::SeqCst);
}

/// How long the log writer stalls before each commit.
pub fn fsync_stall() -> Duration {
    Duration::from_millis(FSYNC_STALL_MS.load(Ordering::Relaxed))
}

/// Replaces the set of isolated peers (empty heals every partition of this node).
pub fn set_isolated(peers: impl IntoIterator<Item = u64>) {
    let set: BTreeSet<u64> = peers.into_iter().collect();
    let mut guard = ISOLATED.write().unwrap_or_else(|e| e.into_inner());
    ACTIVE.store(!set.is_empty(), Ordering::SeqCst);
    *guard = set;
}

/// Whether traffic to `peer` must fail.
pub fn is_isolated(peer: u64) -> bool {
    ACTIVE.load(Ordering::Relaxed)
        && ISOLATED
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&peer)
}

/// The isolated peers, in order.
pub fn isolated() -> Vec<u64> {
    ISOLATED
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect()
}

/// The error a refused RPC reports.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} is isolated by fault injection")]
pub struct Isolated(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolate_and_heal() {
        set_isolated([2, 3]);
        assert!(is_isolated(2) && is_isolated(3) && !is_isolated(1));
        assert_eq!(isolated(), vec![2, 3]);
        set_isolated([]);
        assert!(!is_isolated(2));
        assert!(isolated().is_empty());
    }

    #[test]
    fn crash_points_round_trip() {
        for p in CRASH_POINTS {
            set_crash_point(Some(p));
            assert_eq!(crash_point(), Some(p));
        }
        set_crash_point(None);
        assert_eq!(crash_point(), None);
    }
}
