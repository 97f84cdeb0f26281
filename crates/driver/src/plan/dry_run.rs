//! What Nix itself would do for a set of derivations: which must be built and which
//! paths it would substitute, read from `nix-store --realise --dry-run`. offload builds
//! exactly the first set and lets Nix fetch the second, so it never builds what a cache
//! has, by the same rules (substituters, trusted keys, `allowSubstitutes`) Nix applies.

use std::process::Command;

use crate::process::{self, ProcessError};

/// Nix's plan for a set of derivations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRun {
    /// `.drv` paths Nix would build.
    pub will_build: Vec<String>,
    /// Store paths Nix would substitute.
    pub will_fetch: Vec<String>,
}

/// Asks the local Nix (with `store` as `--store` when given).
pub fn dry_run(store: Option<&str>, targets: &[String]) -> Result<DryRun, ProcessError> {
    let mut cmd = Command::new("nix-store");
    if let Some(store) = store {
        cmd.args(["--store", store]);
    }
    let out = process::run(cmd.args(["--realise", "--dry-run"]).args(targets))?;
    Ok(parse(&String::from_utf8_lossy(&out.stderr)))
}

/// Reads the report `nix-store --realise --dry-run` prints on stderr.
pub fn parse(report: &str) -> DryRun {
    enum Section {
        None,
        Build,
        Fetch,
    }
    let mut plan = DryRun::default();
    let mut section = Section::None;
    for line in report.lines() {
        if let Some(path) = line.strip_prefix("  ") {
            let path = path.trim();
            match section {
                Section::Build => plan.will_build.push(path.to_string()),
                Section::Fetch => plan.will_fetch.push(path.to_string()),
                Section::None => {}
            }
        } else if line.contains("will be built") {
            section = Section::Build;
        } else if line.contains("will be fetched") {
            section = Section::Fetch;
        } else {
            section = Section::None;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nix_2_8_report() {
        let report = "these 2 derivations will be built:\n  /nix/store/a-x.drv\n  /nix/store/b-y.drv\n\
                      this path will be fetched (0.01 MiB download, 0.05 MiB unpacked):\n  /nix/store/c-z\n\
                      warning: something else\n";
        let plan = parse(report);
        assert_eq!(
            plan.will_build,
            ["/nix/store/a-x.drv", "/nix/store/b-y.drv"]
        );
        assert_eq!(plan.will_fetch, ["/nix/store/c-z"]);
        assert_eq!(parse(""), DryRun::default());
    }
}
