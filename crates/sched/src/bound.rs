//! The lower bound of a run: no schedule of a graph on a fleet ends sooner, whatever
//! the order and placement, transfers and per-build costs counted as free. `offload
//! build`'s summary and report and `offload simulate` measure a run against this one
//! bound.

use std::collections::HashMap;

use crate::{Graph, MachineSpec};

/// The lower bound of any schedule of `graph` on `machines`: the larger of
/// - the longest path, each node on the fastest machine with slots that can build it,
/// - for each system, the work of its nodes over the slot-speed of the machines that
///   build for it (every machine builds `builtin`).
///
/// A node no machine can build is never built: it takes no time, and a system no
/// machine builds adds nothing.
pub fn lower_bound(graph: &Graph, machines: &[MachineSpec]) -> f64 {
    critical_path_on_fastest(graph, machines).max(work_over_capacity(graph, machines))
}

/// The longest path of `graph`, each node at the speed of the fastest machine with
/// slots that can build it.
fn critical_path_on_fastest(graph: &Graph, machines: &[MachineSpec]) -> f64 {
    // Fastest capable speed per (system, features), computed once per distinct pair.
    let mut fastest: HashMap<(&str, &[String]), f64> = HashMap::new();
    let mut seconds = vec![0.0f64; graph.len()];
    for &id in graph.topo_order() {
        let node = graph.node(id);
        let speed = *fastest
            .entry((node.system.as_str(), node.required_features.as_slice()))
            .or_insert_with(|| {
                machines
                    .iter()
                    .filter(|m| m.slots > 0 && m.can_build(node))
                    .map(|m| m.speed)
                    .fold(0.0, f64::max)
            });
        let start = node.deps.iter().map(|&d| seconds[d]).fold(0.0, f64::max);
        seconds[id] = start
            + if speed > 0.0 {
                node.duration.max(0.0) / speed
            } else {
                0.0
            };
    }
    seconds.iter().copied().fold(0.0, f64::max)
}

/// Per system, the work of `graph`'s nodes for it over the slot-speed of the machines
/// that build for it; the largest.
fn work_over_capacity(graph: &Graph, machines: &[MachineSpec]) -> f64 {
    let mut work: HashMap<&str, f64> = HashMap::new();
    for node in graph.nodes() {
        *work.entry(node.system.as_str()).or_default() += node.duration.max(0.0);
    }
    work.into_iter()
        .map(|(system, work)| {
            let capacity: f64 = machines
                .iter()
                .filter(|m| system == "builtin" || m.systems.iter().any(|s| s == system))
                .map(|m| f64::from(m.slots) * m.speed)
                .sum();
            if capacity > 0.0 {
                work / capacity
            } else {
                0.0
            }
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeSpec;

    const SYS: &str = "x86_64-linux";

    #[test]
    fn the_bound_is_the_longer_of_the_path_and_the_work_per_system() {
        // A chain of 2 + 3 seconds, and four 2-second builds beside it.
        let mut nodes = vec![
            NodeSpec::new("a", SYS, vec![], 2.0),
            NodeSpec::new("b", SYS, vec![0], 3.0),
        ];
        for i in 0..4 {
            nodes.push(NodeSpec::new(format!("w{i}"), SYS, vec![], 2.0));
        }
        let graph = Graph::new(nodes).unwrap();
        // One slot at speed 2: 13 s of work take 6.5 s; the path 2.5 s.
        let one = [MachineSpec::new("m", SYS, 1, 2.0)];
        assert!((lower_bound(&graph, &one) - 6.5).abs() < 1e-9);
        // Eight slots: the path, on the fastest machine that builds it.
        let wide = [
            MachineSpec::new("m", SYS, 4, 2.0),
            MachineSpec::new("n", SYS, 4, 1.0),
        ];
        assert!((lower_bound(&graph, &wide) - 2.5).abs() < 1e-9);
        // A system nobody builds adds nothing; no machine at all, nothing.
        let other = [MachineSpec::new("m", "aarch64-linux", 4, 1.0)];
        assert_eq!(lower_bound(&graph, &other), 0.0);
        assert_eq!(lower_bound(&graph, &[]), 0.0);
    }
}
