//! sluice: a Linux TCP proxy and file-to-socket relay that moves bytes with
//! splice(2), sendfile(2) and mmap under a file lease, chosen per route.
//!
//! This file is only the command line: parse arguments, set up logging,
//! then hand over to `config` (for `check`) or `server` (for `run`).
//!
//! `run` first installs a panic hook: a panic on any thread is logged at
//! error level (with the standard message), then the process aborts. A
//! worker that died alone would leave its share of every port's
//! connections unserved while the main thread carried on; a dead process
//! is what a service manager notices and restarts (`Restart=` in the
//! systemd unit). Release builds also set `panic = "abort"`.

mod admin;
mod config;
mod conn;
mod file_conn;
mod handshake;
mod health;
mod http;
mod idle_poll;
mod keepalive;
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
        Command::Run { config } => {
            abort_on_panic();
            #[cfg(debug_assertions)]
            failpoint();
            ExitCode::from(server::main(&config) as u8)
        }
    }
}

/// Make a panic on any thread log at error level, print the standard
/// message (and backtrace, if asked for), and abort the process.
fn abort_on_panic() {
    let standard = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)")
            .replace('\n', " ");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        log::error!(
            "thread '{name}' panicked{at}: {msg}; aborting so the service manager restarts sluice"
        );
        standard(info);
        std::process::abort();
    }));
}

/// Debug builds only, for the tests: `SLUICE_FAILPOINT=panic` panics a
/// thread once logging is set up, to show the whole process goes down.
#[cfg(debug_assertions)]
fn failpoint() {
    if std::env::var_os("SLUICE_FAILPOINT").is_some_and(|v| v == "panic") {
        let _ = std::thread::Builder::new()
            .name("failpoint".into())
            .spawn(|| {
                while log::max_level() == log::LevelFilter::Off {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                panic!("failpoint: SLUICE_FAILPOINT=panic");
            });
    }
}
