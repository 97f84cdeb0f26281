//! `offload report`: a run the state database kept, as a summary, as HTML (the driver's
//! [`offload_driver::html`]) or as a Chrome trace; or the list of runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};
use offload_driver::html::html;
use offload_driver::job::RunFile;
use offload_driver::state::report::RunReport;
use offload_driver::{format_utc, StateDb};
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

/// The HTML report of a run, at `path`.
pub fn html_file(path: PathBuf) -> RunFile {
    RunFile {
        what: "report",
        path,
        render: html,
    }
}

/// A run as Chrome trace events, at `path`.
pub fn trace_file(path: PathBuf) -> RunFile {
    RunFile {
        what: "trace",
        path,
        render: trace,
    }
}

/// `offload report`: a recorded run as HTML, a trace, or a summary; or the list of runs.
pub fn run(args: ReportArgs, path: &Path) -> Result<(), Failure> {
    let history = StateDb::open(path).map_err(Failure::usage)?;
    let place = history.place();
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
                Some(id) => anyhow!("no run {id} in {place} (`offload report --list`)"),
                None => anyhow!("no run recorded in {place} yet: `offload build` records each run"),
            })
        })?;
    let run: RunReport = serde_json::from_str(&record.report)
        .with_context(|| format!("run {} in {place} cannot be read", record.id))
        .map_err(Failure::usage)?;
    let asked = args.html.is_some() || args.trace.is_some();
    // The report first, then the trace.
    let files = [args.html.map(html_file), args.trace.map(trace_file)];
    for file in files.into_iter().flatten() {
        file.write(&run).map_err(Failure::usage)?;
    }
    if !asked {
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
        let lines = [
            run.route_bytes.describe(run.delivered_to.as_deref()),
            run.hedges.describe(),
        ];
        for line in lines.into_iter().flatten() {
            crate::output::stdout(&format!("{line}\n"));
        }
    }
    Ok(())
}
