//! Placing ready nodes: ready derivations are grouped into kinds (same system,
//! features, `preferLocalBuild`), each kind's ready nodes kept in priority order, and a
//! round of [`Scheduler::dispatch`] puts the best ones where they would finish first.
//!
//! Policy: ready derivations go in priority order (their duration-weighted critical
//! path); each goes to the machine where it would *finish* first, counting the machine's
//! speed, the transfer of inputs it lacks, and when its next slot frees. When that best
//! machine is busy the derivation waits for it rather than taking a free slot that
//! would finish later; the wait is reserved so lower priorities plan around it.

use std::collections::HashMap;

use crate::classes::{slot_order, SlotKey};
use crate::events::{Action, NodeState};
use crate::fleet::MachineId;
use crate::graph::NodeId;
use crate::scheduler::Scheduler;
use crate::tiers::Tier;
use crate::transfers::{Direction, Route};

/// How many ready derivations per round may choose to wait for a busy machine beyond
/// the number of free slots.
pub const RESERVATIONS_PER_ROUND: usize = 64;

/// Inputs held by at most this many machines have their holders weighed one by one
/// when placing a derivation that needs them; those held more widely set no machine
/// apart and are weighed at each class's earliest machine.
pub const WEIGHED_HOLDERS: usize = 32;

/// Priority-ordered key of a ready node: higher rank first, then lower id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ReadyKey {
    neg_rank_bits: i64,
    node: NodeId,
}

/// Nodes the same machines can build.
#[derive(Debug, Clone)]
pub(crate) struct Kind {
    /// One node of the kind, to match machines against.
    pub(crate) example: NodeId,
    /// Classes that may take nodes of this kind, fastest first.
    pub(crate) classes: Vec<usize>,
    /// Those classes in tiers, fastest first ([`crate::tiers`]).
    pub(crate) tiers: Vec<Tier>,
}

impl Scheduler {
    pub(crate) fn make_ready(&mut self, id: NodeId) {
        self.set_state(id, NodeState::Ready);
        let key = self.ready_key(id);
        self.ready[self.kind_of[id]].insert(key);
    }

    /// Sets every node's priority; the ready ones are ordered again.
    pub(crate) fn set_priorities(&mut self, priority: Vec<f64>) {
        let ready: Vec<NodeId> = self
            .ready
            .iter()
            .flat_map(|r| r.iter().map(|k| k.node))
            .collect();
        for r in &mut self.ready {
            r.clear();
        }
        self.priority = priority;
        for id in ready {
            let key = self.ready_key(id);
            self.ready[self.kind_of[id]].insert(key);
        }
    }

    pub(crate) fn unready(&mut self, id: NodeId) {
        let key = self.ready_key(id);
        self.ready[self.kind_of[id]].remove(&key);
    }

    fn ready_key(&self, id: NodeId) -> ReadyKey {
        // Priorities are non-negative, so their bit patterns order like the values.
        ReadyKey {
            neg_rank_bits: -(self.priority[id].to_bits() as i64),
            node: id,
        }
    }

    /// Which classes may take each kind: those that can build it, and only local ones
    /// for `preferLocalBuild` when a live local machine can.
    pub(crate) fn match_kinds(&mut self) {
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
            let speed = |c: usize| self.machines[self.classes[c][0]].speed_for(&node.system);
            kind.classes
                .sort_by(|&a, &b| speed(b).total_cmp(&speed(a)).then(a.cmp(&b)));
        }
        self.build_tiers();
    }

    /// The inputs of `id` that `machine` lacks, each with its route and size.
    fn input_routes(
        &self,
        id: NodeId,
        machine: MachineId,
    ) -> impl Iterator<Item = (NodeId, Route, u64)> + '_ {
        self.graph.node(id).deps.iter().filter_map(move |&dep| {
            let bytes = self.graph.node(dep).output_bytes;
            let consumers = self.graph.dependents(dep).len();
            let r = self.holders.route(
                &self.machines,
                self.pair_links,
                dep,
                false,
                machine,
                consumers,
                bytes,
            )?;
            (!r.is_present()).then_some((dep, r, bytes))
        })
    }

    /// When the inputs of `id` that `machine` lacks would all be there, sent one after
    /// another from `ready` on, behind what the links carry already.
    pub(crate) fn inputs_arrive(&self, id: NodeId, machine: MachineId, ready: f64) -> f64 {
        self.input_routes(id, machine)
            .fold(ready, |at, (_, r, bytes)| {
                self.links.arrival(&self.machines, &r, bytes, at)
            })
    }

    /// Books the links the inputs of `id` take to `machine`, from `now` on.
    /// The inputs then count as held there (and in the client's store when their route
    /// keeps them): later plans neither send them again nor queue behind a phantom copy.
    fn send_inputs(&mut self, id: NodeId, machine: MachineId, now: f64) {
        let client = self.client;
        let routes: Vec<(NodeId, Route, u64)> = self.input_routes(id, machine).collect();
        let mut at = now;
        for (dep, r, bytes) in routes {
            at = self.links.send(&self.machines, &r, bytes, at);
            let kept = client.filter(|_| r.keeps_in_client());
            for m in kept.into_iter().chain([machine]) {
                self.holders.add(&self.machines, dep, m, bytes);
            }
        }
    }

    /// The way home of the outputs of a requested derivation (one nothing depends
    /// on) built on `machine`: none when built on the client, when others need it, or
    /// when requested outputs go elsewhere ([`Scheduler::outputs_stay_away`]).
    pub(crate) fn home_route(&self, id: NodeId, machine: MachineId) -> Option<Route> {
        let client = self.client?;
        (self.graph.dependents(id).is_empty() && machine != client && !self.outputs_away)
            .then(|| Route::home(machine, client))
    }

    /// When the outputs of `id`, built on `machine` by `built`, are where the run needs
    /// them. Built on a builder, they cross one of its links once: home for a requested
    /// output (behind those of the builds running there), or towards the builds that
    /// need them unless those run there too — over its quickest pair link when it has
    /// some, else over its link to the client. Counting that crossing keeps a builder
    /// behind a slow link from taking the first builds of a chain whose outputs would
    /// then all leave over it.
    fn outputs_home(&self, id: NodeId, machine: MachineId, built: f64) -> f64 {
        let spec = &self.machines[machine];
        if spec.is_local {
            return built;
        }
        let bytes = self.graph.node(id).output_bytes;
        if self.home_route(id, machine).is_some() {
            let start = built.max(self.links.free_at(machine, Direction::FromMachine));
            return start + spec.transfer_time(self.home_pending[machine] + bytes);
        }
        match self.fastest_peer[machine] {
            Some(link) => built + link.transfer_time(bytes),
            None => {
                let start = built.max(self.links.free_at(machine, Direction::FromMachine));
                start + spec.transfer_time(bytes)
            }
        }
    }

    /// The ready node to place next: the best priority among kinds that some free slot
    /// can take. `next` caches each kind's next candidate after its cursor.
    fn next_ready(&self, next: &mut [Option<Option<ReadyKey>>]) -> Option<(usize, ReadyKey)> {
        let mut best: Option<(usize, ReadyKey)> = None;
        for (k, kind) in self.kinds.iter().enumerate() {
            if !kind.tiers.iter().any(Tier::has_free) {
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
    pub(crate) fn dispatch(&mut self, now: f64, actions: &mut Vec<Action>) {
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
        let mut booked: Booked = HashMap::new();
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
            let Some(best) =
                self.best_machine(kind, key.node, now, only_free, &booked, &mut holders)
            else {
                continue;
            };
            self.book(best.machine, best.built, &mut booked);
            if best.free_now {
                free_slots -= 1;
                self.start_on(kind, key, best.machine, best.built, now, actions);
            } else {
                waits += 1;
            }
        }
        // Bookings of waits end with the round: the queues go back to the real slots.
        for (m, slots) in booked {
            let (t, free) = slots[0];
            self.queues[self.class_of[m]].remove(&SlotKey::new(t, free, m));
            // (`replace_queue_key` moves the class in its tiers.)
            self.queued[m] = None;
            self.replace_queue_key(m);
        }
    }

    /// The machine where ready node `id` of `kind` would have its outputs where they are
    /// needed first, given this round's bookings; with `only_free`, among slots free now.
    fn best_machine(
        &self,
        kind: usize,
        id: NodeId,
        now: f64,
        only_free: bool,
        booked: &Booked,
        holders: &mut Vec<MachineId>,
    ) -> Option<Placement> {
        let node = self.graph.node(id);
        // Machines holding some of its inputs are weighed one by one; of the
        // others, only the earliest of each class can be best. An input held by more
        // than a few machines sets none of them apart (a toolchain every builder has
        // fetched): its holders are not weighed one by one, and the earliest machine of
        // each class is weighed with what it holds.
        holders.clear();
        for &d in &node.deps {
            let held = &self.holders[d];
            if held.len() <= WEIGHED_HOLDERS {
                holders.extend(held.iter().copied());
            }
        }
        holders.sort_unstable();
        holders.dedup();
        let mut best: Option<Placement> = None;
        for tier in &self.kinds[kind].tiers {
            let spec = &self.machines[tier.example];
            let build_time = spec.build_time(node);
            if best.is_some_and(|b| now + build_time > b.finish + 1e-9) {
                // This tier and all slower ones finish later even if free now.
                break;
            }
            for &(head, c) in &tier.heads {
                // Classes free soonest first: once one could not be better even with
                // every input there, none of the rest can.
                let soonest = head.time.max(now) + build_time + spec.per_build;
                if (only_free && head.busy)
                    || best.is_some_and(|b| !b.loses_to(soonest, !head.busy, 0))
                {
                    break;
                }
                self.weigh_class(
                    c, id, now, only_free, booked, holders, build_time, &mut best,
                );
            }
        }
        best
    }

    /// Weighs the machines of class `c` for ready node `id`: its earliest machine that
    /// holds none of the inputs weighed one by one, and those that hold some; keeps the
    /// better placement in `best`.
    #[expect(
        clippy::too_many_arguments,
        reason = "one placement's state, passed down"
    )]
    fn weigh_class(
        &self,
        c: usize,
        id: NodeId,
        now: f64,
        only_free: bool,
        booked: &Booked,
        holders: &[MachineId],
        build_time: f64,
        best: &mut Option<Placement>,
    ) {
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
            let setup = if self.session_ready[m] {
                0.0
            } else {
                self.machines[m].session_setup
            };
            // Built no earlier than with every input there: a machine that would not
            // be better even so is not worth routing its inputs for (a later finish
            // never wins where an earlier one loses).
            let soonest = slot_time.max(now) + build_time + self.machines[m].per_build + setup;
            if best.is_some_and(|b| !b.loses_to(soonest, is_free, m)) {
                continue;
            }
            let built = self.inputs_arrive(id, m, slot_time.max(now))
                + build_time
                + self.machines[m].per_build
                + setup;
            let finish = self.outputs_home(id, m, built);
            // Earliest finish; at a tie, a slot free now beats waiting for one,
            // then the lower machine index.
            let better = best.is_none_or(|b| b.loses_to(finish, is_free, m));
            if better {
                *best = Some(Placement {
                    finish,
                    free_now: is_free,
                    machine: m,
                    built,
                });
            }
        }
    }

    /// Books the first slot of machine `m` until `built` for everything planned after
    /// in this round.
    fn book(&mut self, m: MachineId, built: f64, booked: &mut Booked) {
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
        slots[0] = (built, false);
        slots.sort_unstable_by(slot_order);
        let (t, free) = slots[0];
        // `queued` keeps the machine's key outside this round's bookings.
        self.queues[class].insert(SlotKey::new(t, free, m));
        self.head_moved(class);
    }

    /// Starts ready node `key.node` of `kind` on machine `m` now, expected built at
    /// `built`.
    fn start_on(
        &mut self,
        kind: usize,
        key: ReadyKey,
        m: MachineId,
        built: f64,
        now: f64,
        actions: &mut Vec<Action>,
    ) {
        let id = key.node;
        self.free_in_class[self.class_of[m]] -= 1;
        self.ready[kind].remove(&key);
        self.set_state(
            id,
            NodeState::Running {
                machine: m,
                expected_end: built,
            },
        );
        self.started_at[id] = now;
        self.send_inputs(id, m, now);
        // Its outputs will go home over that link, after those of the builds
        // running there now.
        if self.home_route(id, m).is_some() {
            self.home_pending[m] += self.graph.node(id).output_bytes;
        }
        self.running[m].push(id);
        self.running_count += 1;
        self.session_ready[m] = true;
        actions.push(Action::Start {
            node: id,
            machine: m,
        });
    }
}

/// Slots of the machines booked in a round: (free at, free now) per slot, earliest first.
type Booked = HashMap<MachineId, Vec<(f64, bool)>>;

/// A candidate placement of a ready node.
#[derive(Debug, Clone, Copy)]
struct Placement {
    /// When its outputs are where they are needed.
    finish: f64,
    /// Whether the slot is free now (else the node would wait for it).
    free_now: bool,
    machine: MachineId,
    /// When it would be built.
    built: f64,
}

impl Placement {
    /// Whether a placement finishing at `finish` on machine `m`, free now or not, is
    /// better: an earlier finish; at a tie, a slot free now beats waiting for one, then
    /// the lower machine index.
    fn loses_to(&self, finish: f64, free: bool, m: MachineId) -> bool {
        finish < self.finish - 1e-9
            || (finish <= self.finish + 1e-9
                && ((free && !self.free_now) || (free == self.free_now && m < self.machine)))
    }
}
