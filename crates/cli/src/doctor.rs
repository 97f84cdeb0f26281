//! `offload doctor`: the driver's checks of each machine, printed one machine after
//! another, each problem followed by what to change.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context as _};
use offload_driver::fleet::nixconf::NixSettings;
use offload_driver::fleet::{build_fleet, MachineChoice};
use offload_driver::transfer::routes as peers;
use offload_driver::trust::doctor::{self, MachineReport, Severity};
use offload_driver::trust::signing::PathSigner;

use crate::Failure;

/// Examines the machines of `choice` (with `hosts` added to `--on`), checking the outputs
/// path with the key at `sign_key`; which builder reaches which is kept in `state`.
pub async fn run(
    mut choice: MachineChoice,
    hosts: Vec<String>,
    sign_key: Option<&Path>,
    state: &Path,
) -> Result<(), Failure> {
    let settings = NixSettings::load()
        .context("reading Nix's settings")
        .map_err(Failure::usage)?;
    choice.on.extend(hosts);
    let fleet = build_fleet(&choice, &settings).map_err(Failure::usage)?;
    let signer = match sign_key {
        Some(path) => Some(PathSigner::load(path).map_err(Failure::usage)?),
        None => None,
    };
    // Named hosts without `local` leave this machine out, as `--on` does for builds.
    let wanted: Vec<usize> = (0..fleet.len())
        .filter(|&m| m != 0 || choice.on.is_empty() || choice.on.iter().any(|h| h == "local"))
        .collect();
    let mut broken = Vec::new();
    for m in wanted {
        let report = doctor::examine(&fleet, m, signer.as_ref()).await;
        eprint!("{}", render(&report));
        if report.severity() == Severity::Broken {
            broken.push(report.machine.clone());
        }
    }
    let answers = peers::probe_all(&fleet, offload_nix::store_path::store_dir().as_str()).await;
    // Kept, as a build keeps its own probes: the next build goes by them.
    peers::record(&fleet, &answers, state);
    if !answers.is_empty() {
        let names: Vec<&str> = fleet.iter().map(|m| m.spec.name.as_str()).collect();
        eprint!("{}", peers::matrix_text(&names, &answers));
    }
    if broken.is_empty() {
        return Ok(());
    }
    Err(Failure::work(anyhow!(
        "{} cannot build: see the fixes above",
        broken.join(", ")
    )))
}

/// One machine's findings: a heading, a line per check, the fix under each problem.
fn render(report: &MachineReport) -> String {
    let mut out = format!("{}\n", report.machine);
    let width = report
        .findings
        .iter()
        .map(|f| f.check.len())
        .max()
        .unwrap_or(0);
    for f in &report.findings {
        let mark = match f.severity {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Broken => "broken",
        };
        let _ = writeln!(
            out,
            "  {mark:<8} {:<width$} {}",
            f.check,
            f.detail
                .replace('\n', &format!("\n{:width$}", "", width = width + 12))
        );
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "           fix: {fix}");
        }
    }
    out.push('\n');
    out
}
