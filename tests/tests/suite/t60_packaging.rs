//! Packaging: the systemd units, the Debian package and the NixOS module, each checked by
//! using it.
//!
//! - `systemd-analyze verify` and `systemd-analyze security --offline=true` on units/;
//! - the default configs pass `check-config`;
//! - `nix-instantiate --parse` on every .nix file;
//! - the .deb built from the workspace's binaries, installed with `dpkg -i` in a booted
//!   Debian container (systemd-nspawn), both services started with `systemctl`, a VM
//!   created with `blixardctl`, the agent restarted under it, everything stopped, purged
//!   (which stops the VM, while its `ExecStop=` binary is still there);
//! - `lintian` on that .deb: no errors and no warnings.
//!
//! Prerequisites come from `tests/ct/setup.sh`; a missing one fails the test with a message
//! saying so.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use blixard_tests::binaries::binary;
use blixard_tests::container::{self, require_tools, workspace_root, Container};
use blixard_tests::wait;

const UNITS: [&str; 3] = [
    "blixard-control.service",
    "blixard-agent.service",
    "blixard-vms.slice",
];

/// The highest `systemd-analyze security` exposure each service may have ("OK" is ≤ 2.5
/// on systemd's scale; the control unit must stay there, and so, as shipped, does the agent).
const MAX_EXPOSURE: [(&str, f64); 2] = [
    ("blixard-control.service", 2.5),
    ("blixard-agent.service", 2.5),
];

/// The shipped units, with `ExecStart=/usr/bin/NAME` pointing at the workspace's binaries,
/// in a temporary directory (verify needs the executables to exist).
fn units_with_workspace_binaries() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for unit in UNITS {
        let mut text = std::fs::read_to_string(workspace_root().join("units").join(unit))
            .with_context(|| format!("reading units/{unit}"))?;
        for bin in ["blixard-control", "blixard-agent"] {
            let from = format!("ExecStart=/usr/bin/{bin} ");
            let to = format!("ExecStart={} ", binary(bin).display());
            text = text.replace(&from, &to);
        }
        std::fs::write(dir.path().join(unit), text)?;
    }
    Ok(dir)
}

async fn output(cmd: &mut tokio::process::Command) -> anyhow::Result<std::process::Output> {
    cmd.output()
        .await
        .with_context(|| format!("running {cmd:?}"))
}

#[tokio::test]
async fn units_pass_systemd_analyze_verify() -> anyhow::Result<()> {
    require_tools(&["systemd-analyze"])?;
    let dir = units_with_workspace_binaries()?;
    let paths: Vec<PathBuf> = UNITS.iter().map(|u| dir.path().join(u)).collect();
    let out = output(
        tokio::process::Command::new("systemd-analyze")
            .arg("verify")
            .args(&paths),
    )
    .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 on warnings like unknown keys: any line about our units is a failure
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("blixard")).collect();
    ensure!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {} failed ({}):\n{text}",
        UNITS.join(" "),
        out.status
    );
    Ok(())
}

/// Parses "→ Overall exposure level for UNIT: 1.1 OK 🙂".
fn overall_exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn exposure_parser_reads_systemds_summary_line() {
    let report =
        "✓ UMask= ...\n\n→ Overall exposure level for blixard-control.service: 1.1 OK 🙂\n";
    assert_eq!(overall_exposure(report), Some(1.1));
    assert_eq!(overall_exposure("no summary"), None);
}

#[tokio::test]
async fn service_units_score_ok_in_systemd_analyze_security() -> anyhow::Result<()> {
    require_tools(&["systemd-analyze"])?;
    let dir = units_with_workspace_binaries()?;
    let mut failures = Vec::new();
    for (unit, max) in MAX_EXPOSURE {
        let out = output(
            tokio::process::Command::new("systemd-analyze")
                .args(["security", "--offline=true", "--no-pager"])
                .arg(dir.path().join(unit)),
        )
        .await?;
        let report = String::from_utf8_lossy(&out.stdout);
        let score = overall_exposure(&report).with_context(|| {
            format!(
                "no \"Overall exposure level\" line in systemd-analyze security of {unit} ({}):\n{report}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        eprintln!("systemd-analyze security {unit}: {score}");
        if score > max {
            failures.push(format!("{unit}: exposure {score} > {max}\n{report}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn default_configs_pass_check_config() -> anyhow::Result<()> {
    for (daemon, file) in [
        ("blixard-control", "packaging/etc/control.toml"),
        ("blixard-agent", "packaging/etc/agent.toml"),
    ] {
        let path = workspace_root().join(file);
        let out = output(
            tokio::process::Command::new(binary(daemon))
                .arg("check-config")
                .arg(&path),
        )
        .await?;
        ensure!(
            out.status.success(),
            "{daemon} check-config {file} exited with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            nix_files(&path, found)?;
        } else if path.extension().is_some_and(|e| e == "nix") {
            found.push(path);
        }
    }
    Ok(())
}

#[tokio::test]
async fn nix_files_parse() -> anyhow::Result<()> {
    require_tools(&["nix-instantiate"])?;
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in ["nixos-module", "packaging"] {
        nix_files(&root.join(dir), &mut files)?;
    }
    ensure!(
        files.len() >= 2,
        "expected nixos-module/default.nix and packaging/package.nix, found {files:?}"
    );
    for file in &files {
        let out = output(
            tokio::process::Command::new("nix-instantiate")
                .env("NIX_CONFIG", "build-users-group =")
                .arg("--parse")
                .arg(file),
        )
        .await?;
        ensure!(
            out.status.success(),
            "nix-instantiate --parse {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without nixpkgs (not reachable from here) nothing can be evaluated further than the
    // shape of the two functions.
    for (file, args) in [
        (
            "nixos-module/default.nix",
            "{ config = false; lib = false; pkgs = false; }",
        ),
        (
            "packaging/package.nix",
            "{ help2man = false; installShellFiles = false; lib = false; rustPlatform = false; }",
        ),
    ] {
        let expr = format!(
            "builtins.functionArgs (import {})",
            root.join(file).display()
        );
        let out = output(
            tokio::process::Command::new("nix-instantiate")
                .env("NIX_CONFIG", "build-users-group =")
                .args(["--eval", "--strict", "-E", &expr]),
        )
        .await?;
        let got = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && got.trim() == args,
            "{file} should be a function of {args}, got {got} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Builds the .deb from the binaries next to the test executable; returns its path.
async fn build_deb(out_dir: &Path) -> anyhow::Result<PathBuf> {
    let bin = binary("blixard-control");
    let bin_dir = bin.parent().context("binary without a directory")?;
    for b in ["blixard-agent", "blixardctl"] {
        binary(b);
    }
    let profile = if bin_dir.ends_with("release") {
        "release"
    } else {
        "dev"
    };
    let script = workspace_root().join("packaging/build-deb.sh");
    let out = output(
        tokio::process::Command::new(&script)
            .args(["--profile", profile, "--bin-dir"])
            .arg(bin_dir)
            .arg("--out")
            .arg(out_dir)
            .current_dir(workspace_root()),
    )
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{} failed ({}):\n{}{}",
        script.display(),
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    ensure!(
        deb.is_file(),
        "build-deb.sh printed no .deb path: {stdout:?}"
    );
    Ok(deb)
}

const AGENT_TOML: &str = r#"# written by t60_packaging: a "process" VM is /bin/sleep, so no hypervisor is needed
host_id = "ct1"
control_endpoints = ["http://127.0.0.1:7001"]
data_dir = "/var/lib/blixard-agent"
runtime_dir = "/run/blixard-agent"
image_dir = "/var/lib/blixard/images"
systemd_bus = "system"
heartbeat_interval_ms = 500
process_command = ["/bin/sleep", "infinity"]
"#;

const VM: &str = "t60vm";
const VM_UNIT: &str = "blixard-vm-t60vm.service";
const CTL_ENDPOINT: &str = "http://127.0.0.1:7001";

/// Fails unless `unit` is `active (running)`, as `systemctl status` shows it.
async fn assert_running(ct: &Container, unit: &str) -> anyhow::Result<()> {
    let state = ct.unit_property(unit, "ActiveState").await?;
    let sub = ct.unit_property(unit, "SubState").await?;
    if state != "active" || sub != "running" {
        let status = ct
            .exec(&["systemctl", "status", "--no-pager", unit])
            .await?;
        bail!(
            "{unit} is {state} ({sub}), not active (running):\n{}",
            status.stdout
        );
    }
    Ok(())
}

/// `systemctl stop UNIT` must succeed and leave the unit inactive with Result=success.
async fn stop_cleanly(ct: &Container, unit: &str) -> anyhow::Result<()> {
    ct.run(&["systemctl", "stop", unit]).await?;
    let state = ct.unit_property(unit, "ActiveState").await?;
    let result = ct.unit_property(unit, "Result").await?;
    ensure!(
        state == "inactive" && result == "success",
        "after systemctl stop {unit}: ActiveState={state} Result={result}"
    );
    Ok(())
}

async fn main_pid(ct: &Container, unit: &str) -> anyhow::Result<u32> {
    let pid = ct.unit_property(unit, "MainPID").await?;
    let pid: u32 = pid
        .parse()
        .with_context(|| format!("MainPID of {unit}: {pid:?}"))?;
    ensure!(pid != 0, "{unit} has no main process");
    Ok(pid)
}

/// Everything a new Debian user would do, inside the booted container.
async fn install_and_run(ct: &Container, deb_name: &str) -> anyhow::Result<()> {
    // install: files in place, user and directories created, nothing started or enabled
    ct.run(&["dpkg", "-i", &format!("/mnt/blixard/{deb_name}")])
        .await?;
    for unit in UNITS {
        let installed = ct
            .run(&["cat", &format!("/lib/systemd/system/{unit}")])
            .await?;
        let source = std::fs::read_to_string(workspace_root().join("units").join(unit))?;
        ensure!(
            installed == source,
            "/lib/systemd/system/{unit} differs from units/{unit}"
        );
    }
    ct.sh("test -s /usr/share/bash-completion/completions/blixardctl \
           && test -s /usr/share/zsh/vendor-completions/_blixardctl \
           && test -s /usr/share/fish/vendor_completions.d/blixardctl.fish \
           && test -s /usr/share/man/man1/blixardctl.1.gz \
           && test -s /usr/share/doc/blixard/README.md")
        .await
        .context("completions, man page or README missing from the package")?;
    ct.run(&["getent", "passwd", "blixard-control"]).await?;
    ct.sh("test -d /etc/blixard && test -d /var/lib/blixard/images && test -d /run/blixard-agent")
        .await
        .context("tmpfiles.d entries not applied")?;
    for unit in ["blixard-control.service", "blixard-agent.service"] {
        let state = ct.unit_property(unit, "ActiveState").await?;
        let enabled = ct.unit_property(unit, "UnitFileState").await?;
        ensure!(
            state == "inactive" && enabled == "disabled",
            "installing must not start or enable {unit}: ActiveState={state} UnitFileState={enabled}"
        );
    }
    // the installed units, with the real binaries at their ExecStart paths
    let verify = ct
        .exec(&[
            "systemd-analyze",
            "verify",
            "/lib/systemd/system/blixard-control.service",
            "/lib/systemd/system/blixard-agent.service",
            "/lib/systemd/system/blixard-vms.slice",
        ])
        .await?;
    ensure!(
        verify.success() && !format!("{}{}", verify.stdout, verify.stderr).contains("blixard"),
        "systemd-analyze verify of the installed units: {}{}",
        verify.stdout,
        verify.stderr
    );

    // configuration: the shipped control.toml as is (a one-node cluster on loopback)
    ct.run(&[
        "blixard-control",
        "check-config",
        "/etc/blixard/control.toml",
    ])
    .await?;
    ct.write_file("/etc/blixard/agent.toml", AGENT_TOML).await?;
    ct.run(&["blixard-agent", "check-config", "/etc/blixard/agent.toml"])
        .await?;
    // a credential in the credstore reaches the agent; the control node has none and must
    // start all the same
    ct.write_file("/etc/credstore/blixard-agent-token", "t60-token\n")
        .await?;

    // start: `systemctl start` of a Type=notify unit returns once READY=1 arrived
    ct.run(&["systemctl", "start", "blixard-control.service"])
        .await?;
    assert_running(ct, "blixard-control.service").await?;
    ct.run(&["systemctl", "start", "blixard-agent.service"])
        .await?;
    assert_running(ct, "blixard-agent.service").await?;
    ct.run(&[
        "test",
        "-f",
        "/run/credentials/blixard-agent.service/agent-token",
    ])
    .await
    .context("LoadCredential=agent-token did not deliver /etc/credstore/blixard-agent-token")?;

    // the agent's own log lines (not just systemd's "Starting ..."), via journalctl -u
    wait::until(
        "blixard-agent log lines in the journal",
        Duration::from_secs(20),
        || async {
            let own = ct
                .run(&[
                    "journalctl",
                    "--no-pager",
                    "-o",
                    "cat",
                    "_SYSTEMD_UNIT=blixard-agent.service",
                ])
                .await
                .map_err(|e| e.to_string())?;
            let by_unit = ct
                .run(&[
                    "journalctl",
                    "--no-pager",
                    "-o",
                    "cat",
                    "-u",
                    "blixard-agent",
                ])
                .await
                .map_err(|e| e.to_string())?;
            let own_lines = own.lines().filter(|l| !l.trim().is_empty()).count();
            Ok(
                (own_lines > 0 && by_unit.contains(own.lines().next().unwrap_or_default()))
                    .then_some(()),
            )
        },
    )
    .await?;

    // a VM, created through the API, runs as a unit of the container's system manager
    ct.run(&[
        "blixardctl",
        "--endpoints",
        CTL_ENDPOINT,
        "vm",
        "create",
        VM,
        "--vcpus",
        "1",
        "--memory",
        "64",
        "--hypervisor",
        "process",
    ])
    .await?;
    wait::until(
        "the VM unit to be active (running)",
        Duration::from_secs(60),
        || async {
            let state = ct
                .unit_property(VM_UNIT, "ActiveState")
                .await
                .map_err(|e| e.to_string())?;
            let sub = ct
                .unit_property(VM_UNIT, "SubState")
                .await
                .map_err(|e| e.to_string())?;
            if state == "active" && sub == "running" {
                Ok(Some(()))
            } else {
                Err(format!("{VM_UNIT} is {state} ({sub})"))
            }
        },
    )
    .await?;
    let slice = ct.unit_property(VM_UNIT, "Slice").await?;
    ensure!(
        slice == "blixard-vms.slice",
        "{VM_UNIT} is in {slice}, not blixard-vms.slice"
    );
    let list = ct
        .run(&[
            "blixardctl",
            "--endpoints",
            CTL_ENDPOINT,
            "vm",
            "list",
            "-o",
            "json",
        ])
        .await?;
    ensure!(
        list.contains(VM),
        "blixardctl vm list -o json does not show {VM}: {list}"
    );
    let vm_pid = main_pid(ct, VM_UNIT).await?;

    // restarting the agent leaves the VM alone
    let agent_pid = main_pid(ct, "blixard-agent.service").await?;
    ct.run(&["systemctl", "restart", "blixard-agent.service"])
        .await?;
    assert_running(ct, "blixard-agent.service").await?;
    ensure!(
        main_pid(ct, "blixard-agent.service").await? != agent_pid,
        "systemctl restart blixard-agent kept the same main process"
    );
    assert_running(ct, VM_UNIT).await?;
    ensure!(
        main_pid(ct, VM_UNIT).await? == vm_pid,
        "the VM's main process changed when the agent restarted"
    );

    // clean stops; the VM outlives even a stopped agent
    stop_cleanly(ct, "blixard-agent.service").await?;
    assert_running(ct, VM_UNIT).await?;
    ensure!(
        main_pid(ct, VM_UNIT).await? == vm_pid,
        "the VM's main process changed when the agent stopped"
    );
    stop_cleanly(ct, "blixard-control.service").await?;

    // the shipped man pages render
    for page in ["blixard-control", "blixard-agent", "blixardctl"] {
        ct.run(&["test", "-s", &format!("/usr/share/man/man1/{page}.1.gz")])
            .await
            .with_context(|| format!("man page {page}.1 missing from the package"))?;
    }

    // removal: the maintainer scripts run, the units are gone, and so is the VM: prerm
    // stopped it while its ExecStop= binary was still installed
    ct.run(&["dpkg", "--purge", "blixard"]).await?;
    let cat = ct
        .exec(&["systemctl", "cat", "blixard-agent.service"])
        .await?;
    ensure!(
        !cat.success(),
        "blixard-agent.service still known after dpkg --purge"
    );
    let state = ct.unit_property(VM_UNIT, "ActiveState").await?;
    ensure!(
        state == "inactive" || state == "failed",
        "{VM_UNIT} is {state} after dpkg --purge; removing the package must stop its VMs"
    );
    let result = ct.unit_property(VM_UNIT, "Result").await?;
    ensure!(
        result == "success",
        "{VM_UNIT} stopped with Result={result} on dpkg --purge, not a clean stop"
    );
    Ok(())
}

/// Lintian's verdict lines (`E: ...`, `W: ...`); informational tags (`I:`) and lintian's own
/// notices ("running with root privileges ...") are not failures.
fn lintian_failures(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect()
}

#[test]
fn lintian_parser_keeps_errors_and_warnings_only() {
    let out = "E: blixard: no-changelog x\nW: blixard: no-manual-page [usr/bin/a]\n\
               I: blixard: hardening-no-fortify-functions [usr/bin/a]\n\
               running with root privileges is not recommended!\n";
    assert_eq!(
        lintian_failures(out),
        [
            "E: blixard: no-changelog x",
            "W: blixard: no-manual-page [usr/bin/a]"
        ]
    );
}

/// The .deb passes lintian with no errors and no warnings (the one override, in
/// packaging/debian/blixard.lintian-overrides, says why it is there).
#[tokio::test]
async fn deb_is_lintian_clean() -> anyhow::Result<()> {
    require_tools(&[
        "lintian",
        "cargo-deb",
        "dpkg-shlibdeps",
        "dpkg-deb",
        "help2man",
        "jq",
    ])?;
    let work = tempfile::Builder::new()
        .prefix("blixard-lintian-")
        .tempdir()?;
    let deb = build_deb(work.path()).await?;
    let out = output(
        tokio::process::Command::new("lintian")
            .args(["--tag-display-limit", "0", "--fail-on", "error,warning"])
            .arg(&deb),
    )
    .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failures = lintian_failures(&text);
    ensure!(
        out.status.success() && failures.is_empty(),
        "lintian {} ({}): {} errors, {} warnings:\n{text}",
        deb.display(),
        out.status,
        failures.iter().filter(|l| l.starts_with("E: ")).count(),
        failures.iter().filter(|l| l.starts_with("W: ")).count(),
    );
    Ok(())
}

/// What building the package and booting a Debian container with it need.
const DEBIAN_TOOLS: &[&str] = &[
    "systemd-nspawn",
    "unshare",
    "nsenter",
    "cargo-deb",
    "dpkg-shlibdeps",
    "dpkg-deb",
    "jq",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deb_installs_and_runs_in_a_booted_debian() -> anyhow::Result<()> {
    container::require_root()?;
    require_tools(DEBIAN_TOOLS)?;
    let (_work, ct, deb_name) = debian_with_the_package("blixard-t60-", false).await?;
    let result = install_and_run(&ct, &deb_name).await;
    end_in_debian(ct, result).await
}

/// The agent of the sandbox test: QEMU (TCG: the container has no /dev/kvm), a bridge for
/// tap NICs, the `process` hypervisor, and its API for `vm logs`.
const QEMU_AGENT_TOML: &str = r#"# written by t60_packaging: QEMU VMs, sandboxed
host_id = "ct1"
control_endpoints = ["http://127.0.0.1:7001"]
systemd_bus = "system"
heartbeat_interval_ms = 500
kvm = false
bridges = ["br0"]
api_listen = "127.0.0.1:7101"
process_command = ["/bin/sleep", "infinity"]

[hypervisors]
qemu = "/usr/bin/qemu-system-x86_64"
"#;

/// The highest `systemd-analyze security` exposure of a VM unit ("OK" on systemd's scale).
const MAX_VM_EXPOSURE: f64 = 2.5;

/// Time for a TCG guest to boot (or power off) in the container on a loaded machine.
const GUEST: Duration = Duration::from_secs(120);

/// `blixardctl ARGS…` against the container's control node.
async fn ctl(ct: &Container, args: &[&str]) -> anyhow::Result<String> {
    let mut argv = vec!["blixardctl", "--endpoints", CTL_ENDPOINT];
    argv.extend_from_slice(args);
    ct.run(&argv).await
}

/// What the unit of `vm` wrote (the guest's console, QEMU, `qmp-powerdown`), by its syslog
/// identifier (see t40's `console`).
async fn vm_journal(ct: &Container, vm: &str) -> anyhow::Result<String> {
    ct.run(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        "-t",
        &format!("blixard-vm-{vm}"),
    ])
    .await
}

/// `systemd-analyze security UNIT`: the overall exposure, and the report.
async fn exposure(ct: &Container, unit: &str) -> anyhow::Result<(f64, String)> {
    let out = ct
        .exec(&["systemd-analyze", "security", "--no-pager", unit])
        .await?;
    let score = overall_exposure(&out.stdout).with_context(|| {
        format!(
            "no overall exposure for {unit}: {}{}",
            out.stdout, out.stderr
        )
    })?;
    Ok((score, out.stdout))
}

/// The real and effective uid and the effective capabilities of a running process.
async fn identity(ct: &Container, pid: u32) -> anyhow::Result<(String, String)> {
    let status = ct.run(&["cat", &format!("/proc/{pid}/status")]).await?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    Ok((field("Uid:"), field("CapEff:")))
}

/// A QEMU VM unit, as the agent starts it under a real system manager: a dynamic user with no
/// capabilities, its disk and tap handed to that user for the run and the disk back after,
/// `systemd-analyze security` at most 2.5, and the console (journal, `vm logs`) and the
/// graceful stop (QMP) working through the sandbox. A `process` VM is sandboxed too.
async fn qemu_vm_sandboxed(ct: &Container, deb_name: &str) -> anyhow::Result<()> {
    ct.run(&["dpkg", "-i", &format!("/mnt/blixard/{deb_name}")])
        .await?;
    // /dev/net/tun is 0666 wherever udev runs (systemd's 50-udev-default.rules); the
    // container has no udev and the test machines' node is 0600, so do what udev does
    ct.sh(
        "cp /mnt/guest/vmlinuz /mnt/guest/initrd.gz /var/lib/blixard/images/ \
           && truncate -s 8M /var/lib/blixard/images/sbx-disk.img \
           && chmod 0666 /dev/net/tun \
           && ip link add br0 type bridge && ip link set br0 up",
    )
    .await?;
    ct.write_file("/etc/blixard/agent.toml", QEMU_AGENT_TOML)
        .await?;
    ct.run(&["blixard-agent", "check-config", "/etc/blixard/agent.toml"])
        .await?;
    ct.run(&["systemctl", "start", "blixard-control.service"])
        .await?;
    ct.run(&["systemctl", "start", "blixard-agent.service"])
        .await?;

    let (vm, unit) = ("sbx", "blixard-vm-sbx.service");
    ctl(
        ct,
        &[
            "vm",
            "create",
            vm,
            "--hypervisor",
            "qemu",
            "--vcpus",
            "1",
            "--memory",
            "128",
            "--kernel",
            "vmlinuz",
            "--initrd",
            "initrd.gz",
            "--cmdline",
            "console=ttyS0 reboot=t panic=-1 quiet blixard.net=1",
            "--disk",
            "sbx-disk.img",
            "--nic",
            "br0",
            "--restart",
            "never",
        ],
    )
    .await?;
    ctl(
        ct,
        &[
            "vm",
            "create",
            "sbxp",
            "--hypervisor",
            "process",
            "--vcpus",
            "1",
            "--memory",
            "64",
        ],
    )
    .await?;
    wait::until("the guest's marker in the journal", GUEST, || async {
        let j = vm_journal(ct, vm).await.map_err(|e| e.to_string())?;
        if j.contains(blixard_tests::guest::MARKER) {
            Ok(Some(()))
        } else {
            let tail: Vec<&str> = j.lines().rev().take(10).collect();
            Err(format!("the journal of {vm} ends with {tail:?}"))
        }
    })
    .await?;

    // the score, as `systemd-analyze security` gives it
    let (score, report) = exposure(ct, unit).await?;
    println!("systemd-analyze security {unit}: {score}");
    ensure!(
        score <= MAX_VM_EXPOSURE,
        "{unit} scores {score} in systemd-analyze security, above {MAX_VM_EXPOSURE}:\n{report}"
    );

    // QEMU runs as the unit's dynamic user, with no capabilities
    let uid = ct.unit_property(unit, "UID").await?;
    ensure!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "{unit} runs as UID {uid:?}, not a dynamic user"
    );
    let pid = main_pid(ct, unit).await?;
    let (uids, caps) = identity(ct, pid).await?;
    ensure!(
        uids.split(' ').all(|u| u == uid),
        "QEMU (pid {pid}) has uids {uids}, not {uid}"
    );
    ensure!(caps == "0000000000000000", "QEMU has capabilities {caps}");
    // its writable disk and its tap are its own while it runs
    let owner = ct
        .run(&["stat", "-c", "%u", "/var/lib/blixard/images/sbx-disk.img"])
        .await?;
    ensure!(
        owner.trim() == uid,
        "the disk belongs to {owner}, not {uid}"
    );
    let tap = blixard_agent::hypervisor::tap_name(vm, 0);
    let tap_owner = ct
        .run(&["cat", &format!("/sys/class/net/{tap}/owner")])
        .await?;
    ensure!(
        tap_owner.trim() == uid,
        "{tap} belongs to {tap_owner}, not {uid}"
    );
    // the guest's NIC came up on that tap
    wait::until("the guest's NIC up", GUEST, || async {
        let j = vm_journal(ct, vm).await.map_err(|e| e.to_string())?;
        Ok(j.lines()
            .any(|l| l.contains("BLIXARD-GUEST-NET-UP") && l.contains(",UP"))
            .then_some(()))
    })
    .await?;

    // the console through the control plane
    let logs = ctl(ct, &["vm", "logs", vm, "-n", "500"]).await?;
    ensure!(
        logs.contains(blixard_tests::guest::MARKER),
        "blixardctl vm logs {vm} lacks the marker:\n{logs}"
    );

    // the process VM: a dynamic user too, no capabilities
    wait::until("the process VM running", GUEST, || async {
        let s = ct
            .unit_property("blixard-vm-sbxp.service", "SubState")
            .await
            .map_err(|e| e.to_string())?;
        Ok((s == "running").then_some(()))
    })
    .await?;
    let (pscore, preport) = exposure(ct, "blixard-vm-sbxp.service").await?;
    println!("systemd-analyze security blixard-vm-sbxp.service: {pscore}");
    ensure!(
        pscore <= MAX_VM_EXPOSURE,
        "the process VM scores {pscore}:\n{preport}"
    );
    let ppid = main_pid(ct, "blixard-vm-sbxp.service").await?;
    let (puids, pcaps) = identity(ct, ppid).await?;
    ensure!(
        !puids.split(' ').any(|u| u == "0") && pcaps == "0000000000000000",
        "the process VM runs with uids {puids}, capabilities {pcaps}"
    );

    // the graceful stop goes through QMP from inside the sandbox
    ctl(ct, &["vm", "stop", vm]).await?;
    wait::until("a graceful stop in the journal", GUEST, || async {
        let j = vm_journal(ct, vm).await.map_err(|e| e.to_string())?;
        let state = ct
            .unit_property(unit, "ActiveState")
            .await
            .map_err(|e| e.to_string())?;
        if j.contains(blixard_tests::guest::POWER_BUTTON)
            && j.contains("qmp-powerdown: Exited")
            && (state == "inactive" || state == "failed")
        {
            Ok(Some(()))
        } else {
            Err(format!("{unit} {state}; journal:\n{j}"))
        }
    })
    .await?;
    // and the disk is root's again, the tap gone
    wait::until("the disk back to root and the tap gone", GUEST, || async {
        let owner = ct
            .run(&["stat", "-c", "%u", "/var/lib/blixard/images/sbx-disk.img"])
            .await
            .map_err(|e| e.to_string())?;
        let tap_left = ct
            .exec(&["test", "-e", &format!("/sys/class/net/{tap}")])
            .await
            .map_err(|e| e.to_string())?
            .success();
        if owner.trim() == "0" && !tap_left {
            Ok(Some(()))
        } else {
            Err(format!("disk owner {}, tap left: {tap_left}", owner.trim()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vm_unit_is_sandboxed_in_a_booted_debian() -> anyhow::Result<()> {
    container::require_root()?;
    require_tools(DEBIAN_TOOLS)?;
    let (_work, ct, deb_name) = debian_with_the_package("blixard-t60-sandbox-", true).await?;
    let result = qemu_vm_sandboxed(&ct, &deb_name).await;
    end_in_debian(ct, result).await
}

/// Builds the package under a temporary directory (kept while the first value lives) and
/// boots a Debian container with it at `/mnt/blixard`; the deb's file name. With `qemu`, the
/// rootfs has QEMU and iproute2, and the test guest is at `/mnt/guest`.
async fn debian_with_the_package(
    prefix: &str,
    qemu: bool,
) -> anyhow::Result<(tempfile::TempDir, Container, String)> {
    let work = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let deb_dir = work.path().join("deb");
    let deb = build_deb(&deb_dir).await?;
    let deb_name = deb
        .file_name()
        .context("deb without a file name")?
        .to_string_lossy()
        .into_owned();
    let ct = if qemu {
        let guest = blixard_tests::guest::images()?;
        let rootfs = container::rootfs_with_qemu().await?;
        Container::boot(
            &rootfs,
            &[(&deb_dir, "/mnt/blixard"), (&guest, "/mnt/guest")],
        )
        .await?
    } else {
        let rootfs = container::rootfs().await?;
        Container::boot(&rootfs, &[(&deb_dir, "/mnt/blixard")]).await?
    };
    Ok((work, ct, deb_name))
}

/// Shuts the container down; a failed `result` carries the container's diagnostics.
async fn end_in_debian(ct: Container, result: anyhow::Result<()>) -> anyhow::Result<()> {
    let result = match result {
        Ok(()) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{e:#}\n\n{}", ct.diagnostics().await)),
    };
    let down = ct.shutdown().await;
    result?;
    down
}

/// How a README's command block is checked, from the `<!-- readme-test: ... -->` line
/// right above its fence.
#[derive(Debug, PartialEq, Eq)]
enum BlockCheck {
    /// `run`: executed as it is in a booted Debian container with the package installed.
    Run,
    /// `host: REASON`: needs a real host or cluster; the README says why.
    Host(String),
    /// No marker: the test fails, so that every block says which it is.
    Unmarked,
}

#[derive(Debug)]
struct CommandBlock {
    /// 1-based line of the opening fence.
    line: usize,
    check: BlockCheck,
    body: String,
}

/// The fenced `sh` blocks of a Markdown text, with their markers.
fn command_blocks(markdown: &str) -> Vec<CommandBlock> {
    let mut blocks = Vec::new();
    let mut previous = "";
    let mut open: Option<(usize, BlockCheck, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match &mut open {
            Some((_, _, body)) => {
                if line.trim_start().starts_with("```") {
                    if let Some((start, check, body)) = open.take() {
                        blocks.push(CommandBlock {
                            line: start,
                            check,
                            body,
                        });
                    }
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
            None => {
                let fence = line.trim_start();
                if let Some(lang) = fence.strip_prefix("```") {
                    let marker = previous
                        .trim()
                        .strip_prefix("<!-- readme-test:")
                        .and_then(|m| m.strip_suffix("-->"))
                        .map(str::trim);
                    let check = match marker {
                        Some(m) if m == "run" || m.starts_with("run ") => BlockCheck::Run,
                        Some(m) => match m.strip_prefix("host:") {
                            Some(reason) if !reason.trim().is_empty() => {
                                BlockCheck::Host(reason.trim().to_string())
                            }
                            _ => BlockCheck::Unmarked,
                        },
                        None => BlockCheck::Unmarked,
                    };
                    if matches!(lang.trim(), "sh" | "bash" | "console" | "") {
                        open = Some((i + 1, check, String::new()));
                    } else {
                        // another language (toml, json...): not commands; skip to its end
                        open = Some((
                            i + 1,
                            BlockCheck::Host("not commands".into()),
                            String::new(),
                        ));
                    }
                }
            }
        }
        previous = line;
    }
    blocks
}

#[test]
fn command_blocks_are_found_with_their_markers() {
    let md = "text\n\n<!-- readme-test: run -->\n```sh\necho a\necho b\n```\n\n\
              <!-- readme-test: host: needs three machines -->\n```sh\nssh x\n```\n\n\
              ```sh\nunmarked\n```\n";
    let blocks = command_blocks(md);
    assert_eq!(blocks.len(), 3);
    assert_eq!(blocks[0].check, BlockCheck::Run);
    assert_eq!(blocks[0].body, "echo a\necho b\n");
    assert_eq!(blocks[0].line, 4);
    assert_eq!(
        blocks[1].check,
        BlockCheck::Host("needs three machines".into())
    );
    assert_eq!(blocks[2].check, BlockCheck::Unmarked);
}

/// The READMEs whose commands must run as written.
const READMES: [&str; 2] = ["README.md", "packaging/README.md"];

/// Every command block of the READMEs either runs in the container test below or says
/// which kind of host it needs.
#[test]
fn readme_command_blocks_say_how_they_are_checked() -> anyhow::Result<()> {
    let mut unmarked = Vec::new();
    let mut runnable = 0;
    for readme in READMES {
        let text = std::fs::read_to_string(workspace_root().join(readme))
            .with_context(|| format!("reading {readme}"))?;
        for b in command_blocks(&text) {
            match b.check {
                BlockCheck::Unmarked => unmarked.push(format!("{readme}:{}", b.line)),
                BlockCheck::Run => runnable += 1,
                BlockCheck::Host(_) => {}
            }
        }
    }
    ensure!(
        unmarked.is_empty(),
        "command blocks without a `<!-- readme-test: run -->` or \
         `<!-- readme-test: host: REASON -->` line above them: {}",
        unmarked.join(", ")
    );
    ensure!(runnable > 0, "no README block is marked to run");
    Ok(())
}

/// The `run` blocks of the READMEs, executed as they are (`sh -e -x`, as root) in a booted
/// Debian container right after `dpkg -i` of the package: what a new user would type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_commands_run_in_a_booted_debian() -> anyhow::Result<()> {
    container::require_root()?;
    require_tools(DEBIAN_TOOLS)?;
    require_tools(&["help2man"])?;
    let mut scripts = Vec::new();
    for readme in READMES {
        let text = std::fs::read_to_string(workspace_root().join(readme))
            .with_context(|| format!("reading {readme}"))?;
        for b in command_blocks(&text) {
            if b.check == BlockCheck::Run {
                scripts.push((format!("{readme}:{}", b.line), b.body));
            }
        }
    }
    let (_work, ct, deb_name) = debian_with_the_package("blixard-readme-", false).await?;
    let result = run_readme_blocks(&ct, &deb_name, &scripts).await;
    end_in_debian(ct, result).await
}

async fn run_readme_blocks(
    ct: &Container,
    deb_name: &str,
    scripts: &[(String, String)],
) -> anyhow::Result<()> {
    ct.run(&["dpkg", "-i", &format!("/mnt/blixard/{deb_name}")])
        .await?;
    for (at, script) in scripts {
        let out = ct.exec(&["sh", "-e", "-x", "-c", script]).await?;
        eprintln!("{at}:\n{}{}", out.stdout, out.stderr);
        ensure!(
            out.success(),
            "the commands of {at} failed ({:?}):\n{script}\nstdout:\n{}\nstderr:\n{}",
            out.code,
            out.stdout,
            out.stderr
        );
        // not a terminal: plain lines only (`--wait` used to redraw with \r and \e[2K)
        ensure!(
            !out.stderr.contains('\r') && !out.stderr.contains('\u{1b}'),
            "the commands of {at} wrote terminal control characters to a non-terminal:\n{:?}",
            out.stderr
        );
    }
    // systemctl status shows the node's role, term and applied index, and keeps it current
    wait::until(
        "blixard-control's STATUS= to name it leader",
        Duration::from_secs(10),
        || async {
            let status = ct
                .unit_property("blixard-control.service", "StatusText")
                .await
                .map_err(|e| e.to_string())?;
            let applied = status
                .strip_prefix("leader, term ")
                .and_then(|rest| rest.split_once(", applied "))
                .and_then(|(_, applied)| applied.parse::<u64>().ok());
            match applied {
                Some(a) if a > 0 => Ok(Some(())),
                _ => Err(format!("StatusText={status:?}")),
            }
        },
    )
    .await?;
    Ok(())
}
