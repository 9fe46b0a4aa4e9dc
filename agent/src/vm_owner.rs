//! `blixard-agent vm-owner --like DIR [--chown FILE]… [-- ARGV…]`: hands host resources to a
//! VM's dynamic user, in its unit's privileged `ExecStartPre=` (and back in `ExecStopPost=`).
//!
//! A `DynamicUser=` uid exists only while the unit runs and no name service may know it (Debian
//! does not install `nss-systemd` by default), but systemd creates the unit's runtime directory
//! owned by it before any `ExecStartPre=` runs. So the owner of that directory is the VM's
//! identity: `--chown` gives each FILE that owner (its writable disks), and ARGV runs with
//! every `{uid}` and `{gid}` replaced by it (`ip tuntap add … user {uid}`). At stop the disks
//! get `--like` the image directory, its owner (root), again.
//!
//! [`substitute`] is pure; [`run`] is the thin shell (stat, chown, exec).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// Errors of `vm-owner`.
#[derive(Debug, thiserror::Error)]
pub enum VmOwnerError {
    #[error("cannot read the owner of {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give {path} to {uid}:{gid}")]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {program}")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// `argv` with every `{uid}` and `{gid}` replaced.
pub fn substitute(argv: &[String], uid: u32, gid: u32) -> Vec<String> {
    argv.iter()
        .map(|a| {
            a.replace("{uid}", &uid.to_string())
                .replace("{gid}", &gid.to_string())
        })
        .collect()
}

/// Gives each of `chown` the owner of `like`, then (if `argv` is not empty) replaces this
/// process with `argv`, substituted. Returns only on an error, or when there is no `argv`.
pub fn run(like: &Path, chown: &[PathBuf], argv: &[String]) -> Result<(), VmOwnerError> {
    let meta = std::fs::metadata(like).map_err(|source| VmOwnerError::Stat {
        path: like.to_path_buf(),
        source,
    })?;
    let (uid, gid) = (meta.uid(), meta.gid());
    for path in chown {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| {
            VmOwnerError::Chown {
                path: path.clone(),
                uid,
                gid,
                source,
            }
        })?;
    }
    let argv = substitute(argv, uid, gid);
    let Some((program, args)) = argv.split_first() else {
        return Ok(());
    };
    let source = std::process::Command::new(program).args(args).exec();
    Err(VmOwnerError::Exec {
        program: program.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_everywhere_and_only_they() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let cases: [(&[&str], &[&str]); 4] = [
            (&[], &[]),
            (
                &["/usr/sbin/ip", "tuntap", "add", "user", "{uid}"],
                &["/usr/sbin/ip", "tuntap", "add", "user", "61234"],
            ),
            (&["{uid}:{gid}", "x{gid}y"], &["61234:61235", "x61235y"]),
            (&["{UID}", "{uid", "uid}"], &["{UID}", "{uid", "uid}"]),
        ];
        for (argv, want) in cases {
            assert_eq!(substitute(&s(argv), 61234, 61235), s(want), "{argv:?}");
        }
    }

    #[test]
    fn files_get_the_owner_of_the_reference() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("disk.img");
        std::fs::write(&f, b"x").expect("write");
        // Our own uid and gid: allowed without privileges, and still a real chown call.
        run(dir.path(), std::slice::from_ref(&f), &[]).expect("chown");
        let (d, m) = (
            std::fs::metadata(dir.path()).expect("dir"),
            std::fs::metadata(&f).expect("file"),
        );
        assert_eq!((m.uid(), m.gid()), (d.uid(), d.gid()));
        let e = run(&dir.path().join("missing"), &[], &[]).expect_err("no reference");
        assert!(e.to_string().contains("missing"), "{e}");
        let e = run(dir.path(), &[dir.path().join("gone")], &[]).expect_err("no file");
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
