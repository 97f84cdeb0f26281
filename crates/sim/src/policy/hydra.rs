//! A model of Hydra's queue runner: runnable steps by their number of dependents (its
//! priorities fold into that here), then age; each to the machine, the local one
//! included, with a free slot and the lowest `load / speedFactor` as a real number;
//! every input from the client and every output back to it.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use offload_sched::{Graph, MachineId, MachineSpec, NodeId};

use super::Kinds;
use crate::engine::{Costs, Policy};

/// Hydra's queue runner.
pub struct HydraPolicy {
    graph: Graph,
    machines: Vec<MachineSpec>,
    alive: Vec<bool>,
    load: Vec<u32>,
    waiting: Vec<usize>,
    /// Runnable steps per kind, by priority: most dependents first, then oldest.
    ready: Vec<BTreeSet<(Reverse<usize>, NodeId)>>,
    /// Hydra's priority: how many derivations depend on each, transitively.
    dependents: Vec<usize>,
    kinds: Kinds,
    costs: Costs,
}

impl HydraPolicy {
    pub fn new(graph: Graph, machines: Vec<MachineSpec>, costs: Costs) -> Self {
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
        let kinds = Kinds::new(&graph, &machines, |m| m.slots > 0);
        let m = machines.len();
        let mut policy = HydraPolicy {
            graph,
            alive: vec![true; m],
            load: vec![0; m],
            machines,
            waiting,
            ready: vec![BTreeSet::new(); kinds.machines.len()],
            dependents,
            kinds,
            costs,
        };
        for id in 0..n {
            if policy.waiting[id] == 0 {
                policy.push_ready(id);
            }
        }
        policy
    }

    fn push_ready(&mut self, id: NodeId) {
        let kind = self.kinds.of(id);
        // A step no live machine can build fails, as in Hydra.
        if self.kinds.machines[kind].iter().any(|&m| self.alive[m]) {
            self.ready[kind].insert((Reverse(self.dependents[id]), id));
        }
    }

    /// The machine with a free slot and the lowest load over speed, the faster at a tie.
    fn pick(&self, kind: usize) -> Option<MachineId> {
        self.kinds.machines[kind]
            .iter()
            .copied()
            .filter(|&m| self.alive[m] && self.load[m] < self.machines[m].slots)
            .min_by(|&a, &b| {
                let la = f64::from(self.load[a]) / self.machines[a].speed.max(1e-9);
                let lb = f64::from(self.load[b]) / self.machines[b].speed.max(1e-9);
                la.total_cmp(&lb)
                    .then(self.machines[b].speed.total_cmp(&self.machines[a].speed))
            })
    }

    /// Starts runnable steps in priority order while some machine can take them.
    fn dispatch(&mut self) -> Vec<(NodeId, MachineId)> {
        let mut starts = Vec::new();
        loop {
            let best = (0..self.ready.len())
                .filter(|&k| self.kinds.free[k] > 0)
                .filter_map(|k| self.ready[k].first().map(|&key| (key, k)))
                .min();
            let Some((key, kind)) = best else { break };
            let Some(m) = self.pick(kind) else { break };
            self.ready[kind].remove(&key);
            self.load[m] += 1;
            self.kinds.take(m, 1);
            starts.push((key.1, m));
        }
        starts
    }
}

impl Policy for HydraPolicy {
    fn name(&self) -> &'static str {
        "hydra"
    }

    fn costs(&self) -> Costs {
        self.costs
    }

    fn copies_outputs_back(&self) -> bool {
        true
    }

    fn start(&mut self, _now: f64) -> Vec<(NodeId, MachineId)> {
        self.dispatch()
    }

    fn finished(
        &mut self,
        node: NodeId,
        machine: MachineId,
        _now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        if self.alive[machine] && self.load[machine] > 0 {
            self.load[machine] -= 1;
            self.kinds.take(machine, -1);
        }
        for i in 0..self.graph.dependents(node).len() {
            let d = self.graph.dependents(node)[i];
            self.waiting[d] -= 1;
            if self.waiting[d] == 0 {
                self.push_ready(d);
            }
        }
        self.dispatch()
    }

    fn machine_lost(
        &mut self,
        machine: MachineId,
        lost: &[NodeId],
        _now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        if self.alive[machine] {
            let slots = self.machines[machine].slots;
            self.kinds
                .lose(machine, slots, slots.saturating_sub(self.load[machine]));
            self.alive[machine] = false;
        }
        self.load[machine] = 0;
        // Steps that no live machine can build any more fail.
        for k in 0..self.ready.len() {
            if !self.kinds.machines[k].iter().any(|&m| self.alive[m]) {
                self.ready[k].clear();
            }
        }
        for &node in lost {
            self.push_ready(node);
        }
        self.dispatch()
    }
}
