//! `blixard-lazyfs BACKING MOUNTPOINT`: a FUSE file system for power-cut tests. It passes
//! every file of `BACKING` through, but keeps what is written to a file in memory until that
//! file is fsynced (LazyFS, which etcd's robustness tests use, works the same way). Killing
//! this process (SIGKILL) is a power cut for whatever runs on the mount: `BACKING` holds
//! exactly what was fsynced. Then `umount -l MOUNTPOINT` and mount it again.
//!
//! File contents are what it models (see `blixard_tests::lazy_pages`); directory operations
//! (create, rename, unlink) go to `BACKING` at once, as if every directory were synced. Test
//! tool only: single-threaded, paths resolved per call, no permissions checked.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blixard_tests::lazy_pages::{Backing, Overlay};
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};

const TTL: Duration = Duration::from_secs(1);

/// A backing file opened read-write.
struct Disk<'a>(&'a File);

impl Backing for Disk<'_> {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        FileExt::read_at(self.0, buf, off)
    }
    fn write_at(&mut self, data: &[u8], off: u64) -> io::Result<()> {
        FileExt::write_all_at(self.0, data, off)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
}

struct LazyFs {
    root: PathBuf,
    /// Inode → path relative to `root` (the root is inode 1, path "").
    paths: HashMap<u64, PathBuf>,
    inodes: HashMap<PathBuf, u64>,
    next_ino: u64,
    /// Backing files opened read-write, by inode.
    files: HashMap<u64, File>,
    /// Unsynced state of files written since their last fsync.
    dirty: HashMap<u64, Overlay>,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

impl LazyFs {
    fn full(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn ino_of(&mut self, rel: &Path) -> u64 {
        if let Some(i) = self.inodes.get(rel) {
            return *i;
        }
        let i = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(i, rel.to_path_buf());
        self.inodes.insert(rel.to_path_buf(), i);
        i
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.paths.get(&parent).map(|p| p.join(name))
    }

    fn attr(&mut self, ino: u64) -> io::Result<FileAttr> {
        let rel = self
            .paths
            .get(&ino)
            .cloned()
            .ok_or(io::Error::from_raw_os_error(libc::ENOENT))?;
        let m = std::fs::symlink_metadata(self.full(&rel))?;
        let kind = if m.is_dir() {
            FileType::Directory
        } else if m.file_type().is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        let size = self.dirty.get(&ino).map(|o| o.len()).unwrap_or(m.len());
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (m.permissions().mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The backing file of `ino`, opened read-write once.
    fn file(&mut self, ino: u64) -> io::Result<&File> {
        if !self.files.contains_key(&ino) {
            let rel = self
                .paths
                .get(&ino)
                .cloned()
                .ok_or(io::Error::from_raw_os_error(libc::ENOENT))?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.full(&rel))?;
            self.files.insert(ino, f);
        }
        self.files
            .get(&ino)
            .ok_or(io::Error::from_raw_os_error(libc::EIO))
    }

    /// The overlay of `ino` (a clean one if it has none).
    fn overlay(&mut self, ino: u64) -> io::Result<Overlay> {
        if let Some(o) = self.dirty.remove(&ino) {
            return Ok(o);
        }
        let len = self.file(ino)?.metadata()?.len();
        Ok(Overlay::clean(len))
    }

    /// Removes `name` in `parent` from the backing directory with `op`, and forgets it.
    fn remove(
        &mut self,
        parent: u64,
        name: &OsStr,
        reply: ReplyEmpty,
        op: impl FnOnce(&Path) -> io::Result<()>,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        match op(&self.full(&rel)) {
            Ok(()) => {
                self.forget_path(&rel);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget_path(&mut self, rel: &Path) {
        if let Some(i) = self.inodes.remove(rel) {
            self.paths.remove(&i);
            self.files.remove(&i);
            self.dirty.remove(&i);
        }
    }
}

impl Filesystem for LazyFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        if std::fs::symlink_metadata(self.full(&rel)).is_err() {
            return reply.error(libc::ENOENT);
        }
        let ino = self.ino_of(&rel);
        match self.attr(ino) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if let Some(len) = size {
            match self.overlay(ino) {
                Ok(mut o) => {
                    o.truncate(len);
                    self.dirty.insert(ino, o);
                }
                Err(e) => return reply.error(errno(&e)),
            }
        }
        if let (Some(m), Some(rel)) = (mode, self.paths.get(&ino).cloned()) {
            let _ = std::fs::set_permissions(self.full(&rel), std::fs::Permissions::from_mode(m));
        }
        match self.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        if let Err(e) = std::fs::create_dir(self.full(&rel)) {
            return reply.error(errno(&e));
        }
        let _ = std::fs::set_permissions(self.full(&rel), std::fs::Permissions::from_mode(mode));
        let ino = self.ino_of(&rel);
        match self.attr(ino) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |p| std::fs::remove_file(p))
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |p| std::fs::remove_dir(p))
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname))
        else {
            return reply.error(libc::ENOENT);
        };
        if let Err(e) = std::fs::rename(self.full(&from), self.full(&to)) {
            return reply.error(errno(&e));
        }
        self.forget_path(&to);
        if let Some(i) = self.inodes.remove(&from) {
            self.paths.insert(i, to.clone());
            self.inodes.insert(to, i);
        }
        reply.ok()
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.attr(ino) {
            Ok(a) if a.kind == FileType::RegularFile => match self.file(ino) {
                Ok(_) => reply.opened(0, 0),
                Err(e) => reply.error(errno(&e)),
            },
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let was_dirty = self.dirty.contains_key(&ino);
        let o = match self.overlay(ino) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(&e)),
        };
        let res = match self.file(ino) {
            Ok(f) => o.read(&Disk(f), offset.max(0) as u64, size as u64),
            Err(e) => Err(e),
        };
        if was_dirty {
            self.dirty.insert(ino, o);
        }
        match res {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut o = match self.overlay(ino) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(&e)),
        };
        let res = match self.file(ino) {
            Ok(f) => o.write(&Disk(f), offset.max(0) as u64, data),
            Err(e) => Err(e),
        };
        self.dirty.insert(ino, o);
        match res {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(mut o) = self.dirty.remove(&ino) else {
            return reply.ok();
        };
        let res = match self.file(ino) {
            Ok(f) => o.sync(&mut Disk(f)),
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => reply.ok(),
            Err(e) => {
                self.dirty.insert(ino, o);
                reply.error(errno(&e))
            }
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(rel) = self.paths.get(&ino).cloned() else {
            return reply.error(libc::ENOENT);
        };
        let rd = match std::fs::read_dir(self.full(&rel)) {
            Ok(rd) => rd,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut entries = vec![
            (ino, FileType::Directory, ".".into()),
            (1, FileType::Directory, "..".into()),
        ];
        for e in rd.flatten() {
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                Ok(t) if t.is_symlink() => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            let child = rel.join(e.file_name());
            let i = self.ino_of(&child);
            entries.push((i, kind, e.file_name()));
        }
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(i, (k + 1) as i64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.ok()
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode & 0o7777)
            .open(self.full(&rel));
        let f = match f {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        let ino = self.ino_of(&rel);
        self.files.insert(ino, f);
        match self.attr(ino) {
            Ok(a) => reply.created(&TTL, &a, 0, 0, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: blixard-lazyfs BACKING MOUNTPOINT");
    let root = std::fs::canonicalize(&args[1])?;
    let mut fs = LazyFs {
        root,
        paths: HashMap::new(),
        inodes: HashMap::new(),
        next_ino: 2,
        files: HashMap::new(),
        dirty: HashMap::new(),
    };
    fs.paths.insert(1, PathBuf::new());
    fs.inodes.insert(PathBuf::new(), 1);
    let opts = [
        MountOption::FSName("blixard-lazyfs".into()),
        MountOption::RW,
        MountOption::DefaultPermissions,
    ];
    fuser::mount2(fs, &args[2], &opts)?;
    Ok(())
}
