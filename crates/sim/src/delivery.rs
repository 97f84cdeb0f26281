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
    /// Whether outputs refer to the outputs they were built from (as those of
    /// `scripts/gen-dag.py` do): each requested output then goes with its closure,
    /// and a build's inputs reach its machine with theirs (Nix registers a path only
    /// once its references are valid). Else each goes alone.
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

/// The inputs of `node` with their closures, dependencies first (`topo_pos`: each
/// node's place in the topological order).
pub(crate) fn inputs_closure(graph: &Graph, node: NodeId, topo_pos: &[usize]) -> Vec<NodeId> {
    let mut all: Vec<NodeId> = graph
        .node(node)
        .deps
        .iter()
        .flat_map(|&d| closure_of(graph, d, true, topo_pos))
        .collect();
    all.sort_unstable_by_key(|&n| topo_pos[n]);
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use offload_sched::NodeSpec;

    #[test]
    fn a_closure_comes_dependencies_first() {
        // d depends on b and c, both on a; e stands apart.
        let node =
            |key: &str, deps: &[usize]| NodeSpec::new(key, "x86_64-linux", deps.to_vec(), 1.0);
        let graph = Graph::new(vec![
            node("a", &[]),
            node("e", &[]),
            node("b", &[0]),
            node("c", &[0]),
            node("d", &[3, 2]),
        ])
        .unwrap();
        let pos = topo_positions(&graph);
        let closure = closure_of(&graph, 4, true, &pos);
        assert_eq!(closure.len(), 4);
        assert_eq!(closure[0], 0);
        assert_eq!(closure[3], 4);
        assert!(!closure.contains(&1));
        assert_eq!(closure_of(&graph, 4, false, &pos), vec![4]);
    }
}
