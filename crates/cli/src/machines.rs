//! `offload machines`: the fleet a build would use, as a table or JSON Lines, each
//! machine as the driver sees it now ([`offload_driver::overview`]).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use offload_driver::fleet::nixconf::NixSettings;
use offload_driver::fleet::{build_fleet, MachineChoice};
use offload_driver::overview::{overview, MachineOverview};
use offload_driver::slots::SlotLedger;
use serde_json::json;

use crate::Failure;

pub async fn run(choice: MachineChoice, history_path: &Path, json: bool) -> Result<(), Failure> {
    let settings = NixSettings::load()
        .context("reading Nix's settings")
        .map_err(Failure::usage)?;
    let fleet = build_fleet(&choice, &settings).map_err(Failure::usage)?;
    let rows = overview(
        &fleet,
        &settings.system,
        history_path,
        &SlotLedger::from_env(),
    );
    let out = if json {
        rows.iter()
            .map(|r| {
                let mut v = json!({
                    "type": "machine",
                    "name": r.name,
                    "uri": r.uri,
                    "systems": r.systems.split(',').collect::<Vec<_>>(),
                    "features": r.features,
                    "slots": r.slots,
                    "speed_factor": r.speed,
                    "busy_slots": r.busy,
                    "learned_speed": r.learned.iter().map(|(system, l)| {
                        (system.clone(), json!({"relative_to_local": l.speed, "samples": l.samples}))
                    }).collect::<serde_json::Map<_, _>>(),
                    "planned_speed": r.planned.iter().map(|(system, s)| (system.clone(), json!(s)))
                        .collect::<serde_json::Map<_, _>>(),
                    "link": r.link.map(|l| json!({
                        "bandwidth_bytes_per_second": l.bandwidth,
                        "latency_seconds": l.latency,
                        "samples": l.samples,
                    })),
                    "per_build": r.per_build.map(|(s, n)| json!({"seconds": s, "samples": n})),
                    "cores": r.cores,
                    "state": r.state,
                    "state_detail": r.state_detail,
                });
                if r.features.is_empty() {
                    v["features"] = json!([]);
                } else {
                    v["features"] = json!(r.features.split(',').collect::<Vec<_>>());
                }
                format!("{v}\n")
            })
            .collect()
    } else {
        table(&rows)
    };
    crate::output::stdout(&out);
    Ok(())
}

fn table(rows: &[MachineOverview]) -> String {
    let header = [
        "machine",
        "systems",
        "features",
        "slots",
        "speed",
        "learned",
        "link",
        "per build",
        "cores",
        "load",
        "state",
    ];
    let cells: Vec<[String; 11]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.systems.clone(),
                if r.features.is_empty() {
                    "-".into()
                } else {
                    r.features.clone()
                },
                r.slots.to_string(),
                format!("{}", r.speed),
                if r.learned.is_empty() {
                    // What the planner uses instead, when the other builders scaled it.
                    let scaled: Vec<String> = r
                        .planned
                        .iter()
                        .filter(|(_, s)| (s - r.speed).abs() > 1e-9)
                        .map(|(system, s)| format!("{system} {s:.2}x (as the others)"))
                        .collect();
                    if scaled.is_empty() {
                        "-".into()
                    } else {
                        scaled.join(", ")
                    }
                } else {
                    r.learned
                        .iter()
                        .map(|(system, l)| format!("{system} {:.2}x ({})", l.speed, l.samples))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                match r.link {
                    Some(l) => format!(
                        "{:.1} MB/s {:.0} ms ({})",
                        l.bandwidth / 1e6,
                        l.latency * 1e3,
                        l.samples
                    ),
                    None => "-".into(),
                },
                r.per_build
                    .map_or("-".into(), |(s, n)| format!("{s:.2} s ({n})")),
                r.cores.map_or("-".into(), |c| c.to_string()),
                match r.busy {
                    Some(b) => format!("{b}/{}", r.slots),
                    None => "-".into(),
                },
                match &r.state_detail {
                    Some(d) => format!("{} {d}", r.state),
                    None => r.state.to_string(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &[&str]| {
        let text: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&header);
    for row in &cells {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}
