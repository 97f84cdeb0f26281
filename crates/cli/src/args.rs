//! Command-line flags (clap derive). Doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Runs Nix builds across a fleet of machines, planned as one graph.
///
/// offload drives stock Nix on every machine over OpenSSH (`nix-store --serve --write`,
/// the protocol behind `ssh://` stores) and reads machines in Nix's own syntax.
#[derive(Debug, Parser)]
#[command(
    name = "offload",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// More log output (repeat for more); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy store paths and their closures between stores.
    ///
    /// Only paths missing on the other side move; each NAR streams from one store to the
    /// other through offload, several at once, and the receiving Nix checks its hash
    /// before registering it.
    ///
    /// Examples:
    ///   offload copy --to ssh://builder1 /nix/store/…-hello
    ///   offload copy --from 'ssh://localhost?remote-store=/tmp/fleet/m1' /nix/store/…-hello
    ///   offload copy --from ssh://builder1 --to ssh://builder2 /nix/store/…-hello
    Copy(CopyArgs),
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Store to copy to: ssh://[user@]host[?remote-store=DIR], `local`, or a chroot
    /// store directory. Default: the local store.
    #[arg(long, value_name = "URI", required_unless_present = "from")]
    pub to: Option<String>,

    /// Store to copy from. Default: the local store. With both --from and --to, paths
    /// stream from one machine to the other through offload.
    #[arg(long, value_name = "URI")]
    pub from: Option<String>,

    /// What "the local store" means: `local` (this machine's store) or a chroot store
    /// directory.
    #[arg(long, value_name = "URI", default_value = "local")]
    pub store: String,

    /// Transfers in flight at once.
    #[arg(short, long, value_name = "N", default_value_t = 4)]
    pub jobs: usize,

    /// Store paths whose closures to copy.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}
