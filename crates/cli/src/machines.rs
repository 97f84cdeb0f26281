//! `offload machines`: the fleet a build would use, as a table or JSON Lines: each
//! machine's systems, features, slots, speed factor and current load (slots held in
//! the shared ledger by any offload or Nix hook build on this machine).

use std::fmt::Write as _;

use anyhow::Context as _;
use offload_driver::fleet::{build_fleet, MachineConfig, LOCAL};
use offload_driver::nixconf::NixSettings;
use offload_driver::slots::SlotLedger;
use serde_json::json;

use crate::args::MachinesArgs;
use crate::Failure;

/// One machine as shown.
struct Row {
    name: String,
    uri: String,
    systems: String,
    features: String,
    slots: u32,
    speed: f64,
    /// Slots held now, when the ledger can tell.
    busy: Option<u32>,
}

pub async fn run(args: MachinesArgs) -> Result<(), Failure> {
    let settings = NixSettings::load()
        .context("reading Nix's settings")
        .map_err(Failure::usage)?;
    let fleet = build_fleet(&args.machines.choice(), &settings).map_err(Failure::usage)?;
    let ledger = SlotLedger::from_env();
    let rows: Vec<Row> = fleet
        .iter()
        .enumerate()
        .map(|(m, c)| row(m, c, &ledger))
        .collect();
    let out = if args.json {
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

fn row(m: usize, config: &MachineConfig, ledger: &SlotLedger) -> Row {
    let spec = &config.spec;
    let mut features: Vec<String> = spec.supported_features.clone();
    features.extend(
        spec.mandatory_features
            .iter()
            .map(|f| format!("{f}(mandatory)")),
    );
    // The local machine's slots are Nix's max-jobs, not ledger locks.
    let busy = (m != LOCAL)
        .then(|| {
            let _choosing = ledger.choosing(&config.endpoint.name).ok()?;
            ledger
                .probe(&config.endpoint.name, spec.slots)
                .ok()
                .map(|p| p.busy)
        })
        .flatten();
    Row {
        name: spec.name.clone(),
        uri: config.endpoint.name.clone(),
        systems: spec.systems.join(","),
        features: features.join(","),
        slots: spec.slots,
        speed: spec.speed,
        busy,
    }
}

fn table(rows: &[Row]) -> String {
    let header = ["machine", "systems", "features", "slots", "speed", "load"];
    let cells: Vec<[String; 6]> = rows
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
                match r.busy {
                    Some(b) => format!("{b}/{}", r.slots),
                    None => "-".into(),
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
