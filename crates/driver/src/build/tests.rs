//! The runner's logic without Nix: a fake transport whose builds end as each test says,
//! checked against what the runner reports, fetches and records.

use std::collections::HashMap;

use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

use offload_nix::serve::BasicDerivation;
use offload_sched::{MachineId, MachineSpec, Outcome};

use super::health::Reliability;
use super::runner::{BuildTask, BuildTransport, Runner, TaskDone};
use super::{BuildNode, BuildReport, NodeResult, Reporter};
use crate::error::DriverError;
use crate::fleet::LOCAL;
use crate::state::StateDb;

const SYSTEM: &str = "x86_64-linux";
const REMOTE: MachineId = 1;

/// How a fake build ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    Built,
    /// The builder failed (exit 3 after some log lines).
    Failed,
    /// The session broke: the machine is taken out of the run.
    MachineDown,
    /// The builder failed and Nix found the disk full.
    DiskFull,
    /// Never ends by itself.
    Hang,
}

type Plan = dyn Fn(&str, MachineId) -> Ending + Send + Sync;

/// A transport whose builds end by `plan` (node name, machine), and that records what
/// the runner asked of it.
struct FakeTransport {
    names: Vec<String>,
    plan: Box<Plan>,
    fetch_fails: bool,
    /// How many copies home fail more, as a cut link does, before they succeed.
    fetch_breaks: Mutex<u32>,
    /// Machines whose probes fail, and whose sessions do not open.
    unreachable: Vec<MachineId>,
    /// Of those, the ones that refuse for good (as a wrong host key).
    refusing: Vec<MachineId>,
    probes: Mutex<Vec<MachineId>>,
    builds: Mutex<Vec<(String, MachineId, Option<u32>)>>,
    fetched: Mutex<Vec<String>>,
    forgotten: Mutex<Vec<MachineId>>,
    /// Paths sent ahead, and where.
    sent_ahead: Mutex<Vec<(String, MachineId)>>,
    closed: Mutex<bool>,
    /// Slots others hold, per machine, as the ledger would say.
    held_elsewhere: Vec<(MachineId, u32)>,
    /// What copies under way show of each machine's link (bytes per second).
    link_bounds: Vec<(MachineId, f64)>,
}

impl FakeTransport {
    fn new(
        nodes: &[BuildNode],
        plan: impl Fn(&str, MachineId) -> Ending + Send + Sync + 'static,
    ) -> Self {
        FakeTransport {
            names: nodes.iter().map(|n| n.name.clone()).collect(),
            plan: Box::new(plan),
            fetch_fails: false,
            fetch_breaks: Mutex::default(),
            unreachable: Vec::new(),
            refusing: Vec::new(),
            probes: Mutex::default(),
            builds: Mutex::default(),
            fetched: Mutex::default(),
            forgotten: Mutex::default(),
            sent_ahead: Mutex::default(),
            closed: Mutex::default(),
            held_elsewhere: Vec::new(),
            link_bounds: Vec::new(),
        }
    }

    fn builds(&self) -> Vec<(String, MachineId)> {
        let builds = self.builds.lock().unwrap();
        builds.iter().map(|(n, m, _)| (n.clone(), *m)).collect()
    }
}

impl BuildTransport for FakeTransport {
    fn link_bound(&self, machine: MachineId, _latency: f64) -> Option<f64> {
        self.link_bounds
            .iter()
            .find(|(m, _)| *m == machine)
            .map(|(_, b)| *b)
    }

    fn slots_held_elsewhere(
        self: Arc<Self>,
    ) -> impl std::future::Future<Output = Vec<(MachineId, u32)>> + Send + 'static {
        std::future::ready(self.held_elsewhere.clone())
    }

    async fn build(self: Arc<Self>, task: BuildTask) -> TaskDone {
        let (node, machine) = (task.node, task.machine);
        if self.unreachable.contains(&machine) {
            // As a real session that cannot open: the build never ran there.
            tokio::task::yield_now().await;
            return TaskDone {
                node,
                machine,
                outcome: Outcome::Lost {
                    reason: "connection refused".into(),
                },
                log_tail: Vec::new(),
                seconds: 0.0,
                facts: Default::default(),
                machine_down: true,
            };
        }
        let name = self.names[node].clone();
        self.builds
            .lock()
            .unwrap()
            .push((name.clone(), machine, task.cores));
        let ending = (self.plan)(&name, machine);
        tokio::task::yield_now().await;
        let (outcome, machine_down) = match ending {
            Ending::Built => (Outcome::Built, false),
            Ending::Failed => (
                Outcome::Failed {
                    reason: format!("builder for '{name}' failed with exit code 3"),
                },
                false,
            ),
            Ending::DiskFull => (
                Outcome::Failed {
                    reason: format!(
                        "builder for '{name}' failed with exit code 1\nnote: build failure may \
                         have been caused by lack of free disk space"
                    ),
                },
                false,
            ),
            Ending::MachineDown => (
                Outcome::Lost {
                    reason: "the session ended".into(),
                },
                true,
            ),
            Ending::Hang => std::future::pending().await,
        };
        let log_tail = if ending == Ending::Failed {
            vec!["log line 1".into(), "log line 2".into()]
        } else {
            Vec::new()
        };
        TaskDone {
            node,
            machine,
            outcome,
            log_tail,
            seconds: 0.5,
            facts: Default::default(),
            machine_down,
        }
    }

    async fn fetch(self: Arc<Self>, paths: Vec<String>) -> Result<(), DriverError> {
        {
            let mut breaks = self.fetch_breaks.lock().unwrap();
            if *breaks > 0 && !paths.is_empty() {
                *breaks -= 1;
                return Err(DriverError::Exited {
                    machine: "b1".into(),
                    command: "ssh b1 nix-store --serve --write".into(),
                    op: "DumpStorePath",
                    status: "exit status: 255".into(),
                    stderr: String::new(),
                });
            }
        }
        if self.fetch_fails && !paths.is_empty() {
            return Err(DriverError::NotValid {
                machine: "local".into(),
                path: paths[0].clone(),
            });
        }
        self.fetched.lock().unwrap().extend(paths);
        Ok(())
    }

    async fn send_ahead(self: Arc<Self>, machine: MachineId, paths: Vec<String>) {
        let mut sent = self.sent_ahead.lock().unwrap();
        sent.extend(paths.into_iter().map(|p| (p, machine)));
    }

    fn forget_machine(&self, machine: MachineId) {
        self.forgotten.lock().unwrap().push(machine);
    }

    fn refused(&self, machine: MachineId) -> bool {
        self.refusing.contains(&machine)
    }

    async fn probe(self: Arc<Self>, machine: MachineId, _cores: Option<u32>) -> Result<(), String> {
        self.probes.lock().unwrap().push(machine);
        if self.unreachable.contains(&machine) {
            Err("connection refused".into())
        } else {
            Ok(())
        }
    }

    async fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }
}

/// Events as the reporter saw them.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Reporter for Recorder {
    fn build_started(&self, drv: &str, machine: &str) {
        self.0
            .lock()
            .unwrap()
            .push(format!("start {} {machine}", name_of(drv)));
    }
    fn build_log(&self, _drv: &str, _machine: &str, _line: &str) {}
    fn machine_warning(&self, message: &str) {
        self.0.lock().unwrap().push(format!("warning {message}"));
    }
    fn build_finished(&self, drv: &str, machine: &str, ok: bool, _seconds: f64) {
        self.0
            .lock()
            .unwrap()
            .push(format!("end {} {machine} {ok}", name_of(drv)));
    }
}

fn name_of(drv: &str) -> &str {
    drv.rsplit_once('-')
        .map_or(drv, |(_, n)| n.trim_end_matches(".drv"))
}

fn output(name: &str) -> String {
    format!("/nix/store/{}-{name}", "1".repeat(32))
}

/// A node called `name` needing the nodes at `deps`.
fn node(name: &str, deps: &[usize]) -> BuildNode {
    BuildNode {
        drv_path: format!("/nix/store/{}-{name}.drv", "0".repeat(32)),
        name: name.into(),
        system: SYSTEM.into(),
        required_features: Vec::new(),
        prefer_local: false,
        deps: deps.to_vec(),
        inputs: Vec::new(),
        outputs: vec![("out".into(), output(name))],
        drv: BasicDerivation {
            outputs: Vec::new(),
            input_srcs: Vec::new(),
            platform: SYSTEM.into(),
            builder: b"/bin/sh".to_vec(),
            args: Vec::new(),
            env: Vec::new(),
        },
        estimate: 1.0,
        estimate_known: true,
        output_bytes: None,
    }
}

/// The local machine and one builder, `slots` each.
fn fleet(slots: u32) -> Vec<MachineSpec> {
    vec![
        MachineSpec::local(SYSTEM, slots),
        MachineSpec::new("b1", SYSTEM, slots, 1.0),
    ]
}

/// This machine with no slots, and builder `b1`.
fn fleet_without_local(slots: u32) -> Vec<MachineSpec> {
    vec![
        MachineSpec::local(SYSTEM, 0),
        MachineSpec::new("b1", SYSTEM, slots, 1.0),
    ]
}

struct Run {
    report: Result<BuildReport, DriverError>,
    transport: Arc<FakeTransport>,
    events: Vec<String>,
}

impl Run {
    fn report(&self) -> &BuildReport {
        self.report.as_ref().expect("the run ends with a report")
    }

    fn result(&self, i: usize) -> &NodeResult {
        &self.report().results[i]
    }
}

/// Runs `nodes` on `machines` with the fake transport, requesting every output.
async fn run(
    nodes: Vec<BuildNode>,
    machines: Vec<MachineSpec>,
    transport: FakeTransport,
    keep_going: bool,
    history: Option<&StateDb>,
    stop: CancellationToken,
) -> Run {
    let wanted = nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(|(_, p)| p.clone()))
        .collect();
    let cores = machines.iter().map(|m| m.is_local.then_some(4)).collect();
    let transport = Arc::new(transport);
    let recorder = Arc::new(Recorder::default());
    let runner = Runner::new(
        transport.clone(),
        nodes.into(),
        machines,
        cores,
        wanted,
        keep_going,
        Reliability {
            // Probes at once: the fake machines answer or not without waiting.
            backoff: std::time::Duration::from_millis(1),
            quarantine_after: 5,
            slot_wait: std::time::Duration::from_millis(600),
            ..Reliability::default()
        },
        history,
        recorder.clone(),
    )
    .unwrap();
    let report = runner.run(stop).await;
    let events = recorder.0.lock().unwrap().clone();
    Run {
        report,
        transport,
        events,
    }
}

/// A stop that never comes.
fn never() -> CancellationToken {
    CancellationToken::new()
}

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

/// The local machine with `local_slots` and three fast builders of one slot each.
fn three_builders(local_slots: u32) -> Vec<MachineSpec> {
    let mut machines = vec![MachineSpec::local(SYSTEM, local_slots)];
    for name in ["b1", "b2", "b3"] {
        machines.push(MachineSpec::new(name, SYSTEM, 1, 8.0));
    }
    machines
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
    *transport.fetch_breaks.lock().unwrap() = 1 + super::runner::finish::COPY_BACK_ATTEMPTS;
    let mut machines = fleet(1);
    machines[REMOTE].speed = 4.0;
    let run = run(nodes, machines, transport, false, None, never()).await;
    assert!(matches!(
        run.report().copy_back_error,
        Some(DriverError::Exited { .. })
    ));
    assert_eq!(*run.transport.fetch_breaks.lock().unwrap(), 0);
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
