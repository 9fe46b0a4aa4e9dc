//! SQLite storage: the Raft log and vote ([`log`]) and the state machine with its snapshot
//! ([`state`]), each in its own database file under the node's data directory.
//!
//! This is the only module that touches SQLite. Both files run in WAL mode with
//! `synchronous=FULL`, so a write is on disk before it is reported done, and carry a schema
//! version in `PRAGMA user_version`. A file that fails SQLite's integrity check refuses to
//! open: a node never starts on a damaged database.

// openraft's trait methods return its `StorageError`, a large type; our helpers return the same
// type so `?` works without conversions.
#![allow(clippy::result_large_err)]

pub mod log;
pub mod state;

use std::path::Path;

use openraft::{StorageError, StorageIOError};
use rusqlite::Connection;

use crate::raft_types::NodeId;

/// Errors opening a database file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path} is damaged ({detail}); move it away and rebuild this node from its peers")]
    Corrupt { path: String, detail: String },
    #[error("{path} has schema version {found}, this build knows up to {known}")]
    Schema {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("sqlite on {path}")]
    Sql {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: undecodable stored data: {message}")]
    Decode { path: String, message: String },
}

/// Opens (creating if needed) a database with our pragmas, checks its integrity and brings its
/// schema to `migrations.len()` by running the missing migrations in one transaction.
pub(crate) fn open(path: &Path, migrations: &[&str]) -> Result<Connection, StoreError> {
    let p = path.display().to_string();
    let conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: p.clone(),
        source,
    })?;
    let sql = |source| StoreError::Sql {
        path: p.clone(),
        source,
    };
    let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
        path: p.clone(),
        detail: e.to_string(),
    };
    // Any damage to the header shows up on the first statement.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(corrupt)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt {
            path: p,
            detail: format!("journal_mode is {mode}"),
        });
    }
    conn.execute_batch(
        "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;",
    )
    .map_err(sql)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(corrupt)?;
    if check != "ok" {
        return Err(StoreError::Corrupt {
            path: p,
            detail: check,
        });
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    let known = migrations.len() as i64;
    if version > known {
        return Err(StoreError::Schema {
            path: p,
            found: version,
            known,
        });
    }
    if version < known {
        let mut batch = String::from("BEGIN IMMEDIATE;");
        for m in &migrations[version as usize..] {
            batch.push_str(m);
        }
        batch.push_str(&format!("PRAGMA user_version={known}; COMMIT;"));
        conn.execute_batch(&batch).map_err(sql)?;
    }
    Ok(conn)
}

pub(crate) fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

pub(crate) fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;
    use tempfile::TempDir;

    use super::log::LogStore;
    use super::state::StateStore;
    use super::StoreError;
    use crate::raft_types::{NodeId, TypeConfig};

    struct SqliteBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateStore, TempDir> for SqliteBuilder {
        async fn build(&self) -> Result<(TempDir, LogStore, StateStore), StorageError<NodeId>> {
            let dir = TempDir::new().map_err(super::write_err)?;
            let log = LogStore::open(dir.path()).map_err(super::write_err)?;
            let sm = StateStore::open(dir.path()).map_err(super::write_err)?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage suite against the SQLite store.
    #[test]
    fn openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
        Suite::test_all(SqliteBuilder)
    }

    #[test]
    fn damaged_file_refuses_to_open() {
        let dir = TempDir::new().unwrap_or_else(|e| panic!("{e}"));
        drop(LogStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
        std::fs::write(dir.path().join("raft-log.db"), b"this is not a database at all, sorry....................................................................................")
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_file(dir.path().join("raft-log.db-wal"));
        match LogStore::open(dir.path()) {
            Err(StoreError::Corrupt { .. }) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened a damaged file"),
        }
    }
}
