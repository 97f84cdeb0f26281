//! Evaluation: what the command line asks for, as `.drv` paths and wanted outputs.
//!
//! Nix evaluates; offload only chooses the tool. Files and expressions go to
//! `nix-instantiate` as `nix-build` would send them; flake installables (`.#pkg`,
//! `path:/dir#attr`, `github:owner/repo`) go to `nix build --dry-run --json`, which
//! resolves them (default packages, `outputsToInstall`, `--override-input`) exactly as
//! `nix build` does and reports, per installable and in order, the derivation and the
//! outputs it would link.

use std::collections::BTreeMap;
use std::process::Command;

use offload_nix::store_path::StorePath;
use serde::Deserialize;

use super::JobError;
use crate::process;

/// What to evaluate, as `nix-build` or `nix build` takes it.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Nix files, `.drv` paths (with `!OUTPUTS`) or flake installables.
    pub targets: Vec<String>,
    /// `-A` attributes.
    pub attrs: Vec<String>,
    /// `-E`: an expression instead of files.
    pub expr: Option<String>,
    /// `--arg NAME EXPR` and `--argstr NAME STRING`.
    pub args: Vec<(String, String)>,
    pub argstrs: Vec<(String, String)>,
    /// `-I` search path entries.
    pub include: Vec<String>,
    /// `--option NAME VALUE`.
    pub options: Vec<(String, String)>,
    /// `--override-input INPUT REF`, for flakes.
    pub override_inputs: Vec<(String, String)>,
    pub show_trace: bool,
}

/// A target: a `.drv`, the outputs wanted from it (all when `None`), and the suffix its
/// result links get (`""`, `"-2"` for nix-build's second target, `"-1"` for
/// `nix build`'s second installable).
pub struct Target {
    pub drv: StorePath,
    pub outputs: Option<Vec<String>>,
    pub link_suffix: String,
}

/// Flake-reference schemes: a target starting with one of these is a flake installable.
/// `http:`/`https:` are left out on purpose: nix-build takes those as tarball URLs.
const FLAKE_SCHEMES: &[&str] = &[
    "path:",
    "github:",
    "gitlab:",
    "sourcehut:",
    "flake:",
    "git+",
    "hg+",
    "tarball+",
    "file+",
];

/// Whether `target` is a flake installable for `nix build` rather than a file or `.drv`
/// path for `nix-build`.
pub fn is_flake_installable(target: &str) -> bool {
    target.contains('#') || FLAKE_SCHEMES.iter().any(|s| target.starts_with(s))
}

/// Evaluates what `args` names. Evaluation errors are Nix's own, with the command run.
pub fn evaluate(args: &Evaluation) -> Result<Vec<Target>, JobError> {
    if args.targets.iter().any(|t| is_flake_installable(t)) {
        return evaluate_flakes(args);
    }
    if !args.override_inputs.is_empty() {
        return Err(JobError::OverrideWithoutFlake {
            targets: args.targets.clone(),
        });
    }
    evaluate_files(args)
}

/// The options every evaluation gets, whichever Nix tool runs it.
fn common_options(cmd: &mut Command, args: &Evaluation) {
    for path in &args.include {
        cmd.args(["-I", path]);
    }
    for (name, value) in &args.options {
        cmd.args(["--option", name, value]);
    }
    if args.show_trace {
        cmd.arg("--show-trace");
    }
}

/// Runs an evaluation; a Nix that cannot start is a set-up problem, a failed one an
/// evaluation error.
fn run_evaluation(cmd: &mut Command) -> Result<String, JobError> {
    let out = process::run(cmd).map_err(|e| match e {
        process::ProcessError::Spawn { .. } => JobError::Evaluator(e),
        process::ProcessError::Failed { .. } => JobError::Evaluation(e),
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn evaluate_files(args: &Evaluation) -> Result<Vec<Target>, JobError> {
    let mut drv_args = Vec::new();
    let mut files = Vec::new();
    for t in &args.targets {
        if t.ends_with(".drv") || t.contains(".drv!") {
            drv_args.push(t.clone());
        } else {
            files.push(t.clone());
        }
    }
    let mut lines: Vec<String> = drv_args;
    if args.expr.is_some() || !files.is_empty() || lines.is_empty() {
        let mut cmd = Command::new("nix-instantiate");
        if let Some(expr) = &args.expr {
            cmd.args(["-E", expr]);
        } else if files.is_empty() {
            cmd.arg("./default.nix");
        } else {
            cmd.args(&files);
        }
        for a in &args.attrs {
            cmd.args(["-A", a]);
        }
        for (name, value) in &args.args {
            cmd.args(["--arg", name, value]);
        }
        for (name, value) in &args.argstrs {
            cmd.args(["--argstr", name, value]);
        }
        common_options(&mut cmd, args);
        lines.extend(run_evaluation(&mut cmd)?.lines().map(str::to_string));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let (drv, outputs) = match line.split_once('!') {
                Some((d, o)) => (d, Some(o.split(',').map(str::to_string).collect())),
                None => (line.as_str(), None),
            };
            let drv = StorePath::from_absolute_path(drv.trim())
                .map_err(|e| JobError::NotAStorePath(e.to_string()))?;
            // nix-build numbers the second target's links `-2`.
            let link_suffix = if i == 0 {
                String::new()
            } else {
                format!("-{}", i + 1)
            };
            Ok(Target {
                drv,
                outputs,
                link_suffix,
            })
        })
        .collect()
}

/// One entry of `nix build --json`: a derivation with the outputs it builds, or a plain
/// store path (`{"path": …}`).
#[derive(Deserialize)]
struct DerivedPath {
    #[serde(rename = "drvPath")]
    drv_path: Option<String>,
    #[serde(default)]
    outputs: BTreeMap<String, Option<String>>,
    path: Option<String>,
}

fn evaluate_flakes(args: &Evaluation) -> Result<Vec<Target>, JobError> {
    let nix_build_only = [
        ("-A", !args.attrs.is_empty()),
        ("-E", args.expr.is_some()),
        ("--arg", !args.args.is_empty()),
        ("--argstr", !args.argstrs.is_empty()),
    ];
    if let Some((flag, _)) = nix_build_only.iter().find(|(_, used)| *used) {
        return Err(JobError::FlagForFiles {
            flag,
            targets: args.targets.clone(),
        });
    }
    let mut cmd = Command::new("nix");
    cmd.args([
        "--extra-experimental-features",
        "nix-command flakes",
        "build",
        "--dry-run",
        "--json",
        "--no-link",
    ]);
    for (input, flake) in &args.override_inputs {
        cmd.args(["--override-input", input, flake]);
    }
    common_options(&mut cmd, args);
    // `--` so that an installable can never be read as a flag.
    cmd.arg("--").args(&args.targets);
    let json = run_evaluation(&mut cmd)?;
    let paths: Vec<DerivedPath> =
        serde_json::from_str(&json).map_err(|source| JobError::FlakeOutput { json, source })?;
    paths
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let Some(drv) = p.drv_path else {
                return Err(JobError::NotADerivation {
                    path: p.path.unwrap_or_default(),
                });
            };
            let drv =
                StorePath::from_absolute_path(&drv).map_err(|e| JobError::FlakeDerivation {
                    reason: e.to_string(),
                    drv,
                })?;
            // `nix build` numbers the second installable's links `-1`.
            let link_suffix = if i == 0 {
                String::new()
            } else {
                format!("-{i}")
            };
            Ok(Target {
                drv,
                outputs: Some(p.outputs.into_keys().collect()),
                link_suffix,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flake_installables_are_told_from_files_as_nix_build_does() {
        for flake in [
            ".#pkg",
            "path:/some/flake#packages.x86_64-linux.foo",
            "github:owner/repo",
            "git+file:///src/repo",
            "/dir#nixosConfigurations.host.config.system.build.toplevel",
        ] {
            assert!(is_flake_installable(flake), "{flake}");
        }
        for file in [
            "default.nix",
            "./release.nix",
            "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv",
            "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv!out,dev",
            "https://example.org/nixpkgs.tar.gz",
        ] {
            assert!(!is_flake_installable(file), "{file}");
        }
    }
}
