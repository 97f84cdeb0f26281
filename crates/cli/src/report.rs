//! A build report people can look at: one self-contained HTML file (no network, no
//! scripts) with a Gantt chart of the builds on each machine slot, the critical path
//! highlighted, each machine's utilisation, the makespan against the lower bound, and
//! the ten longest builds. Every `offload build` run is recorded in the state database;
//! `offload report [RUN]` renders one again, as HTML or as a Chrome trace.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context as _};
use offload_driver::build::{BuildReport, NodeResult};
use offload_driver::{format_utc, StateDb};
use offload_sim::report::{chrome_trace, TraceEvent};
use serde::{Deserialize, Serialize};

use crate::args::ReportArgs;
use crate::Failure;

/// One build of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportBuild {
    pub name: String,
    pub machine: String,
    /// Seconds since the run began.
    pub start: f64,
    pub seconds: f64,
    /// On the chain of builds that decided the run's length.
    pub critical: bool,
}

/// A machine of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportMachine {
    pub name: String,
    pub slots: u32,
}

/// A store path copied between two machines during the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportTransfer {
    pub from: String,
    pub to: String,
    pub bytes: u64,
    /// Seconds since the run began.
    pub start: f64,
    pub seconds: f64,
}

/// Everything the report shows, as the state database keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub title: String,
    pub wall_seconds: f64,
    pub lower_bound: f64,
    pub machines: Vec<ReportMachine>,
    pub builds: Vec<ReportBuild>,
    #[serde(default)]
    pub transfers: Vec<ReportTransfer>,
}

impl RunReport {
    /// The run of `drv_paths` (whose inputs are `deps`) on `machines`, as it went.
    pub fn from_build(
        drv_paths: &[String],
        deps: &[Vec<usize>],
        machines: Vec<ReportMachine>,
        report: &BuildReport,
    ) -> RunReport {
        let end: Vec<Option<f64>> = report
            .results
            .iter()
            .map(|r| match r {
                NodeResult::Built {
                    started, seconds, ..
                } => Some(started + seconds),
                NodeResult::Failed { .. } => None,
            })
            .collect();
        let chain = critical_chain(deps, &end);
        let builds = drv_paths
            .iter()
            .zip(&report.results)
            .enumerate()
            .filter_map(|(i, (drv, r))| match r {
                NodeResult::Built {
                    machine,
                    started,
                    seconds,
                } => Some(ReportBuild {
                    name: crate::progress::drv_name(drv).to_string(),
                    machine: machine.clone(),
                    start: *started,
                    seconds: *seconds,
                    critical: chain.contains(&i),
                }),
                NodeResult::Failed { .. } => None,
            })
            .collect();
        RunReport {
            title: format!("offload build: {} derivations", drv_paths.len()),
            wall_seconds: report.wall_seconds,
            lower_bound: report.measured_lower_bound,
            machines,
            builds,
            transfers: Vec::new(),
        }
    }

    /// The run as Chrome trace events (Perfetto, chrome://tracing).
    fn trace(&self) -> String {
        let machines: Vec<String> = self.machines.iter().map(|m| m.name.clone()).collect();
        let builds: Vec<TraceEvent> = self
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
}

/// Writes the HTML report of `run` to `path`.
pub fn write_html(path: &Path, run: &RunReport) -> Result<(), Failure> {
    std::fs::write(path, html(run))
        .with_context(|| format!("writing the report to {}", path.display()))
        .map_err(Failure::usage)
}

/// Writes `run` as Chrome trace events to `path`.
pub fn write_trace(path: &Path, run: &RunReport) -> Result<(), Failure> {
    std::fs::write(path, run.trace())
        .with_context(|| format!("writing the trace to {}", path.display()))
        .map_err(Failure::usage)
}

/// Keeps `run` in the state database for `offload report`; a run that cannot be kept is
/// reported, not failed.
pub fn record(history: &StateDb, run: &RunReport) {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        - run.wall_seconds as i64;
    let kept = serde_json::to_string(run)
        .map_err(|e| e.to_string())
        .and_then(|json| {
            history
                .record_run(started, &json)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = kept {
        tracing::warn!("cannot keep the run for offload report: {e}");
    }
}

/// `offload report`: a recorded run as HTML, a trace, or a summary; or the list of runs.
pub fn run(args: ReportArgs) -> Result<(), Failure> {
    let path = args
        .history
        .clone()
        .unwrap_or_else(offload_driver::env::state_db_path);
    let history = StateDb::open(&path).map_err(Failure::usage)?;
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

/// The chain of builds that ends last, each waiting on the one before: the critical path
/// as the run went. `deps[i]` are the builds build `i` needed; `end[i]` when it ended.
pub fn critical_chain(deps: &[Vec<usize>], end: &[Option<f64>]) -> Vec<usize> {
    let Some(mut at) = (0..end.len())
        .filter(|&i| end[i].is_some())
        .max_by(|&a, &b| {
            end[a]
                .partial_cmp(&end[b])
                .unwrap_or(std::cmp::Ordering::Equal)
        })
    else {
        return Vec::new();
    };
    let mut chain = vec![at];
    while let Some(&prev) = deps[at]
        .iter()
        .filter(|&&d| end[d].is_some())
        .max_by(|&&a, &&b| {
            end[a]
                .partial_cmp(&end[b])
                .unwrap_or(std::cmp::Ordering::Equal)
        })
    {
        chain.push(prev);
        at = prev;
    }
    chain.reverse();
    chain
}

/// Colours per machine, readable on white and without colour vision of every hue.
const PALETTE: [&str; 8] = [
    "#4e79a7", "#59a14f", "#9c755f", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#bab0ac",
];
const CRITICAL: &str = "#e15759";
const TRANSFER: &str = "#8c8c8c";

/// A byte count for people.
fn bytes(n: u64) -> String {
    crate::copy::human_bytes(n)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Builds per machine spread over its slots: each build goes to the first lane free at
/// its start.
fn lanes(builds: &[&ReportBuild], slots: u32) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..builds.len()).collect();
    order.sort_by(|&a, &b| builds[a].start.total_cmp(&builds[b].start));
    let mut lanes: Vec<(f64, Vec<usize>)> = Vec::new();
    for i in order {
        let b = builds[i];
        match lanes
            .iter_mut()
            .find(|(free_at, _)| *free_at <= b.start + 1e-6)
        {
            Some(lane) => {
                lane.0 = b.start + b.seconds;
                lane.1.push(i);
            }
            None => lanes.push((b.start + b.seconds, vec![i])),
        }
    }
    while lanes.len() < slots.max(1) as usize {
        lanes.push((0.0, Vec::new()));
    }
    lanes.into_iter().map(|(_, l)| l).collect()
}

/// The report as one HTML file.
pub fn html(run: &RunReport) -> String {
    const WIDTH: f64 = 960.0;
    const LABEL: f64 = 180.0;
    const ROW: f64 = 22.0;
    let span = run
        .builds
        .iter()
        .map(|b| b.start + b.seconds)
        .fold(run.wall_seconds, f64::max)
        .max(1e-3);
    let x = |t: f64| LABEL + (t / span) * (WIDTH - LABEL - 10.0);
    let mut rows = String::new();
    let mut y = 30.0;
    let mut utilisation = String::new();
    for (m, machine) in run.machines.iter().enumerate() {
        let colour = PALETTE[m % PALETTE.len()];
        let mine: Vec<&ReportBuild> = run
            .builds
            .iter()
            .filter(|b| b.machine == machine.name)
            .collect();
        let busy: f64 = mine.iter().map(|b| b.seconds).sum();
        let share = busy / (f64::from(machine.slots.max(1)) * run.wall_seconds.max(1e-3));
        let _ = write!(
            utilisation,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{busy:.1} s</td>\
             <td><div class=\"bar\"><div style=\"width:{:.0}%;background:{colour}\"></div></div> {:.0}%</td>\
             <td>{}</td></tr>",
            escape(&machine.name),
            machine.slots,
            mine.len(),
            (share * 100.0).min(100.0),
            share * 100.0,
            over_time(&mine, machine.slots, span, colour)
        );
        for (slot, lane) in lanes(&mine, machine.slots).iter().enumerate() {
            let _ = write!(
                rows,
                "<text x=\"4\" y=\"{:.0}\" class=\"label\">{} #{}</text>",
                y + 15.0,
                escape(&machine.name),
                slot + 1
            );
            for &i in lane {
                let b = mine[i];
                let fill = if b.critical { CRITICAL } else { colour };
                let _ = write!(
                    rows,
                    "<rect x=\"{:.1}\" y=\"{y:.0}\" width=\"{:.1}\" height=\"{:.0}\" fill=\"{fill}\" \
                     class=\"build\"><title>{} on {}: {:.2} s from {:.2} s{}</title></rect>",
                    x(b.start),
                    (x(b.start + b.seconds) - x(b.start)).max(1.5),
                    ROW - 4.0,
                    escape(&b.name),
                    escape(&b.machine),
                    b.seconds,
                    b.start,
                    if b.critical { " (critical path)" } else { "" }
                );
            }
            y += ROW;
        }
    }
    // One lane per link that carried something: the machine's transfers, in grey.
    let mut links = String::new();
    for machine in &run.machines {
        let mine: Vec<&ReportTransfer> = run
            .transfers
            .iter()
            .filter(|t| t.from == machine.name || t.to == machine.name)
            .filter(|t| t.from != t.to && (t.from == "local" || t.to == "local"))
            .filter(|_| machine.name != "local")
            .collect();
        if mine.is_empty() {
            continue;
        }
        let _ = write!(
            rows,
            "<text x=\"4\" y=\"{:.0}\" class=\"label\">{} link</text>",
            y + 15.0,
            escape(&machine.name)
        );
        for t in &mine {
            let _ = write!(
                rows,
                "<rect x=\"{:.1}\" y=\"{:.0}\" width=\"{:.1}\" height=\"{:.0}\" fill=\"{TRANSFER}\" \
                 class=\"build\"><title>{} → {}: {} in {:.2} s</title></rect>",
                x(t.start),
                y + 4.0,
                (x(t.start + t.seconds) - x(t.start)).max(1.5),
                ROW - 12.0,
                escape(&t.from),
                escape(&t.to),
                bytes(t.bytes),
                t.seconds
            );
        }
        let total: u64 = mine.iter().map(|t| t.bytes).sum();
        let _ = write!(
            links,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&machine.name),
            mine.len(),
            bytes(total)
        );
        y += ROW;
    }
    let height = y + 30.0;
    let mut axis = String::new();
    let step = nice_step(span);
    let mut t = 0.0;
    while t <= span + 1e-9 {
        let _ = write!(
            axis,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"24\" y2=\"{1:.0}\" class=\"grid\"/>\
             <text x=\"{0:.1}\" y=\"18\" class=\"tick\">{2} s</text>",
            x(t),
            y,
            format_seconds(t)
        );
        t += step;
    }
    let mut longest: Vec<&ReportBuild> = run.builds.iter().collect();
    longest.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let mut top = String::new();
    for b in longest.iter().take(10) {
        let _ = write!(
            top,
            "<tr><td>{}</td><td>{}</td><td>{:.2} s</td><td>{}</td></tr>",
            escape(&b.name),
            escape(&b.machine),
            b.seconds,
            if b.critical { "critical path" } else { "" }
        );
    }
    let ratio = if run.lower_bound > 0.001 {
        format!(" ({:.2}× the bound)", run.wall_seconds / run.lower_bound)
    } else {
        String::new()
    };
    let mut on_path: Vec<&ReportBuild> = run.builds.iter().filter(|b| b.critical).collect();
    on_path.sort_by(|a, b| a.start.total_cmp(&b.start));
    let critical: Vec<&str> = on_path.iter().map(|b| b.name.as_str()).collect();
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 10px; text-align: left; border-bottom: 1px solid #ddd; }}
.bar {{ display: inline-block; width: 160px; height: 10px; background: #eee; vertical-align: middle; }}
.bar div {{ height: 10px; }}
svg .label {{ font-size: 12px; }} svg .tick {{ font-size: 11px; fill: #666; text-anchor: middle; }}
svg .grid {{ stroke: #e4e4e4; }} svg .build {{ stroke: #fff; stroke-width: 0.5; }}
</style></head><body>
<h1>{title}</h1>
<p>Makespan <b>{wall:.2} s</b> against a lower bound of {bound:.2} s{ratio}; {n} builds on {m} machines.
Critical path ({c} builds, in red): {path}.</p>
<h2>Builds per machine slot</h2>
<svg id="gantt" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0}" viewBox="0 0 {width} {height:.0}">
{axis}{rows}
</svg>
<h2>Utilisation</h2>
<table><tr><th>machine</th><th>slots</th><th>builds</th><th>busy</th><th>utilisation</th><th>over time</th></tr>{utilisation}</table>
<h2>Bytes moved per link</h2>
<table><tr><th>machine</th><th>transfers</th><th>bytes</th></tr>{links}</table>
<h2>The ten longest builds</h2>
<table><tr><th>derivation</th><th>machine</th><th>time</th><th></th></tr>{top}</table>
</body></html>
"#,
        title = escape(&run.title),
        wall = run.wall_seconds,
        bound = run.lower_bound,
        n = run.builds.len(),
        m = run.machines.len(),
        c = critical.len(),
        path = escape(&critical.join(" → ")),
        width = WIDTH,
    )
}

/// Busy slots of a machine over the run, as a small area chart: 60 time buckets, each
/// as high as the share of its slots in use then.
fn over_time(builds: &[&ReportBuild], slots: u32, span: f64, colour: &str) -> String {
    const BUCKETS: usize = 60;
    const W: f64 = 180.0;
    const H: f64 = 24.0;
    let step = span / BUCKETS as f64;
    let mut bars = String::new();
    for i in 0..BUCKETS {
        let (from, to) = (i as f64 * step, (i + 1) as f64 * step);
        // Slot-seconds used in the bucket, over what the bucket offers.
        let used: f64 = builds
            .iter()
            .map(|b| ((b.start + b.seconds).min(to) - b.start.max(from)).max(0.0))
            .sum();
        let share = (used / (step * f64::from(slots.max(1)))).min(1.0);
        if share > 0.0 {
            let _ = write!(
                bars,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"/>",
                i as f64 * W / BUCKETS as f64,
                H * (1.0 - share),
                W / BUCKETS as f64,
                H * share
            );
        }
    }
    format!(
        "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         style=\"background:#f4f4f4\">{bars}</svg>"
    )
}

/// A round step for the time axis: about eight ticks.
fn nice_step(span: f64) -> f64 {
    let raw = span / 8.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(raw)
}

fn format_seconds(t: f64) -> String {
    if t >= 10.0 || t == 0.0 {
        format!("{t:.0}")
    } else {
        format!("{t:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_critical_chain_follows_the_latest_inputs() {
        // 0 → 2, 1 → 2, 2 → 3; 1 ended after 0.
        let deps = vec![vec![], vec![], vec![0, 1], vec![2], vec![]];
        let end = vec![Some(1.0), Some(2.0), Some(3.0), Some(4.0), Some(0.5)];
        assert_eq!(critical_chain(&deps, &end), [1, 2, 3]);
        assert!(critical_chain(&deps, &[None; 5]).is_empty());
    }

    #[test]
    fn builds_spread_over_slots_without_overlapping() {
        let b = |start: f64, seconds: f64| ReportBuild {
            name: "x".into(),
            machine: "m".into(),
            start,
            seconds,
            critical: false,
        };
        let builds = [b(0.0, 2.0), b(0.5, 1.0), b(1.6, 1.0), b(2.0, 1.0)];
        let refs: Vec<&ReportBuild> = builds.iter().collect();
        let l = lanes(&refs, 2);
        assert_eq!(l, [vec![0, 3], vec![1, 2]]);
    }

    #[test]
    fn names_are_escaped() {
        let run = RunReport {
            title: "<run>".into(),
            wall_seconds: 1.0,
            lower_bound: 0.0,
            machines: vec![ReportMachine {
                name: "m&1".into(),
                slots: 1,
            }],
            builds: Vec::new(),
            transfers: Vec::new(),
        };
        let page = html(&run);
        assert!(page.contains("&lt;run&gt;") && page.contains("m&amp;1"));
        assert!(!page.contains("<run>"));
    }
}
