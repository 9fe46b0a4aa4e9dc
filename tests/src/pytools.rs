//! The Python tools some tests run as independent clients (`prometheus_client`'s parser,
//! `schemathesis`): pinned, in the venv `scripts/install-deps.sh` builds.

use std::path::PathBuf;

/// Where `scripts/install-deps.sh` puts the venv.
pub const VENV: &str = "/var/cache/blixard-test/pyvenv";

/// The venv's `bin/NAME`, or an error that says how to get it.
pub fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(VENV).join("bin").join(name);
    anyhow::ensure!(
        p.exists(),
        "{} is missing: run scripts/install-deps.sh (it installs the pinned Python tools)",
        p.display()
    );
    Ok(p)
}
