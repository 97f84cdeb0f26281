//! The build graph: derivations to build, their dependencies, and each one's priority,
//! the duration-weighted critical path from it to a requested output.

use std::collections::HashMap;

use thiserror::Error;

/// Index of a node in its [`Graph`].
pub type NodeId = usize;

/// One derivation to build, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// What messages call it (the `.drv` path).
    pub key: String,
    /// Nix system it needs (`x86_64-linux`, `aarch64-linux`, `builtin`).
    pub system: String,
    /// `requiredSystemFeatures`.
    pub required_features: Vec<String>,
    /// Nodes whose outputs it needs; each must appear before it is built.
    pub deps: Vec<NodeId>,
    /// Estimated seconds on a machine of speed factor 1.
    pub duration: f64,
    /// Estimated bytes of its outputs (NAR size), for transfer costs.
    pub output_bytes: u64,
    /// `preferLocalBuild`: build on the local machine when it can.
    pub prefer_local: bool,
}

impl NodeSpec {
    /// A derivation for `system` with these dependencies and estimated seconds, with no
    /// required features, no output size and no `preferLocalBuild`; set the other
    /// fields as needed.
    pub fn new(key: impl Into<String>, system: &str, deps: Vec<NodeId>, duration: f64) -> NodeSpec {
        NodeSpec {
            key: key.into(),
            system: system.to_string(),
            required_features: Vec::new(),
            deps,
            duration,
            output_bytes: 0,
            prefer_local: false,
        }
    }
}

/// A graph that is not a DAG, or refers to nodes it does not have.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GraphError {
    #[error("{node} depends on node #{dep}, which is not in the graph")]
    UnknownDep { node: String, dep: NodeId },
    #[error("the graph has a dependency cycle through {node}")]
    Cycle { node: String },
}

/// A checked DAG with its reverse edges and priorities.
#[derive(Debug, Clone)]
pub struct Graph {
    nodes: Vec<NodeSpec>,
    dependents: Vec<Vec<NodeId>>,
    /// Dependencies first.
    topo: Vec<NodeId>,
    /// Estimated seconds from the start of a node to the end of the longest path through
    /// its dependents (its own duration included).
    rank: Vec<f64>,
}

impl Graph {
    /// Checks `nodes` and computes priorities.
    pub fn new(nodes: Vec<NodeSpec>) -> Result<Graph, GraphError> {
        let n = nodes.len();
        let mut dependents = vec![Vec::new(); n];
        let mut waiting = vec![0usize; n];
        for (id, node) in nodes.iter().enumerate() {
            for &dep in &node.deps {
                if dep >= n {
                    return Err(GraphError::UnknownDep {
                        node: node.key.clone(),
                        dep,
                    });
                }
                dependents[dep].push(id);
                waiting[id] += 1;
            }
        }
        // Kahn's algorithm; what is left over sits on a cycle.
        let mut topo: Vec<NodeId> = (0..n).filter(|&i| waiting[i] == 0).collect();
        let mut head = 0;
        while head < topo.len() {
            let id = topo[head];
            head += 1;
            for &d in &dependents[id] {
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    topo.push(d);
                }
            }
        }
        if topo.len() != n {
            let stuck = (0..n).find(|&i| waiting[i] > 0).unwrap_or(0);
            return Err(GraphError::Cycle {
                node: nodes[stuck].key.clone(),
            });
        }
        let mut rank = vec![0.0; n];
        for &id in topo.iter().rev() {
            let tail = dependents[id]
                .iter()
                .map(|&d| rank[d])
                .fold(0.0f64, f64::max);
            rank[id] = nodes[id].duration.max(0.0) + tail;
        }
        Ok(Graph {
            nodes,
            dependents,
            topo,
            rank,
        })
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, id: NodeId) -> &NodeSpec {
        &self.nodes[id]
    }

    /// Sets the bytes of a node's outputs (their ranks do not depend on them).
    pub(crate) fn set_output_bytes(&mut self, id: NodeId, bytes: u64) {
        self.nodes[id].output_bytes = bytes;
    }

    pub fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }

    pub fn dependents(&self, id: NodeId) -> &[NodeId] {
        &self.dependents[id]
    }

    /// Node ids, dependencies before dependents.
    pub fn topo_order(&self) -> &[NodeId] {
        &self.topo
    }

    /// The priority of a node: its duration plus the longest estimated path after it.
    pub fn rank(&self, id: NodeId) -> f64 {
        self.rank[id]
    }

    /// The duration-weighted critical path of the whole graph, in seconds at speed 1.
    pub fn critical_path(&self) -> f64 {
        self.rank.iter().copied().fold(0.0, f64::max)
    }

    /// Total estimated work, in seconds at speed 1.
    pub fn total_work(&self) -> f64 {
        self.nodes.iter().map(|n| n.duration.max(0.0)).sum()
    }

    /// Groups nodes that the same machines can build: same system and required
    /// features, and with `by_prefer_local` the same `preferLocalBuild`. Returns each
    /// node's group and one node of each group.
    pub fn requirement_groups(&self, by_prefer_local: bool) -> (Vec<usize>, Vec<NodeId>) {
        let mut index: HashMap<(&str, Vec<&str>, bool), usize> = HashMap::new();
        let mut examples = Vec::new();
        let group_of = self
            .nodes
            .iter()
            .enumerate()
            .map(|(id, node)| {
                let mut features: Vec<&str> =
                    node.required_features.iter().map(String::as_str).collect();
                features.sort_unstable();
                features.dedup();
                let key = (
                    node.system.as_str(),
                    features,
                    by_prefer_local && node.prefer_local,
                );
                *index.entry(key).or_insert_with(|| {
                    examples.push(id);
                    examples.len() - 1
                })
            })
            .collect();
        (group_of, examples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(key: &str, deps: &[NodeId], duration: f64) -> NodeSpec {
        NodeSpec::new(key, "x86_64-linux", deps.to_vec(), duration)
    }

    #[test]
    fn ranks_follow_the_longest_path() {
        // a(1) -> b(5) -> d(1); a -> c(2) -> d
        let g = Graph::new(vec![
            node("a", &[], 1.0),
            node("b", &[0], 5.0),
            node("c", &[0], 2.0),
            node("d", &[1, 2], 1.0),
        ])
        .unwrap();
        assert_eq!(g.rank(3), 1.0);
        assert_eq!(g.rank(1), 6.0);
        assert_eq!(g.rank(2), 3.0);
        assert_eq!(g.rank(0), 7.0);
        assert_eq!(g.critical_path(), 7.0);
        assert_eq!(g.total_work(), 9.0);
        assert_eq!(g.topo_order()[0], 0);
    }

    #[test]
    fn requirement_groups_ignore_feature_order() {
        let with = |system: &str, features: &[&str], prefer_local: bool| NodeSpec {
            system: system.into(),
            required_features: features.iter().map(|f| f.to_string()).collect(),
            prefer_local,
            ..node("n", &[], 1.0)
        };
        let g = Graph::new(vec![
            with("x86_64-linux", &["kvm", "big-parallel"], false),
            with("x86_64-linux", &["big-parallel", "kvm"], true),
            with("aarch64-linux", &[], false),
            with("x86_64-linux", &["big-parallel", "kvm"], false),
        ])
        .unwrap();
        assert_eq!(g.requirement_groups(false), (vec![0, 0, 1, 0], vec![0, 2]));
        assert_eq!(
            g.requirement_groups(true),
            (vec![0, 1, 2, 0], vec![0, 1, 2])
        );
    }

    #[test]
    fn cycles_and_dangling_deps_are_refused() {
        let err = Graph::new(vec![node("a", &[1], 1.0), node("b", &[0], 1.0)]).unwrap_err();
        assert!(matches!(err, GraphError::Cycle { .. }));
        let err = Graph::new(vec![node("a", &[7], 1.0)]).unwrap_err();
        assert_eq!(
            err,
            GraphError::UnknownDep {
                node: "a".into(),
                dep: 7
            }
        );
    }
}
