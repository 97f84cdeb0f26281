//! `offload simulate`: the scheduler on a simulated fleet, next to models of Nix's hook
//! and Hydra.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context as _};
use offload_driver::fleet::nixconf::NixSettings;
use offload_driver::fleet::{machine_names, remote_spec, DEFAULT_BANDWIDTH, DEFAULT_LATENCY};
use offload_driver::learn::{
    bound_under_way, link_figures, moved, refit_interval, BuildRow, Knowledge, Transfer, LOCAL_KEY,
    RECENT_TRANSFERS, ROWS_READ, SLOWER_UNDER_WAY,
};
use offload_driver::plan::{build_nodes, read_drv_closure};
use offload_driver::{Endpoint, EstimateSource, ServeConn, StateDb};
use offload_nix::machines::parse_builders;
use offload_nix::store_path::StorePath;
use offload_sched::{Graph, MachineSpec, NodeSpec, DEFAULT_OUTPUT_BYTES};
use offload_sim::dag::{generate, generate_fleet, DagFile};
use offload_sim::engine::Policy;
use offload_sim::policy::OffloadPolicy;
use offload_sim::{offload_policy, run_policy, simulate, with_unknown_durations, Report};
use serde::Deserialize;
use serde_json::Value;

use crate::args::SimulateArgs;
use crate::Failure;

fn read_json(path: &Path) -> Result<Value, Failure> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))
        .map_err(Failure::usage)?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))
        .map_err(Failure::usage)
}

/// `SHAPE:N[:SEED]`, the seed 1 when not given.
fn shape_spec<'a>(flag: &str, spec: &'a str) -> Result<(&'a str, usize, u64), Failure> {
    let mut parts = spec.split(':');
    let shape = parts.next().unwrap_or("");
    let n: usize = parts.next().and_then(|n| n.parse().ok()).ok_or_else(|| {
        Failure::usage(anyhow!(
            "{flag} {spec}: expected SHAPE:N[:SEED], N a whole number"
        ))
    })?;
    let seed: u64 = match parts.next() {
        Some(s) => s.parse().map_err(|_| {
            Failure::usage(anyhow!("{flag} {spec}: the seed must be a whole number"))
        })?,
        None => 1,
    };
    Ok((shape, n, seed))
}

/// NAR sizes of those of `paths` that are valid in the local store; none when the store
/// cannot be asked.
async fn local_nar_sizes(paths: &[String]) -> HashMap<String, u64> {
    let query = async {
        let mut conn = ServeConn::open(&Endpoint::local("local", None)).await?;
        let valid = conn.query_valid_paths(paths, false, false).await?;
        conn.query_path_infos(&valid).await
    };
    match query.await {
        Ok(infos) => infos.into_iter().map(|i| (i.path, i.nar_size)).collect(),
        Err(e) => {
            tracing::debug!("output sizes from the local store: {e}");
            HashMap::new()
        }
    }
}

async fn graph(args: &SimulateArgs) -> Result<Graph, Failure> {
    if let Some(path) = &args.dag {
        let dag: DagFile = serde_json::from_value(read_json(path)?)
            .with_context(|| {
                format!(
                    "{} does not follow the graph schema (see --help)",
                    path.display()
                )
            })
            .map_err(Failure::usage)?;
        return dag
            .to_graph()
            .with_context(|| format!("{}", path.display()))
            .map_err(Failure::usage);
    }
    if let Some(spec) = &args.generate {
        let (shape, n, seed) = shape_spec("--generate", spec)?;
        return generate(shape, n, seed)
            .and_then(|d| d.to_graph())
            .map_err(|e| Failure::usage(anyhow!("--generate {spec}: {e}")));
    }
    if let Some(drv) = &args.from_drv {
        let root = StorePath::from_absolute_path(drv).map_err(Failure::usage)?;
        let drvs = read_drv_closure(Path::new("/"), std::slice::from_ref(&root))
            .map_err(Failure::usage)?;
        let history = StateDb::open(
            &args
                .history
                .clone()
                .unwrap_or_else(offload_driver::env::state_db_path),
        )
        .ok();
        let all: Vec<StorePath> = drvs.keys().cloned().collect();
        // Speeds are relative to this machine's system; the root's stands for it.
        let knowledge = history
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
                // The outputs' NAR sizes when they are in the local store (built before),
                // else a default.
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
        return Graph::new(specs).map_err(Failure::usage);
    }
    Err(Failure::usage(anyhow!(
        "give the graph: --dag FILE, --generate SHAPE:N[:SEED] or --from-drv DRV"
    )))
}

/// The simulated machines as they are and as their machines file declares them (what
/// a cold planner knows), and failures as (machine index, seconds).
struct SimFleet {
    machines: Vec<MachineSpec>,
    declared: Vec<MachineSpec>,
    failures: Vec<(usize, f64)>,
}

/// `--fleet FILE`: link figures and machine failures.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    /// Bytes per second of every link not named in `links`.
    #[serde(default = "default_bandwidth")]
    bandwidth: f64,
    /// Seconds of fixed cost per transfer on every link not named in `links`.
    #[serde(default = "default_latency")]
    latency: f64,
    /// Per machine (its name, or its host).
    #[serde(default)]
    links: HashMap<String, LinkFigures>,
    /// Per machine (its name, or its host), speeds per system where they differ from
    /// its speed factor, e.g. a system it builds by emulation.
    #[serde(default)]
    speeds: HashMap<String, HashMap<String, f64>>,
    #[serde(default)]
    failures: Vec<MachineFailure>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkFigures {
    bandwidth: Option<f64>,
    latency: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineFailure {
    machine: String,
    /// Seconds into the run.
    at: f64,
}

fn default_bandwidth() -> f64 {
    DEFAULT_BANDWIDTH
}

fn default_latency() -> f64 {
    DEFAULT_LATENCY
}

fn fleet(args: &SimulateArgs) -> Result<SimFleet, Failure> {
    let local_system = NixSettings::load()
        .map(|s| s.system)
        .unwrap_or_else(|_| "x86_64-linux".into());
    let spec = match &args.machines {
        Some(path) => format!("@{}", path.display()),
        None => args.builders.clone(),
    };
    let parsed = parse_builders(&spec, "--builders", &local_system).map_err(Failure::usage)?;
    let extra: FleetFile = match &args.fleet {
        Some(path) => serde_json::from_value(read_json(path)?)
            .with_context(|| {
                format!(
                    "{} does not follow the fleet schema (see --help)",
                    path.display()
                )
            })
            .map_err(Failure::usage)?,
        None => FleetFile {
            bandwidth: DEFAULT_BANDWIDTH,
            latency: DEFAULT_LATENCY,
            links: HashMap::new(),
            speeds: HashMap::new(),
            failures: Vec::new(),
        },
    };
    let mut machines = vec![MachineSpec::local(&local_system, args.local_slots)];
    let mut declared = machines.clone();
    for (m, name) in parsed.iter().zip(machine_names(&parsed)) {
        declared.push(remote_spec(
            m,
            name.clone(),
            DEFAULT_BANDWIDTH,
            DEFAULT_LATENCY,
        ));
        let host = m.uri.strip_prefix("ssh://").unwrap_or(&m.uri);
        let link = extra.links.get(&name).or_else(|| extra.links.get(host));
        let bandwidth = link.and_then(|l| l.bandwidth).unwrap_or(extra.bandwidth);
        let latency = link.and_then(|l| l.latency).unwrap_or(extra.latency);
        let speeds = extra.speeds.get(&name).or_else(|| extra.speeds.get(host));
        let mut spec = remote_spec(m, name, bandwidth, latency);
        if let Some(speeds) = speeds {
            let mut speeds: Vec<(String, f64)> =
                speeds.iter().map(|(s, v)| (s.clone(), *v)).collect();
            speeds.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some((system, bad)) = speeds.iter().find(|(_, v)| v.is_nan() || *v <= 0.0) {
                return Err(Failure::usage(anyhow!(
                    "fleet file: speed {bad} of {} for {system} must be above 0",
                    spec.name
                )));
            }
            spec.system_speeds = speeds;
        }
        machines.push(spec);
    }
    if let Some(spec) = &args.generate_fleet {
        let (shape, n, seed) = shape_spec("--generate-fleet", spec)?;
        let generated = generate_fleet(shape, n, seed, extra.bandwidth, extra.latency)
            .map_err(|e| Failure::usage(anyhow!("--generate-fleet {spec}: {e}")))?;
        declared.extend(generated.iter().cloned());
        machines.extend(generated);
    }
    let mut failures = Vec::new();
    for f in &extra.failures {
        match machines.iter().position(|m| m.name == f.machine) {
            Some(i) => failures.push((i, f.at)),
            None => {
                return Err(Failure::usage(anyhow!(
                    "fleet file: failure of {:?}: no such machine; the machines are: {}",
                    f.machine,
                    machines
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        }
    }
    Ok(SimFleet {
        machines,
        declared,
        failures,
    })
}

/// offload's policy as the live driver runs it. When a build ends, before the scheduler
/// hears of it: its outputs' size goes into the plan (when sizes are guessed), links
/// whose copies under way show them several times slower than planned are planned at
/// what they show, the build is recorded as the state records it (its own time, at its
/// machine's true speed), and as often as [`refit_interval`] says the machines' speeds
/// are fitted again with the earlier runs' builds and this one's so far, and the links
/// with the copies that landed; those that moved by more than a tenth replace the
/// planned ones.
struct Learning<'a> {
    policy: OffloadPolicy,
    graph: &'a Graph,
    machines: &'a [MachineSpec],
    declared: &'a [MachineSpec],
    /// The speeds and links each machine is planned with now.
    planned: Vec<MachineSpec>,
    /// Earlier runs' builds and this one's, oldest first.
    rows: Vec<BuildRow>,
    run: String,
    local_system: String,
    last_refit: f64,
    refit_wait: f64,
    /// Whether the plan guesses output sizes (a first run).
    guessing_outputs: bool,
    /// Copies over one link, as the client times them: (machine, bytes, start, end),
    /// until they land; then their timings per machine.
    copies: Vec<(usize, u64, f64, f64)>,
    landed: Vec<Vec<Transfer>>,
}

impl<'a> Learning<'a> {
    fn new(
        fleet: (&'a [MachineSpec], &'a [MachineSpec]),
        graph: &'a Graph,
        planning: Graph,
        durations: &[usize],
        believed: Vec<MachineSpec>,
        earlier: Vec<BuildRow>,
        run: &str,
    ) -> Learning<'a> {
        let (machines, declared) = fleet;
        // `durations` are guesses; sizes the plan does not have from the truth are the
        // driver's guess.
        let guessed: Vec<usize> = (0..planning.len())
            .filter(|&i| planning.node(i).output_bytes != graph.node(i).output_bytes)
            .collect();
        let mut policy = offload_policy(planning, &believed);
        policy.guess_output_sizes(&guessed);
        policy.guess_durations(durations);
        Learning {
            policy,
            graph,
            machines,
            declared,
            planned: believed,
            rows: earlier,
            run: run.to_string(),
            local_system: local_system(machines),
            last_refit: 0.0,
            refit_wait: 0.0,
            guessing_outputs: !guessed.is_empty(),
            copies: Vec::new(),
            landed: vec![Vec::new(); machines.len()],
        }
    }

    fn learn(&mut self, node: usize, machine: usize, now: f64) {
        let n = self.graph.node(node);
        if self.guessing_outputs {
            self.policy.outputs_measured(node, n.output_bytes);
        }
        self.rows.push(BuildRow {
            name: n.key.clone(),
            system: n.system.clone(),
            machine: state_key(&self.machines[machine]),
            seconds: self.machines[machine].build_time(n),
            declared_speed: self.declared[machine].speed_for(&n.system),
            run: Some(self.run.clone()),
        });
        self.links_under_way(now);
        if self.last_refit > 0.0 && now - self.last_refit < self.refit_wait {
            return;
        }
        self.last_refit = now;
        let knowledge = Knowledge::from_builds(&newest_first(&self.rows), &self.local_system);
        self.refit_wait = refit_interval(knowledge.rows());
        for (m, spec) in self.planned.iter_mut().enumerate() {
            let declared = self.declared[m].speed;
            if let Some((speed, per_system)) =
                knowledge.moved_speeds(&state_key(spec), spec, declared)
            {
                spec.speed = speed;
                spec.system_speeds = per_system.clone();
                self.policy.set_speeds(m, speed, per_system);
            }
        }
        self.links_landed(now);
    }

    /// Links whose copies under way show them several times slower than planned.
    fn links_under_way(&mut self, now: f64) {
        for (m, spec) in self.planned.iter_mut().enumerate() {
            let under_way: Vec<(f64, u64)> = self
                .copies
                .iter()
                .filter(|&&(l, _, start, end)| l == m && start <= now && now < end)
                .map(|&(_, bytes, start, _)| (now - start, bytes))
                .collect();
            if let Some(bound) = bound_under_way(&under_way, spec.latency) {
                if !spec.is_local && bound * SLOWER_UNDER_WAY < spec.bandwidth {
                    spec.bandwidth = bound;
                    self.policy.set_link(m, bound, spec.latency);
                }
            }
        }
    }

    /// Links fitted with the copies that landed by `now` (at most as many as the
    /// state keeps per link).
    fn links_landed(&mut self, now: f64) {
        let (landed, under_way): (Vec<_>, Vec<_>) =
            self.copies.iter().partition(|&&(_, _, _, end)| end <= now);
        self.copies = under_way;
        for (m, bytes, start, end) in landed {
            self.landed[m].push(Transfer {
                bytes,
                seconds: end - start,
                concurrent: 1,
            });
        }
        for (m, spec) in self.planned.iter_mut().enumerate() {
            let recent = &self.landed[m][self.landed[m].len().saturating_sub(RECENT_TRANSFERS)..];
            let Some(link) = link_figures(recent).filter(|_| !spec.is_local) else {
                continue;
            };
            if moved(spec.bandwidth, link.bandwidth) {
                spec.bandwidth = link.bandwidth;
                spec.latency = link.latency;
                self.policy.set_link(m, link.bandwidth, link.latency);
            }
        }
    }
}

impl Policy for Learning<'_> {
    fn name(&self) -> &'static str {
        self.policy.name()
    }

    fn costs(&self) -> offload_sim::Costs {
        self.policy.costs()
    }

    fn copies_outputs_back(&self) -> bool {
        self.policy.copies_outputs_back()
    }

    fn start(&mut self, now: f64) -> Vec<(usize, usize)> {
        self.policy.start(now)
    }

    fn finished(&mut self, node: usize, machine: usize, now: f64) -> Vec<(usize, usize)> {
        // As the driver: what the build showed goes into the plan before its end places
        // the builds that waited for it.
        self.learn(node, machine, now);
        self.policy.finished(node, machine, now)
    }

    fn copy_sent(&mut self, machine: usize, bytes: u64, start: f64, end: f64) {
        self.copies.push((machine, bytes, start, end));
    }

    fn machine_lost(&mut self, machine: usize, lost: &[usize], now: f64) -> Vec<(usize, usize)> {
        self.policy.machine_lost(machine, lost, now)
    }

    fn next_wakeup(&self) -> Option<f64> {
        self.policy.next_wakeup()
    }

    fn wake(&mut self, now: f64) -> Vec<(usize, usize)> {
        self.policy.wake(now)
    }

    fn outputs_at(&mut self, node: usize, machine: usize, now: f64) -> Vec<(usize, usize)> {
        self.policy.outputs_at(node, machine, now)
    }
}

/// What the state calls `machine`.
fn state_key(machine: &MachineSpec) -> String {
    if machine.is_local {
        LOCAL_KEY.to_string()
    } else {
        machine.name.clone()
    }
}

/// The newest of `rows` (oldest first), newest first, as many as `offload build` reads
/// from its state for a fit.
fn newest_first(rows: &[BuildRow]) -> Vec<BuildRow> {
    rows.iter().rev().take(ROWS_READ).cloned().collect()
}

fn local_system(machines: &[MachineSpec]) -> String {
    machines
        .iter()
        .find(|m| m.is_local)
        .and_then(|m| m.systems.first())
        .cloned()
        .unwrap_or_default()
}

/// offload's first run on the simulated fleet: it plans with the machines file's figures
/// and no estimates, and learns during the run as the driver does. Returns its report
/// and the builds it recorded (oldest first).
fn first_run(
    graph: &Graph,
    fleet: (&[MachineSpec], &[MachineSpec]),
    failures: &[(usize, f64)],
    trace: bool,
) -> (Report, Vec<BuildRow>) {
    let (machines, declared) = fleet;
    // No estimates, and every output's size the driver's guess.
    let planning = Graph::new(
        with_unknown_durations(graph)
            .nodes()
            .iter()
            .map(|n| NodeSpec {
                output_bytes: DEFAULT_OUTPUT_BYTES,
                ..n.clone()
            })
            .collect(),
    )
    .expect("the same edges as a valid graph");
    let all: Vec<usize> = (0..graph.len()).collect();
    let mut policy = Learning::new(
        fleet,
        graph,
        planning,
        &all,
        declared.to_vec(),
        Vec::new(),
        "first",
    );
    let report = simulate(graph, machines, failures, &mut policy, trace);
    (report, policy.rows)
}

/// offload's second run on the simulated fleet: a first run as [`first_run`]; the second
/// plans with what its builds say, fitted as `offload build` fits its state (each
/// derivation's time, each machine's speed per system), and the links as they are (as
/// offload learns them from the first run's copies), and learns on during the run.
fn second_run(
    graph: &Graph,
    fleet: (&[MachineSpec], &[MachineSpec]),
    failures: &[(usize, f64)],
    trace: bool,
) -> Report {
    let (machines, declared) = fleet;
    let (_, rows) = first_run(graph, fleet, failures, false);
    let learned = Knowledge::from_builds(&newest_first(&rows), &local_system(machines));
    let planning = Graph::new(
        graph
            .nodes()
            .iter()
            .map(|n| NodeSpec {
                duration: learned.estimate(&n.key).0,
                ..n.clone()
            })
            .collect(),
    )
    .expect("the same edges as a valid graph");
    let guessed: Vec<usize> = (0..graph.len())
        .filter(|&i| learned.estimate(&graph.node(i).key).1 == EstimateSource::Default)
        .collect();
    let believed: Vec<MachineSpec> = declared
        .iter()
        .zip(machines)
        .map(|(spec, truth)| {
            let mut spec = spec.clone();
            learned.apply_to(&state_key(&spec), &mut spec);
            spec.bandwidth = truth.bandwidth;
            spec.latency = truth.latency;
            spec
        })
        .collect();
    let mut policy = Learning::new(fleet, graph, planning, &guessed, believed, rows, "second");
    simulate(graph, machines, failures, &mut policy, trace)
}

/// A line on the derivations no machine with slots can build, and those that need them.
fn unbuildable(graph: &Graph, machines: &[MachineSpec]) -> Option<String> {
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
    if direct == 0 {
        return None;
    }
    let dependents = blocked.iter().filter(|&&b| b).count() - direct;
    Some(format!(
        "warning: {} no machine can build (needing {}), and {} that depend on them: add such machines to --builders or --generate-fleet\n",
        count(direct, "derivation"),
        missing.join("; "),
        count(dependents, "derivation"),
    ))
}

/// "1 slot", "2 slots".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
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

fn human_bytes(n: u64) -> String {
    crate::copy::human_bytes(n)
}

pub async fn run(args: SimulateArgs) -> Result<(), Failure> {
    let graph = graph(&args).await?;
    let SimFleet {
        machines,
        declared,
        failures,
    } = fleet(&args)?;
    if machines.iter().all(|m| m.slots == 0) {
        return Err(Failure::usage(anyhow!(
            "no machine has a build slot: give --builders/--machines or --local-slots"
        )));
    }
    let policies = args.policy.names();
    let mut reports: Vec<Report> = Vec::new();
    for p in policies {
        let fleet = (machines.as_slice(), declared.as_slice());
        let report = if *p == "offload" && args.second_run {
            second_run(&graph, fleet, &failures, args.trace.is_some())
        } else if *p == "offload" && args.cold {
            first_run(&graph, fleet, &failures, args.trace.is_some()).0
        } else {
            run_policy(
                p,
                &graph,
                &machines,
                Some(&declared),
                &failures,
                args.cold,
                args.trace.is_some(),
            )
            .ok_or_else(|| Failure::usage(anyhow!("unknown policy {p}")))?
        };
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
        out.push_str(&format!(
            "{}, {} ({}); critical path {:.2} s, total work {:.2} s\n",
            count(graph.len(), "derivation"),
            count(machines.iter().filter(|m| m.slots > 0).count(), "machine"),
            count(machines.iter().map(|m| m.slots as usize).sum(), "slot"),
            graph.critical_path(),
            graph.total_work()
        ));
        if let Some(warning) = unbuildable(&graph, &machines) {
            out.push_str(&warning);
        }
        out.push_str(
            "policy    makespan   lower bound   ratio   utilisation   built        bytes moved\n",
        );
        for r in &reports {
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
        if let Some(r) = reports.first() {
            out.push_str(&format!(
                "critical path: {}: {}\n",
                count(r.critical_path.len(), "derivation"),
                abbreviate(&r.critical_path, 6)
            ));
        }
        for r in &reports {
            let mut links = r.bytes_per_link.clone();
            links.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let busiest: Vec<String> = links
                .iter()
                .take(4)
                .filter(|(_, b)| *b > 0)
                .map(|(name, b)| format!("{name} {}", human_bytes(*b)))
                .collect();
            out.push_str(&format!(
                "{}: busiest links (of {}): {}\n",
                r.policy,
                links.len(),
                if busiest.is_empty() {
                    "none used".to_string()
                } else {
                    busiest.join(", ")
                }
            ));
        }
    }
    crate::output::stdout(&out);
    Ok(())
}
