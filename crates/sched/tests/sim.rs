//! The scheduler in a simulated fleet with a fake clock: builds take their estimated
//! time (or a perturbed one), some fail, machines get lost; invariants are checked on
//! random DAGs.

use std::collections::{BTreeMap, HashMap};

use offload_sched::{
    Action, Event, Graph, Link, MachineSpec, NodeSpec, NodeState, Outcome, Scheduler,
};
use proptest::prelude::*;

fn machine(name: &str, slots: u32, speed: f64, is_local: bool) -> MachineSpec {
    MachineSpec {
        is_local,
        bandwidth: 1e8,
        latency: 0.001,
        ..MachineSpec::new(name, "x86_64-linux", slots, speed)
    }
}

fn node(key: &str, deps: &[usize], duration: f64) -> NodeSpec {
    NodeSpec {
        output_bytes: 1000,
        ..NodeSpec::new(key, "x86_64-linux", deps.to_vec(), duration)
    }
}

/// What a simulated run did.
#[derive(Debug, Default)]
struct Run {
    makespan: f64,
    starts: Vec<(usize, usize, f64)>,
    ends: HashMap<usize, f64>,
    failed: BTreeMap<usize, String>,
    max_running: Vec<usize>,
}

/// Runs the scheduler to completion. `actual(node, machine)` gives a build's real time
/// and outcome; `loss` loses a machine at a time.
fn simulate(
    mut sched: Scheduler,
    actual: impl Fn(usize, usize) -> (f64, Outcome),
    loss: Option<(usize, f64)>,
) -> Run {
    let mut run = Run {
        max_running: vec![0; sched.machines().len()],
        ..Run::default()
    };
    let mut now = 0.0;
    // (end time, node, machine, outcome), kept sorted by time then node.
    let mut pending: Vec<(f64, usize, usize, Outcome)> = Vec::new();
    let mut loss = loss;
    let mut actions = sched.start(now);
    loop {
        for a in actions.drain(..) {
            match a {
                Action::Start { node, machine } => {
                    let (t, outcome) = actual(node, machine);
                    run.starts.push((node, machine, now));
                    pending.push((now + t, node, machine, outcome));
                }
                Action::Cancel { node, .. } => pending.retain(|p| p.1 != node),
                Action::Fail { node, reason } => {
                    run.failed.insert(node, format!("{reason:?}"));
                }
            }
        }
        for (m, r) in run.max_running.iter_mut().enumerate() {
            *r = (*r).max(sched.running_on(m).len());
        }
        pending.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        if let Some((m, at)) = loss {
            if pending.first().is_none_or(|p| p.0 >= at) {
                now = at;
                loss = None;
                pending.retain(|p| p.2 != m);
                actions = sched.handle(Event::MachineLost { machine: m }, now);
                continue;
            }
        }
        if pending.is_empty() {
            break;
        }
        let (t, node, machine, outcome) = pending.remove(0);
        now = t;
        if outcome == Outcome::Built {
            // The first build counts: a rebuild after a machine loss ends later.
            run.ends.entry(node).or_insert(now);
        }
        actions = sched.handle(
            Event::Finished {
                node,
                machine,
                outcome,
            },
            now,
        );
    }
    assert!(sched.is_finished(), "simulation ended with work left");
    run.makespan = now;
    run
}

#[test]
fn a_fast_local_machine_gets_work() {
    // Ten independent 1 s builds; local is twice as fast as the two remotes.
    let graph = Graph::new((0..10).map(|i| node(&format!("n{i}"), &[], 1.0)).collect()).unwrap();
    let fleet = vec![
        machine("local", 2, 2.0, true),
        machine("r1", 2, 1.0, false),
        machine("r2", 2, 1.0, false),
    ];
    let run = simulate(
        Scheduler::new(graph, fleet.clone(), false),
        |n, m| (1.0 / fleet[m].speed + 0.0 * n as f64, Outcome::Built),
        None,
    );
    let on_local = run.starts.iter().filter(|s| s.1 == 0).count();
    assert!(
        on_local >= 4,
        "local got {on_local} builds: {:?}",
        run.starts
    );
    assert!(run.makespan <= 2.0 + 1e-9, "makespan {}", run.makespan);
}

#[test]
fn the_critical_path_goes_first_and_waits_for_the_fast_machine() {
    // A 10 s chain head and many short leaves; one fast machine, one slow.
    let mut nodes = vec![node("long", &[], 10.0), node("after-long", &[0], 10.0)];
    for i in 0..6 {
        nodes.push(node(&format!("leaf{i}"), &[], 1.0));
    }
    let graph = Graph::new(nodes).unwrap();
    let fleet = vec![
        machine("fast", 1, 4.0, true),
        machine("slow", 1, 1.0, false),
    ];
    let run = simulate(
        Scheduler::new(graph, fleet.clone(), false),
        |n, m| {
            let d = if n < 2 { 10.0 } else { 1.0 };
            (d / fleet[m].speed, Outcome::Built)
        },
        None,
    );
    // long and after-long run on the fast machine (2.5 + 2.5 s), five leaves on the
    // slow one, one on the fast: 5.25 s is optimal.
    assert!(run
        .starts
        .iter()
        .any(|s| s.0 == 0 && s.1 == 0 && s.2 == 0.0));
    assert!(run.starts.iter().any(|s| s.0 == 1 && s.1 == 0));
    assert!(run.makespan <= 5.25 + 1e-9, "makespan {}", run.makespan);
}

#[test]
fn an_unbuildable_derivation_fails_at_once_naming_the_machines() {
    let mut arm = node("arm", &[], 1.0);
    arm.system = "aarch64-linux".into();
    let graph = Graph::new(vec![arm, node("user", &[0], 1.0), node("other", &[], 1.0)]).unwrap();
    let mut sched = Scheduler::new(graph, vec![machine("local", 1, 1.0, true)], true);
    let actions = sched.start(0.0);
    let text = format!("{actions:?}");
    assert!(
        text.contains("aarch64-linux") && text.contains("local"),
        "{text}"
    );
    assert!(matches!(sched.state(1), NodeState::Failed(_)));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Start { node: 2, .. })));
}

#[test]
fn a_lost_machine_reruns_its_builds_elsewhere() {
    let graph = Graph::new(vec![
        node("a", &[], 1.0),
        node("b", &[0], 1.0),
        node("c", &[1], 1.0),
    ])
    .unwrap();
    let fleet = vec![
        machine("remote", 1, 10.0, false),
        machine("local", 1, 1.0, true),
    ];
    let run = simulate(
        Scheduler::new(graph, fleet.clone(), false),
        |_, m| (1.0 / fleet[m].speed, Outcome::Built),
        Some((0, 0.15)),
    );
    assert!(run.failed.is_empty(), "{:?}", run.failed);
    assert_eq!(run.ends.len(), 3);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn invariants_hold_on_random_dags(
        sizes in proptest::collection::vec((0.1f64..5.0, proptest::collection::vec(0usize..1000, 0..4)), 1..40),
        slots in proptest::collection::vec(1u32..4, 1..4),
        fail_mod in 0usize..7,
        keep_going in any::<bool>(),
        lose in proptest::option::of((0usize..3, 0.0f64..5.0)),
    ) {
        // Dependencies only on earlier nodes: a DAG by construction.
        let nodes: Vec<NodeSpec> = sizes.iter().enumerate().map(|(i, (d, deps))| {
            let mut deps: Vec<usize> = if i == 0 { vec![] } else { deps.iter().map(|x| x % i).collect() };
            deps.sort();
            deps.dedup();
            node(&format!("n{i}"), &deps, *d)
        }).collect();
        let n = nodes.len();
        let graph = Graph::new(nodes.clone()).unwrap();
        let fleet: Vec<MachineSpec> = slots.iter().enumerate()
            .map(|(i, &s)| machine(&format!("m{i}"), s, 1.0 + i as f64, i == 0))
            .collect();
        let lose = lose.filter(|(m, _)| *m < fleet.len() && fleet.len() > 1);
        let failing = |node: usize| fail_mod > 0 && node % 7 == fail_mod;
        let run = simulate(
            Scheduler::new(graph, fleet.clone(), keep_going),
            |node, m| {
                let t = nodes[node].duration / fleet[m].speed;
                if failing(node) { (t, Outcome::Failed { reason: "exit 1".into() }) } else { (t, Outcome::Built) }
            },
            lose,
        );
        // No machine over capacity.
        for (m, spec) in fleet.iter().enumerate() {
            prop_assert!(run.max_running[m] <= spec.slots as usize);
        }
        // Each derivation built successfully at most once, unless its machine was lost.
        let mut built: HashMap<usize, usize> = HashMap::new();
        for (node, _, _) in &run.starts { *built.entry(*node).or_default() += 1; }
        if lose.is_none() {
            prop_assert!(built.values().all(|&k| k == 1));
        }
        // Dependencies end before their dependents start.
        for &(node, _, start) in &run.starts {
            for &dep in &nodes[node].deps {
                let end = run.ends.get(&dep).copied();
                prop_assert!(end.is_some_and(|e| e <= start + 1e-9), "node {node} started before dep {dep} ended");
            }
        }
        // Every node is built or reported failed, every failure is reported.
        for i in 0..n {
            prop_assert!(run.ends.contains_key(&i) || run.failed.contains_key(&i), "node {i} neither built nor failed");
            if failing(i) && run.starts.iter().any(|s| s.0 == i) {
                prop_assert!(run.failed.contains_key(&i));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Mixed fleets: two systems, features, interchangeable machines, preferLocalBuild,
    /// builds that overrun their estimates, a machine lost, some builders sending to
    /// others directly, requested outputs going home or elsewhere. Each build runs only
    /// where it may, within slots, after its inputs, and every node ends built or
    /// failed.
    #[test]
    fn mixed_fleets_keep_every_rule(
        specs in proptest::collection::vec(
            (0.1f64..4.0, proptest::collection::vec(0usize..1000, 0..3), any::<bool>(), 0u8..4, any::<bool>(), 0.5f64..2.0),
            1..50),
        machines in proptest::collection::vec((0u8..2, 0u8..3, 1u32..4, 1u8..3), 1..7),
        local_slots in 0u32..3,
        lose in proptest::option::of((1usize..7, 0.0f64..4.0)),
        pairs in proptest::collection::vec((1usize..7, 1usize..7, 1e5f64..1e10, 0.0f64..0.5), 0..12),
        away in any::<bool>(),
    ) {
        let systems = ["x86_64-linux", "aarch64-linux"];
        let nodes: Vec<NodeSpec> = specs.iter().enumerate().map(|(i, (d, deps, arm, feat, local, _))| {
            let mut deps: Vec<usize> = if i == 0 { vec![] } else { deps.iter().map(|x| x % i).collect() };
            deps.sort();
            deps.dedup();
            NodeSpec {
                system: systems[usize::from(*arm)].into(),
                required_features: if *feat == 0 { vec!["kvm".into()] } else { vec![] },
                prefer_local: *local,
                ..node(&format!("n{i}"), &deps, *d)
            }
        }).collect();
        let mut fleet = vec![MachineSpec::local("x86_64-linux", local_slots)];
        for (i, &(system, features, slots, speed)) in machines.iter().enumerate() {
            fleet.push(MachineSpec {
                supported_features: if features == 0 { vec!["kvm".into()] } else { vec![] },
                bandwidth: 1e8,
                latency: 0.001,
                ..MachineSpec::new(format!("b{i}"), systems[usize::from(system)], slots, f64::from(speed))
            });
        }
        for &(from, to, bandwidth, latency) in &pairs {
            if from != to && from < fleet.len() && to < fleet.len() {
                fleet[from].set_peer_link(to, Some(Link { bandwidth, latency }));
            }
        }
        let lose = lose.filter(|(m, _)| *m < fleet.len());
        let graph = Graph::new(nodes.clone()).unwrap();
        let mut sched = Scheduler::new(graph, fleet.clone(), true);
        sched.outputs_stay_away(away);
        let run = simulate(
            sched,
            // Real durations differ from the estimates.
            |node, m| (nodes[node].duration * specs[node].5 / fleet[m].speed, Outcome::Built),
            lose,
        );
        for (m, spec) in fleet.iter().enumerate() {
            prop_assert!(run.max_running[m] <= spec.slots as usize);
        }
        for &(node, m, start) in &run.starts {
            prop_assert!(fleet[m].can_build(&nodes[node]), "{node} on {m}");
            let local_can = fleet[0].slots > 0 && fleet[0].can_build(&nodes[node]);
            if nodes[node].prefer_local && local_can {
                prop_assert_eq!(m, 0, "preferLocalBuild {} ran remotely", node);
            }
            for &dep in &nodes[node].deps {
                prop_assert!(run.ends.get(&dep).is_some_and(|&e| e <= start + 1e-9));
            }
        }
        for i in 0..nodes.len() {
            prop_assert!(run.ends.contains_key(&i) || run.failed.contains_key(&i), "node {} neither built nor failed", i);
        }
        // Nothing fails that some live machine could have built.
        if lose.is_none() {
            for (&i, reason) in &run.failed {
                let possible = fleet.iter().any(|m| m.slots > 0 && m.can_build(&nodes[i]));
                prop_assert!(!possible || !reason.starts_with("NoMachine"), "{} failed: {}", i, reason);
            }
        }
    }
}

#[test]
fn prefer_local_builds_go_remote_when_the_local_machine_has_no_slots() {
    // `-j0`: the local machine stays in the fleet with no slots.
    let graph = Graph::new(vec![NodeSpec {
        prefer_local: true,
        ..node("writeText", &[], 0.1)
    }])
    .unwrap();
    let fleet = vec![
        MachineSpec::local("x86_64-linux", 0),
        machine("b1", 1, 1.0, false),
    ];
    let run = simulate(
        Scheduler::new(graph, fleet, true),
        |_, _| (0.1, Outcome::Built),
        None,
    );
    assert_eq!(run.starts, vec![(0, 1, 0.0)]);
}

/// Speeds learned mid-run take effect: a builder found three times slower than planned
/// stops getting work a faster machine would finish first.
#[test]
fn speeds_learned_mid_run_change_later_decisions() {
    let fleet = vec![machine("local", 1, 1.0, true), machine("b", 1, 1.0, false)];
    let nodes: Vec<NodeSpec> = (0..4).map(|i| node(&format!("n{i}"), &[], 1.0)).collect();
    let mut sched = Scheduler::new(Graph::new(nodes).unwrap(), fleet, false);
    let first = sched.start(0.0);
    assert_eq!(
        first
            .iter()
            .filter(|a| matches!(a, Action::Start { .. }))
            .count(),
        2,
        "{first:?}"
    );
    // The builder turns out to be three times slower, on a per-system figure too.
    sched.set_speeds(1, 1.0 / 3.0, vec![("x86_64-linux".into(), 1.0 / 3.0)]);
    let on_local = first
        .iter()
        .find_map(|a| match a {
            Action::Start { node, machine: 0 } => Some(*node),
            _ => None,
        })
        .unwrap();
    let next = sched.handle(
        Event::Finished {
            node: on_local,
            machine: 0,
            outcome: Outcome::Built,
        },
        1.0,
    );
    // Local is free again and quicker than the slow builder would be: it takes the next.
    assert!(
        next.iter()
            .any(|a| matches!(a, Action::Start { machine: 0, .. })),
        "{next:?}"
    );
    // The builder, busy until 1.0 as planned, would take until 4.0 for another: the
    // remaining node waits for local rather than starting there when it frees.
    let on_b = first
        .iter()
        .find_map(|a| match a {
            Action::Start { node, machine: 1 } => Some(*node),
            _ => None,
        })
        .unwrap();
    let after = sched.handle(
        Event::Finished {
            node: on_b,
            machine: 1,
            outcome: Outcome::Built,
        },
        1.5,
    );
    assert!(
        !after
            .iter()
            .any(|a| matches!(a, Action::Start { machine: 1, .. })),
        "{after:?}"
    );
}
