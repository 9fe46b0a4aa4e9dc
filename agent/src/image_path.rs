//! Confining a spec's image paths (kernel, initrd, disks) to the agent's image directory.
//!
//! [`resolve`] is pure apart from the file check it is given: it applies the control plane's
//! own lexical rule ([`blixard_api::validate::image_path`]: no `..`, not absolute, not empty,
//! no hostile characters), then asks `check` whether the file
//! is there, readable and (after symlinks) still inside the directory. [`fs_check`] is the
//! real check. Every refusal names the spec field, so the user sees which path is wrong
//! before any unit is started.

use std::path::{Component, Path, PathBuf};

/// What the file check found wrong with a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileProblem {
    Missing,
    Unreadable(String),
    NotAFile,
    /// A symlink (or the directory itself) leads outside the image directory.
    Escapes,
}

/// A refused image path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PathError {
    pub field: String,
    pub message: String,
}

fn refuse(field: &str, message: impl Into<String>) -> PathError {
    PathError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// `value` (spec field `field`) as a path inside `image_dir`: relative paths are joined to
/// it, absolute ones must already lie in it. `check` is called with the joined path.
pub fn resolve(
    image_dir: &Path,
    field: &str,
    value: &str,
    check: &dyn Fn(&Path, &Path) -> Result<(), FileProblem>,
) -> Result<PathBuf, PathError> {
    let p = Path::new(value);
    // An absolute path inside the image directory is read as relative to it: admission
    // refuses absolute paths, but specs stored before it did may still hold them.
    let relative: &str = if p.is_absolute() && !p.components().any(|c| c == Component::ParentDir) {
        match p.strip_prefix(image_dir).ok().and_then(Path::to_str) {
            Some(r) => r,
            None => {
                return Err(refuse(
                    field,
                    format!(
                        "{} is outside the image directory {}",
                        blixard_api::validate::escaped(value),
                        image_dir.display()
                    ),
                ))
            }
        }
    } else {
        value
    };
    // The one lexical rule, the same the control plane applies at admission.
    blixard_api::validate::image_path(field, relative).map_err(|e| refuse(field, e.message))?;
    let rel: PathBuf = Path::new(relative)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    let full = image_dir.join(rel);
    check(image_dir, &full).map_err(|problem| {
        let shown = full.display();
        refuse(
            field,
            match problem {
                FileProblem::Missing => format!("{shown} does not exist"),
                FileProblem::Unreadable(why) => format!("{shown} cannot be read: {why}"),
                FileProblem::NotAFile => format!("{shown} is not a regular file"),
                FileProblem::Escapes => {
                    format!("{shown} leads outside the image directory")
                }
            },
        )
    })?;
    Ok(full)
}

/// The real check: `path` exists, is a regular file once symlinks are followed, stays inside
/// `image_dir` and opens for reading.
pub fn fs_check(image_dir: &Path, path: &Path) -> Result<(), FileProblem> {
    let real = match std::fs::canonicalize(path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FileProblem::Missing),
        Err(e) => return Err(FileProblem::Unreadable(e.to_string())),
    };
    let dir = std::fs::canonicalize(image_dir).map_err(|_| FileProblem::Escapes)?;
    if !real.starts_with(&dir) {
        return Err(FileProblem::Escapes);
    }
    let meta = std::fs::metadata(&real).map_err(|e| FileProblem::Unreadable(e.to_string()))?;
    if !meta.is_file() {
        return Err(FileProblem::NotAFile);
    }
    std::fs::File::open(&real).map_err(|e| FileProblem::Unreadable(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn ok(_: &Path, _: &Path) -> Result<(), FileProblem> {
        Ok(())
    }

    #[test]
    fn lexical_table() {
        let dir = Path::new("/srv/img");
        let cases: [(&str, Result<&str, &str>); 10] = [
            ("vmlinuz", Ok("/srv/img/vmlinuz")),
            ("k/vmlinuz", Ok("/srv/img/k/vmlinuz")),
            ("./k//vmlinuz", Ok("/srv/img/k/vmlinuz")),
            ("/srv/img/vmlinuz", Ok("/srv/img/vmlinuz")),
            ("../etc/passwd", Err("must not contain '..'")),
            ("k/../../x", Err("must not contain '..'")),
            ("/etc/passwd", Err("outside the image directory")),
            ("/srv/imgx/a", Err("outside the image directory")),
            ("", Err("must not be empty")),
            (".", Err("names no file")),
        ];
        for (value, want) in cases {
            let got = resolve(dir, "kernel", value, &ok);
            match (want, got) {
                (Ok(p), Ok(g)) => assert_eq!(g, PathBuf::from(p), "{value}"),
                (Err(m), Err(e)) => {
                    assert_eq!(e.field, "kernel");
                    assert!(e.message.contains(m), "{value}: {e}");
                }
                (w, g) => panic!("{value}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn check_problems_become_clear_errors() {
        let dir = Path::new("/srv/img");
        let cases = [
            (FileProblem::Missing, "/srv/img/a does not exist"),
            (FileProblem::NotAFile, "is not a regular file"),
            (FileProblem::Escapes, "leads outside the image directory"),
            (
                FileProblem::Unreadable("EACCES".into()),
                "cannot be read: EACCES",
            ),
        ];
        for (problem, want) in cases {
            let p = problem.clone();
            let e = resolve(dir, "disks[0].path", "a", &move |_, _| Err(p.clone()))
                .expect_err("refused");
            assert!(e.to_string().starts_with("disks[0].path: "), "{e}");
            assert!(e.message.contains(want), "{problem:?}: {e}");
        }
    }

    #[test]
    fn real_files() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("img");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("vmlinuz"), b"k").expect("write");
        std::fs::create_dir(dir.join("sub")).expect("mkdir");
        std::fs::write(t.path().join("secret"), b"s").expect("write");
        symlink(t.path().join("secret"), dir.join("escape")).expect("symlink");
        symlink(dir.join("vmlinuz"), dir.join("inside")).expect("symlink");
        let locked = dir.join("locked");
        std::fs::write(&locked, b"x").expect("write");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        let r = |v: &str| resolve(&dir, "f", v, &fs_check);
        assert_eq!(r("vmlinuz").expect("ok"), dir.join("vmlinuz"));
        assert_eq!(r("inside").expect("ok"), dir.join("inside"));
        let abs = dir.join("vmlinuz");
        assert!(r(abs.to_str().expect("utf8")).is_ok());
        assert!(r("nope")
            .expect_err("missing")
            .message
            .contains("does not exist"));
        assert!(r("sub")
            .expect_err("dir")
            .message
            .contains("not a regular file"));
        assert!(r("escape").expect_err("escape").message.contains("outside"));
        let secret = t.path().join("secret");
        assert!(r(secret.to_str().expect("utf8"))
            .expect_err("abs outside")
            .message
            .contains("outside the image directory"));
        // Root reads anything regardless of mode bits; only check when not root.
        if !nix::unistd::geteuid().is_root() {
            assert!(r("locked")
                .expect_err("locked")
                .message
                .contains("cannot be read"));
        }
    }
}
