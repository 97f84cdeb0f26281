//! The scheduler: a state machine that turns events (a build finished, a machine was
//! lost, outputs arrived somewhere) into actions (start this build there, cancel that
//! one, this derivation failed). It reads no clock: `now` comes with every call, so the
//! same inputs always give the same plan, live or simulated.
//!
//! Policy: ready derivations go in priority order (their duration-weighted critical
//! path); each goes to the machine where it would *finish* first, counting the machine's
//! speed, the transfer of inputs it lacks, and when its next slot frees. When that best
//! machine is busy the derivation waits for it rather than taking a free slot that
//! would finish later; the wait is reserved so lower priorities plan around it.

use std::collections::{BTreeSet, HashMap};

use crate::fleet::{MachineId, MachineSpec};
use crate::graph::{Graph, NodeId};

/// How often a build lost with its machine is tried again elsewhere.
pub const MAX_ATTEMPTS: u32 = 3;

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A build that was started on `machine` ended.
    Finished {
        node: NodeId,
        machine: MachineId,
        outcome: Outcome,
    },
    /// The machine is gone: its running builds and the outputs only it held are lost.
    MachineLost { machine: MachineId },
    /// The node's outputs are now also valid on `machine` (e.g. copied to the client).
    OutputsAt { node: NodeId, machine: MachineId },
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Built,
    /// The build itself failed (builder exit code, timeout, …): not retried.
    Failed {
        reason: String,
    },
    /// The connection broke: the build runs again elsewhere.
    Lost {
        reason: String,
    },
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start {
        node: NodeId,
        machine: MachineId,
    },
    /// Stop a running build (the run is stopping after a failure).
    Cancel {
        node: NodeId,
        machine: MachineId,
    },
    /// The node will not be built; `reason` says why.
    Fail {
        node: NodeId,
        reason: Failure,
    },
}

/// Why a node was not built.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// No machine of the fleet can build it.
    NoMachine {
        system: String,
        features: Vec<String>,
        considered: Vec<String>,
    },
    /// Its build failed on that machine.
    BuildFailed { machine: MachineId, reason: String },
    /// One of its dependencies failed.
    DependencyFailed { dep: NodeId },
    /// Lost with its machine too often.
    TooManyAttempts { attempts: u32, reason: String },
    /// The run stopped after another failure (no keep-going).
    Stopped,
}

/// Where a node stands.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeState {
    /// Waiting for this many dependencies.
    Waiting(usize),
    Ready,
    Running {
        machine: MachineId,
        expected_end: f64,
    },
    Done {
        machine: MachineId,
        seconds: f64,
    },
    Failed(Failure),
}

/// Priority-ordered key of a ready node: higher rank first, then lower id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ReadyKey {
    neg_rank_bits: i64,
    node: NodeId,
}

/// The scheduler. Create it, call [`Scheduler::start`], then [`Scheduler::handle`] for
/// every event until [`Scheduler::is_finished`].
///
/// Cost of a decision: the fleet is grouped into classes of interchangeable machines,
/// each with its machines ordered by their first free slot, and the ready derivations
/// into kinds (same system, features, `preferLocalBuild`), each in priority order. A
/// round of placements looks only at kinds that have a free slot somewhere and, per
/// derivation, at the first machine of each class that can build it and at the
/// machines that hold its inputs: no scan of the whole fleet or of every ready node.
#[derive(Debug, Clone)]
pub struct Scheduler {
    graph: Graph,
    machines: Vec<MachineSpec>,
    alive: Vec<bool>,
    state: Vec<NodeState>,
    /// Nodes that are done or failed.
    settled: usize,
    started_at: Vec<f64>,
    attempts: Vec<u32>,
    /// Machines that hold each node's outputs.
    holders: Vec<Vec<MachineId>>,
    running: Vec<Vec<NodeId>>,
    running_count: usize,
    keep_going: bool,
    stopping: bool,
    /// Interchangeable machines, and each machine's class.
    classes: Vec<Vec<MachineId>>,
    class_of: Vec<usize>,
    /// Per class, its live machines by their first slot; each machine's key there.
    queues: Vec<BTreeSet<SlotKey>>,
    queued: Vec<Option<SlotKey>>,
    /// Per class, its free slots.
    free_in_class: Vec<usize>,
    /// Kinds of nodes (interchangeable for placement), each node's kind, and the ready
    /// nodes of each kind in priority order.
    kinds: Vec<Kind>,
    kind_of: Vec<usize>,
    ready: Vec<BTreeSet<ReadyKey>>,
}

/// Nodes the same machines can build.
#[derive(Debug, Clone)]
struct Kind {
    /// One node of the kind, to match machines against.
    example: NodeId,
    /// Classes that may take nodes of this kind, fastest first.
    classes: Vec<usize>,
}

impl Scheduler {
    pub fn new(graph: Graph, machines: Vec<MachineSpec>, keep_going: bool) -> Scheduler {
        let n = graph.len();
        let m = machines.len();
        let state = (0..n)
            .map(|i| NodeState::Waiting(graph.node(i).deps.len()))
            .collect();
        let (classes, class_of) = machine_classes(&machines);
        let (kind_of, examples) = graph.requirement_groups(true);
        let kinds: Vec<Kind> = examples
            .into_iter()
            .map(|example| Kind {
                example,
                classes: Vec::new(),
            })
            .collect();
        let mut sched = Scheduler {
            graph,
            alive: vec![true; m],
            running: vec![Vec::new(); m],
            running_count: 0,
            machines,
            state,
            settled: 0,
            started_at: vec![0.0; n],
            attempts: vec![0; n],
            holders: vec![Vec::new(); n],
            keep_going,
            stopping: false,
            queues: vec![BTreeSet::new(); classes.len()],
            queued: vec![None; m],
            free_in_class: vec![0; classes.len()],
            classes,
            class_of,
            ready: vec![BTreeSet::new(); kinds.len()],
            kinds,
            kind_of,
        };
        for m in 0..m {
            sched.replace_queue_key(m);
            sched.free_in_class[sched.class_of[m]] += sched.machines[m].slots as usize;
        }
        sched.match_kinds();
        sched
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn machines(&self) -> &[MachineSpec] {
        &self.machines
    }

    pub fn state(&self, node: NodeId) -> &NodeState {
        &self.state[node]
    }

    /// The first actions: fails what no machine can build, starts what can start.
    pub fn start(&mut self, now: f64) -> Vec<Action> {
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
                        let seconds = now - self.started_at[node];
                        self.set_state(node, NodeState::Done { machine, seconds });
                        self.holders[node] = vec![machine];
                        for i in 0..self.graph.dependents(node).len() {
                            let d = self.graph.dependents(node)[i];
                            if let NodeState::Waiting(k) = &mut self.state[d] {
                                *k -= 1;
                                if *k == 0 {
                                    self.make_ready(d);
                                }
                            }
                        }
                    }
                    Outcome::Failed { reason } => {
                        self.fail(node, Failure::BuildFailed { machine, reason }, &mut actions);
                    }
                    Outcome::Lost { reason } => self.requeue(node, reason, &mut actions),
                }
            }
            Event::MachineLost { machine } => {
                if machine < self.alive.len() && self.alive[machine] {
                    let class = self.class_of[machine];
                    self.free_in_class[class] -= self.free_on(machine);
                    self.alive[machine] = false;
                    self.replace_queue_key(machine);
                    let lost = std::mem::take(&mut self.running[machine]);
                    self.running_count -= lost.len();
                    for node in lost {
                        self.requeue(
                            node,
                            format!("{} was lost", self.machines[machine].name),
                            &mut actions,
                        );
                    }
                    for h in &mut self.holders {
                        h.retain(|&m| m != machine);
                    }
                    self.match_kinds();
                    self.rebuild_lost_outputs();
                    self.fail_unplaceable(&mut actions);
                }
            }
            Event::OutputsAt { node, machine } => {
                if !self.holders[node].contains(&machine) {
                    self.holders[node].push(machine);
                }
            }
        }
        self.dispatch(now, &mut actions);
        #[cfg(debug_assertions)]
        self.check_bookkeeping();
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

    /// Builds running now, per machine.
    pub fn running_on(&self, machine: MachineId) -> &[NodeId] {
        &self.running[machine]
    }

    fn set_state(&mut self, id: NodeId, state: NodeState) {
        let settled = |s: &NodeState| matches!(s, NodeState::Done { .. } | NodeState::Failed(_));
        match (settled(&self.state[id]), settled(&state)) {
            (false, true) => self.settled += 1,
            (true, false) => self.settled -= 1,
            _ => {}
        }
        self.state[id] = state;
    }

    fn make_ready(&mut self, id: NodeId) {
        self.set_state(id, NodeState::Ready);
        let key = self.ready_key(id);
        self.ready[self.kind_of[id]].insert(key);
    }

    fn unready(&mut self, id: NodeId) {
        let key = self.ready_key(id);
        self.ready[self.kind_of[id]].remove(&key);
    }

    fn ready_key(&self, id: NodeId) -> ReadyKey {
        // Ranks are non-negative, so their bit patterns order like the values.
        ReadyKey {
            neg_rank_bits: -(self.graph.rank(id).to_bits() as i64),
            node: id,
        }
    }

    /// Free slots of a live machine.
    fn free_on(&self, m: MachineId) -> usize {
        (self.machines[m].slots as usize).saturating_sub(self.running[m].len())
    }

    /// A live machine's first slot: a free one, else the build expected to end first.
    fn first_slot(&self, m: MachineId) -> Option<SlotKey> {
        if !self.alive[m] || self.machines[m].slots == 0 {
            return None;
        }
        if self.free_on(m) > 0 {
            return Some(SlotKey::new(f64::NEG_INFINITY, true, m));
        }
        let end = self.running[m]
            .iter()
            .map(|&n| self.expected_end(n))
            .fold(f64::INFINITY, f64::min);
        Some(SlotKey::new(end, false, m))
    }

    fn expected_end(&self, node: NodeId) -> f64 {
        match self.state[node] {
            NodeState::Running { expected_end, .. } => expected_end,
            _ => f64::NEG_INFINITY,
        }
    }

    /// All slots of a live machine: (when it is expected free, whether it is free now).
    fn slot_list(&self, m: MachineId) -> Vec<(f64, bool)> {
        let mut slots: Vec<(f64, bool)> = self.running[m]
            .iter()
            .map(|&n| (self.expected_end(n), false))
            .collect();
        slots.extend(std::iter::repeat_n(
            (f64::NEG_INFINITY, true),
            self.free_on(m),
        ));
        slots.sort_unstable_by(slot_order);
        slots
    }

    /// Takes `node` off `machine`'s running builds.
    fn release(&mut self, node: NodeId, machine: MachineId) {
        let class = self.class_of[machine];
        let before = self.running[machine].len();
        self.running[machine].retain(|&n| n != node);
        let removed = before - self.running[machine].len();
        self.running_count -= removed;
        if self.alive[machine] {
            self.free_in_class[class] += removed;
        }
        self.replace_queue_key(machine);
    }

    /// Puts `machine`'s current first slot in its class queue in place of the key it
    /// had there.
    fn replace_queue_key(&mut self, machine: MachineId) {
        let class = self.class_of[machine];
        if let Some(old) = self.queued[machine].take() {
            self.queues[class].remove(&old);
        }
        let new = self.first_slot(machine);
        if let Some(new) = new {
            self.queues[class].insert(new);
        }
        self.queued[machine] = new;
    }

    /// Which classes may take each kind: those that can build it, and only local ones
    /// for `preferLocalBuild` when a live local machine can.
    fn match_kinds(&mut self) {
        for kind in &mut self.kinds {
            let node = self.graph.node(kind.example);
            // A class counts when a live machine of it has slots (`-j0` leaves the
            // local machine in the fleet with none).
            let live = |c: &Vec<MachineId>| {
                c.iter()
                    .any(|&m| self.alive[m] && self.machines[m].slots > 0)
            };
            let able: Vec<usize> = (0..self.classes.len())
                .filter(|&c| {
                    live(&self.classes[c]) && self.machines[self.classes[c][0]].can_build(node)
                })
                .collect();
            let local: Vec<usize> = able
                .iter()
                .copied()
                .filter(|&c| self.machines[self.classes[c][0]].is_local)
                .collect();
            kind.classes = if node.prefer_local && !local.is_empty() {
                local
            } else {
                able
            };
            // Fastest first: a dispatch stops at classes too slow to finish earlier.
            let speed = |c: usize| self.machines[self.classes[c][0]].speed;
            kind.classes
                .sort_by(|&a, &b| speed(b).total_cmp(&speed(a)).then(a.cmp(&b)));
        }
    }

    fn requeue(&mut self, node: NodeId, reason: String, actions: &mut Vec<Action>) {
        self.attempts[node] += 1;
        if self.attempts[node] >= MAX_ATTEMPTS {
            let attempts = self.attempts[node];
            self.fail(node, Failure::TooManyAttempts { attempts, reason }, actions);
        } else {
            self.make_ready(node);
        }
    }

    /// Marks `node` failed, and everything that depends on it; without keep-going,
    /// stops the run and cancels what is running.
    fn fail(&mut self, node: NodeId, failure: Failure, actions: &mut Vec<Action>) {
        if matches!(self.state[node], NodeState::Failed(_)) {
            return;
        }
        self.unready(node);
        self.set_state(node, NodeState::Failed(failure.clone()));
        actions.push(Action::Fail {
            node,
            reason: failure,
        });
        let mut stack: Vec<NodeId> = self.graph.dependents(node).to_vec();
        while let Some(d) = stack.pop() {
            // A running dependent already has its inputs (this node was being built
            // again only for others, its outputs lost with a machine): it goes on.
            if matches!(
                self.state[d],
                NodeState::Failed(_) | NodeState::Done { .. } | NodeState::Running { .. }
            ) {
                continue;
            }
            self.unready(d);
            let f = Failure::DependencyFailed { dep: node };
            self.set_state(d, NodeState::Failed(f.clone()));
            actions.push(Action::Fail { node: d, reason: f });
            stack.extend_from_slice(self.graph.dependents(d));
        }
        if !self.keep_going && !self.stopping {
            self.stopping = true;
            for m in 0..self.running.len() {
                let cancelled = std::mem::take(&mut self.running[m]);
                if self.alive[m] {
                    self.free_in_class[self.class_of[m]] += cancelled.len();
                }
                self.replace_queue_key(m);
                for n in cancelled {
                    self.running_count -= 1;
                    actions.push(Action::Cancel {
                        node: n,
                        machine: m,
                    });
                    actions.push(Action::Fail {
                        node: n,
                        reason: Failure::Stopped,
                    });
                    self.set_state(n, NodeState::Failed(Failure::Stopped));
                }
            }
            for id in 0..self.state.len() {
                if matches!(self.state[id], NodeState::Ready | NodeState::Waiting(_)) {
                    self.set_state(id, NodeState::Failed(Failure::Stopped));
                    actions.push(Action::Fail {
                        node: id,
                        reason: Failure::Stopped,
                    });
                }
            }
            for ready in &mut self.ready {
                ready.clear();
            }
        }
    }

    /// After a machine loss: outputs that only it held and that an unfinished node still
    /// needs must be built again, and so must, transitively, their own lost inputs.
    fn rebuild_lost_outputs(&mut self) {
        let n = self.graph.len();
        loop {
            let mut changed = false;
            for id in 0..n {
                let unfinished = matches!(self.state[id], NodeState::Waiting(_) | NodeState::Ready);
                if !unfinished {
                    continue;
                }
                for i in 0..self.graph.node(id).deps.len() {
                    let dep = self.graph.node(id).deps[i];
                    if matches!(self.state[dep], NodeState::Done { .. })
                        && self.holders[dep].is_empty()
                    {
                        self.set_state(dep, NodeState::Waiting(0));
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        // Recount what each unfinished node waits for.
        for id in 0..n {
            if !matches!(self.state[id], NodeState::Waiting(_) | NodeState::Ready) {
                continue;
            }
            let waiting = self
                .graph
                .node(id)
                .deps
                .iter()
                .filter(|&&d| !matches!(self.state[d], NodeState::Done { .. }))
                .count();
            self.unready(id);
            if waiting == 0 {
                self.make_ready(id);
            } else {
                self.set_state(id, NodeState::Waiting(waiting));
            }
        }
    }

    /// Fails ready or waiting nodes that no live machine can build.
    fn fail_unplaceable(&mut self, actions: &mut Vec<Action>) {
        let unplaceable: Vec<bool> = self.kinds.iter().map(|k| k.classes.is_empty()).collect();
        if !unplaceable.contains(&true) {
            return;
        }
        let considered: Vec<String> = self
            .machines
            .iter()
            .zip(&self.alive)
            .filter(|(_, &a)| a)
            .map(|(m, _)| m.name.clone())
            .collect();
        for id in 0..self.graph.len() {
            if !unplaceable[self.kind_of[id]]
                || !matches!(self.state[id], NodeState::Waiting(_) | NodeState::Ready)
            {
                continue;
            }
            let node = self.graph.node(id);
            let failure = Failure::NoMachine {
                system: node.system.clone(),
                features: node.required_features.clone(),
                considered: considered.clone(),
            };
            self.fail(id, failure, actions);
        }
    }

    /// Seconds to bring the inputs of `id` that `machine` lacks to it.
    fn transfer_in(&self, id: NodeId, machine: MachineId) -> f64 {
        let target = &self.machines[machine];
        let mut total = 0.0;
        for &dep in &self.graph.node(id).deps {
            let holders = &self.holders[dep];
            if holders.contains(&machine) {
                continue;
            }
            let bytes = self.graph.node(dep).output_bytes;
            // Through the client: from the cheapest holder to offload, then onward.
            let from = holders
                .iter()
                .map(|&h| self.machines[h].transfer_time(bytes))
                .fold(f64::INFINITY, f64::min);
            let from = if from.is_finite() { from } else { 0.0 };
            total += from + target.transfer_time(bytes);
        }
        total
    }

    /// The ready node to place next: the best priority among kinds that some free slot
    /// can take. `next` caches each kind's next candidate after its cursor.
    fn next_ready(&self, next: &mut [Option<Option<ReadyKey>>]) -> Option<(usize, ReadyKey)> {
        let mut best: Option<(usize, ReadyKey)> = None;
        for (k, kind) in self.kinds.iter().enumerate() {
            if !kind.classes.iter().any(|&c| self.free_in_class[c] > 0) {
                continue;
            }
            let candidate = *next[k].get_or_insert_with(|| self.ready[k].iter().next().copied());
            if let Some(key) = candidate {
                if best.is_none_or(|(_, b)| key < b) {
                    best = Some((k, key));
                }
            }
        }
        best
    }

    /// Places ready nodes, best priority first, on the machine where each would finish
    /// earliest; starts those whose best machine has a free slot now.
    fn dispatch(&mut self, now: f64, actions: &mut Vec<Action>) {
        if self.stopping {
            return;
        }
        let mut free_slots: usize = self.free_in_class.iter().sum();
        if free_slots == 0 {
            return;
        }
        // Past this many derivations that chose to wait for a busy machine, the rest
        // take what is free: on a large fleet waiting could otherwise be weighed for
        // thousands of derivations at every event.
        let mut waits = 0usize;
        // Slots of the machines booked in this round (waiting for a busy machine books
        // its slot only for this round's planning).
        let mut booked: HashMap<MachineId, Vec<(f64, bool)>> = HashMap::new();
        let mut next: Vec<Option<Option<ReadyKey>>> = vec![None; self.kinds.len()];
        let mut holders: Vec<MachineId> = Vec::new();
        while free_slots > 0 {
            let Some((kind, key)) = self.next_ready(&mut next) else {
                break;
            };
            next[kind] = Some(
                self.ready[kind]
                    .range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
                    .next()
                    .copied(),
            );
            let only_free = waits >= RESERVATIONS_PER_ROUND;
            let id = key.node;
            let node = self.graph.node(id);
            // Machines holding some of its inputs are weighed one by one; of the
            // others, only the earliest of each class can be best.
            holders.clear();
            for &d in &node.deps {
                holders.extend(self.holders[d].iter().copied());
            }
            holders.sort_unstable();
            holders.dedup();
            let mut best: Option<(f64, bool, MachineId)> = None;
            for &c in &self.kinds[kind].classes {
                let spec = &self.machines[self.classes[c][0]];
                let build_time = spec.build_time(node);
                if best.is_some_and(|(f, _, _)| now + build_time > f + 1e-9) {
                    // This class and all slower ones finish later even if free now.
                    break;
                }
                if only_free && self.free_in_class[c] == 0 {
                    continue;
                }
                let earliest = self.queues[c]
                    .iter()
                    .find(|k| holders.binary_search(&k.machine).is_err())
                    .map(|k| k.machine);
                let in_class = holders
                    .iter()
                    .copied()
                    .filter(|&h| self.class_of[h] == c && self.alive[h]);
                for m in earliest.into_iter().chain(in_class) {
                    let first = match booked.get(&m) {
                        Some(slots) => slots.first().copied(),
                        None => self.queued[m].map(|k| (k.time, !k.busy)),
                    };
                    let Some((slot_time, is_free)) = first else {
                        continue;
                    };
                    if only_free && !is_free {
                        continue;
                    }
                    let finish = slot_time.max(now) + self.transfer_in(id, m) + build_time;
                    // Earliest finish; at a tie, a slot free now beats waiting for one,
                    // then the lower machine index.
                    let better = match best {
                        None => true,
                        Some((f, best_free, bm)) => {
                            finish < f - 1e-9
                                || (finish <= f + 1e-9
                                    && ((is_free && !best_free)
                                        || (is_free == best_free && m < bm)))
                        }
                    };
                    if better {
                        best = Some((finish, is_free, m));
                    }
                }
            }
            let Some((finish, is_free, m)) = best else {
                continue;
            };
            // Book the slot: it is busy until `finish` for everything planned after.
            let class = self.class_of[m];
            let slots = match booked.entry(m) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let slots = self.slot_list(m);
                    e.insert(slots)
                }
            };
            let (t, free) = slots[0];
            self.queues[class].remove(&SlotKey::new(t, free, m));
            slots[0] = (finish, false);
            slots.sort_unstable_by(slot_order);
            let (t, free) = slots[0];
            // `queued` keeps the machine's key outside this round's bookings.
            self.queues[class].insert(SlotKey::new(t, free, m));
            if !is_free {
                waits += 1;
            } else {
                free_slots -= 1;
                self.free_in_class[class] -= 1;
                self.ready[kind].remove(&key);
                self.set_state(
                    id,
                    NodeState::Running {
                        machine: m,
                        expected_end: finish,
                    },
                );
                self.started_at[id] = now;
                self.running[m].push(id);
                self.running_count += 1;
                actions.push(Action::Start {
                    node: id,
                    machine: m,
                });
            }
        }
        // Bookings of waits end with the round: the queues go back to the real slots.
        for (m, slots) in booked {
            let (t, free) = slots[0];
            self.queues[self.class_of[m]].remove(&SlotKey::new(t, free, m));
            self.queued[m] = None;
            self.replace_queue_key(m);
        }
    }
}

/// How many ready derivations per round may choose to wait for a busy machine beyond
/// the number of free slots.
pub const RESERVATIONS_PER_ROUND: usize = 64;

/// A machine's first slot, ordered: free ones first (their time is minus infinity),
/// then by when the slot frees, then by machine index.
#[derive(Debug, Clone, Copy)]
struct SlotKey {
    time: f64,
    busy: bool,
    machine: MachineId,
}

impl SlotKey {
    fn new(time: f64, free: bool, machine: MachineId) -> Self {
        SlotKey {
            time: if free { f64::NEG_INFINITY } else { time },
            busy: !free,
            machine,
        }
    }
}

impl PartialEq for SlotKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for SlotKey {}

impl PartialOrd for SlotKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SlotKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.busy
            .cmp(&other.busy)
            .then(self.time.total_cmp(&other.time))
            .then(self.machine.cmp(&other.machine))
    }
}

/// Groups machines that are interchangeable for planning (same systems, features,
/// slots, speed and link): a decision weighs one machine per group, plus those that
/// hold inputs.
fn machine_classes(machines: &[MachineSpec]) -> (Vec<Vec<MachineId>>, Vec<usize>) {
    let mut classes: Vec<Vec<MachineId>> = Vec::new();
    let mut class_of = vec![0; machines.len()];
    let mut index: HashMap<String, usize> = HashMap::new();
    for (m, spec) in machines.iter().enumerate() {
        let key = format!(
            "{:?}|{:?}|{:?}|{}|{}|{}|{}|{}",
            spec.systems,
            spec.supported_features,
            spec.mandatory_features,
            spec.slots,
            spec.speed.to_bits(),
            spec.is_local,
            spec.bandwidth.to_bits(),
            spec.latency.to_bits()
        );
        let c = *index.entry(key).or_insert_with(|| {
            classes.push(Vec::new());
            classes.len() - 1
        });
        classes[c].push(m);
        class_of[m] = c;
    }
    (classes, class_of)
}

/// Free slots first; then by when the slot frees.
fn slot_order(a: &(f64, bool), b: &(f64, bool)) -> std::cmp::Ordering {
    b.1.cmp(&a.1).then(a.0.total_cmp(&b.0))
}
