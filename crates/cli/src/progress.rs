//! What `offload build` shows while it runs: on a terminal, a live view of the fleet
//! (`live.rs`); elsewhere a calm line per build on stderr; or with `--json`, JSON Lines on stdout (and nothing else there), one object per event
//! with a `type`:
//!
//! - `planned`: `derivations` to build, `machines` (`name`, `slots`, `speed_factor`),
//!   `estimated_work_s` (their estimates at speed 1, summed);
//! - `build_started`: `drv`, `machine`, `at_s` (seconds since the run began),
//!   `estimate_s` (on that machine) and `cores` (when shared out);
//! - `build_hedged`: a duplicate of `drv`, running on `from`, starts on `machine` (at
//!   `at_s`); the copy that finishes first is the `build_finished`;
//! - `build_finished` / `build_failed`: `drv`, `machine`, `at_s`, `seconds`;
//! - `machine_lost` (down, tried again later), `machine_quarantined` (failed too often),
//!   `machine_skipped` (quarantined by an earlier run): `machine`, `why`, `at_s`;
//! - `transfer_started` / `transfer_finished`: `path`, `from`, `to` (machine names),
//!   `bytes` (the NAR's size), `at_s`; when finished also `seconds` and `ok`;
//! - `summary`: `ok`, `built`, `wall_s`, `lower_bound_s` (by the measured build times),
//!   `builds_per_machine`, `outputs` (the requested output paths), `hedges`
//!   (`duplicates`, `wins`, `waste_s`), and `failures`, each with `drv`, `reason` and
//!   `log_tail`.

use std::io::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use offload_driver::build::NodeResult;
use offload_driver::fleet::MachineConfig;
use offload_driver::job::{Events, Summary};
use offload_driver::reporter::{Placement, Reporter};
use offload_nix::store_path::derivation_name;
use serde_json::{json, Value};

use crate::live::Live;

/// The reporter the runner calls.
pub struct Progress {
    pub quiet: bool,
    pub logs: bool,
    pub json: bool,
    /// When the run began: the plan's event.
    started: OnceLock<Instant>,
    /// One writer at a time: lines from concurrent builds never interleave.
    stdout: Mutex<()>,
    /// Whether to draw the live view, and the view once the plan is known.
    want_live: bool,
    live: OnceLock<Arc<Live>>,
}

impl Progress {
    pub fn new(quiet: bool, logs: bool, json: bool) -> Progress {
        let terminal = crate::output::stderr_is_terminal();
        Progress {
            quiet,
            logs,
            json,
            started: OnceLock::new(),
            stdout: Mutex::new(()),
            want_live: terminal && !quiet && !json,
            live: OnceLock::new(),
        }
    }

    /// Writes one event, when events are asked for.
    pub fn event(&self, event: Value) {
        if !self.json {
            return;
        }
        let _guard = self.stdout.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) is not an error worth stopping builds for.
        let _ = writeln!(out, "{event}").and_then(|()| out.flush());
    }

    fn at(&self) -> f64 {
        self.started
            .get_or_init(Instant::now)
            .elapsed()
            .as_secs_f64()
    }

    fn started(&self, drv: &str, machine: &str, placement: Option<Placement>) {
        let estimate = placement.map(|p| p.estimate_seconds);
        if let Some(live) = self.live.get() {
            live.started(derivation_name(drv), machine, estimate);
        } else if !self.quiet {
            eprintln!("building '{drv}' on '{machine}'...");
        }
        self.event(json!({
            "type": "build_started", "drv": drv, "machine": machine, "at_s": self.at(),
            "estimate_s": estimate, "cores": placement.and_then(|p| p.cores),
        }));
    }
}

impl Reporter for Progress {
    fn build_started(&self, drv: &str, machine: &str) {
        self.started(drv, machine, None);
    }

    fn build_hedged(&self, drv: &str, from: &str, machine: &str) {
        let at_s = self.at();
        self.event(json!({"type": "build_hedged", "drv": drv, "from": from, "machine": machine, "at_s": at_s}));
    }

    fn build_placed(&self, drv: &str, machine: &str, placement: Placement) {
        self.started(drv, machine, Some(placement));
    }

    fn build_log(&self, drv: &str, _machine: &str, line: &str) {
        if self.logs && !self.quiet {
            match self.live.get() {
                Some(live) => live.println(&format!("{}> {line}", derivation_name(drv))),
                None => eprintln!("{}> {line}", derivation_name(drv)),
            }
        }
    }

    fn machine_warning(&self, message: &str) {
        if !self.quiet {
            match self.live.get() {
                Some(live) => live.println(&format!("warning: {message}")),
                None => eprintln!("warning: {message}"),
            }
        }
    }

    fn machine_event(&self, kind: &str, machine: &str, why: &str) {
        self.event(json!({"type": kind, "machine": machine, "why": why, "at_s": self.at()}));
    }

    fn transfer_started(&self, path: &str, from: &str, to: &str, bytes: u64) {
        self.event(json!({
            "type": "transfer_started", "path": path, "from": from, "to": to,
            "bytes": bytes, "at_s": self.at(),
        }));
    }

    fn transfer_finished(
        &self,
        path: &str,
        from: &str,
        to: &str,
        bytes: u64,
        seconds: f64,
        ok: bool,
    ) {
        if let Some(live) = self.live.get() {
            if ok {
                live.moved(from, to, bytes);
            }
        }
        self.event(json!({
            "type": "transfer_finished", "path": path, "from": from, "to": to,
            "bytes": bytes, "seconds": seconds, "ok": ok, "at_s": self.at(),
        }));
    }

    fn build_finished(&self, drv: &str, machine: &str, ok: bool, seconds: f64) {
        if let Some(live) = self.live.get() {
            live.finished(derivation_name(drv), machine, ok);
        }
        let kind = if ok { "build_finished" } else { "build_failed" };
        self.event(json!({
            "type": kind, "drv": drv, "machine": machine, "at_s": self.at(), "seconds": seconds,
        }));
    }
}

impl Events for Progress {
    fn fetching(&self, paths: usize) {
        if !self.quiet {
            eprintln!("fetching {paths} paths from substituters");
        }
    }

    fn notice(&self, text: &str) {
        eprint!("{text}");
    }

    /// The `planned` event; on a terminal, the live view starts.
    fn planned(&self, derivations: usize, work: f64, machines: &[MachineConfig]) {
        let _ = self.started.set(Instant::now());
        if self.want_live && derivations > 0 {
            let names: Vec<String> = machines.iter().map(|m| m.spec.name.clone()).collect();
            let capacity: f64 = machines
                .iter()
                .map(|m| f64::from(m.spec.slots) * m.spec.speed)
                .sum();
            let _ = self
                .live
                .set(Live::new(derivations, &names, work, capacity));
        }
        let machines: Vec<Value> = machines
            .iter()
            .map(|m| {
                json!({"name": m.spec.name, "slots": m.spec.slots, "speed_factor": m.spec.speed})
            })
            .collect();
        self.event(json!({
            "type": "planned", "derivations": derivations, "machines": machines,
            "estimated_work_s": work,
        }));
    }

    /// The `summary` event, then the summary on stderr; the live view is taken off the
    /// screen first.
    fn summary(&self, summary: &Summary<'_>) {
        let Summary {
            report,
            drvs,
            outputs,
            cpu_seconds,
            delivered_to,
        } = *summary;
        if let Some(live) = self.live.get() {
            live.finish();
        }
        let failures: Vec<Value> = drvs
            .iter()
            .zip(&report.results)
            .filter_map(|(drv, r)| match r {
                NodeResult::Failed { failure, log_tail } => Some(json!({
                    "drv": drv, "reason": failure, "log_tail": log_tail,
                })),
                NodeResult::Built { .. } => None,
            })
            .collect();
        let per_machine: serde_json::Map<String, Value> = report
            .builds_per_machine
            .iter()
            .map(|(m, n)| (m.clone(), json!(n)))
            .collect();
        self.event(json!({
            "type": "summary",
            "ok": report.all_built(),
            "built": report.builds_per_machine.iter().map(|(_, n)| n).sum::<usize>(),
            "wall_s": report.wall_seconds,
            "lower_bound_s": report.measured_lower_bound,
            "builds_per_machine": per_machine,
            "outputs": if report.all_built() { outputs.to_vec() } else { Vec::new() },
            "failures": failures,
            "copy_back_error": report.copy_back_error.as_ref().map(|e| e.to_string()),
            "to": delivered_to,
            "bytes": report.route_bytes,
            "hedges": {"duplicates": report.hedges.duplicates, "wins": report.hedges.wins,
                       "waste_s": report.hedges.waste_seconds},
        }));
        if !self.quiet {
            eprintln!("{}", report.summary_text(cpu_seconds));
            if let Some(line) = report.route_bytes.describe(delivered_to) {
                eprintln!("{line}");
            }
        }
    }
}
