//! Build graphs for simulation: the JSON schema `offload simulate --dag` reads, and
//! generators for the shapes the benchmarks use (layered, nixpkgs-like, wide, chain).

use std::collections::HashMap;

use offload_sched::{Graph, GraphError, MachineSpec, NodeSpec};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// `{"nodes":[{"id":"n0","deps":["…"],"duration_s":1.5,"system":"x86_64-linux",
/// "required_features":[],"output_bytes":4096}]}`; `duration_s` is the time on a machine
/// of speed factor 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DagFile {
    pub nodes: Vec<DagNode>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DagNode {
    pub id: String,
    #[serde(default)]
    pub deps: Vec<String>,
    pub duration_s: f64,
    #[serde(default = "default_system")]
    pub system: String,
    #[serde(default)]
    pub required_features: Vec<String>,
    #[serde(default)]
    pub output_bytes: u64,
}

fn default_system() -> String {
    "x86_64-linux".into()
}

/// A DAG file that cannot be simulated.
#[derive(Debug, Error)]
pub enum DagError {
    #[error("node {node:?} depends on {dep:?}, which is not a node of the file")]
    UnknownDep { node: String, dep: String },
    #[error("node id {0:?} appears twice")]
    DuplicateId(String),
    #[error("node {node:?} has a negative or non-finite duration {duration}")]
    BadDuration { node: String, duration: f64 },
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("unknown shape {0:?}: use layered, nixpkgs, nixpkgs-mixed, wide or chain")]
    UnknownShape(String),
    #[error("unknown fleet shape {0:?}: use mixed")]
    UnknownFleet(String),
}

/// A `SHAPE:N[:SEED]` that says no N or no seed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShapeSpecError {
    #[error("expected SHAPE:N[:SEED], N a whole number")]
    Count,
    #[error("the seed must be a whole number")]
    Seed,
}

/// `SHAPE:N[:SEED]` (a generated graph or fleet): the shape, N and the seed, 1 when
/// not given.
pub fn shape_spec(spec: &str) -> Result<(&str, usize, u64), ShapeSpecError> {
    let mut parts = spec.split(':');
    let shape = parts.next().unwrap_or("");
    let n: usize = parts
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or(ShapeSpecError::Count)?;
    let seed: u64 = match parts.next() {
        Some(s) => s.parse().map_err(|_| ShapeSpecError::Seed)?,
        None => 1,
    };
    Ok((shape, n, seed))
}

impl DagFile {
    /// The scheduler's graph for it.
    pub fn to_graph(&self) -> Result<Graph, DagError> {
        let mut index = HashMap::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            if index.insert(n.id.as_str(), i).is_some() {
                return Err(DagError::DuplicateId(n.id.clone()));
            }
        }
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            if !n.duration_s.is_finite() || n.duration_s < 0.0 {
                return Err(DagError::BadDuration {
                    node: n.id.clone(),
                    duration: n.duration_s,
                });
            }
            let deps = n
                .deps
                .iter()
                .map(|d| {
                    index
                        .get(d.as_str())
                        .copied()
                        .ok_or_else(|| DagError::UnknownDep {
                            node: n.id.clone(),
                            dep: d.clone(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            nodes.push(NodeSpec {
                key: n.id.clone(),
                system: n.system.clone(),
                required_features: n.required_features.clone(),
                deps,
                duration: n.duration_s,
                output_bytes: n.output_bytes,
                prefer_local: false,
            });
        }
        Ok(Graph::new(nodes)?)
    }
}

/// SplitMix64: a small deterministic generator, so a seed gives the same graph anywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

fn node(id: String, duration: f64, bytes: u64, deps: Vec<usize>, all: &[DagNode]) -> DagNode {
    DagNode {
        id,
        deps: deps.into_iter().map(|d| all[d].id.clone()).collect(),
        duration_s: (duration * 100.0).round() / 100.0,
        system: default_system(),
        required_features: Vec::new(),
        output_bytes: bytes,
    }
}

/// A generated graph: `layered` (4 layers, 0.2–3 s, each node on 1–3 of the previous
/// layer), `nixpkgs` (a chain of long toolchain builds, then many short packages on its
/// upper half), `nixpkgs-mixed` (the same on x86_64-linux and aarch64-linux, 7 % needing
/// big-parallel or kvm), `wide` (independent 0.2–2 s builds), `chain` (one long line).
pub fn generate(shape: &str, n: usize, seed: u64) -> Result<DagFile, DagError> {
    let mut rng = Rng::new(seed);
    let mut nodes: Vec<DagNode> = Vec::with_capacity(n);
    match shape {
        "layered" => {
            let first = (n / 8).max(1);
            let layers = [first, n / 4, n / 4, n.saturating_sub(first + n / 4 * 2)];
            let mut prev: Vec<usize> = Vec::new();
            for (li, &count) in layers.iter().enumerate() {
                let mut cur = Vec::with_capacity(count);
                for _ in 0..count {
                    let mut deps = Vec::new();
                    if !prev.is_empty() {
                        for _ in 0..1 + rng.below(3) {
                            let d = prev[rng.below(prev.len())];
                            if !deps.contains(&d) {
                                deps.push(d);
                            }
                        }
                    }
                    let bytes = (1 + rng.below(64) as u64) * 1024;
                    let d = rng.uniform(0.2, 3.0);
                    let id = format!("l{li}-{}", nodes.len());
                    nodes.push(node(id, d, bytes, deps, &nodes));
                    cur.push(nodes.len() - 1);
                }
                prev = cur;
            }
        }
        "nixpkgs" => {
            // A toolchain of a few dozen long builds, as stdenv bootstraps are.
            let chain = (n / 10).clamp(2, 60).min(n);
            for i in 0..chain {
                let deps = if i == 0 { vec![] } else { vec![i - 1] };
                let d = rng.uniform(2.0, 4.0);
                nodes.push(node(format!("toolchain{i}"), d, 512 * 1024, deps, &nodes));
            }
            while nodes.len() < n {
                let mut deps = vec![chain / 2 + rng.below(chain - chain / 2)];
                let pkgs = nodes.len() - chain;
                if pkgs > 0 && rng.uniform(0.0, 1.0) < 0.3 {
                    let d = chain + rng.below(pkgs);
                    deps.push(d);
                }
                let d = rng.uniform(0.1, 1.0);
                let bytes = (1 + rng.below(32) as u64) * 1024;
                nodes.push(node(format!("pkg{}", nodes.len()), d, bytes, deps, &nodes));
            }
        }
        "nixpkgs-mixed" => {
            // nixpkgs-like, on two systems, some needing big-parallel or kvm.
            let base = generate("nixpkgs", n, seed)?;
            nodes = base.nodes;
            // The toolchain stays x86_64 (cross-built for the other system).
            for node in nodes.iter_mut().filter(|n| n.id.starts_with("pkg")) {
                let aarch64 = rng.uniform(0.0, 1.0) < 0.35;
                if aarch64 {
                    node.system = "aarch64-linux".into();
                }
                let f = rng.uniform(0.0, 1.0);
                if f < 0.05 {
                    node.required_features.push("big-parallel".into());
                } else if f < 0.07 && !aarch64 {
                    node.required_features.push("kvm".into());
                }
            }
        }
        "wide" => {
            for i in 0..n {
                let d = rng.uniform(0.2, 2.0);
                nodes.push(node(format!("w{i}"), d, 4096, vec![], &nodes));
            }
        }
        "chain" => {
            for i in 0..n {
                let deps = if i == 0 { vec![] } else { vec![i - 1] };
                let d = rng.uniform(0.1, 1.0);
                nodes.push(node(format!("c{i}"), d, 4096, deps, &nodes));
            }
        }
        other => return Err(DagError::UnknownShape(other.to_string())),
    }
    Ok(DagFile { nodes })
}

/// A generated fleet, `mixed:N[:SEED]`: 60 % x86_64-linux machines (4, 8 or 16 slots,
/// speed 1 to 4, one in ten with big-parallel and kvm, one in seven more with kvm),
/// 40 % aarch64-linux (4 or 8 slots, speed 1 or 2, one in eight with big-parallel).
/// Links get `bandwidth` and `latency`.
pub fn generate_fleet(
    shape: &str,
    n: usize,
    seed: u64,
    bandwidth: f64,
    latency: f64,
) -> Result<Vec<MachineSpec>, DagError> {
    if shape != "mixed" {
        return Err(DagError::UnknownFleet(shape.to_string()));
    }
    let mut rng = Rng::new(seed);
    Ok((0..n)
        .map(|i| {
            let (name, system, slots, speed, features) = if i < n * 6 / 10 {
                let features: &[&str] = if i % 10 == 0 {
                    &["big-parallel", "kvm"]
                } else if i % 7 == 0 {
                    &["kvm"]
                } else {
                    &[]
                };
                let slots = [4, 8, 16][rng.below(3)];
                let speed = 1 + rng.below(4);
                (format!("x{i}"), "x86_64-linux", slots, speed, features)
            } else {
                let features: &[&str] = if i % 8 == 0 { &["big-parallel"] } else { &[] };
                let slots = [4, 8][rng.below(2)];
                let speed = 1 + rng.below(2);
                (format!("a{i}"), "aarch64-linux", slots, speed, features)
            };
            MachineSpec {
                supported_features: features.iter().map(|f| f.to_string()).collect(),
                bandwidth,
                latency,
                ..MachineSpec::new(name, system, slots, speed as f64)
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_specs_give_a_count_and_maybe_a_seed() {
        assert_eq!(shape_spec("layered:30"), Ok(("layered", 30, 1)));
        assert_eq!(shape_spec("mixed:8:5"), Ok(("mixed", 8, 5)));
        assert_eq!(shape_spec("layered"), Err(ShapeSpecError::Count));
        assert_eq!(shape_spec("layered:x"), Err(ShapeSpecError::Count));
        assert_eq!(shape_spec("layered:3:x"), Err(ShapeSpecError::Seed));
    }

    #[test]
    fn generated_graphs_are_deterministic_dags() {
        for shape in ["layered", "nixpkgs", "wide", "chain"] {
            let a = generate(shape, 120, 7).unwrap();
            assert_eq!(a, generate(shape, 120, 7).unwrap());
            assert_eq!(a.nodes.len(), 120);
            let g = a.to_graph().unwrap();
            assert!(g.critical_path() > 0.0);
        }
        assert!(generate("star", 5, 1).is_err());
    }

    #[test]
    fn json_schema_reads_and_checks() {
        let json = r#"{"nodes":[{"id":"a","deps":[],"duration_s":1.5,"system":"x86_64-linux","required_features":[],"output_bytes":4096},
                               {"id":"b","deps":["a"],"duration_s":2}]}"#;
        let dag: DagFile = serde_json::from_str(json).unwrap();
        // A misspelt field is an error, not a silent default.
        let typo = r#"{"nodes":[{"id":"a","duration_s":1,"output_byte":5}]}"#;
        let e = serde_json::from_str::<DagFile>(typo)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `output_byte`"), "{e}");
        let g = dag.to_graph().unwrap();
        assert_eq!(g.critical_path(), 3.5);
        let bad: DagFile =
            serde_json::from_str(r#"{"nodes":[{"id":"b","deps":["zz"],"duration_s":1}]}"#).unwrap();
        assert!(matches!(bad.to_graph(), Err(DagError::UnknownDep { .. })));
    }
}
