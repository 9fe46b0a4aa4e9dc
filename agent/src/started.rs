//! The generation at which this host's agent last started each VM, kept in
//! `<data_dir>/started/<vm>` across agent restarts.
//!
//! A VM assigned `running` whose unit is gone, and which a previous run of the agent started
//! at the assigned generation, ended while no agent watched: it is reported `failed`, not
//! started again (see [`crate::unit_track::UnitTracker::ended_while_down`]). The file is
//! written before the unit is started, so a crash in between errs on the side of reporting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Errors of the started-generation files.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {path}")]
pub struct StartedError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The directory of the files, and what they hold.
#[derive(Debug, Clone)]
pub struct Started {
    dir: PathBuf,
    generations: BTreeMap<String, u64>,
}

/// Whether `name` can be a file name here (VM names are DNS labels; anything else is skipped).
fn usable(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Started {
    /// Reads `<data_dir>/started/` (missing: nothing started yet).
    pub fn load(data_dir: &Path) -> Result<Started, StartedError> {
        let dir = data_dir.join("started");
        let mut generations = BTreeMap::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Started { dir, generations })
            }
            Err(source) => {
                return Err(StartedError {
                    what: "read",
                    path: dir,
                    source,
                })
            }
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !usable(&name) {
                continue;
            }
            if let Some(g) = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                generations.insert(name, g);
            }
        }
        Ok(Started { dir, generations })
    }

    pub fn generations(&self) -> &BTreeMap<String, u64> {
        &self.generations
    }

    /// Records that `vm` is being started at `generation`.
    pub fn record(&mut self, vm: &str, generation: u64) -> Result<(), StartedError> {
        if !usable(vm) || self.generations.get(vm) == Some(&generation) {
            return Ok(());
        }
        let path = self.dir.join(vm);
        let err = |what, source| StartedError {
            what,
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| err("create", e))?;
        let tmp = self.dir.join(format!(".{vm}.tmp"));
        std::fs::write(&tmp, format!("{generation}\n")).map_err(|e| err("write", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| err("write", e))?;
        self.generations.insert(vm.to_string(), generation);
        Ok(())
    }

    /// Forgets the VMs `keep` rejects (no longer assigned here).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self
            .generations
            .keys()
            .filter(|vm| !keep(vm))
            .cloned()
            .collect();
        for vm in gone {
            let _ = std::fs::remove_file(self.dir.join(&vm));
            self.generations.remove(&vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart_and_forgets_what_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Started::load(dir.path()).expect("load");
        assert!(s.generations().is_empty());
        s.record("web", 3).expect("record");
        s.record("db", 1).expect("record");
        s.record("../x", 1).expect("skipped");
        let mut s = Started::load(dir.path()).expect("load");
        assert_eq!(
            s.generations(),
            &BTreeMap::from([("db".to_string(), 1), ("web".to_string(), 3)])
        );
        s.retain(|vm| vm == "web");
        let s = Started::load(dir.path()).expect("load");
        assert_eq!(s.generations(), &BTreeMap::from([("web".to_string(), 3)]));
    }
}
