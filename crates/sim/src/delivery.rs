//! Where the requested outputs go when they do not come home: a delivery target
//! (`offload build --to STORE`), and which outputs go there.

use offload_sched::{Graph, MachineId};

/// Where the requested outputs go instead of home: a machine of the fleet that builds
/// nothing (`offload build --to STORE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub target: MachineId,
    /// Whether each requested output goes with every output it was built from (its
    /// closure, when outputs refer to their inputs as `scripts/gen-dag.py`'s do), or
    /// alone.
    pub closure: bool,
}

/// The nodes whose outputs go to a delivery target: the requested ones (the graph's
/// sinks), and with `closure` every node they were built from.
pub(crate) fn delivered_nodes(graph: &Graph, closure: bool) -> Vec<bool> {
    let mut delivered: Vec<bool> = (0..graph.len())
        .map(|i| graph.dependents(i).is_empty())
        .collect();
    if closure {
        for &id in graph.topo_order().iter().rev() {
            if delivered[id] {
                for &d in &graph.node(id).deps {
                    delivered[d] = true;
                }
            }
        }
    }
    delivered
}
