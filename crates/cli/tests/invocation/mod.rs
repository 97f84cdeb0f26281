//! What the flag and flake tests share: one `offload` run with real Nix.

use std::path::Path;
use std::process::Output;

/// Runs `offload ARGS` in `work`; fails the test when Nix is missing, since these tests
/// exist to show Nix's behaviour through offload.
pub fn offload(args: &[&str], work: &Path) -> Output {
    assert!(
        offload_test_support::require_nix(),
        "these tests need Nix (scripts/setup.sh installs it)"
    );
    crate::common::offload(work)
        .args(args)
        .output()
        .expect("running offload")
}
