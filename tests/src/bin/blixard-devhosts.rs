//! `blixard-devhosts`: simulated hosts with real agents, for the local demo
//! (`scripts/demo.sh`). Each host is a real `systemd --user` manager (see
//! `blixard_tests::host`) running `blixard-agent` against the given control plane, with
//! `/bin/sleep infinity` as the `process` hypervisor, and with `--guest DIR` (a build of
//! `tests/guest/build.sh`) QEMU with that kernel and initramfs in every image directory.
//! Runs until SIGTERM or SIGINT, then kills every host; their journals and agent logs stay in
//! `--dir`.
//!
//! ```text
//! blixard-devhosts --dir .demo/hosts --hosts 2 --endpoints http://127.0.0.1:7001,… [--guest DIR]
//! ```
//! Needs root (namespaces, cgroups), like the integration suite.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use blixard_tests::host::SimHost;

struct Args {
    dir: PathBuf,
    hosts: usize,
    endpoints: Vec<String>,
    guest: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut dir = None;
    let mut hosts = 2;
    let mut endpoints = None;
    let mut guest = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--guest" => guest = Some(PathBuf::from(value()?)),
            "--hosts" => hosts = value()?.parse().context("--hosts must be a number")?,
            "--endpoints" => {
                endpoints = Some(value()?.split(',').map(|s| s.trim().to_string()).collect())
            }
            "-h" | "--help" => {
                println!("usage: blixard-devhosts --dir DIR [--hosts N] --endpoints URL[,URL…] [--guest DIR]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let Some(dir) = dir else {
        bail!("--dir is required")
    };
    let Some(endpoints) = endpoints else {
        bail!("--endpoints is required")
    };
    if !(1..=16).contains(&hosts) {
        bail!("--hosts must be between 1 and 16");
    }
    Ok(Args {
        dir: std::path::absolute(dir)?,
        hosts,
        endpoints,
        guest,
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hosts = Vec::new();
    for i in 1..=args.hosts {
        let name = format!("host{i}");
        let mut host = SimHost::start_in(&name, &args.dir).await?;
        // The agent's API on a loopback port, so `blixardctl vm logs` reaches this host.
        let mut extra = String::from("api_listen = \"127.0.0.1:0\"\n");
        if let Some(dir) = &args.guest {
            blixard_tests::guest::install_from(dir, &host)?;
            extra.push_str(&blixard_tests::guest::agent_config());
        }
        host.spawn_agent(&args.endpoints, &extra)?;
        let env: Vec<String> = host.env().iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{name}: {}", host.base_dir().display());
        println!(
            "  units:   {} systemctl --user list-units 'blixard-vm-*'",
            env.join(" ")
        );
        println!(
            "  journal: journalctl -D {} -f",
            host.journal_dir().display()
        );
        println!(
            "  agent:   tail -f {}",
            host.base_dir().join("agent.log").display()
        );
        hosts.push(host);
    }
    println!(
        "{} simulated hosts running; SIGTERM or Ctrl-C stops them",
        hosts.len()
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    for mut h in hosts {
        h.kill()?;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let result = match parse_args() {
        Ok(args) => run(args).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blixard-devhosts: {e:#}");
            ExitCode::FAILURE
        }
    }
}
