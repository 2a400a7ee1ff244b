//! sluice: a Linux TCP proxy and file-to-socket relay that moves bytes with
//! splice(2), sendfile(2) and mmap under a file lease, chosen per route.
//!
//! This file is only the command line: parse arguments, set up logging,
//! then hand over to `config` (for `check`) or `server` (for `run`).

mod admin;
mod config;
mod conn;
mod file_conn;
mod handshake;
mod health;
mod http;
mod pipe_pool;
mod proxy_proto;
mod pump;
mod route;
mod server;
mod stats;
mod sys;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

const DEFAULT_CONFIG: &str = "/etc/sluice/sluice.toml";

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Zero-copy TCP proxy and file-to-socket relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration and exit (0 = valid).
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(cfg) => {
                println!("{}", cfg.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => ExitCode::from(server::main(&config) as u8),
    }
}
