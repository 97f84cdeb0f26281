//! The `offload` binary: parses flags, sets up logging, runs a command and maps the
//! outcome to an exit code (0 success, 1 a build or copy failed, 2 bad usage or set-up;
//! `offload hook` exits as Nix expects of a build hook: 0, 1, 100 or 101).

mod args;
mod build;
mod completions;
mod copy;
mod doctor;
mod hook;
mod live;
mod machines;
mod output;
mod progress;
mod render;
mod report;
mod simulate;

use std::process::ExitCode;

use clap::Parser;
use offload_driver::config;
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
    let outcome = runtime.block_on(run(cli.command, quiet));
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            render::error(&failure.error);
            ExitCode::from(failure.code)
        }
    }
}

/// Runs `command`: its exit code, or the failure to print.
async fn run(command: Command, quiet: bool) -> Result<u8, Failure> {
    match command {
        Command::Copy(args) => copy::run(args, quiet).await.map(|()| 0),
        Command::Build(args) => {
            let loaded = config::load().map_err(Failure::usage)?;
            build::run(*args, &loaded, quiet).await.map(|()| 0)
        }
        Command::Simulate(args) => {
            shared_state_only();
            simulate::run(args).await.map(|()| 0)
        }
        Command::Doctor(args) => {
            let loaded = config::load().map_err(Failure::usage)?;
            let choice = loaded
                .machines(args.machines.choice())
                .map_err(Failure::usage)?;
            let state = loaded.state_db(None);
            doctor::run(choice, args.hosts, args.sign_key.as_deref(), &state)
                .await
                .map(|()| 0)
        }
        Command::Config => {
            let loaded = config::load().map_err(Failure::usage)?;
            output::stdout(&loaded.describe());
            Ok(0)
        }
        // Nix reads the hook's exit status itself (0, 1, 100, 101); offload's own
        // configuration plays no part in it.
        Command::Hook(args) => {
            shared_state_only();
            hook::run(args).await
        }
        Command::Agent(args) => {
            shared_state_only();
            hook::agent(args).await.map(|()| 0)
        }
        Command::Report(args) => {
            let loaded = config::load().map_err(Failure::usage)?;
            let state = loaded.state_db(args.history.clone());
            report::run(args, &state).map(|()| 0)
        }
        Command::Machines(args) => {
            let loaded = config::load().map_err(Failure::usage)?;
            let choice = loaded
                .machines(args.machines.choice())
                .map_err(Failure::usage)?;
            let state = loaded.state_db(args.history);
            machines::run(choice, &state, args.json).await.map(|()| 0)
        }
        Command::Completions { shell } => {
            completions::completions(shell);
            Ok(0)
        }
        Command::Man { out } => completions::man_pages(&out, quiet).map(|()| 0),
    }
}

/// Reads the config file for its `state` alone, for commands the rest of it does not
/// concern: the shared state is every client's. A file that cannot be read leaves the
/// state as `$OFFLOAD_STATE` (or the file) says.
fn shared_state_only() {
    if let Err(e) = config::load() {
        tracing::debug!("the config file's `state` is not used: {e}");
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
    let colour = output::stderr_in_colour();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}
