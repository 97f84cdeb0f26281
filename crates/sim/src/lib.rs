//! Simulating builds on a fleet, to measure the scheduler where a real fleet cannot be
//! had: the same `offload-sched` code the live driver runs, against models of Nix's
//! build hook and Hydra's queue runner, on a discrete-event model of machines, slots,
//! speeds, links and failures.
//!
//! - [`dag`]: the JSON graph schema and generated shapes;
//! - [`fleet_file`]: the fleet file's links, speeds per system, failures, the builders'
//!   direct links and a delivery target;
//! - [`engine`]: the event loop and the [`engine::Policy`] trait;
//! - [`hedge`]: duplicates of builds that overrun their plan, by the driver's rule;
//! - [`delivery`]: where the requested outputs go when not home (a target);
//! - [`policy`]: offload's scheduler, offload learning as the live driver learns
//!   (`offload-learn`'s model), and the Nix and Hydra models;
//! - [`scenarios`]: what offload knows when it plans: everything, a first run's
//!   nothing, or what a first run taught;
//! - [`report`]: makespan, lower bound, utilisation, bytes per link, Chrome traces.
//!
//! Like the scheduler, this crate does no I/O and reads no clock.

pub mod dag;
pub mod delivery;
pub mod engine;
pub mod fleet_file;
pub mod hedge;
pub mod policy;
pub mod report;
pub mod scenarios;

use offload_sched::{Graph, MachineId, MachineSpec};

pub use delivery::Delivery;
pub use engine::{simulate, Costs};
pub use report::Report;

/// Costs calibrated against loopback runs of Nix 2.8 and offload (see the README).
pub mod calibration {
    use super::Costs;

    /// offload: a persistent session per slot, a BuildDerivation round trip per build,
    /// and the driver's turn between builds (result, history, next start): 200 trivial
    /// builds on 16 loopback slots run at 0.125 s per build and slot.
    pub const OFFLOAD: Costs = Costs {
        dispatch_serial: 0.0,
        per_build: 0.125,
    };
    /// Nix's hook: a fresh `nix-store --serve` per build for the copies and the build;
    /// the hook's questions, one at a time on the client, are modelled in the policy.
    pub const NIX: Costs = Costs {
        dispatch_serial: 0.0,
        per_build: 0.09,
    };
    /// Hydra: the serve-protocol round trip of a build as offload pays it, plus a
    /// new connection per step as Nix's hook opens one.
    pub const HYDRA: Costs = Costs {
        dispatch_serial: 0.0,
        per_build: OFFLOAD.per_build + crate::policy::HOOK_CONNECT_SECONDS,
    };
}

/// Runs the named policy (`offload`, `nix`, `hydra`). With `cold`, offload plans with
/// no duration history (every estimate [`offload_sched::DEFAULT_ESTIMATE_SECONDS`])
/// while builds take their real time.
///
/// `declared` is the fleet as its machines file says (speed factors, no links known),
/// which a cold offload plans with while builds and copies take `machines`' true
/// speeds and links; None: the same as `machines`. The requested outputs go home, or
/// to `delivery`'s target.
#[expect(
    clippy::too_many_arguments,
    reason = "the run's parts, as the CLI and the tests give them"
)]
pub fn run_policy(
    name: &str,
    graph: &Graph,
    machines: &[MachineSpec],
    declared: Option<&[MachineSpec]>,
    delivery: Option<Delivery>,
    failures: &[(MachineId, f64)],
    cold: bool,
    trace: bool,
) -> Option<Report> {
    use policy::{HydraPolicy, NixPolicy};
    let report = match name {
        "offload" => {
            let (planning, believed) = if cold {
                (with_unknown_durations(graph), declared.unwrap_or(machines))
            } else {
                (graph.clone(), machines)
            };
            let mut p = offload_policy(planning, believed);
            if cold {
                p.guess_durations(&(0..graph.len()).collect::<Vec<_>>());
            }
            p.outputs_stay_away(delivery.is_some());
            simulate(graph, machines, delivery, failures, &mut p, trace)
        }
        "nix" => {
            let mut p = NixPolicy::new(graph.clone(), machines.to_vec(), calibration::NIX);
            simulate(graph, machines, delivery, failures, &mut p, trace)
        }
        "hydra" => {
            let mut p = HydraPolicy::new(graph.clone(), machines.to_vec(), calibration::HYDRA);
            simulate(graph, machines, delivery, failures, &mut p, trace)
        }
        _ => return None,
    };
    Some(report)
}

/// offload's policy planning with `planning` (its estimates of each derivation) and
/// `believed` (what it thinks of the machines), at offload's costs; simulated, builds
/// and copies take the true figures.
pub fn offload_policy(planning: Graph, believed: &[MachineSpec]) -> policy::OffloadPolicy {
    policy::OffloadPolicy::new(planning, believed.to_vec(), calibration::OFFLOAD)
}

/// A graph whose every estimate is the default, as a planner without history has it.
pub fn with_unknown_durations(graph: &Graph) -> Graph {
    let nodes = graph
        .nodes()
        .iter()
        .map(|n| offload_sched::NodeSpec {
            duration: offload_sched::DEFAULT_ESTIMATE_SECONDS,
            ..n.clone()
        })
        .collect();
    Graph::new(nodes).expect("same edges as a valid graph")
}
