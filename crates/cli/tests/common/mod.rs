//! What every test of the `offload` binary starts from.

use std::path::Path;
use std::process::Command;

use offload_test_support::NIX_CONFIG;

/// The real `offload` binary, run in `work` with no binary cache, its build history and
/// slot ledger kept in `work` (runs never share learned durations or depend on the
/// machine's own `/nix/var/nix/current-load`) and no config file but one the test
/// writes there.
pub fn offload(work: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_offload"));
    cmd.current_dir(work)
        .env(NIX_CONFIG.0, NIX_CONFIG.1)
        .env("OFFLOAD_HISTORY", work.join("history.sqlite"))
        .env("OFFLOAD_CONFIG", work.join("offload-config.toml"))
        .env("OFFLOAD_SLOTS_DIR", work.join("slots"));
    cmd
}
