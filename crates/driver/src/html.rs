//! The run report ([`crate::state::report`]) as one self-contained HTML file (no network, no scripts): a Gantt
//! chart of the builds on each machine slot with the critical path highlighted, a lane
//! per link with what it carried, each machine's utilisation, the makespan against the
//! lower bound, and the ten longest builds.

use std::fmt::Write as _;

use crate::human_bytes as bytes;
use crate::state::report::{ReportBuild, ReportTransfer, RunReport};

/// Colours per machine, readable on white and without colour vision of every hue.
const PALETTE: [&str; 8] = [
    "#4e79a7", "#59a14f", "#9c755f", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#bab0ac",
];
const CRITICAL: &str = "#e15759";
const TRANSFER: &str = "#8c8c8c";

/// The chart's width, its label column and the height of a lane, in pixels.
const WIDTH: f64 = 960.0;
const LABEL: f64 = 180.0;
const ROW: f64 = 22.0;

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

/// The chart being drawn: its time scale, the SVG so far and the next lane's top.
struct Chart {
    span: f64,
    rows: String,
    y: f64,
}

impl Chart {
    fn x(&self, t: f64) -> f64 {
        LABEL + (t / self.span) * (WIDTH - LABEL - 10.0)
    }

    fn label(&mut self, text: &str) {
        let _ = write!(
            self.rows,
            "<text x=\"4\" y=\"{:.0}\" class=\"label\">{text}</text>",
            self.y + 15.0,
        );
    }

    /// A lane per slot of each machine, and the utilisation table's rows.
    fn builds(&mut self, run: &RunReport) -> String {
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
                over_time(&mine, machine.slots, self.span, colour)
            );
            for (slot, lane) in lanes(&mine, machine.slots).iter().enumerate() {
                self.label(&format!("{} #{}", escape(&machine.name), slot + 1));
                for &i in lane {
                    self.build(mine[i], colour);
                }
                self.y += ROW;
            }
        }
        utilisation
    }

    fn build(&mut self, b: &ReportBuild, colour: &str) {
        let fill = if b.critical { CRITICAL } else { colour };
        let _ = write!(
            self.rows,
            "<rect x=\"{:.1}\" y=\"{:.0}\" width=\"{:.1}\" height=\"{:.0}\" fill=\"{fill}\" \
             class=\"build\"><title>{} on {}: {:.2} s from {:.2} s{}</title></rect>",
            self.x(b.start),
            self.y,
            (self.x(b.start + b.seconds) - self.x(b.start)).max(1.5),
            ROW - 4.0,
            escape(&b.name),
            escape(&b.machine),
            b.seconds,
            b.start,
            if b.critical { " (critical path)" } else { "" }
        );
    }

    /// One lane per link that carried something: the machine's transfers, in grey; and
    /// the bytes-per-link table's rows.
    fn links(&mut self, run: &RunReport) -> String {
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
            self.label(&format!("{} link", escape(&machine.name)));
            for t in &mine {
                let _ = write!(
                    self.rows,
                    "<rect x=\"{:.1}\" y=\"{:.0}\" width=\"{:.1}\" height=\"{:.0}\" fill=\"{TRANSFER}\" \
                     class=\"build\"><title>{} → {}: {} in {:.2} s</title></rect>",
                    self.x(t.start),
                    self.y + 4.0,
                    (self.x(t.start + t.seconds) - self.x(t.start)).max(1.5),
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
            self.y += ROW;
        }
        links
    }

    /// The time axis: a grid line and a label per round step, down to the last lane.
    fn axis(&self) -> String {
        let mut axis = String::new();
        let step = nice_step(self.span);
        let mut t = 0.0;
        while t <= self.span + 1e-9 {
            let _ = write!(
                axis,
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"24\" y2=\"{1:.0}\" class=\"grid\"/>\
                 <text x=\"{0:.1}\" y=\"18\" class=\"tick\">{2} s</text>",
                self.x(t),
                self.y,
                format_seconds(t)
            );
            t += step;
        }
        axis
    }
}

/// The ten longest builds, as table rows.
fn longest(run: &RunReport) -> String {
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
    top
}

/// The report as one HTML file.
pub fn html(run: &RunReport) -> String {
    let span = run
        .builds
        .iter()
        .map(|b| b.start + b.seconds)
        .fold(run.wall_seconds, f64::max)
        .max(1e-3);
    let mut chart = Chart {
        span,
        rows: String::new(),
        y: 30.0,
    };
    let utilisation = chart.builds(run);
    let links = chart.links(run);
    let height = chart.y + 30.0;
    let axis = chart.axis();
    let rows = chart.rows;
    let top = longest(run);
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
    use crate::state::report::ReportMachine;

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
            route_bytes: Default::default(),
            delivered_to: None,
            hedges: Default::default(),
        };
        let page = html(&run);
        assert!(page.contains("&lt;run&gt;") && page.contains("m&amp;1"));
        assert!(!page.contains("<run>"));
    }
}
