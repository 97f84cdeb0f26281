//! The scheduler: a state machine that turns events (a build finished, a machine was
//! lost, outputs arrived somewhere) into actions (start this build there, cancel that
//! one, this derivation failed). It reads no clock: `now` comes with every call, so the
//! same inputs always give the same plan, live or simulated.
//!
//! This module holds the state and how each event changes it: starts, ends, learned
//! figures, slots released. Failures, requeues and lost machines are handled in
//! `failures`; where ready nodes go is decided in `dispatch`, over the machine classes of
//! `classes`.

use std::collections::BTreeSet;

use crate::classes::{machine_classes, SlotKey};
use crate::dispatch::{Kind, ReadyKey};
use crate::fleet::{Link, MachineId, MachineSpec};
use crate::graph::{Graph, NodeId};
use crate::holding::Holding;
use crate::transfers::Links;

// Re-exported so that paths through this module (`scheduler::Event`, …) keep working.
pub use crate::dispatch::RESERVATIONS_PER_ROUND;
pub use crate::events::{Action, Event, Failure, NodeState, Outcome};

/// How often a build that did not run to its end ([`Outcome::Lost`]) is tried. A build
/// lost with its machine is not counted: it simply runs elsewhere.
pub const MAX_ATTEMPTS: u32 = 3;

/// The scheduler. Create it, call [`Scheduler::start`], then [`Scheduler::handle`] for
/// every event until [`Scheduler::is_finished`].
///
/// Cost of a decision: the fleet is grouped into classes of interchangeable machines,
/// each with its machines ordered by their first free slot, and the ready derivations
/// into kinds (same system, features, `preferLocalBuild`), each in priority order. A
/// round of placements looks only at kinds that have a free slot somewhere and, per
/// derivation, at the first machine of each class that can build it and at the
/// machines that hold its inputs: no scan of the whole fleet or of every ready node.
// Fields `classes`, `dispatch` and `failures` work on too are `pub(crate)`; the others
// change only through this module's event handling.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub(crate) graph: Graph,
    pub(crate) machines: Vec<MachineSpec>,
    /// Machines taking builds now.
    pub(crate) alive: Vec<bool>,
    /// Machines lost for the rest of the run; a machine neither alive nor gone is down
    /// for now, and what only it can build waits for it.
    pub(crate) gone: Vec<bool>,
    pub(crate) state: Vec<NodeState>,
    /// Nodes that are done or failed.
    settled: usize,
    pub(crate) started_at: Vec<f64>,
    pub(crate) attempts: Vec<u32>,
    /// Machines that hold each node's outputs.
    pub(crate) holders: Holding,
    pub(crate) running: Vec<Vec<NodeId>>,
    pub(crate) running_count: usize,
    pub(crate) keep_going: bool,
    pub(crate) stopping: bool,
    /// Interchangeable machines, and each machine's class.
    pub(crate) classes: Vec<Vec<MachineId>>,
    pub(crate) class_of: Vec<usize>,
    /// Per class, its live machines by their first slot; each machine's key there.
    pub(crate) queues: Vec<BTreeSet<SlotKey>>,
    pub(crate) queued: Vec<Option<SlotKey>>,
    /// Per class, its first slot as its kinds' tiers hold it, and those tiers (kind,
    /// tier) ([`crate::tiers`]).
    pub(crate) class_head: Vec<Option<SlotKey>>,
    pub(crate) class_tiers: Vec<Vec<(usize, usize)>>,
    /// Per class, its free slots.
    pub(crate) free_in_class: Vec<usize>,
    /// Kinds of nodes (interchangeable for placement), each node's kind, and the ready
    /// nodes of each kind in priority order.
    pub(crate) kinds: Vec<Kind>,
    pub(crate) kind_of: Vec<usize>,
    pub(crate) ready: Vec<BTreeSet<ReadyKey>>,
    /// The links' queues as planned: inputs sent for the builds started, requested
    /// outputs on their way home.
    pub(crate) links: Links,
    /// Per machine, the bytes of requested outputs that builds running there will send
    /// home when they end.
    pub(crate) home_pending: Vec<u64>,
    /// The machine offload runs on, when it is one of the fleet.
    pub(crate) client: Option<MachineId>,
    /// Requested outputs go to another store than the client's (`offload build --to`),
    /// from the builders that hold them: none comes home.
    pub(crate) outputs_away: bool,
    /// Per machine, its pair link with the most bandwidth (the lower latency at a tie):
    /// what its outputs cross towards other builders when it has pair links.
    pub(crate) fastest_peer: Vec<Option<Link>>,
    /// Whether any machine has pair links ([`crate::has_pair_links`]).
    pub(crate) pair_links: bool,
    /// Per machine, the slots others hold ([`Event::SlotsHeldElsewhere`]).
    pub(crate) held_elsewhere: Vec<u32>,
    /// Each node's priority among the ready ones: its rank (duration-weighted critical
    /// path), or the ordering a rehearsal found better ([`Scheduler::start`]).
    pub(crate) priority: Vec<f64>,
    /// When the kept rehearsal had each node end (infinite: none), when it ran, and
    /// when it had the run end.
    pub(crate) rehearsed_end: Vec<f64>,
    pub(crate) rehearsed_at: f64,
    pub(crate) rehearsed_span: f64,
    /// Where the rehearsal kept built each node ([`Scheduler::start`]); none without one.
    pub(crate) rehearsed_on: Vec<Option<MachineId>>,
    /// Machines with a session open or a build started in this run: their next build
    /// pays no [`MachineSpec::session_setup`].
    pub(crate) session_ready: Vec<bool>,
    /// Nodes whose duration is a guess (their ends say nothing of a plan's drift).
    pub(crate) duration_guessed: Vec<bool>,
    /// Nodes whose output size is a guess, and the sizes this run's builds measured.
    output_guessed: Vec<bool>,
    measured_outputs: Vec<u64>,
    /// What the guessed outputs are planned at.
    guessed_output: u64,
}

impl Scheduler {
    pub fn new(graph: Graph, machines: Vec<MachineSpec>, keep_going: bool) -> Scheduler {
        let n = graph.len();
        let m = machines.len();
        let state = (0..n)
            .map(|i| NodeState::Waiting(graph.node(i).deps.len()))
            .collect();
        let (classes, class_of) = machine_classes(&machines);
        let client = machines.iter().position(|spec| spec.is_local);
        let priority = (0..n).map(|i| graph.rank(i)).collect();
        let (kind_of, examples) = graph.requirement_groups(true);
        let kinds: Vec<Kind> = examples
            .into_iter()
            .map(|example| Kind {
                example,
                classes: Vec::new(),
                tiers: Vec::new(),
            })
            .collect();
        let fastest_peer = machines.iter().map(fastest_peer).collect();
        let pair_links = crate::has_pair_links(&machines);
        let mut sched = Scheduler {
            graph,
            alive: vec![true; m],
            gone: vec![false; m],
            running: vec![Vec::new(); m],
            running_count: 0,
            machines,
            state,
            settled: 0,
            started_at: vec![0.0; n],
            attempts: vec![0; n],
            holders: Holding::new(n),
            keep_going,
            stopping: false,
            queues: vec![BTreeSet::new(); classes.len()],
            queued: vec![None; m],
            class_head: vec![None; classes.len()],
            class_tiers: vec![Vec::new(); classes.len()],
            free_in_class: vec![0; classes.len()],
            classes,
            class_of,
            ready: vec![BTreeSet::new(); kinds.len()],
            kinds,
            kind_of,
            links: Links::new(m),
            home_pending: vec![0; m],
            client,
            outputs_away: false,
            fastest_peer,
            pair_links,
            held_elsewhere: vec![0; m],
            priority,
            rehearsed_on: vec![None; n],
            rehearsed_end: vec![f64::INFINITY; n],
            rehearsed_at: 0.0,
            rehearsed_span: 1.0,
            session_ready: vec![false; m],
            duration_guessed: vec![false; n],
            output_guessed: vec![false; n],
            measured_outputs: Vec::new(),
            guessed_output: crate::DEFAULT_OUTPUT_BYTES,
        };
        for m in 0..m {
            sched.replace_queue_key(m);
            sched.free_in_class[sched.class_of[m]] += sched.machines[m].slots as usize;
        }
        sched.match_kinds();
        sched
    }

    /// The machines the rehearsed plan builds the consumers of `node` on that are yet
    /// to start, except those holding its outputs: where its outputs can go ahead of
    /// the builds that need them. Empty for a run that was not rehearsed.
    pub fn consumers_planned_on(&self, node: NodeId) -> Vec<MachineId> {
        let mut machines: Vec<MachineId> = self
            .graph
            .dependents(node)
            .iter()
            .filter(|&&d| matches!(self.state[d], NodeState::Waiting(_) | NodeState::Ready))
            .filter_map(|&d| self.rehearsed_on[d])
            .filter(|&m| !self.holders.contains(node, m) && self.alive[m])
            .collect();
        machines.sort_unstable();
        machines.dedup();
        machines
    }

    /// A session with `machine` is open: builds there no longer wait for one.
    pub fn session_open(&mut self, machine: MachineId) {
        if let Some(ready) = self.session_ready.get_mut(machine) {
            *ready = true;
        }
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// What was learned of `machine` mid-run: its speed, and per system where that
    /// differs. Later decisions use it; builds already running keep their expected ends.
    pub fn set_speeds(
        &mut self,
        machine: MachineId,
        speed: f64,
        system_speeds: Vec<(String, f64)>,
    ) {
        if let Some(spec) = self.machines.get_mut(machine) {
            spec.speed = speed;
            spec.system_speeds = system_speeds;
            self.regroup();
        }
    }

    /// What was learned of `machine`'s link mid-run.
    pub fn set_link(&mut self, machine: MachineId, bandwidth: f64, latency: f64) {
        if let Some(spec) = self.machines.get_mut(machine) {
            spec.bandwidth = bandwidth;
            spec.latency = latency;
            // Which holder relays a path quickest may have changed.
            self.holders.refresh_all(&self.machines, &self.graph);
            self.regroup();
        }
    }

    /// What was learned of the direct link from `from` to `to` mid-run (`None`: `from`
    /// cannot send to `to` directly, copies between them relay through the client).
    pub fn set_peer_link(&mut self, from: MachineId, to: MachineId, link: Option<Link>) {
        if to >= self.machines.len() {
            return;
        }
        if let Some(spec) = self.machines.get_mut(from) {
            if spec.peer_link(to).copied() == link {
                return;
            }
            spec.set_peer_link(to, link);
            self.fastest_peer[from] = fastest_peer(spec);
            self.pair_links = crate::has_pair_links(&self.machines);
            self.regroup();
        }
    }

    /// Whether requested outputs go to another store than the client's (`offload build
    /// --to STORE`) rather than home: with `true`, the plan counts no copy home.
    pub fn outputs_stay_away(&mut self, away: bool) {
        self.outputs_away = away;
    }

    /// Groups the machines into classes again after a spec changed.
    fn regroup(&mut self) {
        let (classes, class_of) = machine_classes(&self.machines);
        self.queues = vec![BTreeSet::new(); classes.len()];
        self.free_in_class = vec![0; classes.len()];
        self.classes = classes;
        self.class_of = class_of;
        self.queued = vec![None; self.machines.len()];
        self.class_head = vec![None; self.classes.len()];
        self.class_tiers = vec![Vec::new(); self.classes.len()];
        for m in 0..self.machines.len() {
            self.replace_queue_key(m);
            if self.alive[m] {
                self.free_in_class[self.class_of[m]] += self.free_on(m);
            }
        }
        self.match_kinds();
    }

    /// Says which nodes' durations are guesses ([`crate::DEFAULT_ESTIMATE_SECONDS`]: no
    /// build of theirs was ever timed): a run does not re-plan when those end off the
    /// rehearsal.
    pub fn guess_durations(&mut self, nodes: &[NodeId]) {
        mark(&mut self.duration_guessed, nodes);
    }

    /// Says which nodes' output sizes are guesses ([`crate::DEFAULT_OUTPUT_BYTES`]: no
    /// build of theirs was ever measured).
    pub fn guess_output_sizes(&mut self, nodes: &[NodeId]) {
        mark(&mut self.output_guessed, nodes);
    }

    /// A build of `node` made `bytes` of outputs (their NAR size): copies of them are
    /// planned at that, and the outputs still guessed at the median of what this run's
    /// builds made, as derivations of one graph tend to make alike. On a first run
    /// every output is a guess, and a builder behind a slow link looks as near as any
    /// until then.
    pub fn outputs_measured(&mut self, node: NodeId, bytes: u64) {
        if node >= self.graph.len() {
            return;
        }
        self.graph.set_output_bytes(node, bytes);
        self.holders.refresh(&self.machines, node, bytes);
        self.output_guessed[node] = false;
        self.measured_outputs.push(bytes);
        // The median settles fast: taken again for the first builds and then each time
        // their number doubles, applied when it moved by more than a tenth.
        let n = self.measured_outputs.len();
        if n > 16 && !n.is_power_of_two() {
            return;
        }
        let mut sizes = self.measured_outputs.clone();
        let (_, &mut median, _) = sizes.select_nth_unstable(n / 2);
        let guess = self.guessed_output;
        if (median as f64 - guess as f64).abs() <= 0.1 * guess as f64 {
            return;
        }
        self.guessed_output = median;
        for id in 0..self.graph.len() {
            if self.output_guessed[id] {
                self.graph.set_output_bytes(id, median);
                self.holders.refresh(&self.machines, id, median);
            }
        }
    }

    pub fn machines(&self) -> &[MachineSpec] {
        &self.machines
    }

    pub fn state(&self, node: NodeId) -> &NodeState {
        &self.state[node]
    }

    /// The first actions: fails what no machine can build, starts what can start.
    /// On a graph small enough, the order of the ready derivations is first chosen by
    /// rehearsing the run against the estimates (module `rehearsal`).
    pub fn start(&mut self, now: f64) -> Vec<Action> {
        self.tune_priorities(now);
        self.start_planned(now)
    }

    /// [`Scheduler::start`] with the priorities as they are.
    pub(crate) fn start_planned(&mut self, now: f64) -> Vec<Action> {
        let mut actions = Vec::new();
        self.fail_unplaceable(&mut actions);
        for id in 0..self.graph.len() {
            if self.state[id] == NodeState::Waiting(0) {
                self.make_ready(id);
            }
        }
        self.dispatch(now, &mut actions);
        actions
    }

    /// Feeds one event in; returns what to do now.
    pub fn handle(&mut self, event: Event, now: f64) -> Vec<Action> {
        let mut actions = self.handle_undispatched(event, now);
        self.dispatch(now, &mut actions);
        #[cfg(debug_assertions)]
        self.check_bookkeeping();
        actions
    }

    /// [`Scheduler::handle`] but for giving the free slots to ready builds: the
    /// caller dispatches (hedging gives an overrunning build's duplicate first pick).
    pub(crate) fn handle_undispatched(&mut self, event: Event, now: f64) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Finished {
                node,
                machine,
                outcome,
            } => {
                if !matches!(self.state[node], NodeState::Running { machine: m, .. } if m == machine)
                {
                    // Stale: the build was already requeued (its machine was lost).
                    return actions;
                }
                self.release(node, machine);
                match outcome {
                    Outcome::Built => {
                        // A requested output starts home now, over its machine's link.
                        if let Some(home) = self.home_route(node, machine) {
                            let bytes = self.graph.node(node).output_bytes;
                            self.links.send(&self.machines, &home, bytes, now);
                        }
                        let seconds = now - self.started_at[node];
                        self.set_state(node, NodeState::Done { machine, seconds });
                        self.holders.set_only(&self.machines, node, machine);
                        for i in 0..self.graph.dependents(node).len() {
                            let d = self.graph.dependents(node)[i];
                            if let NodeState::Waiting(k) = &mut self.state[d] {
                                *k -= 1;
                                if *k == 0 {
                                    self.make_ready(d);
                                }
                            }
                        }
                        self.replan_if_drifted(node, now);
                    }
                    Outcome::Failed { reason } => {
                        self.fail(node, Failure::BuildFailed { machine, reason }, &mut actions);
                    }
                    Outcome::Lost { reason } => self.requeue(node, reason, &mut actions),
                    Outcome::Deferred => self.make_ready(node),
                }
            }
            Event::MachineLost { machine } => {
                if machine < self.gone.len() && !self.gone[machine] {
                    self.take_down(machine, &mut actions);
                    self.gone[machine] = true;
                    self.fail_unplaceable(&mut actions);
                }
            }
            Event::MachineDown { machine } => {
                if machine < self.alive.len() {
                    self.take_down(machine, &mut actions);
                }
            }
            Event::MachineBack { machine } => {
                if machine < self.alive.len() && !self.alive[machine] && !self.gone[machine] {
                    self.alive[machine] = true;
                    // A down machine runs nothing: all its slots are free.
                    self.free_in_class[self.class_of[machine]] += self.free_on(machine);
                    self.replace_queue_key(machine);
                    self.match_kinds();
                }
            }
            Event::OutputsAt { node, machine } => {
                if node < self.graph.len() && machine < self.machines.len() {
                    let bytes = self.graph.node(node).output_bytes;
                    self.holders.add(&self.machines, node, machine, bytes);
                }
            }
            Event::SlotsHeldElsewhere { machine, count } => {
                if machine < self.machines.len() && self.held_elsewhere[machine] != count {
                    self.change_free(machine, |s| s.held_elsewhere[machine] = count);
                }
            }
        }
        actions
    }

    /// The incremental counts and queues agree with a recount (debug builds: tests).
    #[cfg(debug_assertions)]
    fn check_bookkeeping(&self) {
        for (c, class) in self.classes.iter().enumerate() {
            let free: usize = class
                .iter()
                .filter(|&&m| self.alive[m])
                .map(|&m| self.free_on(m))
                .sum();
            assert_eq!(self.free_in_class[c], free, "free slots of class {c}");
            let keys: Vec<SlotKey> = class.iter().filter_map(|&m| self.first_slot(m)).collect();
            assert_eq!(self.queues[c].len(), keys.len(), "queue of class {c}");
            assert_eq!(
                self.class_head[c],
                self.queues[c].first().copied(),
                "head of class {c}"
            );
            let free_head = self.class_head[c].is_some_and(|k| !k.busy);
            assert_eq!(free_head, free > 0, "free head of class {c}");
            assert!(
                keys.iter().all(|k| self.queues[c].contains(k)),
                "queue of class {c}: {:?}, machines' first slots: {keys:?}",
                self.queues[c]
            );
        }
        let running: usize = self.running.iter().map(Vec::len).sum();
        assert_eq!(self.running_count, running);
        let settled = self
            .state
            .iter()
            .filter(|s| matches!(s, NodeState::Done { .. } | NodeState::Failed(_)))
            .count();
        assert_eq!(self.settled, settled);
    }

    /// True when nothing runs and nothing more will start.
    pub fn is_finished(&self) -> bool {
        self.running_count == 0 && (self.stopping || self.settled == self.graph.len())
    }

    /// Whether others hold slots of a live machine: builds that wait may start when
    /// they let go, even with nothing of this run's own running.
    pub fn waits_for_others(&self) -> bool {
        (0..self.machines.len()).any(|m| self.alive[m] && self.held_elsewhere[m] > 0)
    }

    /// The slots of `machine` others hold, as last told.
    pub fn slots_held_elsewhere(&self, machine: MachineId) -> u32 {
        self.held_elsewhere.get(machine).copied().unwrap_or(0)
    }

    /// Builds running now, per machine.
    pub fn running_on(&self, machine: MachineId) -> &[NodeId] {
        &self.running[machine]
    }

    pub(crate) fn set_state(&mut self, id: NodeId, state: NodeState) {
        let settled = |s: &NodeState| matches!(s, NodeState::Done { .. } | NodeState::Failed(_));
        match (settled(&self.state[id]), settled(&state)) {
            (false, true) => self.settled += 1,
            (true, false) => self.settled -= 1,
            _ => {}
        }
        self.state[id] = state;
    }

    /// Takes `node` off `machine`'s running builds.
    pub(crate) fn release(&mut self, node: NodeId, machine: MachineId) {
        let before = self.running[machine].len();
        self.change_free(machine, |s| s.running[machine].retain(|&n| n != node));
        let removed = before - self.running[machine].len();
        if removed > 0 && self.home_route(node, machine).is_some() {
            let bytes = self.graph.node(node).output_bytes;
            self.home_pending[machine] = self.home_pending[machine].saturating_sub(bytes);
        }
        self.running_count -= removed;
    }

    /// Applies `change` to what occupies `machine`'s slots, keeping its class's free
    /// count and its queue key in step (slots others hold may outnumber the free ones).
    pub(crate) fn change_free(&mut self, machine: MachineId, change: impl FnOnce(&mut Self)) {
        let before = self.free_on(machine);
        change(self);
        if self.alive[machine] {
            let after = self.free_on(machine);
            let class = &mut self.free_in_class[self.class_of[machine]];
            *class = *class + after - before;
        }
        self.replace_queue_key(machine);
    }
}

/// The pair link of `spec` with the most bandwidth, the lower latency at a tie.
fn fastest_peer(spec: &MachineSpec) -> Option<Link> {
    spec.peers.iter().map(|&(_, l)| l).reduce(|a, b| {
        let b_first =
            b.bandwidth > a.bandwidth || (b.bandwidth == a.bandwidth && b.latency < a.latency);
        if b_first {
            b
        } else {
            a
        }
    })
}

/// Sets the flags of `nodes` (ids past the end are ignored).
fn mark(flags: &mut [bool], nodes: &[NodeId]) {
    for &id in nodes {
        if let Some(f) = flags.get_mut(id) {
            *f = true;
        }
    }
}
