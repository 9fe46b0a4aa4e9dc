//! `blixard-control`: parses flags, sets up logging, and runs a control node.

use std::path::PathBuf;
use std::process::ExitCode;

use blixard_control::config::{Config, Settings};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blixard-control",
    version,
    about = "Blixard control-plane node",
    after_help = "Without --config the node reads no file: the options above and their defaults apply. \
                  The packaged unit (blixard-control.service) runs it with \
                  --config /etc/blixard/control.toml; check that file with \
                  `blixard-control check-config /etc/blixard/control.toml`."
)]
struct Cli {
    /// TOML configuration file; flags override it. The packaged unit uses
    /// /etc/blixard/control.toml; without it, no file is read.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a configuration file without starting.
    CheckConfig { file: PathBuf },
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLIXARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let journald = std::path::Path::new("/run/systemd/journal/socket")
        .exists()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(j) => registry
            .with(j.with_syslog_identifier("blixard-control".into()))
            .init(),
        None => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}

fn load(file: Option<&PathBuf>, flags: Settings) -> Result<Config, String> {
    let base = match file {
        Some(f) => Settings::from_file(f).map_err(|e| e.to_string())?,
        None => Settings::default(),
    };
    Config::from_settings(base.overridden_by(flags)).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::CheckConfig { file }) = &cli.command {
        return match load(Some(file), Settings::default()) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("blixard-control: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match load(cli.config.as_ref(), cli.settings.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("blixard-control: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blixard-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(blixard_control::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = blixard_control::http::error::error_chain(&e);
            tracing::error!(error = %e, "exiting");
            eprintln!("blixard-control: {e}");
            ExitCode::FAILURE
        }
    }
}
