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

use std::collections::BTreeSet;

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
#[derive(Debug, Clone)]
pub struct Scheduler {
    graph: Graph,
    machines: Vec<MachineSpec>,
    alive: Vec<bool>,
    state: Vec<NodeState>,
    started_at: Vec<f64>,
    attempts: Vec<u32>,
    /// Machines that hold each node's outputs.
    holders: Vec<Vec<MachineId>>,
    ready: BTreeSet<ReadyKey>,
    running: Vec<Vec<NodeId>>,
    keep_going: bool,
    stopping: bool,
    /// Interchangeable machines, and each machine's group.
    classes: Vec<Vec<MachineId>>,
    class_of: Vec<usize>,
    /// Per-machine slot lists, reused from round to round.
    slot_buffers: Vec<Vec<(f64, bool)>>,
}

impl Scheduler {
    pub fn new(graph: Graph, machines: Vec<MachineSpec>, keep_going: bool) -> Scheduler {
        let n = graph.len();
        let m = machines.len();
        let state = (0..n)
            .map(|i| NodeState::Waiting(graph.node(i).deps.len()))
            .collect();
        let (classes, class_of) = machine_classes(&machines);
        Scheduler {
            graph,
            alive: vec![true; m],
            running: vec![Vec::new(); m],
            machines,
            state,
            started_at: vec![0.0; n],
            attempts: vec![0; n],
            holders: vec![Vec::new(); n],
            ready: BTreeSet::new(),
            keep_going,
            stopping: false,
            classes,
            class_of,
            slot_buffers: Vec::new(),
        }
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
        for id in 0..self.graph.len() {
            let node = self.graph.node(id);
            if !self.machines.iter().any(|m| m.can_build(node)) {
                let failure = Failure::NoMachine {
                    system: node.system.clone(),
                    features: node.required_features.clone(),
                    considered: self.machines.iter().map(|m| m.name.clone()).collect(),
                };
                self.fail(id, failure, &mut actions);
            }
        }
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
                self.running[machine].retain(|&n| n != node);
                match outcome {
                    Outcome::Built => {
                        let seconds = now - self.started_at[node];
                        self.state[node] = NodeState::Done { machine, seconds };
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
                    self.alive[machine] = false;
                    for node in std::mem::take(&mut self.running[machine]) {
                        self.requeue(
                            node,
                            format!("{} was lost", self.machines[machine].name),
                            &mut actions,
                        );
                    }
                    for h in &mut self.holders {
                        h.retain(|&m| m != machine);
                    }
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
        actions
    }

    /// True when nothing runs and nothing more will start.
    pub fn is_finished(&self) -> bool {
        self.running.iter().all(Vec::is_empty)
            && (self.stopping
                || self
                    .state
                    .iter()
                    .all(|s| matches!(s, NodeState::Done { .. } | NodeState::Failed(_))))
    }

    /// Builds running now, per machine.
    pub fn running_on(&self, machine: MachineId) -> &[NodeId] {
        &self.running[machine]
    }

    fn make_ready(&mut self, id: NodeId) {
        self.state[id] = NodeState::Ready;
        self.ready.insert(self.ready_key(id));
    }

    fn ready_key(&self, id: NodeId) -> ReadyKey {
        // Ranks are non-negative, so their bit patterns order like the values.
        ReadyKey {
            neg_rank_bits: -(self.graph.rank(id).to_bits() as i64),
            node: id,
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
        self.ready.remove(&self.ready_key(node));
        self.state[node] = NodeState::Failed(failure.clone());
        actions.push(Action::Fail {
            node,
            reason: failure,
        });
        let mut stack: Vec<NodeId> = self.graph.dependents(node).to_vec();
        while let Some(d) = stack.pop() {
            if matches!(self.state[d], NodeState::Failed(_) | NodeState::Done { .. }) {
                continue;
            }
            self.ready.remove(&self.ready_key(d));
            let f = Failure::DependencyFailed { dep: node };
            self.state[d] = NodeState::Failed(f.clone());
            actions.push(Action::Fail { node: d, reason: f });
            stack.extend_from_slice(self.graph.dependents(d));
        }
        if !self.keep_going && !self.stopping {
            self.stopping = true;
            for m in 0..self.running.len() {
                for n in std::mem::take(&mut self.running[m]) {
                    actions.push(Action::Cancel {
                        node: n,
                        machine: m,
                    });
                    actions.push(Action::Fail {
                        node: n,
                        reason: Failure::Stopped,
                    });
                    self.state[n] = NodeState::Failed(Failure::Stopped);
                }
            }
            for id in 0..self.state.len() {
                if matches!(self.state[id], NodeState::Ready | NodeState::Waiting(_)) {
                    self.state[id] = NodeState::Failed(Failure::Stopped);
                    actions.push(Action::Fail {
                        node: id,
                        reason: Failure::Stopped,
                    });
                }
            }
            self.ready.clear();
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
                for &dep in &self.graph.node(id).deps {
                    if matches!(self.state[dep], NodeState::Done { .. })
                        && self.holders[dep].is_empty()
                    {
                        self.state[dep] = NodeState::Waiting(0);
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
            self.ready.remove(&self.ready_key(id));
            if waiting == 0 {
                self.make_ready(id);
            } else {
                self.state[id] = NodeState::Waiting(waiting);
            }
        }
    }

    /// Fails ready or waiting nodes that no remaining machine can build.
    fn fail_unplaceable(&mut self, actions: &mut Vec<Action>) {
        for id in 0..self.graph.len() {
            if !matches!(self.state[id], NodeState::Waiting(_) | NodeState::Ready) {
                continue;
            }
            let node = self.graph.node(id);
            let possible = self
                .machines
                .iter()
                .zip(&self.alive)
                .any(|(m, &alive)| alive && m.can_build(node));
            if !possible {
                let failure = Failure::NoMachine {
                    system: node.system.clone(),
                    features: node.required_features.clone(),
                    considered: self
                        .machines
                        .iter()
                        .zip(&self.alive)
                        .filter(|(_, &a)| a)
                        .map(|(m, _)| m.name.clone())
                        .collect(),
                };
                self.fail(id, failure, actions);
            }
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

    /// Places ready nodes, best priority first, on the machine where each would finish
    /// earliest; starts those whose best machine has a free slot now.
    fn dispatch(&mut self, now: f64, actions: &mut Vec<Action>) {
        if self.stopping {
            return;
        }
        // When each slot of each machine is expected to be free, and whether it is
        // free now (an overdue build still holds its slot). The buffers are kept
        // between rounds: a round on a large fleet should not allocate per machine.
        let mut slots = std::mem::take(&mut self.slot_buffers);
        slots.resize_with(self.machines.len(), Vec::new);
        for (m, spec) in self.machines.iter().enumerate() {
            let times = &mut slots[m];
            times.clear();
            if !self.alive[m] {
                continue;
            }
            times.extend(self.running[m].iter().map(|&n| match self.state[n] {
                NodeState::Running { expected_end, .. } => (expected_end.max(now), false),
                _ => (now, false),
            }));
            let free = (spec.slots as usize).saturating_sub(times.len());
            times.extend(std::iter::repeat_n((now, true), free));
            times.sort_unstable_by(slot_order);
        }
        // Per class of interchangeable machines, its machines by their first slot
        // (sorted vectors: built once per round, changed only where a slot is booked).
        let mut queues: Vec<Vec<SlotKey>> = self
            .classes
            .iter()
            .map(|class| {
                let mut q: Vec<SlotKey> = class
                    .iter()
                    .filter_map(|&m| slots[m].first().map(|&(t, free)| SlotKey::new(t, free, m)))
                    .collect();
                q.sort_unstable();
                q
            })
            .collect();
        let local_ids: Vec<MachineId> = (0..self.machines.len())
            .filter(|&m| self.machines[m].is_local && self.alive[m])
            .collect();
        // Once no slot is free anywhere, nothing more can start in this round: the rest
        // of the ready set is not looked at (what keeps a decision cheap when thousands
        // of derivations are ready).
        let mut free_slots: usize = slots
            .iter()
            .map(|s| s.iter().filter(|(_, free)| *free).count())
            .sum();
        // Past this many derivations that chose to wait for a busy machine, the rest
        // take what is free: on a large fleet waiting could otherwise be weighed for
        // thousands of derivations at every event.
        let patience = free_slots + RESERVATIONS_PER_ROUND;
        let mut considered = 0usize;
        // Walk the ready set in priority order without copying it: it may hold
        // thousands of entries while only a few slots are free.
        let mut cursor: Option<ReadyKey> = None;
        let mut holders: Vec<MachineId> = Vec::new();
        loop {
            if free_slots == 0 {
                break;
            }
            let next = match cursor {
                None => self.ready.iter().next(),
                Some(c) => self
                    .ready
                    .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                    .next(),
            };
            let Some(&key) = next else { break };
            cursor = Some(key);
            considered += 1;
            let only_free = considered > patience;
            let id = key.node;
            let node = self.graph.node(id);
            let local_ok =
                node.prefer_local && local_ids.iter().any(|&m| self.machines[m].can_build(node));
            // Machines holding some of its inputs are weighed one by one; of the
            // others, only the earliest of each class can be best.
            holders.clear();
            for &d in &node.deps {
                holders.extend(self.holders[d].iter().copied());
            }
            holders.sort_unstable();
            holders.dedup();
            let mut best: Option<(f64, bool, MachineId)> = None;
            for (c, class) in self.classes.iter().enumerate() {
                let spec = &self.machines[class[0]];
                if !spec.can_build(node) || (local_ok && !spec.is_local) {
                    continue;
                }
                let earliest = queues[c]
                    .iter()
                    .find(|k| holders.binary_search(&k.machine).is_err())
                    .map(|k| k.machine);
                let in_class = holders
                    .iter()
                    .copied()
                    .filter(|&h| self.class_of[h] == c && self.alive[h]);
                for m in earliest.into_iter().chain(in_class) {
                    let Some(&(slot_time, is_free)) = slots[m].first() else {
                        continue;
                    };
                    if only_free && !is_free {
                        continue;
                    }
                    let finish = slot_time + self.transfer_in(id, m) + spec.build_time(node);
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
            let queue = &mut queues[self.class_of[m]];
            if let Some(&(t, free)) = slots[m].first() {
                if let Ok(i) = queue.binary_search(&SlotKey::new(t, free, m)) {
                    queue.remove(i);
                }
            }
            slots[m][0] = (finish, false);
            slots[m].sort_unstable_by(slot_order);
            if let Some(&(t, free)) = slots[m].first() {
                let key = SlotKey::new(t, free, m);
                let i = queue.binary_search(&key).unwrap_or_else(|i| i);
                queue.insert(i, key);
            }
            if is_free {
                free_slots -= 1;
                self.ready.remove(&key);
                self.state[id] = NodeState::Running {
                    machine: m,
                    expected_end: finish,
                };
                self.started_at[id] = now;
                self.running[m].push(id);
                actions.push(Action::Start {
                    node: id,
                    machine: m,
                });
            }
        }
        self.slot_buffers = slots;
    }
}

/// How many ready derivations per round may choose to wait for a busy machine beyond
/// the number of free slots.
pub const RESERVATIONS_PER_ROUND: usize = 64;

/// A machine's first slot, ordered: earliest, free before busy, lower index.
#[derive(Debug, Clone, Copy)]
struct SlotKey {
    time: f64,
    busy: bool,
    machine: MachineId,
}

impl SlotKey {
    fn new(time: f64, free: bool, machine: MachineId) -> Self {
        SlotKey {
            time,
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
        self.time
            .total_cmp(&other.time)
            .then(self.busy.cmp(&other.busy))
            .then(self.machine.cmp(&other.machine))
    }
}

/// Groups machines that are interchangeable for planning (same systems, features,
/// slots, speed and link): a decision weighs one machine per group, plus those that
/// hold inputs.
fn machine_classes(machines: &[MachineSpec]) -> (Vec<Vec<MachineId>>, Vec<usize>) {
    let mut classes: Vec<Vec<MachineId>> = Vec::new();
    let mut class_of = vec![0; machines.len()];
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
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

/// Earliest first; at equal times a free slot before a busy one.
fn slot_order(a: &(f64, bool), b: &(f64, bool)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(b.1.cmp(&a.1))
}
