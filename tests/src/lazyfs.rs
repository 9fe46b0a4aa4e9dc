//! A directory whose unsynced writes a power cut loses: `blixard-lazyfs` (FUSE) mounted over
//! a backing directory. [`LazyMount::cut`] kills it with SIGKILL, so the backing directory
//! keeps exactly what was fsynced, and lazily unmounts the dead mount; [`LazyMount::remount`]
//! mounts it again over what survived. Needs root and `/dev/fuse`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// One mounted `blixard-lazyfs`.
pub struct LazyMount {
    backing: PathBuf,
    mountpoint: PathBuf,
    child: Option<Child>,
}

/// Whether `path` is a mount point of `blixard-lazyfs` (per `/proc/self/mountinfo`).
fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines().any(|l| {
        let mut f = l.split(' ');
        f.nth(4) == Some(&*p) && l.contains("blixard-lazyfs")
    })
}

impl LazyMount {
    /// Mounts `backing` (created if missing) at `mountpoint` (created if missing).
    pub fn mount(backing: &Path, mountpoint: &Path) -> anyhow::Result<LazyMount> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let mut m = LazyMount {
            backing: backing.canonicalize()?,
            mountpoint: mountpoint.canonicalize()?,
            child: None,
        };
        m.remount()?;
        Ok(m)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Mounts again (after [`Self::cut`]) over what the backing directory kept.
    pub fn remount(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "already mounted");
        let child = Command::new(crate::binaries::binary("blixard-lazyfs"))
            .arg(&self.backing)
            .arg(&self.mountpoint)
            .stdin(Stdio::null())
            .spawn()
            .context("starting blixard-lazyfs")?;
        self.child = Some(child);
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        while !mounted(&self.mountpoint) {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    anyhow::bail!("blixard-lazyfs exited before mounting: {status}");
                }
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "{} not mounted after 10 s",
                self.mountpoint.display()
            );
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The power cut: everything written but not fsynced is gone. Kill whatever uses the
    /// mount first.
    pub fn cut(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        self.cut();
    }
}
