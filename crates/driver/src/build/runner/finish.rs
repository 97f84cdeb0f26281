//! The end of a run: what still runs is stopped, the requested outputs of what was
//! built come home (the copy back, tried again when a connection fails), and the report
//! is made, with the lower bound by the measured build times.

use std::collections::{HashMap, HashSet};

use offload_sched::{Graph, MachineSpec, NodeSpec};
use tokio_util::sync::CancellationToken;

use super::{node_spec, BuildNode, BuildReport, BuildTransport, NodeResult, Runner};
use crate::error::DriverError;

impl<T: BuildTransport> Runner<'_, T> {
    /// Stops what still runs, brings the requested outputs of what was built home, and
    /// reports. The copies stop when `stop` is cancelled.
    pub(super) async fn finish(
        mut self,
        stop: CancellationToken,
    ) -> Result<BuildReport, DriverError> {
        self.tasks.shutdown().await;
        self.probes.shutdown().await;
        // Every build has ended: nothing needs them any more.
        self.sent_ahead.shutdown().await;
        let early = async { while self.early_copies.join_next().await.is_some() {} };
        tokio::select! {
            () = early => {}
            () = stop.cancelled() => return Err(self.stop().await),
        }
        let measured_lower_bound = measured_bound(&self.nodes, &self.results, &self.machines);
        // Outputs of derivations that failed cannot come home; the rest do, with -k too.
        let unbuilt: HashSet<&str> = self
            .nodes
            .iter()
            .zip(&self.results)
            .filter(|(_, r)| !matches!(r, Some(NodeResult::Built { .. })))
            .flat_map(|(n, _)| n.outputs.iter().map(|(_, p)| p.as_str()))
            .collect();
        let wanted: Vec<String> = self
            .wanted
            .iter()
            .filter(|p| !unbuilt.contains(p.as_str()))
            .cloned()
            .collect();
        let mut attempt = 1;
        let copy_back_error = loop {
            let copy_back = self.transport.clone().fetch(wanted.clone());
            let result = tokio::select! {
                result = copy_back => result,
                // Dropping the copy kills its sessions: a half-copied path is never
                // registered.
                () = stop.cancelled() => return Err(self.stop().await),
            };
            match result {
                Ok(()) => break None,
                // A link that died or a session that broke may pass: each attempt opens
                // new sessions and copies only what is still missing here.
                Err(e) if attempt < COPY_BACK_ATTEMPTS && e.is_connection_failure() => {
                    let wait = self.health.backoff();
                    self.reporter.machine_warning(&format!(
                        "copying the requested outputs here failed ({}); trying again in {} s \
                         (attempt {} of {COPY_BACK_ATTEMPTS})",
                        first_line(&e.to_string()),
                        wait.as_secs_f64(),
                        attempt + 1
                    ));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => return Err(self.stop().await),
                    }
                    attempt += 1;
                }
                Err(e) => break Some(e),
            }
        };
        self.take_news();
        let route_bytes = self.transport.route_bytes();
        self.transport.close().await;
        Ok(BuildReport {
            results: self
                .results
                .into_iter()
                .map(|r| {
                    r.unwrap_or(NodeResult::Failed {
                        failure: "not built".into(),
                        log_tail: Vec::new(),
                    })
                })
                .collect(),
            wall_seconds: self.clock.elapsed().as_secs_f64(),
            builds_per_machine: self
                .machines
                .iter()
                .map(|m| m.name.clone())
                .zip(self.builds_per_machine)
                .collect(),
            lower_bound: self.lower_bound,
            measured_lower_bound,
            copy_back_error,
            route_bytes,
            hedges: self.hedging.hedger.counts(),
        })
    }
}

/// How often the requested outputs' copy home is tried before the run fails.
pub(crate) const COPY_BACK_ATTEMPTS: u32 = 3;

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// The lower bound ([`offload_sched::lower_bound`]) over the builds' measured times,
/// each scaled to speed 1 by its machine's speed factor.
fn measured_bound(
    nodes: &[BuildNode],
    results: &[Option<NodeResult>],
    machines: &[MachineSpec],
) -> f64 {
    let speed: HashMap<&str, f64> = machines
        .iter()
        .map(|s| (s.name.as_str(), s.speed))
        .collect();
    let specs: Vec<NodeSpec> = nodes
        .iter()
        .zip(results)
        .map(|(n, r)| NodeSpec {
            duration: match r {
                Some(NodeResult::Built {
                    machine, seconds, ..
                }) => seconds * speed.get(machine.as_str()).copied().unwrap_or(1.0),
                _ => 0.0,
            },
            ..node_spec(n)
        })
        .collect();
    match Graph::new(specs) {
        Ok(g) => offload_sched::lower_bound(&g, machines),
        Err(_) => 0.0,
    }
}
