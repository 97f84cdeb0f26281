//! The policies a simulation can run.

mod hydra;
pub mod learning;
mod nix;
mod offload;

pub use hydra::HydraPolicy;
pub use learning::LearningPolicy;
pub use nix::{NixPolicy, HOOK_CONNECT_SECONDS};
pub use offload::OffloadPolicy;

use offload_sched::{Graph, MachineId, MachineSpec, NodeId};

/// Nodes grouped by system and required features, with the machines that can build
/// each group and their free slots: a policy learns that nothing can take a node
/// without looking at every machine.
struct Kinds {
    kind_of: Vec<usize>,
    /// Machines able to build each kind, in fleet order.
    machines: Vec<Vec<MachineId>>,
    /// Slots, and free slots, of the live machines able to build each kind.
    slots: Vec<u64>,
    free: Vec<u64>,
    /// Kinds each machine can build.
    of_machine: Vec<Vec<usize>>,
}

impl Kinds {
    /// Groups `graph`'s nodes over the machines `eligible` admits.
    fn new(graph: &Graph, fleet: &[MachineSpec], eligible: impl Fn(&MachineSpec) -> bool) -> Self {
        let (kind_of, examples) = graph.requirement_groups(false);
        let machines: Vec<Vec<MachineId>> = examples
            .into_iter()
            .map(|id| {
                (0..fleet.len())
                    .filter(|&m| eligible(&fleet[m]) && fleet[m].can_build(graph.node(id)))
                    .collect()
            })
            .collect();
        let mut of_machine = vec![Vec::new(); fleet.len()];
        let mut free = vec![0u64; machines.len()];
        for (k, ms) in machines.iter().enumerate() {
            for &m in ms {
                of_machine[m].push(k);
                free[k] += u64::from(fleet[m].slots);
            }
        }
        Kinds {
            kind_of,
            machines,
            slots: free.clone(),
            free,
            of_machine,
        }
    }

    fn of(&self, node: NodeId) -> usize {
        self.kind_of[node]
    }

    fn has_free(&self, node: NodeId) -> bool {
        self.free[self.kind_of[node]] > 0
    }

    /// `machine` (with `slots`) is gone: its slots no longer count, free or not.
    fn lose(&mut self, machine: MachineId, slots: u32, free: u32) {
        for &k in &self.of_machine[machine] {
            self.slots[k] -= u64::from(slots);
            self.free[k] -= u64::from(free);
        }
    }

    /// `machine` takes (`delta` > 0) or gives back slots.
    fn take(&mut self, machine: MachineId, delta: i64) {
        for &k in &self.of_machine[machine] {
            self.free[k] = (self.free[k] as i64 - delta) as u64;
        }
    }
}
