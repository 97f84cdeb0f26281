//! `offload simulate`: the scheduler on a simulated fleet, next to models of Nix's hook
//! and Hydra. The simulation, offload's learning during it and the fleet file's schema
//! are `offload-sim`'s; this file reads the arguments, the graph and the fleet, and
//! prints.

use std::path::Path;

use anyhow::{anyhow, Context as _};
use offload_driver::fleet::nixconf::NixSettings;
use offload_driver::fleet::{machine_names, remote_spec, DEFAULT_BANDWIDTH, DEFAULT_LATENCY};
use offload_driver::plan::{build_nodes, local_nar_sizes, read_drv_closure};
use offload_driver::StateDb;
use offload_nix::machines::parse_builders;
use offload_nix::store_path::StorePath;
use offload_sched::{Graph, MachineSpec, NodeSpec, DEFAULT_OUTPUT_BYTES};
use offload_sim::dag::{generate, generate_fleet, shape_spec, DagFile};
use offload_sim::fleet_file::{Fleet, FleetFile};
use offload_sim::report::unbuildable;
use offload_sim::scenarios::{self, Knows};
use offload_sim::Report;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::args::SimulateArgs;
use crate::copy::human_bytes;
use crate::Failure;

/// `path`'s JSON, as `schema` says (named in the error, beside serde's line and column,
/// when it is not).
fn read_json<T: DeserializeOwned>(path: &Path, schema: &str) -> Result<T, Failure> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))
        .map_err(Failure::usage)?;
    serde_json::from_str(&text)
        .with_context(|| {
            format!(
                "{} is not JSON of the {schema} schema (see --help)",
                path.display()
            )
        })
        .map_err(Failure::usage)
}

/// `SHAPE:N[:SEED]` of `flag`.
fn shape<'a>(flag: &str, spec: &'a str) -> Result<(&'a str, usize, u64), Failure> {
    shape_spec(spec).map_err(|e| Failure::usage(anyhow!("{flag} {spec}: {e}")))
}

async fn graph(args: &SimulateArgs) -> Result<Graph, Failure> {
    if let Some(path) = &args.dag {
        let dag: DagFile = read_json(path, "graph")?;
        return dag
            .to_graph()
            .with_context(|| format!("{}", path.display()))
            .map_err(Failure::usage);
    }
    if let Some(spec) = &args.generate {
        let (shape, n, seed) = shape("--generate", spec)?;
        return generate(shape, n, seed)
            .and_then(|d| d.to_graph())
            .map_err(|e| Failure::usage(anyhow!("--generate {spec}: {e}")));
    }
    if let Some(drv) = &args.from_drv {
        return drv_graph(drv, args.history.as_deref()).await;
    }
    Err(Failure::usage(anyhow!(
        "give the graph: --dag FILE, --generate SHAPE:N[:SEED] or --from-drv DRV"
    )))
}

/// The closure of `drv` in the local store, estimated from the state at `history`;
/// outputs sized as the local store has them (built before), else as learned.
async fn drv_graph(drv: &str, history: Option<&Path>) -> Result<Graph, Failure> {
    let root = StorePath::from_absolute_path(drv).map_err(Failure::usage)?;
    let drvs =
        read_drv_closure(Path::new("/"), std::slice::from_ref(&root)).map_err(Failure::usage)?;
    let history =
        StateDb::open(&history.map_or_else(offload_driver::env::state_db_path, Path::to_path_buf));
    let all: Vec<StorePath> = drvs.keys().cloned().collect();
    // Speeds are relative to this machine's system; the root's stands for it.
    let knowledge = history
        .ok()
        .and_then(|h| h.knowledge(&drvs[&root].system).ok())
        .unwrap_or_default();
    let nodes = build_nodes(&drvs, &all, &knowledge).map_err(Failure::usage)?;
    let outputs: Vec<String> = nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(|(_, p)| p.clone()))
        .collect();
    let sizes = local_nar_sizes(&outputs).await;
    let specs = nodes
        .into_iter()
        .map(|n| {
            let known: Option<u64> = n.outputs.iter().map(|(_, p)| sizes.get(p)).sum();
            NodeSpec {
                key: n.drv_path,
                system: n.system,
                required_features: n.required_features,
                deps: n.deps,
                duration: n.estimate,
                output_bytes: known.or(n.output_bytes).unwrap_or(DEFAULT_OUTPUT_BYTES),
                prefer_local: n.prefer_local,
            }
        })
        .collect();
    Graph::new(specs).map_err(Failure::usage)
}

/// The simulated fleet (as it is and as declared), with `fleet_file`'s routes and failures.
fn fleet(args: &SimulateArgs, fleet_file: Option<&Path>) -> Result<Fleet, Failure> {
    let local_system = NixSettings::load()
        .map(|s| s.system)
        .unwrap_or_else(|_| "x86_64-linux".into());
    let spec = match &args.machines {
        Some(path) => format!("@{}", path.display()),
        None => args.builders.clone(),
    };
    let parsed = parse_builders(&spec, "--builders", &local_system).map_err(Failure::usage)?;
    let extra: FleetFile = match fleet_file {
        Some(path) => read_json(path, "fleet")?,
        None => FleetFile::default(),
    };
    let mut machines = vec![MachineSpec::local(&local_system, args.local_slots)];
    let mut declared = machines.clone();
    for (m, name) in parsed.iter().zip(machine_names(&parsed)) {
        let host = m.uri.strip_prefix("ssh://").unwrap_or(&m.uri);
        let spec = remote_spec(m, name, DEFAULT_BANDWIDTH, DEFAULT_LATENCY);
        machines.push(extra.as_it_is(&spec, host).map_err(Failure::usage)?);
        declared.push(spec);
    }
    if let Some(spec) = &args.generate_fleet {
        let (shape, n, seed) = shape("--generate-fleet", spec)?;
        let generated = generate_fleet(shape, n, seed, extra.bandwidth, extra.latency)
            .map_err(|e| Failure::usage(anyhow!("--generate-fleet {spec}: {e}")))?;
        declared.extend(generated.iter().cloned());
        machines.extend(generated);
    }
    extra
        .fleet(machines, declared, args.relay)
        .map_err(Failure::usage)
}

/// "1 slot", "2 slots".
fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// `a → b → … → z`, keeping the first and last `keep / 2` items.
fn abbreviate(items: &[String], keep: usize) -> String {
    if items.len() <= keep {
        return items.join(" → ");
    }
    let head = items[..keep / 2].join(" → ");
    let tail = items[items.len() - keep / 2..].join(" → ");
    format!("{head} → … → {tail}")
}

pub async fn run(args: SimulateArgs) -> Result<(), Failure> {
    let graph = graph(&args).await?;
    let f = fleet(&args, args.fleet.as_deref())?;
    // The machines as they were when the history was recorded.
    let then = args
        .history_fleet
        .as_deref()
        .map(|p| fleet(&args, Some(p)).map(|f| f.machines))
        .transpose()?;
    if f.machines.iter().all(|m| m.slots == 0) {
        return Err(Failure::usage(anyhow!(
            "no machine has a build slot: give --builders/--machines or --local-slots"
        )));
    }
    let knows = match (args.second_run, args.cold) {
        (true, _) => Knows::SecondRun {
            then: then.as_deref(),
        },
        (false, true) => Knows::FirstRun,
        (false, false) => Knows::Everything,
    };
    let policies = args.policy.names();
    let mut reports: Vec<Report> = Vec::new();
    for p in policies {
        let fleet = (f.machines.as_slice(), f.declared.as_slice());
        let trace = args.trace.is_some();
        let report = scenarios::run(p, &graph, fleet, f.delivery, &f.failures, knows, trace)
            .ok_or_else(|| Failure::usage(anyhow!("unknown policy {p}")))?;
        if let Some(path) = &args.trace {
            let path = if policies.len() > 1 {
                path.with_file_name(format!(
                    "{}.{p}.json",
                    path.file_stem().and_then(|s| s.to_str()).unwrap_or("trace")
                ))
            } else {
                path.clone()
            };
            std::fs::write(&path, report.chrome_trace().to_string())
                .with_context(|| format!("writing {}", path.display()))
                .map_err(Failure::usage)?;
        }
        reports.push(report);
    }
    let mut out = String::new();
    if args.json {
        for r in &reports {
            let mut v = serde_json::to_value(r).map_err(|e| Failure::usage(anyhow!(e)))?;
            v["type"] = Value::from("simulation");
            out.push_str(&v.to_string());
            out.push('\n');
        }
    } else {
        out = table(&graph, &f.machines, &reports);
    }
    crate::output::stdout(&out);
    Ok(())
}

/// The policies' figures side by side, the critical path and each policy's busiest
/// links.
fn table(graph: &Graph, machines: &[MachineSpec], reports: &[Report]) -> String {
    let mut out = format!(
        "{}, {} ({}); critical path {:.2} s, total work {:.2} s\n",
        count(graph.len(), "derivation"),
        count(machines.iter().filter(|m| m.slots > 0).count(), "machine"),
        count(machines.iter().map(|m| m.slots as usize).sum(), "slot"),
        graph.critical_path(),
        graph.total_work()
    );
    if let Some(u) = unbuildable(graph, machines) {
        out.push_str(&format!(
            "warning: {} no machine can build (needing {}), and {} that depend on them: add such machines to --builders or --generate-fleet\n",
            count(u.direct, "derivation"),
            u.missing.join("; "),
            count(u.dependents, "derivation"),
        ));
    }
    out.push_str(
        "policy    makespan   lower bound   ratio   utilisation   built        bytes moved\n",
    );
    for r in reports {
        let bytes: u64 = r.bytes_per_link.iter().map(|(_, b)| b).sum();
        // A graph of zero-length builds has no meaningful ratio.
        let ratio = if r.lower_bound_s > 0.0 {
            format!("{:.2}", r.ratio)
        } else {
            "-".to_string()
        };
        out.push_str(&format!(
            "{:<8} {:>8.2} s {:>11.2} s {:>7} {:>12.0}% {:>7}/{:<6} {:>11}\n",
            r.policy,
            r.makespan_s,
            r.lower_bound_s,
            ratio,
            r.utilisation * 100.0,
            r.built,
            r.nodes,
            human_bytes(bytes)
        ));
    }
    for (r, b) in reports.iter().filter_map(|r| Some((r, r.bytes_by_route?))) {
        let [c, p, t] = [b.client_links, b.builder_to_builder, b.to_target].map(human_bytes);
        let line = format!("client links {c}, builder to builder {p}, to the target {t}");
        out.push_str(&format!("{}: bytes by route: {line}\n", r.policy));
    }
    if let Some(r) = reports.first() {
        out.push_str(&format!(
            "critical path: {}: {}\n",
            count(r.critical_path.len(), "derivation"),
            abbreviate(&r.critical_path, 6)
        ));
    }
    for r in reports {
        let busiest: Vec<String> = r
            .busiest_links(4)
            .iter()
            .map(|(name, b)| format!("{name} {}", human_bytes(*b)))
            .collect();
        out.push_str(&format!(
            "{}: busiest links (of {}): {}\n",
            r.policy,
            r.bytes_per_link.len(),
            if busiest.is_empty() {
                "none used".to_string()
            } else {
                busiest.join(", ")
            }
        ));
    }
    out
}
