//! `offload machines`: the fleet a build would use, as a table or JSON Lines: each
//! machine's systems, features, slots, declared speed factor, what the planner learned
//! of it from the state database (speed per system relative to this machine's native
//! one, the link's bandwidth and latency, what a build costs there besides its own time,
//! CPU cores, and how many builds or transfers each figure rests on), current load (slots held in the shared ledger by any offload
//! or Nix hook build on this machine) and state (up, failing since, or quarantined
//! until).

use std::fmt::Write as _;

use anyhow::Context as _;
use offload_driver::fleet::nixconf::NixSettings;
use offload_driver::fleet::{build_fleet, MachineConfig, LOCAL};
use offload_driver::slots::SlotLedger;
use offload_driver::state::{Knowledge, Learned, LinkFigures};
use offload_driver::{format_utc, StateDb};
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
    /// Per system it builds: its learned speed (this machine's native system is 1).
    learned: Vec<(String, Learned)>,
    /// Per system, the speed the planner uses: the learned one, else its speed factor
    /// on the scale the other builders showed, else its speed factor.
    planned: Vec<(String, f64)>,
    link: Option<LinkFigures>,
    /// Seconds a build costs there besides its own time, and the builds behind it.
    per_build: Option<(f64, usize)>,
    cores: Option<u32>,
    /// `up`, `failing`, or `quarantined`, and what the record says.
    state: &'static str,
    state_detail: Option<String>,
}

pub async fn run(args: MachinesArgs) -> Result<(), Failure> {
    let settings = NixSettings::load()
        .context("reading Nix's settings")
        .map_err(Failure::usage)?;
    let fleet = build_fleet(&args.machines.choice(), &settings).map_err(Failure::usage)?;
    let ledger = SlotLedger::from_env();
    let history_path = args
        .history
        .clone()
        .unwrap_or_else(offload_driver::env::state_db_path);
    let history = StateDb::open(&history_path)
        .map_err(|e| tracing::debug!("no machine records: {e}"))
        .ok();
    let knowledge = history
        .as_ref()
        .and_then(|h| h.knowledge(&settings.system).ok())
        .unwrap_or_default();
    let rows: Vec<Row> = fleet
        .iter()
        .enumerate()
        .map(|(m, c)| row(m, c, &ledger, history.as_ref(), &knowledge))
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

/// What the state database says of a machine now.
fn state(name: &str, history: Option<&StateDb>) -> (&'static str, Option<String>) {
    let record = history.and_then(|h| h.machine(name).ok().flatten());
    let Some(r) = record else {
        return ("up", None);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if r.quarantined_until > now {
        let detail = format!(
            "until {}: {}",
            format_utc(r.quarantined_until),
            r.last_failure
        );
        ("quarantined", Some(detail))
    } else if r.failures > 0 {
        let detail = format!(
            "{} failures, last at {}: {}",
            r.failures,
            format_utc(r.last_failure_at),
            r.last_failure
        );
        ("failing", Some(detail))
    } else {
        ("up", None)
    }
}

fn row(
    m: usize,
    config: &MachineConfig,
    ledger: &SlotLedger,
    history: Option<&StateDb>,
    knowledge: &Knowledge,
) -> Row {
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
    let (state, state_detail) = if m == LOCAL {
        ("up", None)
    } else {
        state(&spec.name, history)
    };
    let key = &config.endpoint.name;
    let learned = spec
        .systems
        .iter()
        .filter_map(|system| {
            let l = knowledge.speed(key, system)?;
            (l.samples > 0).then(|| (system.clone(), l))
        })
        .collect();
    let cores = if m == LOCAL {
        config.cores
    } else {
        history.and_then(|h| h.cores(key).ok().flatten())
    };
    let planned = knowledge
        .planned_speeds(key, spec, spec.speed)
        .map(|(_, per_system)| per_system)
        .unwrap_or_default();
    let planned = spec
        .systems
        .iter()
        .map(|s| {
            let speed = planned
                .iter()
                .find(|(x, _)| x == s)
                .map_or(spec.speed, |e| e.1);
            (s.clone(), speed)
        })
        .collect();
    Row {
        learned,
        planned,
        link: knowledge.link(key),
        per_build: knowledge.per_build(key),
        cores,
        state,
        state_detail,
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
