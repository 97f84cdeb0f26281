//! `offload completions SHELL` and `offload man --out DIR`: shell completion scripts and
//! man pages generated from the flag definitions in `args`, so they never drift from
//! `--help`.

use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::args::Cli;
use crate::Failure;

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: Shell) {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "offload", &mut script);
    crate::output::stdout(&String::from_utf8_lossy(&script));
}

/// Writes `offload.1` and a page per subcommand (`offload-build.1`, …) into `dir`,
/// making it if needed.
pub fn man_pages(dir: &Path, quiet: bool) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
        .with_context(|| format!("cannot write man pages to {}", dir.display()))
        .map_err(Failure::usage)?;
    if !quiet {
        eprintln!("wrote man pages to {}", dir.display());
    }
    Ok(())
}
