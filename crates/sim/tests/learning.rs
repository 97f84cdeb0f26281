//! offload's learning policy (the driver's model of what builds and copies teach, run
//! in the simulator): on random graphs and fleets, a first run and a second run from
//! what the first taught keep every machine within its slots, build each derivation
//! once (again only when its machine is lost), never before its dependencies, and the
//! second run plans a builder that is slower than declared as slower.

use std::collections::HashMap;

use offload_learn::LOCAL_KEY;
use offload_sched::{Graph, MachineId, MachineSpec};
use offload_sim::dag::generate;
use offload_sim::scenarios::{first_run, run, second_run, taught, Knows};
use offload_sim::Report;
use proptest::prelude::*;

const SYS: &str = "x86_64-linux";

/// A fleet as it is and as its machines file declares it (every speed factor 1): this
/// machine with `local` slots and `builders` builders of 1-3 slots, the first of them
/// `slow` times slower than declared.
fn fleet(local: u32, builders: &[u32], slow: f64) -> (Vec<MachineSpec>, Vec<MachineSpec>) {
    let mut declared = vec![MachineSpec::local(SYS, local)];
    for (i, &slots) in builders.iter().enumerate() {
        declared.push(MachineSpec {
            bandwidth: 1e8,
            latency: 0.005,
            ..MachineSpec::new(format!("ssh://b{i}"), SYS, slots, 1.0)
        });
    }
    let mut truth = declared.clone();
    if let Some(b) = truth.get_mut(1) {
        b.speed = 1.0 / slow;
    }
    (truth, declared)
}

/// What a run must hold: at no time more builds on a machine than its slots; each
/// derivation started only once its dependencies had ended (some build of each); each
/// built once, and again only after a start on a machine that then failed.
fn check(
    graph: &Graph,
    machines: &[MachineSpec],
    failures: &[(MachineId, f64)],
    r: &Report,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        r.built,
        graph.len(),
        "{} did not build everything",
        r.policy
    );
    prop_assert!(
        r.makespan_s + 1e-9 >= r.lower_bound_s,
        "beat the lower bound"
    );
    let index: HashMap<&str, usize> = (0..graph.len())
        .map(|i| (graph.node(i).key.as_str(), i))
        .collect();
    let mut ends: Vec<Vec<f64>> = vec![Vec::new(); graph.len()];
    let mut starts: Vec<Vec<(f64, MachineId)>> = vec![Vec::new(); graph.len()];
    for e in &r.trace {
        ends[index[e.name.as_str()]].push(e.start + e.duration);
        starts[index[e.name.as_str()]].push((e.start, e.machine));
    }
    for (node, s) in starts.iter_mut().enumerate() {
        prop_assert!(!s.is_empty(), "{} never started", graph.node(node).key);
        // Every start but the last was lost with its machine (or its outputs were), or
        // ran beside a duplicate of it (hedging: the first to end counts).
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        let spans: Vec<(f64, f64)> = r
            .trace
            .iter()
            .filter(|e| index[e.name.as_str()] == node)
            .map(|e| (e.start, e.start + e.duration))
            .collect();
        // Whether the copy started at `start` overlapped another copy of the node.
        let beside = |start: f64| {
            let Some(i) = spans.iter().position(|&(a, _)| a == start) else {
                return false;
            };
            let (a, b) = spans[i];
            spans
                .iter()
                .enumerate()
                .any(|(j, &(c, d))| j != i && c < b && a < d)
        };
        for &(start, m) in &s[..s.len() - 1] {
            prop_assert!(
                failures.iter().any(|&(f, at)| f == m && start <= at) || beside(start),
                "{} built again though {} did not fail: {:?}",
                graph.node(node).key,
                machines[m].name,
                s
            );
        }
    }
    for e in &r.trace {
        for &d in &graph.node(index[e.name.as_str()]).deps {
            prop_assert!(
                ends[d].iter().any(|&end| end <= e.start + 1e-9),
                "{} started at {} before its dependency {} ended ({:?})",
                e.name,
                e.start,
                graph.node(d).key,
                ends[d]
            );
        }
    }
    for (m, spec) in machines.iter().enumerate() {
        // Starts and ends on the machine, ends first at the same time.
        let mut edges: Vec<(f64, i32)> = r
            .trace
            .iter()
            .filter(|e| e.machine == m)
            // An end is a sum the engine did not make itself: within a nanosecond of a
            // start, it counts as before it.
            .flat_map(|e| [(e.start, 1), (e.start + e.duration - 1e-9, -1)])
            .collect();
        edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut running = 0;
        for (at, step) in edges {
            running += step;
            prop_assert!(
                running <= spec.slots as i32,
                "{} ran {} builds at {} on {} slots",
                spec.name,
                running,
                at,
                spec.slots
            );
        }
    }
    Ok(())
}

#[test]
fn a_builder_three_times_slower_than_declared_is_planned_slower_the_next_time() {
    let graph = generate("layered", 60, 1).unwrap().to_graph().unwrap();
    let (truth, declared) = fleet(2, &[2, 2, 2], 3.0);
    let (first, rows) = first_run(&graph, (&truth, &declared), None, &[], true);
    check(&graph, &truth, &[], &first).unwrap();
    assert!(rows.iter().any(|r| r.machine == "ssh://b0"));
    assert!(rows.iter().any(|r| r.machine == LOCAL_KEY));
    let (_, _, believed) = taught(&graph, (&truth, &declared), &rows);
    // Declared 1, truly 1/3: planned within a half of the truth, the others near 1.
    assert!((0.2..0.5).contains(&believed[1].speed), "{:?}", believed[1]);
    assert!(believed[2].speed > 0.6, "{:?}", believed[2]);
    let second = second_run(&graph, (&truth, &declared), &truth, None, &[], true);
    check(&graph, &truth, &[], &second).unwrap();
    assert!(
        second.makespan_s < first.makespan_s,
        "{} then {}",
        first.makespan_s,
        second.makespan_s
    );
}

#[test]
fn a_builder_turned_slow_since_its_history_is_planned_slower_within_the_run() {
    // The history was recorded with every builder as declared; since then b2 turned six
    // times slower. Its first builds of the run show it, so the rest go elsewhere, and
    // those it holds up get a duplicate in the first slot that frees.
    let graph = generate("layered", 60, 1).unwrap().to_graph().unwrap();
    let (then, declared) = fleet(2, &[2, 2, 2], 1.0);
    let mut now = then.clone();
    now[3].speed = 1.0 / 6.0;
    let second = second_run(&graph, (&now, &declared), &then, None, &[], true);
    check(&graph, &now, &[], &second).unwrap();
    // Against offload planning with the true speeds from the start.
    let knows = Knows::Everything;
    let truth = run(
        "offload",
        &graph,
        (&now, &declared),
        None,
        &[],
        knows,
        false,
    )
    .unwrap();
    assert!(
        second.makespan_s <= 1.1 * truth.makespan_s,
        "{:.2} s, {:.2} s knowing the truth (a bound of {:.2} s)",
        second.makespan_s,
        truth.makespan_s,
        second.lower_bound_s
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn first_and_second_runs_keep_slots_order_and_builds(
        shape in prop::sample::select(vec!["layered", "nixpkgs", "wide", "chain"]),
        n in 1usize..120,
        seed in any::<u64>(),
        local in 1u32..4,
        builders in prop::collection::vec(1u32..4, 0..4),
        slow in 1.0f64..4.0,
        fail in any::<bool>(),
    ) {
        let graph = generate(shape, n, seed).unwrap().to_graph().unwrap();
        let (truth, declared) = fleet(local, &builders, slow);
        // A builder lost a little into the run, when there is one.
        let failures: Vec<(MachineId, f64)> = if fail && truth.len() > 1 { vec![(1, 1.5)] } else { Vec::new() };
        for knows in [Knows::FirstRun, Knows::SecondRun { then: None }] {
            let r = run("offload", &graph, (&truth, &declared), None, &failures, knows, true).unwrap();
            check(&graph, &truth, &failures, &r)?;
        }
    }
}

/// One run of a layered graph shows a builder 2.5-5 times slower than declared by how
/// its builds stand out of the run's noise (a trimmed mean of log times against this
/// machine's): over 120 first runs of graphs of 40-120, what is learned must move from
/// the declared speed towards the truth in nearly all. The population comparison
/// assumes both machines drew alike from the graph; where the plan gave one the long
/// builds, it can read the other wrong (1 run of these 120: seed 25, 3.5 times slower,
/// learned 1.63 times faster).
#[test]
fn what_first_runs_teach_of_a_slow_builder_moves_towards_the_truth() {
    let (mut toward, mut away) = (0, Vec::new());
    for seed in 1..=40u64 {
        for slow in [2.5, 3.5, 5.0] {
            let n = 40 + (seed as usize * 7) % 80;
            let graph = generate("layered", n, seed).unwrap().to_graph().unwrap();
            let (truth, declared) = fleet(2, &[2, 2, 2], slow);
            let (_, rows) = first_run(&graph, (&truth, &declared), None, &[], false);
            let (_, _, believed) = taught(&graph, (&truth, &declared), &rows);
            let learned = believed[1].speed;
            if learned < 1.0 && learned >= 1.0 / slow.powf(1.5) {
                toward += 1;
            } else if learned > 1.0 {
                away.push((seed, slow, learned));
            }
        }
    }
    assert!(toward >= 110, "{toward} of 120 moved towards the truth");
    assert!(away.len() <= 1, "learned faster than declared: {away:?}");
}
