//! What a simulation found: makespan against the lower bound, utilisation, bytes per
//! link, the critical path, and a Chrome trace (`chrome://tracing`, Perfetto).

use offload_sched::{Graph, MachineId, MachineSpec};
use serde::Serialize;

/// One build in the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceEvent {
    pub name: String,
    pub machine: MachineId,
    pub start: f64,
    pub duration: f64,
}

/// The result of one simulated run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub policy: &'static str,
    pub makespan_s: f64,
    /// [`lower_bound`]: max(critical path on the fastest capable machines, per system:
    /// its work / the slot-speed of the machines that build for it).
    pub lower_bound_s: f64,
    pub ratio: f64,
    /// Busy slot-seconds over available slot-seconds.
    pub utilisation: f64,
    pub built: usize,
    pub nodes: usize,
    /// Bytes moved between the client and each machine.
    pub bytes_per_link: Vec<(String, u64)>,
    /// Bytes moved by route, for fleets with pair links or a delivery target (`None`
    /// for others, and left out of the JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_by_route: Option<RouteBytes>,
    /// Keys of the nodes on the duration-weighted critical path, first to last.
    pub critical_path: Vec<String>,
    #[serde(skip)]
    pub trace: Vec<TraceEvent>,
    #[serde(skip)]
    machine_names: Vec<String>,
}

/// The bytes a run moved, by route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RouteBytes {
    /// Over the links between the client and each machine (the target's included): a
    /// relayed copy counts on both machines' links.
    pub client_links: u64,
    /// Straight from one builder to another, over pair links.
    pub builder_to_builder: u64,
    /// To the delivery target, by any route.
    pub to_target: u64,
}

/// The lower bound of any schedule of `graph` on `machines`
/// ([`offload_sched::lower_bound`], the one `offload build` measures runs against).
pub use offload_sched::lower_bound;

/// Derivations no machine with slots can build, and those that depend on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unbuildable {
    /// Derivations no machine with slots can build.
    pub direct: usize,
    /// Derivations that depend on them.
    pub dependents: usize,
    /// What they need: `system`, or `system with feature, …`, each once.
    pub missing: Vec<String>,
}

/// What of `graph` no machine of `machines` with slots can build; None when all can be.
pub fn unbuildable(graph: &Graph, machines: &[MachineSpec]) -> Option<Unbuildable> {
    let mut missing: Vec<String> = Vec::new();
    let mut blocked = vec![false; graph.len()];
    let mut direct = 0;
    for &id in graph.topo_order() {
        let node = graph.node(id);
        if !machines.iter().any(|m| m.slots > 0 && m.can_build(node)) {
            direct += 1;
            blocked[id] = true;
            let what = if node.required_features.is_empty() {
                node.system.clone()
            } else {
                format!("{} with {}", node.system, node.required_features.join(", "))
            };
            if !missing.contains(&what) {
                missing.push(what);
            }
        } else if node.deps.iter().any(|&d| blocked[d]) {
            blocked[id] = true;
        }
    }
    (direct > 0).then(|| Unbuildable {
        direct,
        dependents: blocked.iter().filter(|&&b| b).count() - direct,
        missing,
    })
}

/// Chrome trace-event JSON (`chrome://tracing`, Perfetto): one process per machine,
/// one complete event per build. `offload build --trace` writes real runs the same way.
pub fn chrome_trace(machine_names: &[String], builds: &[TraceEvent]) -> serde_json::Value {
    let mut events: Vec<serde_json::Value> = machine_names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            serde_json::json!({"name": "process_name", "ph": "M", "pid": i, "args": {"name": name}})
        })
        .collect();
    for e in builds {
        events.push(serde_json::json!({
            "name": e.name, "ph": "X", "pid": e.machine, "tid": 0,
            "ts": (e.start * 1e6).round(), "dur": (e.duration * 1e6).round(),
        }));
    }
    serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}

impl Report {
    #[expect(
        clippy::too_many_arguments,
        reason = "one constructor for the engine's totals"
    )]
    pub(crate) fn new(
        policy: &'static str,
        graph: &Graph,
        machines: &[MachineSpec],
        makespan: f64,
        built: usize,
        busy: Vec<f64>,
        link_bytes: Vec<u64>,
        trace: Vec<TraceEvent>,
    ) -> Report {
        let lb = lower_bound(graph, machines);
        let slot_seconds: f64 = machines.iter().map(|m| f64::from(m.slots)).sum::<f64>() * makespan;
        // Walk the critical path from the highest-ranked node along the highest-ranked
        // dependents.
        let mut critical_path = Vec::new();
        let mut cur = (0..graph.len()).max_by(|a, b| graph.rank(*a).total_cmp(&graph.rank(*b)));
        while let Some(id) = cur {
            critical_path.push(graph.node(id).key.clone());
            cur = graph
                .dependents(id)
                .iter()
                .copied()
                .max_by(|a, b| graph.rank(*a).total_cmp(&graph.rank(*b)));
        }
        Report {
            policy,
            makespan_s: makespan,
            lower_bound_s: lb,
            ratio: if lb > 0.0 { makespan / lb } else { 0.0 },
            utilisation: if slot_seconds > 0.0 {
                busy.iter().sum::<f64>() / slot_seconds
            } else {
                0.0
            },
            built,
            nodes: graph.len(),
            bytes_per_link: machines
                .iter()
                .zip(link_bytes)
                .filter(|(m, _)| !m.is_local)
                .map(|(m, b)| (m.name.clone(), b))
                .collect(),
            bytes_by_route: None,
            critical_path,
            trace,
            machine_names: machines.iter().map(|m| m.name.clone()).collect(),
        }
    }

    /// The `n` links that carried the most bytes (by name when alike), of those that
    /// carried any.
    pub fn busiest_links(&self, n: usize) -> Vec<(String, u64)> {
        let mut links = self.bytes_per_link.clone();
        links.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        links.into_iter().take(n).filter(|(_, b)| *b > 0).collect()
    }

    /// The trace in Chrome's trace-event JSON: one process per machine, one complete
    /// event (`"ph":"X"`) per build, times in microseconds.
    pub fn chrome_trace(&self) -> serde_json::Value {
        chrome_trace(&self.machine_names, &self.trace)
    }
}
