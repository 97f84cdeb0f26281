//! `offload report`: a run the state database kept, as a summary, as HTML (the driver's
//! [`offload_driver::state::report::html`]) or as a Chrome trace; or the list of runs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context as _};
use offload_driver::state::report::html::html;
use offload_driver::state::report::RunReport;
use offload_driver::{format_utc, History};
use offload_sim::report::{chrome_trace, TraceEvent};

use crate::args::ReportArgs;
use crate::Failure;

/// The run as Chrome trace events (Perfetto, chrome://tracing).
pub fn trace(run: &RunReport) -> String {
    let machines: Vec<String> = run.machines.iter().map(|m| m.name.clone()).collect();
    let builds: Vec<TraceEvent> = run
        .builds
        .iter()
        .filter_map(|b| {
            Some(TraceEvent {
                name: b.name.clone(),
                machine: machines.iter().position(|m| *m == b.machine)?,
                start: b.start,
                duration: b.seconds,
            })
        })
        .collect();
    chrome_trace(&machines, &builds).to_string()
}

/// Writes the HTML report of `run` to `path`.
pub fn write_html(path: &Path, run: &RunReport) -> Result<(), Failure> {
    std::fs::write(path, html(run))
        .with_context(|| format!("writing the report to {}", path.display()))
        .map_err(Failure::usage)
}

/// Writes `run` as Chrome trace events to `path`.
pub fn write_trace(path: &Path, run: &RunReport) -> Result<(), Failure> {
    std::fs::write(path, trace(run))
        .with_context(|| format!("writing the trace to {}", path.display()))
        .map_err(Failure::usage)
}

/// `offload report`: a recorded run as HTML, a trace, or a summary; or the list of runs.
pub fn run(args: ReportArgs, path: &Path) -> Result<(), Failure> {
    let history = History::open(path).map_err(Failure::usage)?;
    if args.list {
        let mut out = String::new();
        for (id, started) in history.runs(50).map_err(Failure::usage)? {
            let _ = writeln!(out, "{id}  {}", format_utc(started));
        }
        crate::output::stdout(&out);
        return Ok(());
    }
    let record = history
        .run(args.run)
        .map_err(Failure::usage)?
        .ok_or_else(|| {
            Failure::usage(match args.run {
                Some(id) => anyhow!(
                    "no run {id} in {} (`offload report --list`)",
                    path.display()
                ),
                None => anyhow!(
                    "no run recorded in {} yet: `offload build` records each run",
                    path.display()
                ),
            })
        })?;
    let run: RunReport = serde_json::from_str(&record.report)
        .with_context(|| format!("run {} in {} cannot be read", record.id, path.display()))
        .map_err(Failure::usage)?;
    if let Some(file) = &args.html {
        write_html(file, &run)?;
    }
    if let Some(file) = &args.trace {
        write_trace(file, &run)?;
    }
    if args.html.is_none() && args.trace.is_none() {
        let per_machine: Vec<String> = run
            .machines
            .iter()
            .map(|m| {
                let n = run.builds.iter().filter(|b| b.machine == m.name).count();
                format!("{} {n}", m.name)
            })
            .collect();
        crate::output::stdout(&format!(
            "run {} at {}: {} builds in {:.2} s (lower bound {:.2} s)\nbuilds per machine: {}\n",
            record.id,
            format_utc(record.started_at),
            run.builds.len(),
            run.wall_seconds,
            run.lower_bound,
            per_machine.join(", ")
        ));
    }
    Ok(())
}
