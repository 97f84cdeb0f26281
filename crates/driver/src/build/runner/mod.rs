//! The runner: the event loop between the scheduler and the machines. It turns the
//! scheduler's actions into build tasks on a [`BuildTransport`], and each finished task
//! back into events, until nothing runs and nothing more will start; then it brings the
//! requested outputs home and reports. It holds no I/O of its own, so its logic is
//! tested with a fake transport (`build/tests/`).
//!
//! Beside the loop: the machines' health during the run (`machines.rs`), what the run
//! learns as it goes (`learning.rs`), and its end, with the copy back (`finish.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use offload_learn::Refits;
use offload_sched::{
    Action, Event, Failure, Graph, MachineId, MachineSpec, NodeSpec, NodeState, Outcome, Scheduler,
    DEFAULT_OUTPUT_BYTES,
};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::health::{Health, Reliability};
use super::{BuildNode, BuildReport, NodeResult, Reporter};
use crate::error::DriverError;
use crate::fleet::LOCAL;
use crate::state::StateDb;

pub(super) mod finish;
mod hedging;
mod learning;
mod machines;
mod transport;

use machines::out_of_space;
pub(crate) use transport::BuildTransport;

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
    refits: Refits,
    /// The direct copies between builders this run timed, for their pairs' links.
    pair_links: offload_learn::PairLinks<MachineId>,
    /// Whether each machine's link to this one is measured (learned, or seen under
    /// way), rather than assumed: pairs are planned as learned only between those.
    link_measured: Vec<bool>,
    /// Machines whose first probe has not answered yet, and that probe.
    first_probes: HashMap<MachineId, AbortHandle>,
    /// Since when nothing of this run has run while others held the slots it needs.
    waiting_for_others: Option<f64>,
    slot_wait: std::time::Duration,
    /// Duplicates of builds that overrun their plan.
    hedging: hedging::Hedging,
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
        let lower_bound = offload_sched::lower_bound(&graph, &machines);
        let n = nodes.len();
        let slot_wait = reliability.slot_wait;
        let state_keys = machines.iter().map(|m| m.name.clone()).collect();
        let declared_speeds = machines.iter().map(|m| m.speed).collect();
        let machine_count = machines.len();
        let mut sched = Scheduler::new(graph, machines.clone(), keep_going);
        let guessed: Vec<usize> = (0..n)
            .filter(|&i| nodes[i].output_bytes.is_none())
            .collect();
        sched.guess_output_sizes(&guessed);
        let guessed: Vec<usize> = (0..n).filter(|&i| !nodes[i].estimate_known).collect();
        sched.guess_durations(&guessed);
        let never: Vec<usize> = (0..n)
            .filter(|&i| !hedging::may_build_twice(&nodes[i].drv))
            .collect();
        let hedging = hedging::Hedging::new(&sched, &never);
        if let Some(h) = history {
            learning::commit_without_waiting_for_the_disk(h);
        }
        Ok(Runner {
            transport,
            sched,
            hedging,
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
            refits: Refits::default(),
            pair_links: Default::default(),
            link_measured: vec![false; machine_count],
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

    /// Which machines' links the state has measured.
    pub(crate) fn with_links_measured(mut self, knowledge: &offload_learn::Knowledge) -> Self {
        self.link_measured = self
            .state_keys
            .iter()
            .map(|k| knowledge.link(k).is_some())
            .collect();
        self
    }

    /// Requested outputs go elsewhere than this machine (`--to`): the plan counts no
    /// copy home.
    pub(crate) fn with_outputs_away(mut self, away: bool) -> Self {
        self.sched.outputs_stay_away(away);
        self
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
                _ = slot_watch.tick() => {
                    self.watch_slots().await;
                    self.hedge_now();
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    // An aborted task (a Cancel, its machine's failure) is accounted for.
                    if let Ok((id, done)) = joined {
                        self.take_news();
                        self.on_finished(id, done);
                        // Duplicates that took a slot this end freed start now.
                        self.hedge_now();
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

    /// Stops every build and transfer. Dropping the sessions kills their processes,
    /// which stops the builds on every machine; nothing half-done is ever registered.
    async fn stop(&mut self) -> DriverError {
        let stopped = self.running.len();
        self.tasks.shutdown().await;
        self.probes.shutdown().await;
        self.early_copies.shutdown().await;
        self.sent_ahead.shutdown().await;
        // The sessions and shared ssh connections end (and are reaped) before this
        // process exits, not after it, as when a run ends.
        self.transport.close().await;
        DriverError::Interrupted { stopped }
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
                self.hedging.hedger.started(&self.sched, node, self.now());
            }
            Action::Cancel { node, machine } => self.cancel_copy(node, machine),
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
        // Else the end of a task the runner already gave up on (its machine failed).
        if !self.take_task(id, done.node) {
            return;
        }
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
            NodeState::Running { machine, .. } if *machine == done.machine)
            || self.is_duplicate(done.node, done.machine);
        if current && done.outcome == Outcome::Built {
            // What the build showed goes into the plan before its end places the builds
            // that waited for it.
            self.learn_from(&done);
        }
        let actions = self.hedging.hedger.finished(
            &mut self.sched,
            done.node,
            done.machine,
            done.outcome.clone(),
            now,
        );
        self.apply(actions);
        self.hedge_settled(done.node);
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
