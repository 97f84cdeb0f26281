//! Which machines hold each node's outputs, kept so that routing one input costs the
//! same whether two machines hold it or ten thousand: the holders sorted (is the target
//! one of them: a binary search), whether the client's store is one of them, and the
//! holder whose own link sends the outputs quickest (the source of a relay), kept up to
//! date as holders come and go rather than looked for at every decision.

use std::ops::Index;

use crate::fleet::{MachineId, MachineSpec};
use crate::graph::{Graph, NodeId};
use crate::transfers::{route_from, HeldBy, Route};

/// Each node's holders with what routing asks of them: who they are, whether a
/// local machine is one, and which relays quickest.
#[derive(Debug, Clone)]
pub struct Holding {
    /// Per node, the machines holding its outputs, in index order.
    machines: Vec<Vec<MachineId>>,
    /// Per node, whether a local machine holds it, and the holder whose link is
    /// quickest for its outputs' size (the lower index at a tie).
    local: Vec<bool>,
    nearest: Vec<Option<MachineId>>,
    /// Per node held by more than [`DENSE`] machines, its holders as a bit set (an
    /// index into `sets`): is a machine one of them costs one look, not a search of
    /// thousands. Few nodes have that many holders (each copy has a build needing it).
    dense: Vec<u32>,
    sets: Vec<Vec<u64>>,
}

/// Holders past which a node's are also kept as a bit set.
const DENSE: usize = 64;

/// No bit set for this node.
const SPARSE: u32 = u32::MAX;

impl Index<NodeId> for Holding {
    type Output = [MachineId];

    fn index(&self, node: NodeId) -> &[MachineId] {
        &self.machines[node]
    }
}

impl Holding {
    pub fn new(nodes: usize) -> Holding {
        Holding {
            machines: vec![Vec::new(); nodes],
            local: vec![false; nodes],
            nearest: vec![None; nodes],
            dense: vec![SPARSE; nodes],
            sets: Vec::new(),
        }
    }

    pub fn contains(&self, node: NodeId, machine: MachineId) -> bool {
        match self.dense[node] {
            SPARSE => self.machines[node].binary_search(&machine).is_ok(),
            set => self.sets[set as usize]
                .get(machine / 64)
                .is_some_and(|w| w & (1 << (machine % 64)) != 0),
        }
    }

    /// Keeps the bit set of `node` in step with its holders (made once they are many).
    fn mark(&mut self, node: NodeId, machine: MachineId, held: bool) {
        if self.dense[node] == SPARSE {
            if self.machines[node].len() <= DENSE {
                return;
            }
            self.dense[node] = self.sets.len() as u32;
            self.sets.push(Vec::new());
            for i in 0..self.machines[node].len() {
                let m = self.machines[node][i];
                self.mark(node, m, true);
            }
            return;
        }
        let set = &mut self.sets[self.dense[node] as usize];
        if set.len() <= machine / 64 {
            set.resize(machine / 64 + 1, 0);
        }
        if held {
            set[machine / 64] |= 1 << (machine % 64);
        } else {
            set[machine / 64] &= !(1 << (machine % 64));
        }
    }

    /// `machine` holds the outputs of `node` (of `bytes`) too.
    pub fn add(&mut self, machines: &[MachineSpec], node: NodeId, machine: MachineId, bytes: u64) {
        let held = &mut self.machines[node];
        let Err(at) = held.binary_search(&machine) else {
            return;
        };
        held.insert(at, machine);
        self.mark(node, machine, true);
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
    pub fn set_only(&mut self, machines: &[MachineSpec], node: NodeId, machine: MachineId) {
        for i in 0..self.machines[node].len() {
            let m = self.machines[node][i];
            self.mark(node, m, false);
        }
        self.machines[node] = vec![machine];
        self.mark(node, machine, true);
        self.local[node] = machines[machine].is_local;
        self.nearest[node] = Some(machine);
    }

    /// `machine` holds nothing any more (it was lost).
    pub fn drop_machine(&mut self, machines: &[MachineSpec], graph: &Graph, machine: MachineId) {
        for node in 0..self.machines.len() {
            if let Ok(at) = self.machines[node].binary_search(&machine) {
                self.machines[node].remove(at);
                self.mark(node, machine, false);
                self.refresh(machines, node, graph.node(node).output_bytes);
            }
        }
    }

    /// Works out again what routing asks of the holders of `node`, whose outputs are
    /// of `bytes` (after their size or the machines' links changed).
    pub fn refresh(&mut self, machines: &[MachineSpec], node: NodeId, bytes: u64) {
        let held = &self.machines[node];
        self.local[node] = held.iter().any(|&h| machines[h].is_local);
        self.nearest[node] = nearest_holder(machines, held, bytes);
    }

    /// [`Holding::refresh`] of every node.
    pub fn refresh_all(&mut self, machines: &[MachineSpec], graph: &Graph) {
        for node in 0..self.machines.len() {
            self.refresh(machines, node, graph.node(node).output_bytes);
        }
    }

    /// The route of the outputs of `node` (of `bytes`) to `target`, as
    /// [`crate::route_in`] gives it; `at_client`: the client's store has them too.
    #[expect(clippy::too_many_arguments, reason = "route_in's arguments")]
    pub fn route(
        &self,
        machines: &[MachineSpec],
        pairs: bool,
        node: NodeId,
        at_client: bool,
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
        route_from(machines, pairs, &held, at_client, target, consumers, bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeSpec;

    #[test]
    fn holders_many_or_few_answer_alike() {
        let machines: Vec<MachineSpec> = (0..300)
            .map(|i| MachineSpec {
                bandwidth: 1e6 * f64::from(1 + i % 7),
                ..MachineSpec::new(format!("m{i}"), "x86_64-linux", 1, 1.0)
            })
            .collect();
        let graph = Graph::new(vec![NodeSpec::new("a", "x86_64-linux", vec![], 1.0)]).unwrap();
        let mut holding = Holding::new(1);
        let mut plain: Vec<MachineId> = Vec::new();
        let check = |holding: &Holding, plain: &[MachineId]| {
            for m in 0..machines.len() {
                assert_eq!(holding.contains(0, m), plain.contains(&m), "machine {m}");
            }
            assert_eq!(&holding[0], plain);
            let nearest = nearest_holder(&machines, plain, 1 << 20);
            assert_eq!(holding.nearest[0], nearest);
        };
        // Past the bit set's threshold and back, machines lost and the node built again.
        for m in (0..200).rev().step_by(3) {
            holding.add(&machines, 0, m, 1 << 20);
            plain.push(m);
            plain.sort_unstable();
            check(&holding, &plain);
        }
        for m in [3, 198, 60, 1000] {
            holding.drop_machine(&machines, &graph, m);
            plain.retain(|&h| h != m);
            check(&holding, &plain);
        }
        holding.set_only(&machines, 0, 250);
        check(&holding, &[250]);
        holding.add(&machines, 0, 7, 1 << 20);
        check(&holding, &[7, 250]);
    }
}
