//! Hedging in the simulator: a builder far slower than offload believes, and the
//! duplicates the driver's rule starts, counted as the rule says.

use offload_sched::{Graph, MachineSpec, NodeSpec};
use offload_sim::policy::OffloadPolicy;
use offload_sim::{calibration, simulate};

/// Six independent builds of 2 s, on a builder of four slots and one of two that
/// offload believes as fast as the first.
fn case(slow: f64) -> (Graph, Vec<MachineSpec>, Vec<MachineSpec>) {
    let graph = Graph::new(
        (0..6)
            .map(|i| NodeSpec::new(format!("n{i}"), "x86_64-linux", vec![], 2.0))
            .collect(),
    )
    .unwrap();
    let believed = vec![
        MachineSpec::new("fast", "x86_64-linux", 4, 1.0),
        MachineSpec::new("slow", "x86_64-linux", 2, 1.0),
    ];
    let mut truth = believed.clone();
    truth[1].speed = slow;
    (graph, believed, truth)
}

#[test]
fn duplicates_rescue_the_builds_of_a_machine_turned_slow() {
    let (graph, believed, truth) = case(0.1);
    let mut policy = OffloadPolicy::new(graph.clone(), believed, calibration::OFFLOAD);
    let report = simulate(&graph, &truth, None, &[], &mut policy, false);
    // Without duplicates, the two builds placed on the slow builder take 20.125 s.
    //
    // With them, by the rule: each build is planned at 2.125 s (its 2 s and the
    // calibrated 0.125 s per build), so both on the slow builder overrun at
    // 1.5 × 2.125 + 1 = 4.1875 s, when the fast builder is idle. Duplicates may take a
    // tenth of the slot time so far, 0.1 × 6 slots × 4.1875 s = 2.51 s: one of 2.125 s
    // starts, ending at 6.3125 s. The other is looked at again after half as long again
    // as it ran, at 6.28 s (budget 3.77 s, 2.125 s spent: no) and at 9.42 s (5.65 s:
    // yes), and ends at 11.55 s.
    let counts = policy.hedges();
    assert_eq!((counts.duplicates, counts.wins), (2, 2), "{counts:?}");
    let second = 4.1875 + 2.09375 + 3.140625;
    let end = second + 2.125;
    assert!(
        (report.makespan_s - end).abs() < 1e-6,
        "makespan {} against {end}",
        report.makespan_s
    );
    // Wasted: the slow builder's two copies, from the start until each duplicate won.
    let waste = (4.1875 + 2.125) + end;
    assert!(
        (counts.waste_seconds - waste).abs() < 1e-6,
        "{counts:?} against {waste}"
    );
    assert_eq!(report.built, 6);
}

#[test]
fn a_fleet_as_believed_starts_no_duplicate() {
    let (graph, believed, truth) = case(1.0);
    let mut policy = OffloadPolicy::new(graph.clone(), believed, calibration::OFFLOAD);
    let report = simulate(&graph, &truth, None, &[], &mut policy, false);
    assert_eq!(policy.hedges().duplicates, 0);
    assert!(
        (report.makespan_s - 2.125).abs() < 1e-6,
        "{}",
        report.makespan_s
    );
}
