//! A builder's first session takes time to open ([`MachineSpec::session_setup`]): the
//! run's first builds go where they finish first counting it, and once the driver says
//! a session is open there, builds there no longer pay it.

mod common;

use common::starts;
use offload_sched::{Graph, MachineSpec, NodeSpec, Scheduler};

const SYSTEM: &str = "x86_64-linux";
const LOCAL: usize = 0;
const BUILDER: usize = 1;

/// This machine and a builder a little faster, one slot each, the builder's session
/// 0.5 s away.
fn fleet() -> Vec<MachineSpec> {
    let mut builder = MachineSpec::new("b1", SYSTEM, 1, 1.1);
    builder.session_setup = 0.5;
    vec![MachineSpec::local(SYSTEM, 1), builder]
}

/// Two independent builds: a long one (the critical path) and a short one.
fn graph() -> Graph {
    Graph::new(vec![
        NodeSpec::new("long", SYSTEM, Vec::new(), 2.0),
        NodeSpec::new("short", SYSTEM, Vec::new(), 0.3),
    ])
    .unwrap()
}

#[test]
fn the_first_build_on_a_builder_counts_its_session() {
    // The long build would end sooner on the builder (1.82 s) but for its session
    // (2.32 s): it stays here (2 s), and the short one takes the builder.
    let mut sched = Scheduler::new(graph(), fleet(), false);
    assert_eq!(starts(&sched.start(0.0)), [(0, LOCAL), (1, BUILDER)]);
    // With the builder's session open, the long build goes there.
    let mut open = Scheduler::new(graph(), fleet(), false);
    open.session_open(BUILDER);
    assert_eq!(starts(&open.start(0.0)), [(0, BUILDER), (1, LOCAL)]);
}
