//! The runner's logic without Nix: a fake transport whose builds end as each test says,
//! checked against what the runner reports, fetches and records.

use std::collections::HashMap;

use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

use offload_nix::serve::BasicDerivation;
use offload_nix::store_path::derivation_name;
use offload_sched::{MachineId, MachineSpec, Outcome};

use super::health::Reliability;
use super::runner::{BuildTask, BuildTransport, Runner, TaskDone};
use super::{BuildNode, BuildReport, NodeResult, Reporter};
use crate::error::DriverError;
use crate::fleet::LOCAL;
use crate::state::StateDb;

mod copy_back;
mod machines;
mod runs;

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
            .push(format!("start {} {machine}", derivation_name(drv)));
    }
    fn build_log(&self, _drv: &str, _machine: &str, _line: &str) {}
    fn machine_warning(&self, message: &str) {
        self.0.lock().unwrap().push(format!("warning {message}"));
    }
    fn build_finished(&self, drv: &str, machine: &str, ok: bool, _seconds: f64) {
        self.0
            .lock()
            .unwrap()
            .push(format!("end {} {machine} {ok}", derivation_name(drv)));
    }
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
