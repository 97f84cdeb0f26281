//! What offload knows when it plans a simulated run: everything (the true figures), a
//! first run's nothing (`--cold`), or what a first run taught (`--second-run`). The
//! first and second runs learn during the run as the live driver does
//! ([`LearningPolicy`]).

use offload_learn::{BuildRow, EstimateSource, Knowledge};
use offload_sched::{Graph, MachineId, MachineSpec, NodeSpec, DEFAULT_OUTPUT_BYTES};

use crate::policy::learning::{local_system, newest_first, state_key, LearningPolicy};
use crate::{run_policy, simulate, with_unknown_durations, Delivery, Report};

/// What offload plans a simulated run with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Knows<'a> {
    /// The true durations, output sizes, speeds and links.
    Everything,
    /// Nothing learned yet: every estimate the default, the machines as declared; it
    /// learns during the run.
    FirstRun,
    /// What a simulated first run taught; it learns on during the run. The first ran
    /// on the machines as they were `then` (their true speeds and links when the
    /// history was recorded), as they are now when `None`.
    SecondRun { then: Option<&'a [MachineSpec]> },
}

/// Runs the named policy (`offload`, `nix`, `hydra`) on `graph` over `machines` (as they
/// are; `declared` as their machines file says), with `failures` (machine, seconds into
/// the run), offload knowing what `knows` says, the requested outputs going home or to
/// `delivery`'s target; `None` for an unknown policy. Nix's hook and Hydra learn
/// nothing, so they run alike whatever offload knows.
pub fn run(
    name: &str,
    graph: &Graph,
    fleet: (&[MachineSpec], &[MachineSpec]),
    delivery: Option<Delivery>,
    failures: &[(MachineId, f64)],
    knows: Knows,
    trace: bool,
) -> Option<Report> {
    let (machines, declared) = fleet;
    match (name, knows) {
        ("offload", Knows::SecondRun { then }) => {
            let then = then.unwrap_or(machines);
            Some(second_run(graph, fleet, then, delivery, failures, trace))
        }
        ("offload", Knows::FirstRun) => Some(first_run(graph, fleet, delivery, failures, trace).0),
        _ => run_policy(
            name,
            graph,
            machines,
            Some(declared),
            delivery,
            failures,
            knows == Knows::FirstRun,
            trace,
        ),
    }
}

/// offload's first run on the simulated fleet: it plans with the machines file's figures
/// and no estimates, and learns during the run as the driver does. Returns its report
/// and the builds it recorded (oldest first).
pub fn first_run(
    graph: &Graph,
    fleet: (&[MachineSpec], &[MachineSpec]),
    delivery: Option<Delivery>,
    failures: &[(MachineId, f64)],
    trace: bool,
) -> (Report, Vec<BuildRow>) {
    let (machines, declared) = fleet;
    // No estimates, and every output's size the driver's guess.
    let planning = Graph::new(
        with_unknown_durations(graph)
            .nodes()
            .iter()
            .map(|n| NodeSpec {
                output_bytes: DEFAULT_OUTPUT_BYTES,
                ..n.clone()
            })
            .collect(),
    )
    .expect("the same edges as a valid graph");
    let all: Vec<usize> = (0..graph.len()).collect();
    let mut policy = LearningPolicy::new(
        fleet,
        graph,
        planning,
        &all,
        declared.to_vec(),
        Vec::new(),
        "first",
    );
    policy.outputs_stay_away(delivery.is_some());
    let report = simulate(graph, machines, delivery, failures, &mut policy, trace);
    (report, policy.into_rows())
}

/// offload's second run on the simulated fleet: a first run as [`first_run`] on the
/// machines as they were then (`then`: their true speeds and links when the history was
/// recorded; `fleet`'s own when nothing changed since); the second plans with what its
/// builds say, fitted as `offload build` fits its state (each derivation's time, each
/// machine's speed per system), and the links as they are (as offload learns them from
/// the first run's copies), and learns on during the run, on the machines as they are now.
pub fn second_run(
    graph: &Graph,
    fleet: (&[MachineSpec], &[MachineSpec]),
    then: &[MachineSpec],
    delivery: Option<Delivery>,
    failures: &[(MachineId, f64)],
    trace: bool,
) -> Report {
    let (machines, declared) = fleet;
    let (_, rows) = first_run(graph, (then, declared), delivery, failures, false);
    let (planning, guessed, believed) = taught(graph, fleet, &rows);
    let mut policy =
        LearningPolicy::new(fleet, graph, planning, &guessed, believed, rows, "second");
    policy.outputs_stay_away(delivery.is_some());
    simulate(graph, machines, delivery, failures, &mut policy, trace)
}

/// What `rows` (a first run's builds, oldest first) teach a second run on `fleet`: the
/// graph with the estimates fitted from them, the nodes whose estimates are still
/// guesses, and the machines as fitted (their links, pair links too, as they are).
pub fn taught(
    graph: &Graph,
    fleet: (&[MachineSpec], &[MachineSpec]),
    rows: &[BuildRow],
) -> (Graph, Vec<usize>, Vec<MachineSpec>) {
    let (machines, declared) = fleet;
    let learned = Knowledge::from_builds(&newest_first(rows), &local_system(machines));
    let planning = Graph::new(
        graph
            .nodes()
            .iter()
            .map(|n| NodeSpec {
                duration: learned.estimate(&n.key).0,
                ..n.clone()
            })
            .collect(),
    )
    .expect("the same edges as a valid graph");
    let guessed: Vec<usize> = (0..graph.len())
        .filter(|&i| learned.estimate(&graph.node(i).key).1 == EstimateSource::Default)
        .collect();
    let believed: Vec<MachineSpec> = declared
        .iter()
        .zip(machines)
        .map(|(spec, truth)| {
            let mut spec = spec.clone();
            learned.apply_to(&state_key(&spec), &mut spec);
            spec.bandwidth = truth.bandwidth;
            spec.latency = truth.latency;
            spec.peers = truth.peers.clone();
            spec
        })
        .collect();
    (planning, guessed, believed)
}
