//! The rule on figures, and the hedger beside a real scheduler on a fake clock.

use super::*;
use crate::fleet::MachineSpec;
use crate::graph::{Graph, NodeSpec};

fn figures() -> Estimate {
    Estimate {
        planned: 10.0,
        elapsed: 20.0,
        remaining: 0.0,
        duplicate: 10.0,
        budget_left: 100.0,
    }
}

#[test]
fn a_build_within_its_margin_is_left_alone() {
    let rule = HedgeRule::default();
    let e = Estimate {
        elapsed: 15.9,
        ..figures()
    };
    assert!(!decide(&rule, &e));
    assert!(decide(&rule, &Estimate { elapsed: 16.0, ..e }));
}

#[test]
fn a_duplicate_must_finish_clearly_sooner() {
    let rule = HedgeRule::default();
    // What is left is at least what has run: 20 s; a duplicate of 16 s is 1.25 times
    // sooner, one of 16.1 s is not.
    assert!(decide(
        &rule,
        &Estimate {
            duplicate: 16.0,
            ..figures()
        }
    ));
    assert!(!decide(
        &rule,
        &Estimate {
            duplicate: 16.1,
            ..figures()
        }
    ));
    // The machine's own estimate may say more is left.
    let slow = Estimate {
        duplicate: 30.0,
        remaining: 40.0,
        ..figures()
    };
    assert!(decide(&rule, &slow));
    // No free slot: no duplicate.
    let none = Estimate {
        duplicate: f64::INFINITY,
        ..figures()
    };
    assert!(!decide(&rule, &none));
}

#[test]
fn the_budget_caps_duplicates() {
    let rule = HedgeRule::default();
    assert!(!decide(
        &rule,
        &Estimate {
            budget_left: 9.9,
            ..figures()
        }
    ));
    assert!(decide(
        &rule,
        &Estimate {
            budget_left: 10.0,
            ..figures()
        }
    ));
}

#[test]
fn an_overrun_bounds_its_machines_speed() {
    let rule = HedgeRule::default();
    assert_eq!(speed_under_way(&rule, 2.0, 10.0, 15.9), None);
    assert_eq!(speed_under_way(&rule, 2.0, 10.0, 25.0), Some(0.8));
    assert_eq!(speed_under_way(&rule, 2.0, 0.0, 25.0), None);
}

/// Two machines of one slot each; `n0` takes 10 s, `n1` 2 s.
fn two_machines() -> Scheduler {
    let graph = Graph::new(vec![
        NodeSpec::new("n0", "x86_64-linux", vec![], 10.0),
        NodeSpec::new("n1", "x86_64-linux", vec![], 2.0),
    ])
    .unwrap();
    let machines = vec![
        MachineSpec::new("a", "x86_64-linux", 1, 1.0),
        MachineSpec::new("b", "x86_64-linux", 1, 1.0),
    ];
    Scheduler::new(graph, machines, true)
}

fn generous() -> HedgeRule {
    HedgeRule {
        budget_share: 1.0,
        ..HedgeRule::default()
    }
}

/// Starts both builds and ends `n1` at 2 s: `n0` runs on the returned machine, the
/// other is free.
fn started(sched: &mut Scheduler, hedger: &mut Hedger) -> MachineId {
    let mut n0_on = None;
    let mut n1_on = None;
    for a in sched.start(0.0) {
        if let Action::Start { node, machine } = a {
            hedger.started(sched, node, 0.0);
            if node == 0 {
                n0_on = Some(machine);
            } else {
                n1_on = Some(machine);
            }
        }
    }
    let (n0_on, n1_on) = (n0_on.unwrap(), n1_on.unwrap());
    let actions = hedger.finished(sched, 1, n1_on, Outcome::Built, 2.0);
    assert!(actions.is_empty(), "{actions:?}");
    n0_on
}

#[test]
fn an_overrun_gets_one_duplicate_which_wins() {
    let mut sched = two_machines();
    let mut hedger = Hedger::new(generous(), &sched);
    let a = started(&mut sched, &mut hedger);
    let b = 1 - a;
    assert_eq!(hedger.next_due(), Some(16.0));
    assert!(hedger.poll(&mut sched, 15.0).hedges.is_empty());
    let poll = hedger.poll(&mut sched, 16.0);
    assert_eq!(
        poll.hedges,
        vec![Hedge {
            node: 0,
            from: a,
            to: b
        }]
    );
    assert_eq!(sched.running_on(b), &[0]);
    assert_eq!(hedger.duplicate_of(0), Some(b));
    // Nothing more is due: one duplicate per derivation.
    assert_eq!(hedger.next_due(), None);
    let actions = hedger.finished(&mut sched, 0, b, Outcome::Built, 26.0);
    assert_eq!(
        actions,
        vec![Action::Cancel {
            node: 0,
            machine: a
        }]
    );
    assert!(matches!(sched.state(0), NodeState::Done { machine, .. } if *machine == b));
    assert!(sched.running_on(a).is_empty());
    assert!(sched.is_finished());
    let counts = hedger.counts();
    assert_eq!((counts.duplicates, counts.wins), (1, 1));
    assert_eq!(counts.waste_seconds, 26.0);
    // The loser's end, should it come, is stale.
    assert!(hedger
        .finished(&mut sched, 0, a, Outcome::Built, 27.0)
        .is_empty());
}

#[test]
fn when_the_original_wins_the_duplicate_is_cancelled() {
    let mut sched = two_machines();
    let mut hedger = Hedger::new(generous(), &sched);
    let a = started(&mut sched, &mut hedger);
    let b = 1 - a;
    assert_eq!(hedger.poll(&mut sched, 16.0).hedges.len(), 1);
    let actions = hedger.finished(&mut sched, 0, a, Outcome::Built, 18.0);
    assert_eq!(
        actions,
        vec![Action::Cancel {
            node: 0,
            machine: b
        }]
    );
    assert!(matches!(sched.state(0), NodeState::Done { machine, .. } if *machine == a));
    assert!(sched.is_finished());
    let counts = hedger.counts();
    assert_eq!((counts.duplicates, counts.wins), (1, 0));
    assert_eq!(counts.waste_seconds, 2.0);
}

#[test]
fn duplicates_take_a_tenth_of_the_slot_time_at_most() {
    // 12 s of work on two slots: by 16 s, 3.2 s of slot time for duplicates, less than
    // the 10 s one would take; by 60 s, 12 s.
    let mut sched = two_machines();
    let mut hedger = Hedger::new(HedgeRule::default(), &sched);
    started(&mut sched, &mut hedger);
    assert!((hedger.budget(0.0) - 1.2).abs() < 1e-9);
    assert!(hedger.poll(&mut sched, 16.0).hedges.is_empty());
    // Looked at again after half as long again as it ran.
    assert_eq!(hedger.next_due(), Some(24.0));
    assert!(hedger.poll(&mut sched, 40.0).hedges.is_empty());
    assert_eq!(hedger.next_due(), Some(60.0));
    assert_eq!(hedger.poll(&mut sched, 60.0).hedges.len(), 1);
    assert_eq!(hedger.counts().duplicates, 1);
}

#[test]
fn marked_and_guessed_derivations_are_never_hedged() {
    for guessed in [false, true] {
        let mut sched = two_machines();
        let mut hedger = Hedger::new(generous(), &sched);
        if guessed {
            sched.guess_durations(&[0]);
        } else {
            hedger.never_hedge(&[0]);
        }
        started(&mut sched, &mut hedger);
        assert_eq!(hedger.next_due(), None);
        assert!(hedger.poll(&mut sched, 1000.0).hedges.is_empty());
    }
}

#[test]
fn a_failed_duplicate_leaves_the_original_and_no_second_one() {
    let mut sched = two_machines();
    let mut hedger = Hedger::new(generous(), &sched);
    let a = started(&mut sched, &mut hedger);
    let b = 1 - a;
    hedger.poll(&mut sched, 16.0);
    let lost = Outcome::Lost {
        reason: "gone".into(),
    };
    assert!(hedger.finished(&mut sched, 0, b, lost, 17.0).is_empty());
    assert!(sched.running_on(b).is_empty());
    assert!(hedger.poll(&mut sched, 1000.0).hedges.is_empty());
    hedger.finished(&mut sched, 0, a, Outcome::Built, 1001.0);
    assert!(matches!(sched.state(0), NodeState::Done { machine, .. } if *machine == a));
    assert!(sched.is_finished());
    assert_eq!(hedger.counts().waste_seconds, 1.0);
}

#[test]
fn the_originals_machine_lost_leaves_the_duplicate_as_the_build() {
    let mut sched = two_machines();
    let mut hedger = Hedger::new(generous(), &sched);
    let a = started(&mut sched, &mut hedger);
    let b = 1 - a;
    hedger.poll(&mut sched, 16.0);
    assert_eq!(hedger.machine_failing(&mut sched, a, 17.0), vec![0]);
    let actions = sched.handle(Event::MachineLost { machine: a }, 17.0);
    // Not made ready again: it runs on as the duplicate.
    assert!(actions.is_empty(), "{actions:?}");
    assert!(matches!(sched.state(0), NodeState::Running { machine, .. } if *machine == b));
    assert!(hedger
        .finished(&mut sched, 0, b, Outcome::Built, 27.0)
        .is_empty());
    assert!(sched.is_finished());
}

#[test]
fn a_build_that_loses_to_its_duplicate_reports_its_machine() {
    let mut sched = two_machines();
    let mut hedger = Hedger::new(generous(), &sched);
    let a = started(&mut sched, &mut hedger);
    let b = 1 - a;
    hedger.poll(&mut sched, 16.0);
    assert!(hedger.take_slower().is_empty());
    hedger.finished(&mut sched, 0, b, Outcome::Built, 26.0);
    // Planned 10 s, ran 26 s without ending: planned at that from now on, and a fit
    // during the run plans it no faster.
    assert_eq!(hedger.take_slower(), vec![a]);
    assert!((sched.machines()[a].speed - 10.0 / 26.0).abs() < 1e-9);
    let (speed, _) = hedger.capped(a, 1.0, Vec::new());
    assert!((speed - 10.0 / 26.0).abs() < 1e-9);
    assert_eq!(hedger.capped(b, 1.0, Vec::new()).0, 1.0);
}

/// Four builds of 10 s on machine `a` (one slot), one after another, each watched.
fn four_in_a_row() -> (Scheduler, Hedger) {
    let graph = Graph::new(
        (0..4)
            .map(|i| NodeSpec::new(format!("n{i}"), "x86_64-linux", vec![], 10.0))
            .collect(),
    )
    .unwrap();
    let machines = vec![MachineSpec::new("a", "x86_64-linux", 1, 1.0)];
    let sched = Scheduler::new(graph, machines, true);
    let hedger = Hedger::new(HedgeRule::default(), &sched);
    (sched, hedger)
}

/// Runs the builds on `a` one after another, the i-th taking `seconds[i]` of its own;
/// returns what [`Hedger::take_slower`] said after each.
fn run_builds(sched: &mut Scheduler, hedger: &mut Hedger, seconds: &[f64]) -> Vec<Vec<MachineId>> {
    let mut actions = sched.start(0.0);
    let mut now = 0.0;
    let mut slower = Vec::new();
    for &took in seconds {
        let node = actions
            .iter()
            .find_map(|a| match a {
                Action::Start { node, .. } => Some(*node),
                _ => None,
            })
            .unwrap_or_else(|| panic!("nothing started at {now}: {actions:?}"));
        hedger.started(sched, node, now);
        now += took;
        hedger.built(sched, node, 0, took);
        actions = hedger.finished(sched, node, 0, Outcome::Built, now);
        slower.push(hedger.take_slower());
    }
    slower
}

#[test]
fn a_build_far_over_its_plan_plans_its_machine_slower_at_once() {
    let (mut sched, mut hedger) = four_in_a_row();
    // 10 s planned, 25 s of its own: the machine is at most 0.4 of what was planned.
    let slower = run_builds(&mut sched, &mut hedger, &[25.0]);
    assert_eq!(slower, vec![vec![0]]);
    assert!((sched.machines()[0].speed - 0.4).abs() < 1e-9);
}

#[test]
fn one_build_a_little_over_is_a_witness_and_two_convict() {
    let (mut sched, mut hedger) = four_in_a_row();
    // 17 s: over 1.5 × 10 s + 1 s, but not twice the plan: perhaps the derivation. A
    // second one there: the machine, planned at the milder of the two.
    let slower = run_builds(&mut sched, &mut hedger, &[17.0, 18.0]);
    assert_eq!(slower, vec![vec![], vec![0]]);
    assert!((sched.machines()[0].speed - 10.0 / 17.0).abs() < 1e-9);
}

#[test]
fn a_build_on_time_clears_the_witness_against_its_machine() {
    let (mut sched, mut hedger) = four_in_a_row();
    let slower = run_builds(&mut sched, &mut hedger, &[17.0, 10.0, 17.0, 10.0]);
    assert!(slower.iter().all(Vec::is_empty), "{slower:?}");
    assert_eq!(sched.machines()[0].speed, 1.0);
}
