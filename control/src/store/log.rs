//! The Raft log, vote and committed id in `raft-log.db`.
//!
//! Every entry is one row keyed by its index; the whole log id (term, leader node, index) is
//! stored inside the encoded entry. `append` commits one transaction for the whole batch
//! openraft hands over (group commit) and reports the flush only after the commit returned, so
//! an acknowledged entry is on disk. `purge` records `last_purged` in the same transaction as
//! the delete.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{read_err, write_err, StoreError};
use crate::raft_types::{NodeId, TypeConfig};

const MIGRATIONS: &[&str] = &["
    CREATE TABLE log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"];

/// The SQLite-backed Raft log. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct LogStore {
    conn: Arc<Mutex<Connection>>,
}

#[derive(Debug, thiserror::Error)]
#[error("log store lock poisoned")]
struct Poisoned;

impl LogStore {
    /// Opens `dir/raft-log.db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let conn = super::open(&dir.join("raft-log.db"), MIGRATIONS)?;
        Ok(LogStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StorageError<NodeId>> {
        self.conn.lock().map_err(|_| read_err(Poisoned))
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError<NodeId>> {
        let conn = self.conn()?;
        let raw: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(read_err)?;
        match raw {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(read_err),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError<NodeId>> {
        let b = serde_json::to_vec(value).map_err(write_err)?;
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, b],
        )
        .map_err(write_err)?;
        Ok(())
    }

    fn write_batch(&self, entries: &[Entry<TypeConfig>]) -> Result<(), rusqlite::Error> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| rusqlite::Error::InvalidParameterName("log store lock poisoned".into()))?;
        let tx = conn.transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)")?;
            for e in entries {
                let b = serde_json::to_vec(e)
                    .map_err(|err| rusqlite::Error::ToSqlConversionFailure(Box::new(err)))?;
                stmt.execute(params![e.log_id.index as i64, b])?;
            }
        }
        tx.commit()
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (i64, i64) {
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
    (
        start.min(i64::MAX as u64) as i64,
        end.min(i64::MAX as u64) as i64,
    )
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (start, end) = bounds(&range);
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached("SELECT entry FROM log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")
            .map_err(read_err)?;
        let rows = stmt
            .query_map(params![start, end], |r| r.get::<_, Vec<u8>>(0))
            .map_err(read_err)?;
        let mut out = Vec::new();
        for row in rows {
            let b = row.map_err(read_err)?;
            out.push(serde_json::from_slice(&b).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let last: Option<Vec<u8>> = {
            let conn = self.conn()?;
            conn.query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(read_err)?
        };
        let last_log_id = match last {
            Some(b) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(&b).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged,
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
        self.put_meta("vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta("vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.put_meta("committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
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
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        match self.write_batch(&entries) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let conn = self.conn()?;
        conn.execute("DELETE FROM log WHERE idx >= ?1", [log_id.index as i64])
            .map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let b = serde_json::to_vec(&log_id).map_err(write_err)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(write_err)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('last_purged', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [b],
        )
        .map_err(write_err)?;
        tx.execute("DELETE FROM log WHERE idx <= ?1", [log_id.index as i64])
            .map_err(write_err)?;
        tx.commit().map_err(write_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_bounds() {
        assert_eq!(bounds(&(3..7)), (3, 7));
        assert_eq!(bounds(&(3..=7)), (3, 8));
        assert_eq!(bounds(&(..)), (0, i64::MAX));
        assert_eq!(bounds(&(5..)), (5, i64::MAX));
    }
}
