//! Where the binaries under test are.

use std::path::PathBuf;

/// Path of a workspace binary: `$BLIXARD_BIN_DIR/NAME`, or `target/<profile>/NAME` found from
/// the running test executable (`target/<profile>/deps/suite-…`).
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("BLIXARD_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("."));
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the suite",
        p.display()
    );
    p
}
