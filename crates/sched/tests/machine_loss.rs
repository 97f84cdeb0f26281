//! Machines lost, down for a while and back, as the driver reports them: a loss is never
//! a failed attempt of the builds the machine carried, and a build fails for want of a
//! machine only when no machine that could build it remains.

use offload_sched::{
    Action, Event, Failure, Graph, MachineSpec, NodeSpec, NodeState, Outcome, Scheduler,
    MAX_ATTEMPTS,
};

const SYSTEM: &str = "x86_64-linux";
const LOCAL: usize = 0;
const B1: usize = 1;
const B2: usize = 2;

/// The local machine (`local_slots`) and two fast builders of one slot each.
fn fleet(local_slots: u32) -> Vec<MachineSpec> {
    vec![
        MachineSpec::local(SYSTEM, local_slots),
        MachineSpec::new("b1", SYSTEM, 1, 4.0),
        MachineSpec::new("b2", SYSTEM, 1, 4.0),
    ]
}

fn one_node() -> Graph {
    Graph::new(vec![NodeSpec::new("a", SYSTEM, Vec::new(), 10.0)]).unwrap()
}

fn started_on(actions: &[Action]) -> Vec<usize> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { machine, .. } => Some(*machine),
            _ => None,
        })
        .collect()
}

#[test]
fn a_machine_down_and_back_more_often_than_max_attempts_costs_its_build_nothing() {
    let machines = vec![
        MachineSpec::local(SYSTEM, 0),
        MachineSpec::new("b1", SYSTEM, 1, 1.0),
    ];
    let mut sched = Scheduler::new(one_node(), machines, false);
    assert_eq!(started_on(&sched.start(0.0)), [B1]);
    for round in 0..=MAX_ATTEMPTS {
        let actions = sched.handle(Event::MachineDown { machine: B1 }, 1.0);
        assert!(actions.is_empty(), "round {round}: {actions:?}");
        let actions = sched.handle(Event::MachineBack { machine: B1 }, 2.0);
        assert_eq!(started_on(&actions), [B1], "round {round}");
    }
}

#[test]
fn with_every_builder_lost_the_local_machine_builds() {
    let mut sched = Scheduler::new(one_node(), fleet(1), false);
    let mut on = started_on(&sched.start(0.0));
    for lost in [B1, B2] {
        assert_eq!(on, [lost]);
        let actions = sched.handle(Event::MachineLost { machine: lost }, 1.0);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Fail { .. })),
            "{actions:?}"
        );
        on = started_on(&actions);
    }
    assert_eq!(on, [LOCAL]);
    sched.handle(
        Event::Finished {
            node: 0,
            machine: LOCAL,
            outcome: Outcome::Built,
        },
        2.0,
    );
    assert!(sched.is_finished());
    assert!(matches!(
        sched.state(0),
        NodeState::Done { machine: LOCAL, .. }
    ));
}

#[test]
fn a_build_only_down_machines_can_take_waits_for_one_to_come_back() {
    // -j0: no local slot.
    let mut sched = Scheduler::new(one_node(), fleet(0), false);
    assert_eq!(started_on(&sched.start(0.0)), [B1]);
    let actions = sched.handle(Event::MachineDown { machine: B1 }, 1.0);
    assert_eq!(started_on(&actions), [B2]);
    let actions = sched.handle(Event::MachineDown { machine: B2 }, 1.0);
    assert!(actions.is_empty(), "it waits: {actions:?}");
    assert_eq!(sched.state(0), &NodeState::Ready);
    assert!(!sched.is_finished());
    // B2 answers again: the build goes there.
    let actions = sched.handle(Event::MachineBack { machine: B2 }, 5.0);
    assert_eq!(started_on(&actions), [B2]);
    // A second `back` for a machine already back changes nothing.
    assert!(sched
        .handle(Event::MachineBack { machine: B2 }, 5.0)
        .is_empty());
}

#[test]
fn a_build_fails_for_want_of_machines_only_when_none_remains() {
    let mut sched = Scheduler::new(one_node(), fleet(0), false);
    sched.start(0.0);
    sched.handle(Event::MachineDown { machine: B1 }, 1.0);
    sched.handle(Event::MachineDown { machine: B2 }, 1.0);
    // One given up: the other may still come back.
    let actions = sched.handle(Event::MachineLost { machine: B1 }, 2.0);
    assert!(actions.is_empty(), "{actions:?}");
    let actions = sched.handle(Event::MachineLost { machine: B2 }, 3.0);
    match actions.as_slice() {
        [Action::Fail {
            node: 0,
            reason: Failure::NoMachine { considered, .. },
        }] => assert_eq!(considered, &["local"]),
        other => panic!("{other:?}"),
    }
    assert!(sched.is_finished());
    // A lost machine never comes back.
    assert!(sched
        .handle(Event::MachineBack { machine: B1 }, 4.0)
        .is_empty());
}

#[test]
fn a_machine_back_from_down_takes_new_builds_with_all_its_slots() {
    let graph = Graph::new(vec![
        NodeSpec::new("a", SYSTEM, Vec::new(), 10.0),
        NodeSpec::new("b", SYSTEM, Vec::new(), 10.0),
    ])
    .unwrap();
    let machines = vec![
        MachineSpec::local(SYSTEM, 0),
        MachineSpec::new("b1", SYSTEM, 2, 1.0),
    ];
    let mut sched = Scheduler::new(graph, machines, false);
    assert_eq!(started_on(&sched.start(0.0)), [B1, B1]);
    assert!(sched
        .handle(Event::MachineDown { machine: B1 }, 1.0)
        .is_empty());
    // A stale end from before the loss is ignored.
    sched.handle(
        Event::Finished {
            node: 0,
            machine: B1,
            outcome: Outcome::Built,
        },
        1.5,
    );
    assert_eq!(sched.state(0), &NodeState::Ready);
    let actions = sched.handle(Event::MachineBack { machine: B1 }, 2.0);
    assert_eq!(started_on(&actions), [B1, B1]);
    assert_eq!(sched.running_on(B1).len(), 2);
}
