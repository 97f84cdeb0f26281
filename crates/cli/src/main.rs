//! The `offload` binary: parses flags, sets up logging, runs a command and maps the
//! outcome to an exit code (0 success, 1 a build or copy failed, 2 bad usage or set-up).

mod access;
mod args;
mod build;
mod config;
mod copy;
mod doctor;
mod evaluate;
mod output;
mod render;
mod simulate;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            render::error(&anyhow::Error::new(e).context("cannot start the async runtime"));
            return ExitCode::from(2);
        }
    };
    let quiet = cli.quiet;
    let outcome = runtime.block_on(async {
        let loaded = config::load().map_err(Failure::usage)?;
        match cli.command {
            Command::Copy(args) => copy::run(args, quiet).await,
            Command::Build(mut args) => {
                loaded.apply_to_build(&mut args).map_err(Failure::usage)?;
                build::run(args, quiet).await
            }
            Command::Simulate(args) => simulate::run(args).await,
            Command::Doctor(mut args) => {
                loaded
                    .expand_groups(&mut args.machines)
                    .map_err(Failure::usage)?;
                doctor::run(args).await
            }
            Command::Config => {
                output::stdout(&loaded.describe());
                Ok(())
            }
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            render::error(&failure.error);
            ExitCode::from(failure.code)
        }
    }
}

/// An error with the exit code it maps to.
pub struct Failure {
    pub error: anyhow::Error,
    pub code: u8,
}

impl Failure {
    /// The user's input or set-up is wrong (exit 2).
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            error: error.into(),
            code: 2,
        }
    }

    /// The work itself failed (exit 1).
    pub fn work(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            error: error.into(),
            code: 1,
        }
    }
}

fn init_logging(cli: &Cli) {
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}
