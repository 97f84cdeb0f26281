//! Where the requested outputs go when they do not come home: a delivery target
//! (`offload build --to STORE`), and which outputs go there: as the driver delivers,
//! each requested output as soon as it is built, with what of its closure the target
//! lacks.

use offload_sched::{Graph, MachineId, NodeId};

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

/// Each node's place in `graph`'s topological order.
pub(crate) fn topo_positions(graph: &Graph) -> Vec<usize> {
    let mut pos = vec![0; graph.len()];
    for (i, &id) in graph.topo_order().iter().enumerate() {
        pos[id] = i;
    }
    pos
}

/// What goes to the target when the requested output `root` is built: `root`, and with
/// `closure` every node it was built from, dependencies first (`topo_pos`:
/// [`topo_positions`]).
pub(crate) fn closure_of(
    graph: &Graph,
    root: NodeId,
    closure: bool,
    topo_pos: &[usize],
) -> Vec<NodeId> {
    let mut nodes = vec![root];
    if closure {
        let mut seen = std::collections::HashSet::from([root]);
        let mut i = 0;
        while i < nodes.len() {
            for &d in &graph.node(nodes[i]).deps {
                if seen.insert(d) {
                    nodes.push(d);
                }
            }
            i += 1;
        }
    }
    nodes.sort_unstable_by_key(|&n| topo_pos[n]);
    nodes
}
