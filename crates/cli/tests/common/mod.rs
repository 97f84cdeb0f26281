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

/// The marker process every build of [`marker_graph`] runs: counting those processes
/// counts the builds running at once.
#[allow(dead_code)] // The slot tests' alone.
pub const MARKER: [&str; 2] = ["sleep", "1.37"];

/// Four leaves that each run the marker, under one top.
#[allow(dead_code)] // The slot tests' alone.
pub fn marker_graph(salt: &str) -> String {
    format!(
        r#"let mk = name: deps: script: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}";
             args = [ "-c" "${{script}}; mkdir $out" ];
           }};
           leaves = builtins.genList (i: mk "leaf${{toString i}}" [] "sleep 1.37") 4;
         in {{ top = mk "top" leaves "true"; }}"#
    )
}
