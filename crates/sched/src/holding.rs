//! Which machines hold each node's outputs, kept so that routing one input costs the
//! same whether two machines hold it or ten thousand: the holders sorted (is the target
//! one of them: a binary search), whether the client's store is one of them, and the
//! holder whose own link sends the outputs quickest (the source of a relay), kept up to
//! date as holders come and go rather than looked for at every decision.

use std::ops::Index;

use crate::fleet::{MachineId, MachineSpec};
use crate::graph::{Graph, NodeId};
use crate::transfers::{route_from, HeldBy, Route};

/// Each node's holders with what routing asks of them ([`HeldBy`]).
#[derive(Debug, Clone)]
pub(crate) struct Holding {
    /// Per node, the machines holding its outputs, in index order.
    machines: Vec<Vec<MachineId>>,
    /// Per node, whether a local machine holds it, and the holder whose link is
    /// quickest for its outputs' size (the lower index at a tie).
    local: Vec<bool>,
    nearest: Vec<Option<MachineId>>,
}

impl Index<NodeId> for Holding {
    type Output = [MachineId];

    fn index(&self, node: NodeId) -> &[MachineId] {
        &self.machines[node]
    }
}

impl Holding {
    pub(crate) fn new(nodes: usize) -> Holding {
        Holding {
            machines: vec![Vec::new(); nodes],
            local: vec![false; nodes],
            nearest: vec![None; nodes],
        }
    }

    pub(crate) fn contains(&self, node: NodeId, machine: MachineId) -> bool {
        self.machines[node].binary_search(&machine).is_ok()
    }

    /// `machine` holds the outputs of `node` (of `bytes`) too.
    pub(crate) fn add(
        &mut self,
        machines: &[MachineSpec],
        node: NodeId,
        machine: MachineId,
        bytes: u64,
    ) {
        let held = &mut self.machines[node];
        let Err(at) = held.binary_search(&machine) else {
            return;
        };
        held.insert(at, machine);
        self.local[node] |= machines[machine].is_local;
        let quicker = match self.nearest[node] {
            None => true,
            Some(n) => {
                let (t, best) = (
                    machines[machine].transfer_time(bytes),
                    machines[n].transfer_time(bytes),
                );
                t.total_cmp(&best).then(machine.cmp(&n)).is_lt()
            }
        };
        if quicker {
            self.nearest[node] = Some(machine);
        }
    }

    /// Only `machine` holds the outputs of `node` (they were built there).
    pub(crate) fn set_only(&mut self, machines: &[MachineSpec], node: NodeId, machine: MachineId) {
        self.machines[node] = vec![machine];
        self.local[node] = machines[machine].is_local;
        self.nearest[node] = Some(machine);
    }

    /// `machine` holds nothing any more (it was lost).
    pub(crate) fn drop_machine(
        &mut self,
        machines: &[MachineSpec],
        graph: &Graph,
        machine: MachineId,
    ) {
        for node in 0..self.machines.len() {
            if let Ok(at) = self.machines[node].binary_search(&machine) {
                self.machines[node].remove(at);
                self.refresh(machines, node, graph.node(node).output_bytes);
            }
        }
    }

    /// Works out again what routing asks of the holders of `node`, whose outputs are
    /// of `bytes` (after their size or the machines' links changed).
    pub(crate) fn refresh(&mut self, machines: &[MachineSpec], node: NodeId, bytes: u64) {
        let held = &self.machines[node];
        self.local[node] = held.iter().any(|&h| machines[h].is_local);
        self.nearest[node] = nearest_holder(machines, held, bytes);
    }

    /// [`Holding::refresh`] of every node.
    pub(crate) fn refresh_all(&mut self, machines: &[MachineSpec], graph: &Graph) {
        for node in 0..self.machines.len() {
            self.refresh(machines, node, graph.node(node).output_bytes);
        }
    }

    /// The route of the outputs of `node` (of `bytes`) to `target`, as
    /// [`crate::route_in`] gives it.
    pub(crate) fn route(
        &self,
        machines: &[MachineSpec],
        pairs: bool,
        node: NodeId,
        target: MachineId,
        consumers: usize,
        bytes: u64,
    ) -> Option<Route> {
        let held = HeldBy {
            machines: &self.machines[node],
            target: self.contains(node, target),
            local: self.local[node],
            nearest: self.nearest[node],
        };
        route_from(machines, pairs, &held, false, target, consumers, bytes)
    }
}

/// The holder whose own link sends `bytes` quickest, the lower index at a tie.
pub(crate) fn nearest_holder(
    machines: &[MachineSpec],
    holders: &[MachineId],
    bytes: u64,
) -> Option<MachineId> {
    holders.iter().copied().min_by(|&a, &b| {
        machines[a]
            .transfer_time(bytes)
            .total_cmp(&machines[b].transfer_time(bytes))
            .then(a.cmp(&b))
    })
}
