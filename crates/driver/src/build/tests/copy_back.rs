//! The copy of the requested outputs home at the end of a run: a failure fails the
//! run, a broken link is tried again, up to its attempts.

use super::*;

#[tokio::test]
async fn a_failed_copy_home_fails_the_run() {
    let nodes = vec![node("a", &[])];
    let mut transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    transport.fetch_fails = true;
    let run = run(nodes, fleet(1), transport, false, None, never()).await;
    let report = run.report();
    assert!(matches!(run.result(0), NodeResult::Built { .. }));
    assert!(report.copy_back_error.is_some());
    assert!(!report.all_built());
}

#[tokio::test]
async fn a_copy_home_whose_link_breaks_is_tried_again() {
    let nodes = vec![node("a", &[])];
    let transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    // The copy as the build on the builder ends, and the first at the end of the run.
    *transport.fetch_breaks.lock().unwrap() = 2;
    let mut machines = fleet(1);
    machines[REMOTE].speed = 4.0;
    let run = run(nodes, machines, transport, false, None, never()).await;
    assert_eq!(run.transport.builds(), [("a".into(), REMOTE)]);
    let report = run.report();
    assert!(report.all_built(), "{:?}", report.copy_back_error);
    assert!(
        run.events.iter().any(|e| e.contains("trying again")),
        "{:?}",
        run.events
    );
}

#[tokio::test]
async fn a_copy_home_that_keeps_breaking_fails_after_its_attempts() {
    let nodes = vec![node("a", &[])];
    let transport = FakeTransport::new(&nodes, |_, _| Ending::Built);
    *transport.fetch_breaks.lock().unwrap() = 1 + crate::build::runner::finish::COPY_BACK_ATTEMPTS;
    let mut machines = fleet(1);
    machines[REMOTE].speed = 4.0;
    let run = run(nodes, machines, transport, false, None, never()).await;
    assert!(matches!(
        run.report().copy_back_error,
        Some(DriverError::Exited { .. })
    ));
    assert_eq!(*run.transport.fetch_breaks.lock().unwrap(), 0);
}
