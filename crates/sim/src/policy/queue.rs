//! Models of the schedulers offload is compared with. Both take ready derivations one
//! at a time and pick a machine with a free slot by load over speed factor, copying
//! every input from the client and every output back to it:
//!
//! - **Nix 2.8's build hook** (`build-remote.cc`): derivations in the order they become
//!   ready; among remote machines with a free slot the lowest `load / speedFactor`
//!   (integer division, ties to the faster, then the less loaded); the local machine only
//!   when no remote one can take it; one build decided at a time on the client. A
//!   derivation no machine can take now is postponed: Nix retries it only when the
//!   worker's poll interval (`build-poll-interval`, 5 s) has passed.
//! - **Hydra's queue runner**: runnable steps by their number of dependents (its
//!   priorities fold into that here), then age; every machine, the local one included,
//!   by `load / speedFactor` as a real number.

use std::collections::VecDeque;

use offload_sched::{Graph, MachineId, MachineSpec, NodeId};

use crate::engine::{Costs, Policy};

/// Which scheduler the model follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    NixHook,
    Hydra,
}

/// A ready-queue scheduler in the style of Nix's hook or Hydra.
pub struct QueuePolicy {
    kind: QueueKind,
    graph: Graph,
    machines: Vec<MachineSpec>,
    alive: Vec<bool>,
    load: Vec<u32>,
    waiting: Vec<usize>,
    ready: VecDeque<NodeId>,
    /// Hydra's priority: how many derivations depend on each, transitively.
    dependents: Vec<usize>,
    costs: Costs,
    /// Nix: postponed derivations, and when the worker wakes them.
    postponed: Vec<NodeId>,
    last_woken: Option<f64>,
    /// Nix: the hook decides one derivation at a time; the next decision is not before.
    next_decision: f64,
}

/// Seconds the Nix client spends per hook decision (starting or asking the hook,
/// reading its answer, spawning the transfer), one at a time.
pub const NIX_DECISION_SECONDS: f64 = 0.05;

/// Nix's `build-poll-interval`.
pub const NIX_POLL_INTERVAL: f64 = 5.0;

impl QueuePolicy {
    pub fn new(kind: QueueKind, graph: Graph, machines: Vec<MachineSpec>, costs: Costs) -> Self {
        let n = graph.len();
        let waiting = (0..n).map(|i| graph.node(i).deps.len()).collect();
        // Transitive dependents, counted along reverse topological order (an
        // over-count on diamonds, as a priority it only has to order).
        let mut dependents = vec![0usize; n];
        for &id in graph.topo_order().iter().rev() {
            dependents[id] = graph
                .dependents(id)
                .iter()
                .map(|&d| 1 + dependents[d])
                .sum();
        }
        let m = machines.len();
        let mut policy = QueuePolicy {
            kind,
            graph,
            alive: vec![true; m],
            load: vec![0; m],
            machines,
            waiting,
            ready: VecDeque::new(),
            dependents,
            costs,
            postponed: Vec::new(),
            last_woken: None,
            next_decision: 0.0,
        };
        for id in 0..n {
            if policy.waiting[id] == 0 {
                policy.push_ready(id);
            }
        }
        policy
    }

    fn push_ready(&mut self, id: NodeId) {
        match self.kind {
            QueueKind::NixHook => self.ready.push_back(id),
            QueueKind::Hydra => {
                let key = |p: &QueuePolicy, x: NodeId| (std::cmp::Reverse(p.dependents[x]), x);
                let pos = self
                    .ready
                    .iter()
                    .position(|&other| key(self, other) > key(self, id))
                    .unwrap_or(self.ready.len());
                self.ready.insert(pos, id);
            }
        }
    }

    /// No machine left can ever build it: Nix and Hydra fail such a derivation.
    fn unbuildable(&self, node: NodeId) -> bool {
        let spec = self.graph.node(node);
        !(0..self.machines.len()).any(|m| {
            self.alive[m] && self.machines[m].slots > 0 && self.machines[m].can_build(spec)
        })
    }

    fn free(&self, m: MachineId) -> bool {
        self.alive[m] && self.load[m] < self.machines[m].slots
    }

    fn pick(&self, node: NodeId) -> Option<MachineId> {
        let spec = self.graph.node(node);
        let candidates =
            (0..self.machines.len()).filter(|&m| self.free(m) && self.machines[m].can_build(spec));
        match self.kind {
            QueueKind::NixHook => {
                let remote = candidates
                    .clone()
                    .filter(|&m| !self.machines[m].is_local)
                    .min_by_key(|&m| {
                        let speed = self.machines[m].speed.max(1.0) as u32;
                        (self.load[m] / speed, std::cmp::Reverse(speed), self.load[m])
                    });
                remote.or_else(|| candidates.into_iter().find(|&m| self.machines[m].is_local))
            }
            QueueKind::Hydra => candidates.min_by(|&a, &b| {
                let la = f64::from(self.load[a]) / self.machines[a].speed.max(1e-9);
                let lb = f64::from(self.load[b]) / self.machines[b].speed.max(1e-9);
                la.total_cmp(&lb)
                    .then(self.machines[b].speed.total_cmp(&self.machines[a].speed))
            }),
        }
    }

    fn dispatch(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        if self.kind == QueueKind::NixHook {
            return self.decide_one(now);
        }
        let mut starts = Vec::new();
        let mut kept = VecDeque::with_capacity(self.ready.len());
        while let Some(node) = self.ready.pop_front() {
            if self.unbuildable(node) {
                continue;
            }
            match self.pick(node) {
                Some(m) => {
                    self.load[m] += 1;
                    starts.push((node, m));
                }
                None => kept.push_back(node),
            }
        }
        self.ready = kept;
        starts
    }

    /// Nix: one hook decision for the oldest ready derivation, if the client is free.
    fn decide_one(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        if now + 1e-12 < self.next_decision {
            return Vec::new();
        }
        let Some(node) = self.ready.pop_front() else {
            return Vec::new();
        };
        self.next_decision = now + NIX_DECISION_SECONDS;
        if self.unbuildable(node) {
            // "Failed to find a machine for remote build", then no local build either.
            return Vec::new();
        }
        match self.pick(node) {
            Some(m) => {
                self.load[m] += 1;
                vec![(node, m)]
            }
            None => {
                // The hook postpones it; the worker retries at its next poll.
                if self.postponed.is_empty() {
                    self.last_woken = Some(now);
                }
                self.postponed.push(node);
                Vec::new()
            }
        }
    }
}

impl Policy for QueuePolicy {
    fn name(&self) -> &'static str {
        match self.kind {
            QueueKind::NixHook => "nix",
            QueueKind::Hydra => "hydra",
        }
    }

    fn costs(&self) -> Costs {
        self.costs
    }

    fn copies_outputs_back(&self) -> bool {
        true
    }

    fn start(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        self.dispatch(now)
    }

    fn next_wakeup(&self) -> Option<f64> {
        if self.kind != QueueKind::NixHook {
            return None;
        }
        let poll = (!self.postponed.is_empty())
            .then(|| self.last_woken.map(|t| t + NIX_POLL_INTERVAL))
            .flatten();
        let decision = (!self.ready.is_empty()).then_some(self.next_decision);
        [poll, decision].into_iter().flatten().reduce(f64::min)
    }

    fn wake(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        if self
            .last_woken
            .is_some_and(|t| t + NIX_POLL_INTERVAL <= now + 1e-12)
        {
            self.last_woken = Some(now);
            for node in std::mem::take(&mut self.postponed) {
                self.ready.push_back(node);
            }
        }
        self.dispatch(now)
    }

    fn finished(&mut self, node: NodeId, machine: MachineId, now: f64) -> Vec<(NodeId, MachineId)> {
        self.load[machine] = self.load[machine].saturating_sub(1);
        for i in 0..self.graph.dependents(node).len() {
            let d = self.graph.dependents(node)[i];
            self.waiting[d] -= 1;
            if self.waiting[d] == 0 {
                self.push_ready(d);
            }
        }
        self.dispatch(now)
    }

    fn machine_lost(
        &mut self,
        machine: MachineId,
        lost: &[NodeId],
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        self.alive[machine] = false;
        self.load[machine] = 0;
        for &node in lost {
            self.push_ready(node);
        }
        self.dispatch(now)
    }
}
