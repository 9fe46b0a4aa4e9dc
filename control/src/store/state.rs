//! The state machine in `state.db`: hosts, VMs, the applied log id, the membership and the
//! latest snapshot.
//!
//! The state is kept in memory for reads and scheduling, and written through to SQLite: each
//! applied batch is one transaction holding the changed rows, the applied log id and the
//! membership together, so after a crash the file is exactly the state at some applied index.
//! Nothing but [`crate::state_machine::apply`], run from here on committed entries, changes it.
//!
//! Applies commit with `synchronous=NORMAL` (WAL): a killed process loses nothing, and a
//! power loss can lose only the last applies, which Raft applies again from the log (the
//! state is a pure function of it). Snapshots are written with `synchronous=FULL`, which
//! makes every earlier apply durable too, before openraft may purge the log behind them: so
//! the log is never purged past what the synced state covers (ARCHITECTURE.md, invariants).

use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StoredMembership,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{read_err, write_err, StoreError};
use crate::raft_types::{Entry, Node, NodeId, TypeConfig};
use crate::state_machine::{apply, ClusterState, Response, Touched};

const MIGRATIONS: &[&str] = &["
    CREATE TABLE vms (name TEXT PRIMARY KEY, body BLOB NOT NULL);
    CREATE TABLE hosts (id TEXT PRIMARY KEY, body BLOB NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), meta BLOB NOT NULL, data BLOB NOT NULL);
", "
    CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, body BLOB NOT NULL);
"];

/// Durability of applies: recoverable from the log, so no fsync of their own.
const SYNC_APPLY: &str = "PRAGMA synchronous=NORMAL";
/// Durability of snapshots: synced, with every apply before them, before the log is purged.
const SYNC_SNAPSHOT: &str = "PRAGMA synchronous=FULL";

/// Runs `f` with `synchronous=FULL`, so its commit is on disk (and with it, the WAL frames of
/// every earlier commit) when it returns; then goes back to `NORMAL`.
fn synced<R>(
    conn: &mut Connection,
    f: impl FnOnce(&mut Connection) -> Result<R, StorageError<NodeId>>,
) -> Result<R, StorageError<NodeId>> {
    conn.execute_batch(SYNC_SNAPSHOT).map_err(write_err)?;
    let r = f(conn);
    conn.execute_batch(SYNC_APPLY).map_err(write_err)?;
    r
}

struct Applied {
    cluster: ClusterState,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

struct Shared {
    conn: Mutex<Connection>,
    applied: RwLock<Applied>,
    /// The last applied index, for long-polls and the scheduler.
    applied_tx: watch::Sender<u64>,
    snapshot_seq: AtomicU64,
}

/// The SQLite-backed state machine. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct StateStore {
    shared: Arc<Shared>,
}

#[derive(Debug, thiserror::Error)]
#[error("state store lock poisoned")]
struct Poisoned;

#[derive(Serialize, Deserialize)]
struct SnapshotData {
    cluster: ClusterState,
}

/// [`SnapshotData`]'s encoding, from a borrowed state.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    cluster: &'a ClusterState,
}

/// A snapshot's bytes: `state`'s rows (its derived fields are not encoded).
pub fn encode_snapshot(state: &ClusterState) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&SnapshotRef { cluster: state })
}

/// The state in a snapshot's bytes, its derived fields rebuilt as of log index `index`.
pub fn decode_snapshot(data: &[u8], index: u64) -> Result<ClusterState, serde_json::Error> {
    let mut cluster = serde_json::from_slice::<SnapshotData>(data)?.cluster;
    cluster.rebuild_derived(index);
    Ok(cluster)
}

fn decode<T: for<'de> Deserialize<'de>>(path: &str, b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Decode {
        path: path.to_string(),
        message: e.to_string(),
    })
}

impl StateStore {
    /// Opens `dir/state.db` and loads it into memory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("state.db");
        let p = path.display().to_string();
        let conn = super::open(&path, MIGRATIONS)?;
        let sql = |source| StoreError::Sql {
            path: p.clone(),
            source,
        };
        conn.execute_batch(SYNC_APPLY).map_err(sql)?;
        let mut cluster = ClusterState::default();
        {
            let mut stmt = conn.prepare("SELECT body FROM vms").map_err(sql)?;
            let rows = stmt
                .query_map([], |r| r.get::<_, Vec<u8>>(0))
                .map_err(sql)?;
            for row in rows {
                let vm: blixard_api::Vm = decode(&p, &row.map_err(sql)?)?;
                cluster.vms.insert(vm.spec.name.clone(), vm);
            }
            let mut stmt = conn.prepare("SELECT body FROM hosts").map_err(sql)?;
            let rows = stmt
                .query_map([], |r| r.get::<_, Vec<u8>>(0))
                .map_err(sql)?;
            for row in rows {
                let h: blixard_api::Host = decode(&p, &row.map_err(sql)?)?;
                cluster.hosts.insert(h.id.clone(), h);
            }
            let mut stmt = conn
                .prepare("SELECT key, body FROM idempotency_keys")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .map_err(sql)?;
            for row in rows {
                let (k, b) = row.map_err(sql)?;
                cluster.keys.insert(k, decode(&p, &b)?);
            }
        }
        let meta = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(|source| StoreError::Sql {
                    path: p.clone(),
                    source,
                })
        };
        let last_applied: Option<LogId<NodeId>> = match meta("last_applied")? {
            Some(b) => decode(&p, &b)?,
            None => None,
        };
        let membership: StoredMembership<NodeId, Node> = match meta("membership")? {
            Some(b) => decode(&p, &b)?,
            None => StoredMembership::default(),
        };
        let index = last_applied.map(|l| l.index).unwrap_or(0);
        cluster.rebuild_derived(index);
        let (applied_tx, _) = watch::channel(index);
        Ok(StateStore {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                applied: RwLock::new(Applied {
                    cluster,
                    last_applied,
                    membership,
                }),
                applied_tx,
                snapshot_seq: AtomicU64::new(0),
            }),
        })
    }

    /// Runs `f` over the current state.
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        match self.shared.applied.read() {
            Ok(g) => f(&g.cluster),
            Err(poisoned) => f(&poisoned.into_inner().cluster),
        }
    }

    /// Index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        *self.shared.applied_tx.borrow()
    }

    /// Watches the applied index.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StorageError<NodeId>> {
        self.shared.conn.lock().map_err(|_| write_err(Poisoned))
    }
}

fn put_meta<T: Serialize>(
    tx: &Transaction<'_>,
    key: &str,
    v: &T,
) -> Result<(), StorageError<NodeId>> {
    let b = serde_json::to_vec(v).map_err(write_err)?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, b],
    )
    .map_err(write_err)?;
    Ok(())
}

/// Writes `body` as row `key` of `table` (keyed by `column`), or deletes the row for `None`.
fn put_row<T: Serialize>(
    tx: &Transaction<'_>,
    table: &str,
    column: &str,
    key: &str,
    body: Option<&T>,
) -> Result<(), StorageError<NodeId>> {
    match body {
        Some(v) => {
            let b = serde_json::to_vec(v).map_err(write_err)?;
            tx.prepare_cached(&format!(
                "INSERT INTO {table} ({column}, body) VALUES (?1, ?2)
                 ON CONFLICT({column}) DO UPDATE SET body = excluded.body"
            ))
            .and_then(|mut s| s.execute(params![key, b]))
            .map_err(write_err)?;
        }
        None => {
            tx.prepare_cached(&format!("DELETE FROM {table} WHERE {column} = ?1"))
                .and_then(|mut s| s.execute([key]))
                .map_err(write_err)?;
        }
    }
    Ok(())
}

fn write_rows(
    tx: &Transaction<'_>,
    cluster: &ClusterState,
    touched: &Touched,
) -> Result<(), StorageError<NodeId>> {
    for name in &touched.vms {
        put_row(tx, "vms", "name", name, cluster.vms.get(name))?;
    }
    for k in &touched.keys {
        put_row(tx, "idempotency_keys", "key", k, cluster.keys.get(k))?;
    }
    for id in &touched.hosts {
        put_row(tx, "hosts", "id", id, cluster.hosts.get(id))?;
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Applies wait while the lock is held. The rows are encoded straight from the state
        // (the derived fields are not encoded): at 100,000 VMs that is about half the time a
        // copy of them would take (`blixard-bench --only size`).
        let (data, last_applied, membership) = {
            let g = self.shared.applied.read().map_err(|_| read_err(Poisoned))?;
            let data = encode_snapshot(&g.cluster).map_err(read_err)?;
            (data, g.last_applied, g.membership.clone())
        };
        let seq = self.shared.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!(
                "{}-{}-{}-{seq}",
                l.leader_id.term, l.leader_id.node_id, l.index
            ),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let meta_b = serde_json::to_vec(&meta).map_err(write_err)?;
        crate::faults::crash_if(crate::faults::CrashPoint::SnapshotBuild);
        {
            let mut conn = self.conn()?;
            synced(&mut conn, |conn| {
                conn.execute(
                    "INSERT OR REPLACE INTO snapshot (id, meta, data) VALUES (1, ?1, ?2)",
                    params![meta_b, data],
                )
                .map_err(write_err)
            })?;
        }
        crate::faults::crash_if(crate::faults::CrashPoint::SnapshotWritten);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let g = self.shared.applied.read().map_err(|_| read_err(Poisoned))?;
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let last_index;
        {
            let mut conn = self.conn()?;
            let tx = conn.transaction().map_err(write_err)?;
            let mut g = self
                .shared
                .applied
                .write()
                .map_err(|_| write_err(Poisoned))?;
            let mut touched = Touched::default();
            for entry in entries {
                g.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => responses.push(Response::None),
                    EntryPayload::Normal(cmd) => {
                        let (resp, t) = apply(&mut g.cluster, entry.log_id.index, &cmd);
                        touched.merge(t);
                        responses.push(resp);
                    }
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembership::new(Some(entry.log_id), m);
                        responses.push(Response::None);
                    }
                }
            }
            write_rows(&tx, &g.cluster, &touched)?;
            put_meta(&tx, "last_applied", &g.last_applied)?;
            put_meta(&tx, "membership", &g.membership)?;
            tx.commit().map_err(write_err)?;
            last_index = g.last_applied.map(|l| l.index).unwrap_or(0);
        }
        self.shared.applied_tx.send_replace(last_index);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        let cluster = decode_snapshot(&data, index).map_err(read_err)?;
        let meta_b = serde_json::to_vec(meta).map_err(write_err)?;
        {
            let mut conn = self.conn()?;
            conn.execute_batch(SYNC_SNAPSHOT).map_err(write_err)?;
            let tx = conn.transaction().map_err(write_err)?;
            tx.execute_batch("DELETE FROM vms; DELETE FROM hosts; DELETE FROM idempotency_keys;")
                .map_err(write_err)?;
            let all = Touched {
                vms: cluster.vms.keys().cloned().collect(),
                hosts: cluster.hosts.keys().cloned().collect(),
                keys: cluster.keys.keys().cloned().collect(),
            };
            write_rows(&tx, &cluster, &all)?;
            put_meta(&tx, "last_applied", &meta.last_log_id)?;
            put_meta(&tx, "membership", &meta.last_membership)?;
            tx.execute(
                "INSERT OR REPLACE INTO snapshot (id, meta, data) VALUES (1, ?1, ?2)",
                params![meta_b, data],
            )
            .map_err(write_err)?;
            tx.commit().map_err(write_err)?;
            conn.execute_batch(SYNC_APPLY).map_err(write_err)?;
            let mut g = self
                .shared
                .applied
                .write()
                .map_err(|_| write_err(Poisoned))?;
            *g = Applied {
                cluster,
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
        }
        self.shared.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let row: Option<(Vec<u8>, Vec<u8>)> = {
            let conn = self.conn()?;
            conn.query_row("SELECT meta, data FROM snapshot WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(read_err)?
        };
        match row {
            None => Ok(None),
            Some((m, d)) => {
                let meta = serde_json::from_slice(&m).map_err(read_err)?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(d)),
                }))
            }
        }
    }
}
