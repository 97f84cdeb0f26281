//! Slots other runs hold ([`Event::SlotsHeldElsewhere`]): builds go to the machines
//! that are free instead of queueing behind a machine someone else keeps busy, and the
//! slots come back when the others let them go.

mod common;

use common::starts;
use offload_sched::{Event, Graph, MachineSpec, NodeSpec, Outcome, Scheduler};

const SYSTEM: &str = "x86_64-linux";
const FAST: usize = 1;
const SLOW: usize = 2;

/// No local slots; a fast builder and a slow one, one slot each.
fn fleet() -> Vec<MachineSpec> {
    vec![
        MachineSpec::local(SYSTEM, 0),
        MachineSpec::new("fast", SYSTEM, 1, 1.5),
        MachineSpec::new("slow", SYSTEM, 1, 1.0),
    ]
}

/// `n` independent builds of 10 s each.
fn independent(n: usize) -> Graph {
    let nodes = (0..n)
        .map(|i| NodeSpec::new(format!("n{i}"), SYSTEM, Vec::new(), 10.0))
        .collect();
    Graph::new(nodes).unwrap()
}

fn held(machine: usize, count: u32) -> Event {
    Event::SlotsHeldElsewhere { machine, count }
}

#[test]
fn a_machine_whose_slots_others_hold_gets_no_build_until_they_let_go() {
    // Alone, the fast builder takes the build.
    let mut alone = Scheduler::new(independent(1), fleet(), false);
    assert_eq!(starts(&alone.start(0.0)), [(0, FAST)]);

    // With its slot held by another run, the slow one builds at once.
    let mut sched = Scheduler::new(independent(2), fleet(), false);
    assert!(sched.handle(held(FAST, 1), 0.0).is_empty());
    let first = starts(&sched.start(0.0));
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].1, SLOW);

    // The other run lets go: the waiting build starts on the fast builder.
    let next = starts(&sched.handle(held(FAST, 0), 1.0));
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0].1, FAST);
}

#[test]
fn more_slots_held_elsewhere_than_a_machine_has_leave_it_busy_after_its_own_build_ends() {
    let mut sched = Scheduler::new(independent(3), fleet(), false);
    let first = starts(&sched.start(0.0));
    assert_eq!(first.len(), 2, "{first:?}");
    let (on_fast, _) = *first.iter().find(|(_, m)| *m == FAST).unwrap();
    // Others take more than the fast machine's one slot (its own build still runs).
    assert!(starts(&sched.handle(held(FAST, 3), 1.0)).is_empty());
    let done = Event::Finished {
        node: on_fast,
        machine: FAST,
        outcome: Outcome::Built,
    };
    // Its own build ended, but the others still hold its slot: nothing starts there.
    let after = starts(&sched.handle(done, 3.0));
    assert!(after.iter().all(|&(_, m)| m != FAST), "{after:?}");
    // Once they let go, the last build starts there.
    let later = starts(&sched.handle(held(FAST, 0), 4.0));
    assert_eq!(later.iter().map(|&(_, m)| m).collect::<Vec<_>>(), [FAST]);
}
