//! The lease file: how the agent tells its dead man's switch (`blixard-agent fence-watch`,
//! see [`crate::fence_watch`]) until when the host's lease holds.
//!
//! `<runtime_dir>/lease` is JSON: the expiry in milliseconds on `CLOCK_BOOTTIME` (which
//! counts suspended time, so a suspended host wakes up fenced), the SIGTERM → SIGKILL grace,
//! the VMs never to fence (`on_host_loss = stay`) and the boot it was written in (a file from
//! another boot is no lease: `CLOCK_BOOTTIME` starts again at 0). The agent rewrites it
//! atomically (a temporary file, then `rename`) on every renewal. A missing file means that
//! no lease was held this boot.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name in the runtime directory.
pub const FILE_NAME: &str = "lease";

/// Errors of the lease file and the clock.
#[derive(Debug, thiserror::Error)]
pub enum LeaseFileError {
    #[error("cannot write the lease file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the lease file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the lease file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The contents of the lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFile {
    /// When the lease runs out, in ms on `CLOCK_BOOTTIME`.
    pub expires_boottime_ms: u64,
    /// How long a fenced VM gets between SIGTERM and SIGKILL.
    pub grace_ms: u64,
    /// VMs never fenced.
    #[serde(default)]
    pub stay: BTreeSet<String>,
    /// `/proc/sys/kernel/random/boot_id` when the file was written.
    #[serde(default)]
    pub boot_id: String,
}

/// Milliseconds on `CLOCK_BOOTTIME`: monotonic, and counting while the machine sleeps.
pub fn boottime_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(t) => {
            let ms = i128::from(t.tv_sec()) * 1000 + i128::from(t.tv_nsec()) / 1_000_000;
            u64::try_from(ms).unwrap_or(0)
        }
        // Linux has had CLOCK_BOOTTIME since 2.6.39; without it nothing here can work, and a
        // clock stuck at 0 fences (a lease never looks renewed) rather than never fencing.
        Err(_) => 0,
    }
}

/// This boot's id (empty if the kernel does not say).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The lease file of a runtime directory.
pub fn path_in(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(FILE_NAME)
}

/// Writes `lease` to `path` atomically.
pub fn write(path: &Path, lease: &LeaseFile) -> Result<(), LeaseFileError> {
    let err = |source| LeaseFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec(lease).map_err(|e| err(std::io::Error::other(e)))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&text).map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads the lease file: `None` if there is none, or it is from another boot.
pub fn read(path: &Path) -> Result<Option<LeaseFile>, LeaseFileError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LeaseFileError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let lease: LeaseFile =
        serde_json::from_slice(&text).map_err(|source| LeaseFileError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    let boot = boot_id();
    if !lease.boot_id.is_empty() && !boot.is_empty() && lease.boot_id != boot {
        return Ok(None);
    }
    Ok(Some(lease))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_in(dir.path());
        assert!(read(&path).expect("read").is_none());
        let lease = LeaseFile {
            expires_boottime_ms: 1234,
            grace_ms: 500,
            stay: BTreeSet::from(["db".to_string()]),
            boot_id: boot_id(),
        };
        write(&path, &lease).expect("write");
        assert_eq!(read(&path).expect("read"), Some(lease.clone()));
        // Another boot's file is no lease.
        let other = LeaseFile {
            boot_id: "not-this-boot".into(),
            ..lease
        };
        write(&path, &other).expect("write");
        if !boot_id().is_empty() {
            assert_eq!(read(&path).expect("read"), None);
        }
        std::fs::write(&path, "{").expect("write");
        assert!(matches!(read(&path), Err(LeaseFileError::Parse { .. })));
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = boottime_ms();
        let b = boottime_ms();
        assert!(a > 0 && b >= a);
    }
}
