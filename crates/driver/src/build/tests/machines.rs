//! Machines that fail during a run: lost, unreachable, quarantined, out of disk,
//! refusing for good, or with their slots held by other runs.

use super::*;

/// The local machine with `local_slots` and three fast builders of one slot each.
fn three_builders(local_slots: u32) -> Vec<MachineSpec> {
    let mut machines = vec![MachineSpec::local(SYSTEM, local_slots)];
    for name in ["b1", "b2", "b3"] {
        machines.push(MachineSpec::new(name, SYSTEM, 1, 8.0));
    }
    machines
}

#[tokio::test]
async fn a_lost_machine_is_forgotten_and_its_builds_run_elsewhere() {
    // The builder is faster, so the scheduler puts both builds there first.
    let mut machines = fleet(2);
    machines[REMOTE].speed = 4.0;
    let nodes = vec![node("x", &[]), node("y", &[])];
    let transport = FakeTransport::new(&nodes, |name, m| match (name, m) {
        ("x", REMOTE) => Ending::MachineDown,
        // Still running there when the machine is lost: aborted, built again.
        ("y", REMOTE) => Ending::Hang,
        _ => Ending::Built,
    });
    let run = run(nodes, machines, transport, false, None, never()).await;
    let report = run.report();
    assert!(report.all_built(), "{:?}", report.results);
    assert_eq!(*run.transport.forgotten.lock().unwrap(), [REMOTE]);
    let builds = run.transport.builds();
    assert_eq!(
        &builds[..2],
        &[("x".into(), REMOTE), ("y".into(), REMOTE)],
        "{builds:?}"
    );
    assert!(builds[2..].iter().all(|(_, m)| *m == LOCAL), "{builds:?}");
    assert_eq!(
        report.builds_per_machine,
        [("local".into(), 2), ("b1".into(), 0)]
    );
    // The lost attempt is not reported as a finished build.
    assert!(
        !run.events
            .iter()
            .any(|e| e.starts_with("end ") && e.contains(" b1 ")),
        "{:?}",
        run.events
    );
}

#[tokio::test]
async fn with_every_builder_unreachable_the_local_machine_builds_everything() {
    let nodes = vec![node("a", &[]), node("b", &[]), node("top", &[0, 1])];
    let mut transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    transport.unreachable = vec![1, 2, 3];
    let run = run(nodes, three_builders(1), transport, false, None, never()).await;
    let report = run.report();
    assert!(report.all_built(), "{:?}", report.results);
    assert!(run.transport.builds().iter().all(|(_, m)| *m == LOCAL));
    // Each builder is named once at the start, with why; then, still failing, it is
    // probed again until it is quarantined for the run.
    for name in ["b1", "b2", "b3"] {
        let said: Vec<&String> = run
            .events
            .iter()
            .filter(|e| e.starts_with(&format!("warning {name} cannot be used")))
            .collect();
        assert!(
            said[0].contains("(connection refused); skipping it, trying it again in"),
            "{said:?}"
        );
    }
}

#[tokio::test]
async fn a_machine_lost_more_often_than_max_attempts_costs_its_builds_nothing() {
    // -j0 and one builder, whose session breaks four times before a build succeeds.
    let nodes = vec![node("x", &[])];
    let breaks = std::sync::atomic::AtomicU32::new(0);
    let transport = FakeTransport::new(&nodes, move |_, _| {
        let n = breaks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n <= offload_sched::MAX_ATTEMPTS {
            Ending::MachineDown
        } else {
            Ending::Built
        }
    });
    let machines = vec![
        MachineSpec::local(SYSTEM, 0),
        MachineSpec::new("b1", SYSTEM, 1, 1.0),
    ];
    let run = run(nodes, machines, transport, false, None, never()).await;
    assert!(run.report().all_built(), "{:?}", run.report().results);
    let builds = run.transport.builds();
    assert_eq!(builds.len() as u32, offload_sched::MAX_ATTEMPTS + 2);
    assert!(builds.iter().all(|(_, m)| *m == REMOTE));
    // Each loss was followed by a probe before the machine took the build again.
    assert_eq!(
        run.transport.probes.lock().unwrap().len() as u32,
        1 + offload_sched::MAX_ATTEMPTS + 1
    );
}

#[tokio::test]
async fn a_build_no_machine_remains_for_fails_saying_why_each_was_lost() {
    let nodes = vec![node("x", &[])];
    let mut transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    transport.unreachable = vec![1, 2, 3];
    let run = run(nodes, three_builders(0), transport, false, None, never()).await;
    match run.result(0) {
        NodeResult::Failed { failure, .. } => {
            assert!(
                failure.starts_with("no machine can build it: it needs system x86_64-linux and the machines considered were local; not used, as their connections failed: b1 (connection refused); b2"),
                "{failure}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(run.transport.builds().is_empty());
}

#[tokio::test]
async fn a_quarantined_machine_is_skipped_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let history = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let nodes = vec![node("x", &[])];
    // Runs end before the builder's backoff: each counts at least its first failure,
    // and the count goes on from run to run until the fifth quarantines it.
    let mut probes = 0;
    for round in 1..=5 {
        let mut transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
        transport.unreachable = vec![REMOTE];
        let r = run(
            nodes.clone(),
            fleet(1),
            transport,
            false,
            Some(&history),
            never(),
        )
        .await;
        assert!(r.report().all_built());
        probes += r.transport.probes.lock().unwrap().len();
        if r.events.iter().any(|e| e.contains("quarantined until")) {
            break;
        }
        assert!(
            round < 5,
            "not quarantined after 5 failures: {:?}",
            r.events
        );
    }
    assert_eq!(probes, 5);
    let transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    let second = run(nodes, fleet(1), transport, false, Some(&history), never()).await;
    assert!(second.transport.probes.lock().unwrap().is_empty());
    let skipped: Vec<&String> = second
        .events
        .iter()
        .filter(|e| e.starts_with("warning skipping b1: quarantined until "))
        .collect();
    assert_eq!(skipped.len(), 1, "{:?}", second.events);
    assert!(skipped[0].ends_with("last failure: connection refused"));
    assert!(second.transport.builds().iter().all(|(_, m)| *m == LOCAL));
}

#[tokio::test]
async fn a_build_that_fills_a_builders_disk_runs_elsewhere_and_names_the_machine() {
    let mut machines = fleet(1);
    machines[REMOTE].speed = 4.0;
    let nodes = vec![node("big", &[])];
    let transport = FakeTransport::new(&nodes, |_, m| {
        if m == REMOTE {
            Ending::DiskFull
        } else {
            Ending::Built
        }
    });
    let run = run(nodes, machines, transport, false, None, never()).await;
    let report = run.report();
    assert!(report.all_built(), "{:?}", report.results);
    assert_eq!(
        run.transport.builds(),
        [("big".into(), REMOTE), ("big".into(), LOCAL)]
    );
    assert!(
        run.events
            .iter()
            .any(|e| e.contains("b1 cannot be used (it ran out of space")),
        "{:?}",
        run.events
    );
}

#[tokio::test]
async fn a_failure_for_lack_of_disk_space_here_is_the_builds_own() {
    let nodes = vec![node("big", &[])];
    let transport = FakeTransport::new(&nodes, |_, _| Ending::DiskFull);
    let run = run(
        nodes,
        vec![MachineSpec::local(SYSTEM, 1)],
        transport,
        false,
        None,
        never(),
    )
    .await;
    assert!(matches!(run.result(0), NodeResult::Failed { .. }));
    assert_eq!(run.transport.builds().len(), 1);
}

#[tokio::test]
async fn a_builder_that_refuses_for_good_is_not_tried_again_in_the_run() {
    let nodes = vec![node("a", &[]), node("b", &[]), node("top", &[0, 1])];
    let mut transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    transport.unreachable = vec![1, 2, 3];
    transport.refusing = vec![1];
    let run = run(nodes, three_builders(1), transport, false, None, never()).await;
    assert!(run.report().all_built(), "{:?}", run.report().results);
    assert!(run.transport.builds().iter().all(|(_, m)| *m == LOCAL));
    // Probed once, said once, never retried; the others back off as network faults do.
    let probes = run.transport.probes.lock().unwrap().clone();
    assert_eq!(probes.iter().filter(|&&m| m == 1).count(), 1, "{probes:?}");
    let said: Vec<&String> = run
        .events
        .iter()
        .filter(|e| e.starts_with("warning b1 cannot be used"))
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("not tried again in this run"), "{said:?}");
    assert!(run
        .events
        .iter()
        .any(|e| e.starts_with("warning b2 cannot be used") && e.contains("trying it again in")));
}

#[tokio::test]
async fn a_run_waits_for_slots_others_hold_then_gives_up_naming_the_machine() {
    let nodes = vec![node("a", &[])];
    let mut transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    // This machine builds nothing; others hold the builder's only slot all along.
    transport.held_elsewhere = vec![(1, 1)];
    let started = std::time::Instant::now();
    let run = run(
        nodes,
        fleet_without_local(1),
        transport,
        false,
        None,
        never(),
    )
    .await;
    let waited = started.elapsed();
    assert!(
        run.transport.builds().is_empty(),
        "{:?}",
        run.transport.builds()
    );
    assert!(
        waited >= std::time::Duration::from_millis(600),
        "{waited:?}"
    );
    match run.result(0) {
        NodeResult::Failed { failure, .. } => {
            assert!(
                failure.contains("b1: all 1 of its build slots stayed taken"),
                "{failure}"
            );
            assert!(failure.contains("--exclude"), "{failure}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_build_whose_slot_another_run_holds_goes_to_a_free_machine() {
    let nodes = vec![node("a", &[])];
    let mut transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    transport.held_elsewhere = vec![(1, 1)];
    let mut machines = fleet_without_local(1);
    // A second builder, slower: alone, the plan would choose the first.
    machines.push(MachineSpec::new("b2", SYSTEM, 1, 0.5));
    let run = run(nodes, machines, transport, false, None, never()).await;
    assert!(run.report().all_built());
    assert_eq!(run.transport.builds(), [("a".to_string(), 2)]);
}
