//! Runs that go as planned or stop: dependency order, failures with and without
//! --keep-going, interrupts, what no machine can build, copies ahead and links that
//! turn out slow.

use super::*;

#[tokio::test]
async fn starts_in_dependency_order_finishes_and_brings_outputs_home() {
    let nodes = vec![node("a", &[]), node("b", &[]), node("top", &[0, 1])];
    let transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    let dir = tempfile::tempdir().unwrap();
    let history = StateDb::open(&dir.path().join("history.sqlite")).unwrap();
    let run = run(nodes, fleet(1), transport, false, Some(&history), never()).await;
    let report = run.report();
    assert!(report.all_built(), "{:?}", report.results);
    let builds = run.transport.builds();
    assert_eq!(builds.len(), 3);
    // One slot on each machine: the two leaves run side by side, the top after them.
    assert_eq!(builds[2].0, "top");
    let leaves: Vec<MachineId> = builds[..2].iter().map(|(_, m)| *m).collect();
    assert!(
        leaves.contains(&LOCAL) && leaves.contains(&REMOTE),
        "{builds:?}"
    );
    let per_machine: HashMap<&str, usize> = report
        .builds_per_machine
        .iter()
        .map(|(m, n)| (m.as_str(), *n))
        .collect();
    assert_eq!(per_machine["local"] + per_machine["b1"], 3);
    // Every requested output reaches the local store (some early, the rest at the end).
    let fetched = run.transport.fetched.lock().unwrap().clone();
    for name in ["a", "b", "top"] {
        assert!(
            fetched.contains(&output(name)),
            "{name} not fetched: {fetched:?}"
        );
    }
    assert!(*run.transport.closed.lock().unwrap());
    // Every start has its end, reported once.
    assert_eq!(
        run.events.iter().filter(|e| e.starts_with("start")).count(),
        3
    );
    assert_eq!(
        run.events.iter().filter(|e| e.ends_with(" true")).count(),
        3
    );
    // Durations go to the history, scaled by the machine's speed.
    let knowledge = history.knowledge(SYSTEM).unwrap();
    assert_eq!(knowledge.estimate("top").0, 0.5);
    // A lone build on the local machine gets all of its cores.
    let cores = run.transport.builds.lock().unwrap().clone();
    assert!(cores.iter().any(|(_, m, c)| *m == LOCAL && *c == Some(4)));
    assert!(cores.iter().all(|(_, m, c)| *m == LOCAL || c.is_none()));
}

#[tokio::test]
async fn a_link_its_copies_under_way_show_slow_takes_no_more_builds() {
    // `a` builds here; `b` and `c` need its output. With the builder's link as planned,
    // `c` goes there rather than wait for this machine's one slot.
    let nodes = || vec![node("a", &[]), node("b", &[0]), node("c", &[0])];
    let plain = FakeTransport::new(&nodes(), |_, _| Ending::Built);
    let run_plain = run(nodes(), fleet(1), plain, false, None, never()).await;
    assert!(
        run_plain.transport.builds().contains(&("c".into(), REMOTE))
            || run_plain.transport.builds().contains(&("b".into(), REMOTE))
    );
    // A copy under way there shows the link at 1 kB/s: `a`'s output would take 17
    // minutes, so everything builds here.
    let mut slow = FakeTransport::new(&nodes(), |_, _| Ending::Built);
    slow.link_bounds = vec![(REMOTE, 1000.0)];
    let run_slow = run(nodes(), fleet(1), slow, false, None, never()).await;
    assert!(run_slow.report().all_built());
    let builds = run_slow.transport.builds();
    assert!(builds.iter().all(|(_, m)| *m == LOCAL), "{builds:?}");
}

#[tokio::test]
async fn a_failure_stops_the_run_and_cancels_what_runs() {
    // `slow` never ends by itself: the failure of `bad` must cancel it.
    let nodes = vec![node("bad", &[]), node("slow", &[]), node("after", &[0])];
    let transport = FakeTransport::new(&nodes, |name, _| match name {
        "bad" => Ending::Failed,
        "slow" => Ending::Hang,
        _ => Ending::Built,
    });
    let run = run(nodes, fleet(1), transport, false, None, never()).await;
    let report = run.report();
    assert!(!report.all_built());
    match run.result(0) {
        NodeResult::Failed { failure, log_tail } => {
            assert!(failure.contains("exit code 3"), "{failure}");
            assert!(failure.contains("(on "), "{failure}");
            assert_eq!(log_tail, &["log line 1", "log line 2"]);
        }
        other => panic!("bad: {other:?}"),
    }
    match run.result(1) {
        NodeResult::Failed { failure, .. } => {
            assert!(failure.contains("--keep-going"), "{failure}")
        }
        other => panic!("slow: {other:?}"),
    }
    assert!(matches!(run.result(2), NodeResult::Failed { .. }));
    // Nothing was built, so nothing comes home.
    assert!(run.transport.fetched.lock().unwrap().is_empty());
}

#[tokio::test]
async fn keep_going_builds_everything_that_does_not_depend_on_a_failure() {
    let nodes = vec![node("bad", &[]), node("fine", &[]), node("after", &[0])];
    let transport = FakeTransport::new(&nodes, |name, _| {
        if name == "bad" {
            Ending::Failed
        } else {
            Ending::Built
        }
    });
    let run = run(nodes, fleet(1), transport, true, None, never()).await;
    assert!(matches!(run.result(1), NodeResult::Built { .. }));
    match run.result(2) {
        NodeResult::Failed { failure, .. } => {
            assert!(failure.starts_with("dependency /nix/store/"), "{failure}");
            assert!(failure.contains("-bad.drv failed"), "{failure}");
        }
        other => panic!("after: {other:?}"),
    }
    // Only what was built is fetched.
    let fetched = run.transport.fetched.lock().unwrap().clone();
    assert!(fetched.contains(&output("fine")));
    assert!(!fetched.contains(&output("bad")) && !fetched.contains(&output("after")));
}

#[tokio::test]
async fn an_interrupt_stops_every_build() {
    let nodes = vec![node("p", &[]), node("q", &[])];
    let transport = FakeTransport::new(&nodes, |_, _| Ending::Hang);
    let stop = CancellationToken::new();
    let cancel = stop.clone();
    let driver = tokio::spawn(async move {
        // Let both builds start before the interrupt.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        cancel.cancel();
    });
    let run = run(nodes, fleet(1), transport, false, None, stop).await;
    driver.await.unwrap();
    match run.report {
        Err(DriverError::Interrupted { stopped }) => assert_eq!(stopped, 2),
        other => panic!("{:?}", other.map(|r| r.results)),
    }
    assert_eq!(run.transport.builds().len(), 2);
}

#[tokio::test]
async fn a_derivation_no_machine_can_build_fails_at_once() {
    let mut odd = node("odd", &[]);
    odd.system = "riscv64-linux".into();
    let nodes = vec![odd, node("fine", &[])];
    let transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    let run = run(nodes, fleet(1), transport, true, None, never()).await;
    match run.result(0) {
        NodeResult::Failed { failure, .. } => assert_eq!(
            failure,
            "no machine can build it: it needs system riscv64-linux and the machines \
             considered were local, b1"
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(run.result(1), NodeResult::Built { .. }));
    assert!(!run.transport.builds().iter().any(|(n, _)| n == "odd"));
}

#[tokio::test]
async fn outputs_go_ahead_to_the_builder_the_plan_builds_their_consumers_on() {
    // Six builds need a root built here and a gate only the builder can build; the plan
    // builds some of the six there. The root's output goes there as soon as it is
    // built, while the gate still builds (it never ends here: the run is stopped).
    let mut nodes = vec![node("root", &[]), node("gate", &[])];
    nodes[1].estimate = 3.0;
    nodes[1].required_features = vec!["big".into()];
    for i in 0..6 {
        nodes.push(node(&format!("leaf{i}"), &[0, 1]));
    }
    let mut machines = fleet(1);
    machines[REMOTE].supported_features = vec!["big".into()];
    let transport = FakeTransport::new(&nodes, |name, _| {
        if name == "gate" {
            Ending::Hang
        } else {
            Ending::Built
        }
    });
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stopper.cancel();
    });
    let r = run(nodes, machines, transport, false, None, stop).await;
    assert!(r.report.is_err(), "stopped");
    let builds = r.transport.builds();
    assert_eq!(builds, [("gate".into(), REMOTE), ("root".into(), LOCAL)]);
    let sent = r.transport.sent_ahead.lock().unwrap().clone();
    assert_eq!(sent, [(output("root"), REMOTE)]);
}
