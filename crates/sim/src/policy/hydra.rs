//! A model of Hydra's queue runner: runnable steps by their number of dependents (its
//! priorities fold into that here), then age; each to the machine, the local one
//! included, with a free slot and the lowest `load / speedFactor` as a real number;
//! every input from the client and every output back to it.

use std::collections::VecDeque;

use offload_sched::{Graph, MachineId, MachineSpec, NodeId};

use crate::engine::{Costs, Policy};

/// Hydra's queue runner.
pub struct HydraPolicy {
    graph: Graph,
    machines: Vec<MachineSpec>,
    alive: Vec<bool>,
    load: Vec<u32>,
    waiting: Vec<usize>,
    ready: VecDeque<NodeId>,
    /// Hydra's priority: how many derivations depend on each, transitively.
    dependents: Vec<usize>,
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
        let m = machines.len();
        let mut policy = HydraPolicy {
            graph,
            alive: vec![true; m],
            load: vec![0; m],
            machines,
            waiting,
            ready: VecDeque::new(),
            dependents,
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
        let key = |p: &HydraPolicy, x: NodeId| (std::cmp::Reverse(p.dependents[x]), x);
        let pos = self
            .ready
            .iter()
            .position(|&other| key(self, other) > key(self, id))
            .unwrap_or(self.ready.len());
        self.ready.insert(pos, id);
    }

    /// No machine left can ever build it: Hydra fails such a step.
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
        (0..self.machines.len())
            .filter(|&m| self.free(m) && self.machines[m].can_build(spec))
            .min_by(|&a, &b| {
                let la = f64::from(self.load[a]) / self.machines[a].speed.max(1e-9);
                let lb = f64::from(self.load[b]) / self.machines[b].speed.max(1e-9);
                la.total_cmp(&lb)
                    .then(self.machines[b].speed.total_cmp(&self.machines[a].speed))
            })
    }

    fn dispatch(&mut self) -> Vec<(NodeId, MachineId)> {
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
        self.load[machine] = self.load[machine].saturating_sub(1);
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
        self.alive[machine] = false;
        self.load[machine] = 0;
        for &node in lost {
            self.push_ready(node);
        }
        self.dispatch()
    }
}
