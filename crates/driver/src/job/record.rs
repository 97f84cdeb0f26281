//! The run's report ([`crate::state::report`]) as the job records it: the reporter it
//! hands the runner passes every event on to the job's [`Events`] and keeps the
//! transfers that complete; at the end, the builds as they went and the critical path.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::Events;
use crate::build::{BuildReport, NodeResult};
use crate::reporter::{Placement, Reporter};
use crate::state::report::{critical_chain, ReportBuild, ReportMachine, ReportTransfer, RunReport};

/// The run of `drv_paths` (whose inputs are `deps`) on `machines`, as it went.
pub fn run_report(
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
                name: offload_nix::store_path::derivation_name(drv).to_string(),
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
        route_bytes: report.route_bytes,
        delivered_to: None,
        hedges: report.hedges.into(),
    }
}

pub struct Recorder {
    events: Arc<dyn Events>,
    /// When the run began: transfers are placed from here.
    started: Instant,
    transfers: Mutex<Vec<ReportTransfer>>,
}

impl Recorder {
    /// Starts the run's clock.
    pub fn new(events: Arc<dyn Events>) -> Arc<Recorder> {
        Arc::new(Recorder {
            events,
            started: Instant::now(),
            transfers: Mutex::new(Vec::new()),
        })
    }

    /// The transfers that completed so far.
    pub fn transfers(&self) -> Vec<ReportTransfer> {
        self.transfers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Reporter for Recorder {
    fn build_started(&self, drv: &str, machine: &str) {
        self.events.build_started(drv, machine);
    }

    fn build_placed(&self, drv: &str, machine: &str, placement: Placement) {
        self.events.build_placed(drv, machine, placement);
    }

    fn build_log(&self, drv: &str, machine: &str, line: &str) {
        self.events.build_log(drv, machine, line);
    }

    fn build_finished(&self, drv: &str, machine: &str, ok: bool, seconds: f64) {
        self.events.build_finished(drv, machine, ok, seconds);
    }

    fn build_hedged(&self, drv: &str, from: &str, machine: &str) {
        self.events.build_hedged(drv, from, machine);
    }

    fn machine_warning(&self, message: &str) {
        self.events.machine_warning(message);
    }

    fn machine_event(&self, kind: &str, machine: &str, why: &str) {
        self.events.machine_event(kind, machine, why);
    }

    fn transfer_started(&self, path: &str, from: &str, to: &str, bytes: u64) {
        self.events.transfer_started(path, from, to, bytes);
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
        if ok {
            let at = self.started.elapsed().as_secs_f64();
            self.transfers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ReportTransfer {
                    from: from.to_string(),
                    to: to.to_string(),
                    bytes,
                    start: (at - seconds).max(0.0),
                    seconds,
                });
        }
        self.events
            .transfer_finished(path, from, to, bytes, seconds, ok);
    }

    fn bytes_moved(&self, route: crate::reporter::ByteRoute, from: &str, to: &str, bytes: u64) {
        self.events.bytes_moved(route, from, to, bytes);
    }
}
