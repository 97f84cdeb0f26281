//! The runner: the event loop between the scheduler and the machines. It turns the
//! scheduler's actions into build tasks on a [`BuildTransport`], and each finished task
//! back into events, until nothing runs and nothing more will start; then it brings the
//! requested outputs home and reports. It holds no I/O of its own, so its logic is
//! tested with a fake transport (`build/tests.rs`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use offload_sched::{
    Action, Event, Failure, Graph, MachineId, MachineSpec, NodeSpec, NodeState, Outcome, Scheduler,
    DEFAULT_OUTPUT_BYTES,
};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::health::{AfterFailure, Health, Reliability};
use super::{BuildNode, BuildReport, NodeResult, Reporter};
use crate::error::DriverError;
use crate::fleet::LOCAL;
use crate::learn::{moved, refit_interval, SLOWER_UNDER_WAY};
use crate::state::{BuildRecord, StateDb};
use crate::transfer::TransferNews;

/// What the runner needs from the machines. [`super::serve::ServeTransport`] speaks the
/// serve protocol; the unit tests use a fake.
pub(crate) trait BuildTransport: Send + Sync + 'static {
    /// Ships the inputs of the node that the machine lacks, builds it there and learns
    /// its outputs. Dropping the future stops the build.
    fn build(self: Arc<Self>, task: BuildTask) -> impl Future<Output = TaskDone> + Send + 'static;

    /// Makes the closures of `paths` valid in the local store.
    fn fetch(
        self: Arc<Self>,
        paths: Vec<String>,
    ) -> impl Future<Output = Result<(), DriverError>> + Send + 'static;

    /// Copies the closures of `paths` to `machine` ahead of the builds that will need
    /// them there, best effort: a failure only means the builds ship them themselves.
    fn send_ahead(
        self: Arc<Self>,
        _machine: MachineId,
        _paths: Vec<String>,
    ) -> impl Future<Output = ()> + Send + 'static {
        async {}
    }

    /// `machine` is lost: nothing it held can be fetched from it any more.
    fn forget_machine(&self, machine: MachineId);

    /// Whether `machine` answers: a session opens there, one that builds with `cores`
    /// (those of a build alone there), kept for the first build. The error says why not.
    fn probe(
        self: Arc<Self>,
        machine: MachineId,
        cores: Option<u32>,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static;

    /// Ends every idle session.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Copies that landed and were timed since the last call.
    fn take_news(&self) -> TransferNews {
        TransferNews::default()
    }

    /// The most `machine`'s link can carry by the copies crossing it now
    /// ([`crate::transfer::TransferEngine::crossing_bound`]).
    fn link_bound(&self, _machine: MachineId, _latency: f64) -> Option<f64> {
        None
    }

    /// Whether `machine` refused offload for good (authentication, host key): trying
    /// it again in this run would meet the same refusal.
    fn refused(&self, _machine: MachineId) -> bool {
        false
    }

    /// Per machine with slots to share, how many of them others hold now (other runs,
    /// Nix's own build hook).
    fn slots_held_elsewhere(
        self: Arc<Self>,
    ) -> impl Future<Output = Vec<(MachineId, u32)>> + Send + 'static {
        std::future::ready(Vec::new())
    }
}

/// What a build taught, for the state database.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct BuildFacts {
    /// The build's own seconds, its inputs' copies left out.
    pub build_seconds: Option<f64>,
    /// Seconds spent bringing its inputs to the machine.
    pub inputs_seconds: Option<f64>,
    /// NAR bytes of its outputs.
    pub output_bytes: Option<u64>,
}

/// One build the scheduler placed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BuildTask {
    pub node: usize,
    pub machine: MachineId,
    /// Cores its builder gets (`NIX_BUILD_CORES`), when the runner shares them out.
    pub cores: Option<u32>,
}

/// How one build task ended.
#[derive(Debug)]
pub(crate) struct TaskDone {
    pub node: usize,
    pub machine: MachineId,
    pub outcome: Outcome,
    /// The last lines of its log.
    pub log_tail: Vec<String>,
    /// How long the task took: input copies and the build.
    pub seconds: f64,
    pub facts: BuildFacts,
    /// The machine's connection failed (its session broke): it is down for a while, and
    /// the build runs again without counting as a failed attempt.
    pub machine_down: bool,
}

/// One run of a build graph over a fleet.
pub(crate) struct Runner<'h, T: BuildTransport> {
    transport: Arc<T>,
    nodes: Arc<[BuildNode]>,
    machines: Vec<MachineSpec>,
    cores: Vec<Option<u32>>,
    sched: Scheduler,
    history: Option<&'h StateDb>,
    reporter: Arc<dyn Reporter>,
    clock: Instant,
    /// Output paths to bring to the local store, and the same as a set.
    wanted: Vec<String>,
    wanted_set: HashSet<String>,
    results: Vec<Option<NodeResult>>,
    builds_per_machine: Vec<usize>,
    started_at: Vec<f64>,
    tasks: JoinSet<TaskDone>,
    /// Each running build's task, by node: only that task's end counts.
    running: HashMap<usize, (AbortHandle, MachineId)>,
    health: Health<'h>,
    /// Machines down for now, each probed again after its backoff.
    probes: JoinSet<(MachineId, Result<(), String>)>,
    /// Requested outputs copied home while the rest of the graph builds.
    early_copies: JoinSet<()>,
    /// Outputs on their way to the builders the plan will build their consumers on,
    /// and the copy ahead to each machine in flight, if any.
    sent_ahead: JoinSet<()>,
    sending_ahead: Vec<Option<AbortHandle>>,
    lower_bound: f64,
    /// Each machine's key in the state database (its store URI as written) and the
    /// speed factor its machines-file line declares.
    state_keys: Vec<String>,
    declared_speeds: Vec<f64>,
    /// Output path → its node, for copies that land.
    output_of: HashMap<String, usize>,
    /// What the state calls this run: builds of one run are compared as a population.
    run_id: String,
    /// When the speeds were last fitted, and how long to wait for the next fit.
    last_refit: f64,
    refit_wait: f64,
    /// Machines whose first probe has not answered yet, and that probe.
    first_probes: HashMap<MachineId, AbortHandle>,
    /// Since when nothing of this run has run while others held the slots it needs.
    waiting_for_others: Option<f64>,
    slot_wait: std::time::Duration,
}

impl<'h, T: BuildTransport> Runner<'h, T> {
    /// A runner for `nodes` on `machines` (the local machine at [`LOCAL`]), bringing the
    /// closures of `wanted` home at the end.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        transport: Arc<T>,
        nodes: Arc<[BuildNode]>,
        machines: Vec<MachineSpec>,
        cores: Vec<Option<u32>>,
        wanted: Vec<String>,
        keep_going: bool,
        reliability: Reliability,
        history: Option<&'h StateDb>,
        reporter: Arc<dyn Reporter>,
    ) -> Result<Self, DriverError> {
        let graph =
            Graph::new(nodes.iter().map(node_spec).collect()).map_err(|e| DriverError::Io {
                machine: "local".into(),
                op: "checking the build graph",
                source: std::io::Error::other(e.to_string()),
            })?;
        let capacity: f64 = machines.iter().map(|m| f64::from(m.slots) * m.speed).sum();
        let lower_bound = graph
            .critical_path()
            .max(graph.total_work() / capacity.max(1.0));
        let n = nodes.len();
        let slot_wait = reliability.slot_wait;
        let state_keys = machines.iter().map(|m| m.name.clone()).collect();
        let declared_speeds = machines.iter().map(|m| m.speed).collect();
        let machine_count = machines.len();
        Ok(Runner {
            transport,
            sched: {
                let mut sched = Scheduler::new(graph, machines.clone(), keep_going);
                let guessed: Vec<usize> = (0..n)
                    .filter(|&i| nodes[i].output_bytes.is_none())
                    .collect();
                sched.guess_output_sizes(&guessed);
                let guessed: Vec<usize> = (0..n).filter(|&i| !nodes[i].estimate_known).collect();
                sched.guess_durations(&guessed);
                sched
            },
            health: Health::new(
                reliability,
                history,
                machines.iter().map(|m| m.name.clone()).collect(),
            ),
            probes: JoinSet::new(),
            builds_per_machine: vec![0; machines.len()],
            machines,
            cores,
            history,
            reporter,
            clock: Instant::now(),
            wanted_set: wanted.iter().cloned().collect(),
            wanted,
            results: vec![None; n],
            started_at: vec![0.0; n],
            tasks: JoinSet::new(),
            running: HashMap::new(),
            early_copies: JoinSet::new(),
            sent_ahead: JoinSet::new(),
            sending_ahead: vec![None; machine_count],
            lower_bound,
            state_keys,
            declared_speeds,
            last_refit: 0.0,
            refit_wait: 0.0,
            first_probes: HashMap::new(),
            waiting_for_others: None,
            slot_wait,
            run_id: format!(
                "{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
            output_of: nodes
                .iter()
                .enumerate()
                .flat_map(|(i, n)| n.outputs.iter().map(move |(_, p)| (p.clone(), i)))
                .collect(),
            nodes,
        })
    }

    /// Names each machine in the state database by `keys` (store URIs as written)
    /// with the speed factors its machines-file line declares, rather than by its
    /// planning name and speed.
    pub(crate) fn with_state_keys(mut self, keys: Vec<String>, declared_speeds: Vec<f64>) -> Self {
        self.state_keys = keys;
        self.declared_speeds = declared_speeds;
        self
    }

    /// Tells the scheduler where copies landed and the history how long they took.
    fn take_news(&mut self) {
        let news = self.transport.take_news();
        let now = self.now();
        for (path, machine) in news.landed {
            if let Some(&node) = self.output_of.get(&path) {
                let actions = self.sched.handle(Event::OutputsAt { node, machine }, now);
                self.apply(actions);
            }
        }
        if let Some(h) = self.history {
            for t in news.transfers {
                let key = &self.state_keys[t.machine];
                if let Err(e) =
                    h.record_transfer(key, t.to_machine, t.bytes, t.seconds, t.concurrent)
                {
                    tracing::warn!("{e}");
                }
            }
        }
    }

    /// Runs the graph to its end. When `stop` is cancelled first, every running build,
    /// transfer and copy is stopped and the run ends with [`DriverError::Interrupted`].
    pub(crate) async fn run(mut self, stop: CancellationToken) -> Result<BuildReport, DriverError> {
        let interrupt = stop.clone().cancelled_owned();
        tokio::pin!(interrupt);
        self.check_machines();
        // Slots others hold count from the first decision on, and are looked at again
        // while the run goes on, so concurrent runs spread over the fleet.
        self.watch_slots().await;
        let mut slot_watch = tokio::time::interval(SLOT_WATCH_INTERVAL);
        slot_watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        slot_watch.reset();
        let first = self.sched.start(self.now());
        self.apply(first);
        while !self.sched.is_finished() {
            if self.tasks.is_empty() && self.probes.is_empty() {
                if !self.sched.waits_for_others() {
                    // Nothing runs, no machine may come back and no slot others hold
                    // may free: nothing more can happen.
                    break;
                }
                let now = self.now();
                let since = *self.waiting_for_others.get_or_insert(now);
                if now - since >= self.slot_wait.as_secs_f64() {
                    self.give_up_on_held_slots(now - since);
                    break;
                }
            } else {
                self.waiting_for_others = None;
            }
            tokio::select! {
                _ = slot_watch.tick() => self.watch_slots().await,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    // An aborted task (a Cancel, its machine's failure) is accounted for.
                    if let Ok((id, done)) = joined {
                        self.take_news();
                        self.on_finished(id, done);
                    }
                }
                Some(probed) = self.probes.join_next(), if !self.probes.is_empty() => {
                    if let Ok((machine, answer)) = probed {
                        self.on_probed(machine, answer);
                    }
                }
                () = &mut interrupt => return Err(self.stop().await),
            }
        }
        self.finish(stop).await
    }

    /// Others held every slot the rest of the graph could use for `waited` seconds:
    /// what is left fails, naming the machines and their holders' lock files.
    fn give_up_on_held_slots(&mut self, waited: f64) {
        let held: Vec<String> = (0..self.machines.len())
            .filter(|&m| self.sched.slots_held_elsewhere(m) > 0)
            .map(|m| {
                DriverError::SlotsBusy {
                    machine: self.machines[m].name.clone(),
                    slots: self.machines[m].slots,
                    dir: "here or on the machine".into(),
                    secs: waited as u64,
                }
                .with_hint()
            })
            .collect();
        let why = held.join("; ");
        self.reporter.machine_warning(&why);
        for (node, result) in self.results.iter_mut().enumerate() {
            if result.is_none() && *self.sched.state(node) == NodeState::Ready {
                *result = Some(NodeResult::Failed {
                    failure: format!("not built: {why}"),
                    log_tail: Vec::new(),
                });
            }
        }
    }

    /// Tells the scheduler how many slots of each machine others hold now.
    async fn watch_slots(&mut self) {
        let held = self.transport.clone().slots_held_elsewhere().await;
        let now = self.now();
        for (machine, count) in held {
            let actions = self
                .sched
                .handle(Event::SlotsHeldElsewhere { machine, count }, now);
            self.apply(actions);
        }
    }

    /// Stops every build and transfer. Dropping the sessions kills their processes,
    /// which stops the builds on every machine; nothing half-done is ever registered.
    async fn stop(&mut self) -> DriverError {
        let stopped = self.running.len();
        self.tasks.shutdown().await;
        self.probes.shutdown().await;
        self.early_copies.shutdown().await;
        self.sent_ahead.shutdown().await;
        DriverError::Interrupted { stopped }
    }

    /// Before the first build: skips the machines still quarantined by earlier runs,
    /// and probes the others while the first builds start: one that cannot be reached
    /// is said once (by its probe or by the first build there, whichever fails first)
    /// and its work goes elsewhere.
    fn check_machines(&mut self) {
        for m in 0..self.machines.len() {
            if m == LOCAL || self.machines[m].slots == 0 {
                continue;
            }
            if let Some(why) = self.health.quarantined(m) {
                let name = &self.machines[m].name;
                self.reporter
                    .machine_warning(&format!("skipping {name}: {why}"));
                self.reporter.machine_event("machine_skipped", name, &why);
                let actions = self.sched.handle(Event::MachineLost { machine: m }, 0.0);
                self.apply(actions);
                continue;
            }
            let probe = self.probe(m);
            let handle = self.probes.spawn(async move { (m, probe.await) });
            self.first_probes.insert(m, handle);
        }
    }

    /// `machine`'s connection failed: it is down until a probe after its backoff, or
    /// lost for the run when it keeps failing. Its running builds go elsewhere.
    fn machine_failed(&mut self, machine: MachineId, why: &str, doing: &str) {
        // A build there failed before the first probe answered: one failure, not two,
        // said as the probe would have said it.
        let doing = match self.first_probes.remove(&machine) {
            Some(probe) => {
                probe.abort();
                "skipping it"
            }
            None => doing,
        };
        self.running.retain(|_, (handle, m)| {
            if *m == machine {
                handle.abort();
            }
            *m != machine
        });
        self.transport.forget_machine(machine);
        let name = self.machines[machine].name.clone();
        if self.transport.refused(machine) {
            // Not a fault that passes: no backoff, no quarantine; the fix is the user's.
            self.reporter.machine_warning(&format!(
                "{name} cannot be used ({why}); {doing}, and it is not tried again in this \
                 run: a retry would meet the same refusal"
            ));
            self.reporter.machine_event("machine_lost", &name, why);
            let actions = self
                .sched
                .handle(Event::MachineLost { machine }, self.now());
            self.apply(actions);
            return;
        }
        let (event, next, kind) = match self.health.failed(machine, why) {
            AfterFailure::RetryIn(wait) => {
                let probe = self.probe(machine);
                self.probes.spawn(async move {
                    tokio::time::sleep(wait).await;
                    (machine, probe.await)
                });
                (
                    Event::MachineDown { machine },
                    format!("trying it again in {} s", wait.as_secs_f64()),
                    "machine_lost",
                )
            }
            AfterFailure::Quarantined(until) => (
                Event::MachineLost { machine },
                format!(
                    "it failed too often: quarantined until {}",
                    crate::state::format_utc(until)
                ),
                "machine_quarantined",
            ),
        };
        self.reporter
            .machine_warning(&format!("{name} cannot be used ({why}); {doing}, {next}"));
        self.reporter.machine_event(kind, &name, why);
        let actions = self.sched.handle(event, self.now());
        self.apply(actions);
    }

    /// A probe of `machine`, bounded: a host that takes the connection and then says
    /// nothing (no keepalive notices a silent program) counts as down too.
    fn probe(&self, machine: MachineId) -> impl Future<Output = Result<(), String>> + 'static {
        let limit = self.health.probe_timeout();
        let probe = self.transport.clone().probe(machine, self.cores[machine]);
        async move {
            match tokio::time::timeout(limit, probe).await {
                Ok(answer) => answer,
                Err(_) => Err(format!(
                    "no serve-protocol answer within {} s",
                    limit.as_secs()
                )),
            }
        }
    }

    fn on_probed(&mut self, machine: MachineId, answer: Result<(), String>) {
        let first = self.first_probes.remove(&machine).is_some();
        match answer {
            Ok(()) => {
                if !first {
                    tracing::info!(machine = %self.machines[machine].name, "answers again");
                }
                // The probe's session waits in the pool for the next build there.
                self.sched.session_open(machine);
                let actions = self
                    .sched
                    .handle(Event::MachineBack { machine }, self.now());
                self.apply(actions);
            }
            Err(why) if first => self.machine_failed(machine, &why, "skipping it"),
            Err(why) => self.machine_failed(machine, &why, "still down"),
        }
    }

    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            self.on_action(action);
        }
    }

    /// Carries out one of the scheduler's actions.
    fn on_action(&mut self, action: Action) {
        match action {
            Action::Start { node, machine } => {
                // Builds running there now, this one included, share its cores.
                let cores = self.cores[machine].map(|total| {
                    let sharing = self.sched.running_on(machine).len().max(1) as u32;
                    (total / sharing).max(1)
                });
                let spec = &self.machines[machine];
                let planned = crate::reporter::Placement {
                    estimate_seconds: self.nodes[node].estimate / spec.speed.max(1e-6),
                    cores,
                };
                self.reporter
                    .build_placed(&self.nodes[node].drv_path, &spec.name, planned);
                self.started_at[node] = self.now();
                let task = BuildTask {
                    node,
                    machine,
                    cores,
                };
                let handle = self.tasks.spawn(self.transport.clone().build(task));
                self.running.insert(node, (handle, machine));
            }
            Action::Cancel { node, .. } => {
                if let Some((handle, _)) = self.running.remove(&node) {
                    handle.abort();
                }
            }
            Action::Fail { node, reason } => {
                if self.results[node].is_none() {
                    self.results[node] = Some(NodeResult::Failed {
                        failure: self.describe(&reason),
                        log_tail: Vec::new(),
                    });
                }
            }
        }
    }

    /// Feeds a finished task to the scheduler and records what it did.
    fn on_finished(&mut self, id: tokio::task::Id, done: TaskDone) {
        match self.running.get(&done.node) {
            Some((handle, _)) if handle.id() == id => {}
            // The end of a task the runner already gave up on (its machine failed).
            _ => return,
        }
        self.running.remove(&done.node);
        let now = self.now();
        // A builder whose disk is full fails every build that writes much: that is the
        // machine's fault, not the derivation's, so the build runs elsewhere.
        let full = done.machine != LOCAL && out_of_space(&done.outcome, &done.log_tail);
        if done.machine_down || full {
            let why = match &done.outcome {
                Outcome::Lost { reason } => reason.clone(),
                Outcome::Failed { .. } if full => format!(
                    "it ran out of space: the build of {} failed for lack of free disk space \
                     there; free some with `nix-collect-garbage` on it, or give its store a \
                     larger disk",
                    self.nodes[done.node].drv_path
                ),
                _ => "its session broke".to_string(),
            };
            self.machine_failed(done.machine, &why, "its builds go elsewhere");
            return;
        }
        if done.outcome == Outcome::Deferred {
            // Others took the machine's slots first: they count as held until the next
            // look at the ledger, so the build goes elsewhere or waits for a free slot.
            let count = self.machines[done.machine].slots;
            let event = Event::SlotsHeldElsewhere {
                machine: done.machine,
                count,
            };
            let actions = self.sched.handle(event, now);
            self.apply(actions);
        }
        let drv_path = &self.nodes[done.node].drv_path;
        let machine_name = &self.machines[done.machine].name;
        if let Outcome::Lost { reason } = &done.outcome {
            tracing::warn!(machine = %machine_name, drv = %drv_path, "build lost, will retry: {reason}");
        }
        let current = matches!(self.sched.state(done.node),
            NodeState::Running { machine, .. } if *machine == done.machine);
        if current && done.outcome == Outcome::Built {
            // What the build showed goes into the plan before its end places the builds
            // that waited for it.
            self.learn_from(&done);
        }
        let actions = self.sched.handle(
            Event::Finished {
                node: done.node,
                machine: done.machine,
                outcome: done.outcome.clone(),
            },
            now,
        );
        self.apply(actions);
        // Count only what the scheduler took: a build of a lost machine is stale.
        let accepted = match self.sched.state(done.node) {
            NodeState::Done { machine, .. } => *machine == done.machine,
            NodeState::Failed(Failure::BuildFailed { machine, .. }) => *machine == done.machine,
            _ => false,
        };
        if !accepted {
            return;
        }
        match &done.outcome {
            Outcome::Built => self.on_built(&done),
            Outcome::Failed { reason } => {
                self.results[done.node] = Some(NodeResult::Failed {
                    failure: format!("{reason} (on {})", self.machines[done.machine].name),
                    log_tail: done.log_tail.clone(),
                });
            }
            Outcome::Lost { .. } | Outcome::Deferred => {}
        }
        self.reporter.build_finished(
            &self.nodes[done.node].drv_path,
            &self.machines[done.machine].name,
            done.outcome == Outcome::Built,
            done.seconds,
        );
    }

    /// Learns from a build that ended well: the real size of its outputs, and (with a
    /// state) its time, recorded, and the speeds fitted again.
    fn learn_from(&mut self, done: &TaskDone) {
        if let Some(bytes) = done.facts.output_bytes {
            self.sched.outputs_measured(done.node, bytes);
        }
        let node = &self.nodes[done.node];
        if let Some(h) = self.history {
            let recorded = h.record_build(&BuildRecord {
                name: &node.name,
                system: &node.system,
                machine: &self.state_keys[done.machine],
                seconds: done.facts.build_seconds.unwrap_or(done.seconds),
                declared_speed: self.declared_speeds[done.machine],
                output_bytes: done.facts.output_bytes,
                run: Some(&self.run_id),
                // The inputs' copies are the links' to learn, not the machine's.
                task_seconds: Some(done.seconds - done.facts.inputs_seconds.unwrap_or(0.0)),
            });
            if let Err(e) = recorded {
                tracing::warn!("{e}");
            }
        }
        self.refit_speeds();
    }

    fn on_built(&mut self, done: &TaskDone) {
        self.health.built_on(done.machine);
        let node = &self.nodes[done.node];
        let machine = &self.machines[done.machine];
        // Requested outputs start home as soon as they are built, while the rest of the
        // graph builds; the copy at the end only picks up what is left.
        let home: Vec<String> = node
            .outputs
            .iter()
            .map(|(_, p)| p.clone())
            .filter(|p| self.wanted_set.contains(p))
            .collect();
        if !home.is_empty() && done.machine != LOCAL {
            let fetch = self.transport.clone().fetch(home);
            self.early_copies.spawn(async move {
                // Best effort: the copy at the end reports what still fails.
                if let Err(e) = fetch.await {
                    tracing::debug!("early copy of requested outputs failed: {e}");
                }
            });
        }
        self.builds_per_machine[done.machine] += 1;
        self.results[done.node] = Some(NodeResult::Built {
            machine: machine.name.clone(),
            started: self.started_at[done.node],
            seconds: done.seconds,
        });
        self.send_ahead(done);
    }

    /// Sends the outputs of a build that just ended to the builders where the plan
    /// builds what needs them, while their links are idle, rather than when those
    /// builds start. At most one such copy goes to a machine at a time, and none that
    /// would hold its link longer than [`SEND_AHEAD_LIMIT`] by what is known of it: a
    /// copy ahead must not delay a build's own inputs behind it (a slow link, or one
    /// not yet measured that turns out slow, costs one copy).
    fn send_ahead(&mut self, done: &TaskDone) {
        while self.sent_ahead.try_join_next().is_some() {}
        let node = &self.nodes[done.node];
        let bytes = done
            .facts
            .output_bytes
            .or(node.output_bytes)
            .unwrap_or(DEFAULT_OUTPUT_BYTES);
        let outputs: Vec<String> = node.outputs.iter().map(|(_, p)| p.clone()).collect();
        for m in self.sched.consumers_planned_on(done.node) {
            let busy = self.sending_ahead[m]
                .as_ref()
                .is_some_and(|h| !h.is_finished());
            if m == LOCAL
                || m == done.machine
                || busy
                || self.machines[m].transfer_time(bytes) > SEND_AHEAD_LIMIT
            {
                continue;
            }
            let send = self.transport.clone().send_ahead(m, outputs.clone());
            self.sending_ahead[m] = Some(self.sent_ahead.spawn(send));
        }
    }

    /// Fits the machines' speeds and links again with this run's builds and copies so
    /// far, as often as [`refit_interval`] says: a machine or link that turns out
    /// slower or faster than planned gets the rest of the run's decisions right.
    fn refit_speeds(&mut self) {
        self.slow_links_under_way();
        let now = self.now();
        let Some(h) = self.history else { return };
        if self.last_refit > 0.0 && now - self.last_refit < self.refit_wait {
            return;
        }
        self.last_refit = now;
        let Some(system) = self.machines[LOCAL].systems.first().cloned() else {
            return;
        };
        let knowledge = match h.knowledge(&system) {
            Ok(k) => k,
            Err(e) => return tracing::debug!("{e}"),
        };
        self.refit_wait = refit_interval(knowledge.rows());
        for m in 0..self.machines.len() {
            let spec = &self.machines[m];
            if let Some((speed, per_system)) =
                knowledge.moved_speeds(&self.state_keys[m], spec, self.declared_speeds[m])
            {
                tracing::debug!(machine = %spec.name, "speed now {speed:.2}: {per_system:?}");
                self.machines[m].speed = speed;
                self.machines[m].system_speeds = per_system.clone();
                self.sched.set_speeds(m, speed, per_system);
            }
        }
        for m in 0..self.machines.len() {
            let spec = &self.machines[m];
            let Some(link) = knowledge
                .link(&self.state_keys[m])
                .filter(|_| !spec.is_local)
            else {
                continue;
            };
            if moved(spec.bandwidth, link.bandwidth) {
                tracing::debug!(machine = %spec.name, "link now {:.1} MB/s", link.bandwidth / 1e6);
                self.machines[m].bandwidth = link.bandwidth;
                self.machines[m].latency = link.latency;
                self.sched.set_link(m, link.bandwidth, link.latency);
            }
        }
    }

    /// Links that carry their copies under way several times slower than planned
    /// ([`SLOWER_UNDER_WAY`]) are planned at what
    /// those copies show, before the first of them lands: on a first run every link is
    /// planned at the default until then, and a copy over a slow one can take tens of
    /// seconds.
    fn slow_links_under_way(&mut self) {
        for m in 0..self.machines.len() {
            let spec = &self.machines[m];
            if spec.is_local {
                continue;
            }
            let Some(bound) = self.transport.link_bound(m, spec.latency) else {
                continue;
            };
            if bound * SLOWER_UNDER_WAY < spec.bandwidth {
                tracing::debug!(machine = %spec.name, "link at most {:.1} MB/s by the copies under way", bound / 1e6);
                let latency = spec.latency;
                self.machines[m].bandwidth = bound;
                self.sched.set_link(m, bound, latency);
            }
        }
    }

    /// Stops what still runs, brings the requested outputs of what was built home, and
    /// reports. The copies stop when `stop` is cancelled.
    async fn finish(mut self, stop: CancellationToken) -> Result<BuildReport, DriverError> {
        self.tasks.shutdown().await;
        self.probes.shutdown().await;
        // Every build has ended: nothing needs them any more.
        self.sent_ahead.shutdown().await;
        let early = async { while self.early_copies.join_next().await.is_some() {} };
        tokio::select! {
            () = early => {}
            () = stop.cancelled() => return Err(self.stop().await),
        }
        let measured_lower_bound = measured_bound(&self.nodes, &self.results, &self.machines);
        // Outputs of derivations that failed cannot come home; the rest do, with -k too.
        let unbuilt: HashSet<&str> = self
            .nodes
            .iter()
            .zip(&self.results)
            .filter(|(_, r)| !matches!(r, Some(NodeResult::Built { .. })))
            .flat_map(|(n, _)| n.outputs.iter().map(|(_, p)| p.as_str()))
            .collect();
        let wanted: Vec<String> = self
            .wanted
            .iter()
            .filter(|p| !unbuilt.contains(p.as_str()))
            .cloned()
            .collect();
        let mut attempt = 1;
        let copy_back_error = loop {
            let copy_back = self.transport.clone().fetch(wanted.clone());
            let result = tokio::select! {
                result = copy_back => result,
                // Dropping the copy kills its sessions: a half-copied path is never
                // registered.
                () = stop.cancelled() => return Err(self.stop().await),
            };
            match result {
                Ok(()) => break None,
                // A link that died or a session that broke may pass: each attempt opens
                // new sessions and copies only what is still missing here.
                Err(e) if attempt < COPY_BACK_ATTEMPTS && e.is_connection_failure() => {
                    let wait = self.health.backoff();
                    self.reporter.machine_warning(&format!(
                        "copying the requested outputs here failed ({}); trying again in {} s \
                         (attempt {} of {COPY_BACK_ATTEMPTS})",
                        first_line(&e.to_string()),
                        wait.as_secs_f64(),
                        attempt + 1
                    ));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => return Err(self.stop().await),
                    }
                    attempt += 1;
                }
                Err(e) => break Some(e),
            }
        };
        self.take_news();
        self.transport.close().await;
        Ok(BuildReport {
            results: self
                .results
                .into_iter()
                .map(|r| {
                    r.unwrap_or(NodeResult::Failed {
                        failure: "not built".into(),
                        log_tail: Vec::new(),
                    })
                })
                .collect(),
            wall_seconds: self.clock.elapsed().as_secs_f64(),
            builds_per_machine: self
                .machines
                .iter()
                .map(|m| m.name.clone())
                .zip(self.builds_per_machine)
                .collect(),
            lower_bound: self.lower_bound,
            measured_lower_bound,
            copy_back_error,
        })
    }

    fn describe(&self, failure: &Failure) -> String {
        match failure {
            Failure::NoMachine {
                system,
                features,
                considered,
            } => format!(
                "no machine can build it: it needs system {system}{} and the machines considered were {}{}",
                if features.is_empty() {
                    String::new()
                } else {
                    format!(" with features {}", features.join(", "))
                },
                if considered.is_empty() {
                    "none".to_string()
                } else {
                    considered.join(", ")
                },
                self.why_machines_were_lost()
            ),
            Failure::BuildFailed { machine, reason } => {
                format!("{reason} (on {})", self.machines[*machine].name)
            }
            Failure::DependencyFailed { dep } => {
                format!("dependency {} failed", self.nodes[*dep].drv_path)
            }
            Failure::TooManyAttempts { attempts, reason } => {
                format!("tried {attempts} times without running to its end; last: {reason}")
            }
            Failure::Stopped => {
                "not built: the run stopped after a failure (use --keep-going to go on)".into()
            }
        }
    }
}

impl<T: BuildTransport> Runner<'_, T> {
    /// `; lost: NAME (why); …` for the machines whose connections failed in this run.
    fn why_machines_were_lost(&self) -> String {
        let failures = self.health.failures();
        if failures.is_empty() {
            return String::new();
        }
        let each: Vec<String> = failures
            .iter()
            .map(|(name, why)| format!("{name} ({why})"))
            .collect();
        format!(
            "; not used, as their connections failed: {}",
            each.join("; ")
        )
    }
}

/// How often the requested outputs' copy home is tried before the run fails.
pub(crate) const COPY_BACK_ATTEMPTS: u32 = 3;

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// Whether a build failed because its machine's disk is full: Nix says so in its
/// message when the store or the build directory has too little space left after a
/// failure ("may have been caused by lack of free disk space", `derivation-goal.cc`), and
/// the builder's own log names the error (ENOSPC) when Nix's check came too late.
fn out_of_space(outcome: &Outcome, log_tail: &[String]) -> bool {
    match outcome {
        Outcome::Failed { reason } => {
            reason.contains("lack of free disk space")
                || log_tail
                    .iter()
                    .any(|l| l.contains("No space left on device"))
        }
        _ => false,
    }
}

/// How often the slots others hold are looked at: a lock file per slot, each a
/// non-blocking flock.
const SLOT_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Seconds a copy ahead may take at most, by what is known of the link.
const SEND_AHEAD_LIMIT: f64 = 1.0;

/// The scheduler's view of a build node.
fn node_spec(n: &BuildNode) -> NodeSpec {
    NodeSpec {
        key: n.drv_path.clone(),
        system: n.system.clone(),
        required_features: n.required_features.clone(),
        deps: n.deps.clone(),
        duration: n.estimate,
        output_bytes: n.output_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES),
        prefer_local: n.prefer_local,
    }
}

/// max(critical path, total work / total slots) over the builds' measured times, each
/// scaled to speed 1 by its machine's speed factor.
fn measured_bound(
    nodes: &[BuildNode],
    results: &[Option<NodeResult>],
    machines: &[MachineSpec],
) -> f64 {
    let speed: HashMap<&str, f64> = machines
        .iter()
        .map(|s| (s.name.as_str(), s.speed))
        .collect();
    let specs: Vec<NodeSpec> = nodes
        .iter()
        .zip(results)
        .map(|(n, r)| NodeSpec {
            duration: match r {
                Some(NodeResult::Built {
                    machine, seconds, ..
                }) => seconds * speed.get(machine.as_str()).copied().unwrap_or(1.0),
                _ => 0.0,
            },
            ..node_spec(n)
        })
        .collect();
    let capacity: f64 = machines.iter().map(|s| f64::from(s.slots) * s.speed).sum();
    match Graph::new(specs) {
        Ok(g) => g.critical_path().max(g.total_work() / capacity.max(1.0)),
        Err(_) => 0.0,
    }
}
