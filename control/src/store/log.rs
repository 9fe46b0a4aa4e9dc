//! The Raft log, vote and committed id in `raft-log.db`.
//!
//! Every entry is one row keyed by its index; the whole log id (term, leader node, index) is
//! stored inside the encoded entry. `purge` records `last_purged` in the same transaction as
//! the delete.
//!
//! Writes go through one writer thread that owns the write connection (group commit): it
//! takes every request queued since its last commit (appends, the vote, the committed id, a
//! truncation or purge) and commits them as one transaction, with `synchronous=FULL`, so one
//! fsync covers them all. `append` returns as soon as its entries are queued and readable;
//! openraft's flush callback fires only after the transaction holding them committed, so an
//! acknowledged entry is on disk. `save_vote`, `truncate` and `purge` wait for their commit.
//! The committed id is optional state in openraft (it is re-learned from the leader and the
//! applied index after a crash), so it is written with the next transaction rather than
//! costing an fsync of its own.
//!
//! Readers (replication, the state machine) are served from an in-memory tail of the log:
//! every entry not yet on disk plus the most recent flushed ones, contiguous up to the last
//! index. Older entries come from SQLite through a separate read connection (WAL lets it read
//! while the writer commits), so replication never waits behind an fsync.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use super::{read_err, write_err, StoreError};
use crate::raft_types::{NodeId, TypeConfig};

const MIGRATIONS: &[&str] = &["
    CREATE TABLE log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"];

/// Most entries the in-memory tail keeps once they are on disk.
const TAIL_MAX_ENTRIES: usize = 8_192;
/// Most encoded bytes the in-memory tail keeps once they are on disk.
const TAIL_MAX_BYTES: usize = 32 * 1024 * 1024;
/// Most requests folded into one transaction.
const MAX_BATCH: usize = 4_096;
/// An unwritten committed id is written after this much idleness.
const IDLE_FLUSH: Duration = Duration::from_millis(500);

/// The SQLite-backed Raft log. Cheap to clone: clones share one writer and one tail.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// To the writer thread; `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    read: Mutex<Connection>,
    tail: Arc<Mutex<Tail>>,
    /// The latest committed id handed to `save_committed` (maybe not yet on disk).
    committed: Mutex<Option<Option<LogId<NodeId>>>>,
}

/// The newest entries, contiguous: `entries` holds every index from its first key to the last
/// log index. Entries above `flushed` may not be on disk yet and are never evicted.
#[derive(Default)]
struct Tail {
    entries: BTreeMap<u64, (Entry<TypeConfig>, usize)>,
    bytes: usize,
    flushed: u64,
}

impl Tail {
    fn evict(&mut self) {
        while self.entries.len() > TAIL_MAX_ENTRIES || self.bytes > TAIL_MAX_BYTES {
            let Some((&first, _)) = self.entries.first_key_value() else {
                break;
            };
            if first > self.flushed {
                break;
            }
            if let Some((_, size)) = self.entries.remove(&first) {
                self.bytes -= size;
            }
        }
    }

    fn remove_from(&mut self, index: u64) {
        for (_, (_, size)) in self.entries.split_off(&index) {
            self.bytes -= size;
        }
        self.flushed = self.flushed.min(index.saturating_sub(1));
    }

    fn remove_upto(&mut self, index: u64) {
        let keep = self.entries.split_off(&(index.saturating_add(1)));
        for (_, (_, size)) in std::mem::replace(&mut self.entries, keep) {
            self.bytes -= size;
        }
    }
}

type Reply = oneshot::Sender<Result<(), String>>;

/// A request to the writer thread.
enum Job {
    Append {
        rows: Vec<(i64, Vec<u8>)>,
        /// The last entry's log id: once committed, the tail may evict up to it.
        last: LogId<NodeId>,
        done: LogFlushed<TypeConfig>,
    },
    Meta {
        key: &'static str,
        value: Vec<u8>,
        /// `None`: no one waits, and the write needs no fsync of its own.
        reply: Option<Reply>,
    },
    Truncate {
        since: i64,
        reply: Reply,
    },
    Purge {
        upto: i64,
        value: Vec<u8>,
        reply: Reply,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("log store lock poisoned")]
struct Poisoned;

#[derive(Debug, thiserror::Error)]
#[error("log writer: {0}")]
struct WriterError(String);

impl LogStore {
    /// Opens `dir/raft-log.db` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("raft-log.db");
        let write = super::open(&path, MIGRATIONS)?;
        let read = super::open(&path, MIGRATIONS)?;
        let (tx, rx) = mpsc::channel();
        let tail = Arc::new(Mutex::new(Tail::default()));
        let writer_tail = tail.clone();
        let writer = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer_loop(write, rx, writer_tail))
            .map_err(|e| StoreError::Decode {
                path: path.display().to_string(),
                message: format!("cannot start the log writer thread: {e}"),
            })?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                jobs: Some(tx),
                writer: Some(writer),
                read: Mutex::new(read),
                tail,
                committed: Mutex::new(None),
            }),
        })
    }

    fn read_conn(&self) -> Result<MutexGuard<'_, Connection>, StorageError<NodeId>> {
        self.inner.read.lock().map_err(|_| read_err(Poisoned))
    }

    fn tail(&self) -> Result<MutexGuard<'_, Tail>, StorageError<NodeId>> {
        self.inner.tail.lock().map_err(|_| write_err(Poisoned))
    }

    fn send(&self, job: Job) -> Result<(), StorageError<NodeId>> {
        self.inner
            .jobs
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| write_err(WriterError("the writer thread is gone".into())))
    }

    /// Queues `job` (built around a reply channel) and waits until its transaction committed.
    async fn send_wait(&self, job: impl FnOnce(Reply) -> Job) -> Result<(), StorageError<NodeId>> {
        let (tx, rx) = oneshot::channel();
        self.send(job(tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(write_err(WriterError(e))),
            Err(_) => Err(write_err(WriterError("the writer thread is gone".into()))),
        }
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError<NodeId>> {
        let conn = self.read_conn()?;
        let raw: Option<Vec<u8>> = conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(read_err)?;
        match raw {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(read_err),
        }
    }

    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError<NodeId>> {
        serde_json::to_vec(value).map_err(write_err)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its last transaction; wait for it so the
        // file is closed when the store is gone.
        self.jobs.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The writer thread: one transaction per batch of queued jobs.
fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Job>, tail: Arc<Mutex<Tail>>) {
    // A committed id waiting for the next transaction.
    let mut lazy: Option<Vec<u8>> = None;
    loop {
        let first = match rx.recv_timeout(IDLE_FLUSH) {
            Ok(j) => j,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(v) = lazy.take() {
                    if let Err(e) = write_lazy(&mut conn, &v) {
                        tracing::warn!(error = %e, "writing the committed log id");
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Only lazy writes: keep them for a later transaction.
        if jobs
            .iter()
            .all(|j| matches!(j, Job::Meta { reply: None, .. }))
        {
            for j in jobs {
                if let Job::Meta { value, .. } = j {
                    lazy = Some(value);
                }
            }
            continue;
        }
        let stall = crate::faults::fsync_stall();
        if !stall.is_zero() {
            // Fault injection: a disk whose fsync takes this long.
            std::thread::sleep(stall);
        }
        let res = write_batch(&mut conn, &jobs, lazy.take()).map_err(|e| e.to_string());
        if res.is_ok() {
            if let Ok(mut t) = tail.lock() {
                for j in &jobs {
                    if let Job::Append { last, .. } = j {
                        // Unless truncated meanwhile, everything up to `last` is on disk.
                        if t.entries
                            .get(&last.index)
                            .is_some_and(|(e, _)| e.log_id == *last)
                        {
                            t.flushed = t.flushed.max(last.index);
                        }
                    }
                }
                t.evict();
            }
        }
        for j in jobs {
            match j {
                Job::Append { done, .. } => {
                    done.log_io_completed(res.clone().map_err(std::io::Error::other))
                }
                Job::Meta { reply, .. } => {
                    if let Some(r) = reply {
                        let _ = r.send(res.clone());
                    }
                }
                Job::Truncate { reply, .. } | Job::Purge { reply, .. } => {
                    let _ = reply.send(res.clone());
                }
            }
        }
    }
    if let Some(v) = lazy {
        let _ = write_lazy(&mut conn, &v);
    }
}

fn put_meta(tx: &Transaction<'_>, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

fn write_lazy(conn: &mut Connection, committed: &[u8]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    put_meta(&tx, "committed", committed)?;
    tx.commit()
}

fn write_batch(conn: &mut Connection, jobs: &[Job], lazy: Option<Vec<u8>>) -> rusqlite::Result<()> {
    use crate::faults::{crash_if, CrashPoint};
    let tx = conn.transaction()?;
    if let Some(v) = lazy {
        put_meta(&tx, "committed", &v)?;
    }
    for j in jobs {
        match j {
            Job::Append { rows, .. } => {
                let mut stmt =
                    tx.prepare_cached("INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)")?;
                for (idx, b) in rows {
                    stmt.execute(params![idx, b])?;
                }
            }
            Job::Meta { key, value, .. } => put_meta(&tx, key, value)?,
            Job::Truncate { since, .. } => {
                tx.prepare_cached("DELETE FROM log WHERE idx >= ?1")?
                    .execute([since])?;
            }
            Job::Purge { upto, value, .. } => {
                put_meta(&tx, "last_purged", value)?;
                tx.prepare_cached("DELETE FROM log WHERE idx <= ?1")?
                    .execute([upto])?;
            }
        }
    }
    for j in jobs {
        match j {
            Job::Purge { .. } => crash_if(CrashPoint::LogPurge),
            Job::Meta { key: "vote", .. } => crash_if(CrashPoint::SaveVote),
            _ => {}
        }
    }
    tx.commit()
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start.min(i64::MAX as u64), end.min(i64::MAX as u64))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (start, end) = bounds(&range);
        if start >= end {
            return Ok(Vec::new());
        }
        // The tail first: what it holds is the truth for its indexes.
        let (first_cached, cached): (u64, Vec<Entry<TypeConfig>>) = {
            let tail = self.tail()?;
            let first = tail
                .entries
                .first_key_value()
                .map(|(k, _)| *k)
                .unwrap_or(u64::MAX);
            let from = start.max(first);
            let cached = if from < end {
                tail.entries
                    .range(from..end)
                    .map(|(_, (e, _))| e.clone())
                    .collect()
            } else {
                Vec::new()
            };
            (first, cached)
        };
        let db_end = end.min(first_cached);
        let mut out = Vec::new();
        if start < db_end {
            let conn = self.read_conn()?;
            let mut stmt = conn
                .prepare_cached("SELECT entry FROM log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")
                .map_err(read_err)?;
            let rows = stmt
                .query_map(params![start as i64, db_end as i64], |r| {
                    r.get::<_, Vec<u8>>(0)
                })
                .map_err(read_err)?;
            for row in rows {
                let b = row.map_err(read_err)?;
                out.push(serde_json::from_slice(&b).map_err(read_err)?);
            }
        }
        out.extend(cached);
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let cached = self
            .tail()?
            .entries
            .last_key_value()
            .map(|(_, (e, _))| e.log_id);
        let last_log_id = match cached {
            Some(id) => Some(id),
            None => {
                let last: Option<Vec<u8>> = {
                    let conn = self.read_conn()?;
                    conn.query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(read_err)?
                };
                match last {
                    Some(b) => {
                        let e: Entry<TypeConfig> = serde_json::from_slice(&b).map_err(read_err)?;
                        Some(e.log_id)
                    }
                    None => last_purged,
                }
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let value = Self::encode(vote)?;
        self.send_wait(|reply| Job::Meta {
            key: "vote",
            value,
            reply: Some(reply),
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta("vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let value = Self::encode(&committed)?;
        *self
            .inner
            .committed
            .lock()
            .map_err(|_| write_err(Poisoned))? = Some(committed);
        self.send(Job::Meta {
            key: "committed",
            value,
            reply: None,
        })
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let known = *self
            .inner
            .committed
            .lock()
            .map_err(|_| read_err(Poisoned))?;
        match known {
            Some(c) => Ok(c),
            None => Ok(self
                .get_meta::<Option<LogId<NodeId>>>("committed")?
                .flatten()),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        let mut cached = Vec::new();
        for e in entries {
            let b = Self::encode(&e)?;
            rows.push((e.log_id.index as i64, b.clone()));
            cached.push((e.log_id.index, e, b.len()));
        }
        let Some(last) = cached.last().map(|(_, e, _)| e.log_id) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        {
            let mut tail = self.tail()?;
            for (index, e, size) in cached {
                if let Some((_, old)) = tail.entries.insert(index, (e, size)) {
                    tail.bytes -= old;
                }
                tail.bytes += size;
            }
        }
        self.send(Job::Append {
            rows,
            last,
            done: callback,
        })
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.tail()?.remove_from(log_id.index);
        self.send_wait(|reply| Job::Truncate {
            since: log_id.index as i64,
            reply,
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let value = Self::encode(&log_id)?;
        self.tail()?.remove_upto(log_id.index);
        self.send_wait(|reply| Job::Purge {
            upto: log_id.index as i64,
            value,
            reply,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_bounds() {
        assert_eq!(bounds(&(3..7)), (3, 7));
        assert_eq!(bounds(&(3..=7)), (3, 8));
        assert_eq!(bounds(&(..)), (0, i64::MAX as u64));
        assert_eq!(bounds(&(5..)), (5, i64::MAX as u64));
    }
}
