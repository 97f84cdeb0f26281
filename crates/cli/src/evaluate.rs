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

use anyhow::{anyhow, Context as _};
use offload_driver::process;
use offload_nix::store_path::StorePath;
use serde::Deserialize;

use crate::args::BuildArgs;
use crate::Failure;

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
pub fn evaluate(args: &BuildArgs) -> Result<Vec<Target>, Failure> {
    if args.targets.iter().any(|t| is_flake_installable(t)) {
        return evaluate_flakes(args);
    }
    if !args.override_input.is_empty() {
        return Err(Failure::usage(anyhow!(
            "--override-input applies to flake installables only, and none of {:?} is one\n\n\
             hint: name the flake with `#` or a flake scheme, e.g. `offload build .#pkg` or \
             `path:/dir#pkg`",
            args.targets
        )));
    }
    evaluate_files(args)
}

/// The options every evaluation gets, whichever Nix tool runs it.
fn common_options(cmd: &mut Command, args: &BuildArgs) {
    for path in &args.include {
        cmd.args(["-I", path]);
    }
    for pair in args.option.chunks(2) {
        cmd.arg("--option").args(pair);
    }
    if args.show_trace {
        cmd.arg("--show-trace");
    }
}

/// Runs an evaluation; a Nix that cannot start is a set-up problem, a failed one an
/// evaluation error.
fn run_evaluation(cmd: &mut Command) -> Result<String, Failure> {
    let out = process::run(cmd).map_err(|e| match e {
        process::ProcessError::Spawn { .. } => Failure::usage(e),
        process::ProcessError::Failed { .. } => {
            Failure::work(anyhow!(e).context("evaluation failed"))
        }
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn evaluate_files(args: &BuildArgs) -> Result<Vec<Target>, Failure> {
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
        for pair in args.arg.chunks(2) {
            cmd.arg("--arg").args(pair);
        }
        for pair in args.argstr.chunks(2) {
            cmd.arg("--argstr").args(pair);
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
                .map_err(|e| Failure::usage(anyhow!("{e}")))?;
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

fn evaluate_flakes(args: &BuildArgs) -> Result<Vec<Target>, Failure> {
    let nix_build_only = [
        ("-A", !args.attrs.is_empty()),
        ("-E", args.expr.is_some()),
        ("--arg", !args.arg.is_empty()),
        ("--argstr", !args.argstr.is_empty()),
    ];
    if let Some((flag, _)) = nix_build_only.iter().find(|(_, used)| *used) {
        return Err(Failure::usage(anyhow!(
            "{flag} applies to Nix files, not to the flake installables in {:?}\n\n\
             hint: name the attribute in the installable instead: `.#ATTR`",
            args.targets
        )));
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
    for pair in args.override_input.chunks(2) {
        cmd.arg("--override-input").args(pair);
    }
    common_options(&mut cmd, args);
    // `--` so that an installable can never be read as a flag.
    cmd.arg("--").args(&args.targets);
    let json = run_evaluation(&mut cmd)?;
    let paths: Vec<DerivedPath> = serde_json::from_str(&json)
        .with_context(|| format!("reading what `nix build --dry-run --json` printed: {json}"))
        .map_err(Failure::work)?;
    paths
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let Some(drv) = p.drv_path else {
                return Err(Failure::usage(anyhow!(
                    "{} is a store path, not a derivation: there is nothing to build\n\n\
                     hint: pass the installable or .drv that produces it",
                    p.path.unwrap_or_default()
                )));
            };
            let drv = StorePath::from_absolute_path(&drv)
                .map_err(|e| Failure::work(anyhow!("nix build reported {drv}: {e}")))?;
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
