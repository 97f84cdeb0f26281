//! Output sizes a plan guesses ([`Scheduler::guess_output_sizes`]) give way to what the
//! run's builds measure ([`Scheduler::outputs_measured`]): a builder behind a slow link
//! stops looking as near as the local machine once the first output shows how much its
//! copies would carry.

mod common;

use common::starts;
use offload_sched::{
    Event, Graph, MachineSpec, NodeSpec, Outcome, Scheduler, DEFAULT_OUTPUT_BYTES,
};

const SYSTEM: &str = "x86_64-linux";
const LOCAL: usize = 0;
const BUILDER: usize = 1;
const MEASURED: u64 = 16 << 20;

/// This machine and a builder behind a 20 Mbit/s link, one slot each.
fn fleet() -> Vec<MachineSpec> {
    let mut builder = MachineSpec::new("b1", SYSTEM, 1, 1.0);
    builder.bandwidth = 2.5e6;
    builder.latency = 0.02;
    vec![MachineSpec::local(SYSTEM, 1), builder]
}

/// `a` (1 s), then `b` and `c` (1 s each) that both need it; every size a guess.
fn scheduler() -> Scheduler {
    let node = |key: &str, deps: Vec<usize>| NodeSpec {
        output_bytes: DEFAULT_OUTPUT_BYTES,
        ..NodeSpec::new(key, SYSTEM, deps, 1.0)
    };
    let graph = Graph::new(vec![
        node("a", vec![]),
        node("b", vec![0]),
        node("c", vec![0]),
    ])
    .unwrap();
    let mut sched = Scheduler::new(graph, fleet(), false);
    sched.guess_output_sizes(&[0, 1, 2]);
    sched
}

fn a_built() -> Event {
    Event::Finished {
        node: 0,
        machine: LOCAL,
        outcome: Outcome::Built,
    }
}

#[test]
fn a_measured_output_keeps_its_consumers_off_a_slow_link() {
    // Guessed at 1 MiB, `a`'s output would cross the link in 0.44 s: `c` goes to the
    // builder (2.44 s) rather than wait for this machine (3 s).
    let mut guessing = scheduler();
    assert_eq!(starts(&guessing.start(0.0)), [(0, LOCAL)]);
    assert_eq!(
        starts(&guessing.handle(a_built(), 1.0)),
        [(1, LOCAL), (2, BUILDER)]
    );

    // Measured at 16 MiB it would take 6.7 s: `c` waits for this machine.
    let mut measured = scheduler();
    assert_eq!(starts(&measured.start(0.0)), [(0, LOCAL)]);
    measured.outputs_measured(0, MEASURED);
    assert_eq!(starts(&measured.handle(a_built(), 1.0)), [(1, LOCAL)]);
}

#[test]
fn guessed_sizes_follow_what_the_run_measured_and_known_ones_stay() {
    let node = |key: &str, bytes: u64| NodeSpec {
        output_bytes: bytes,
        ..NodeSpec::new(key, SYSTEM, Vec::new(), 1.0)
    };
    let graph = Graph::new(vec![
        node("a", DEFAULT_OUTPUT_BYTES),
        node("b", DEFAULT_OUTPUT_BYTES),
        node("known", 5_000),
    ])
    .unwrap();
    let mut sched = Scheduler::new(graph, fleet(), false);
    sched.guess_output_sizes(&[0, 1]);
    sched.outputs_measured(0, MEASURED);
    let bytes = |sched: &Scheduler, i: usize| sched.graph().node(i).output_bytes;
    assert_eq!(bytes(&sched, 0), MEASURED);
    assert_eq!(bytes(&sched, 1), MEASURED, "a guess takes the run's median");
    assert_eq!(bytes(&sched, 2), 5_000, "a size the history knew stays");
}
