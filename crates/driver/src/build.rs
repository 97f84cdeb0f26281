//! The build runner: executes the scheduler's plan on real machines.
//!
//! The scheduler (pure, in `offload-sched`) decides what runs where; this module turns
//! its actions into serve-protocol operations and their results back into events. For a
//! build of derivation D on machine M it ships M the inputs it lacks — from the local
//! store, or streamed from another builder that produced them, never twice to the same
//! machine at once — then runs BuildDerivation over a pooled session (no handshake per
//! build) and records the outputs' infos. At the end, the closures of the requested
//! outputs come back to the local store; nothing else is copied back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use offload_nix::serve::{BasicDerivation, BuildSettings};
use offload_sched::{
    Action, Event, Failure, Graph, MachineId, MachineSpec, NodeSpec, NodeState, Outcome, Scheduler,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::conn::ServeConn;
use crate::error::DriverError;
use crate::history::History;
use crate::paths::PathRegistry;
use crate::pool::Pool;
use crate::transport::Endpoint;

/// Lines of a failed build's log kept for its error message.
pub const LOG_TAIL_LINES: usize = 25;

/// A derivation to build, with what the runner needs to know of it.
#[derive(Debug, Clone)]
pub struct BuildNode {
    pub drv_path: String,
    /// Derivation name (for the history and messages).
    pub name: String,
    pub system: String,
    pub required_features: Vec<String>,
    pub prefer_local: bool,
    /// Indices of the nodes whose outputs it needs.
    pub deps: Vec<usize>,
    /// Every store path it needs: input sources and outputs of input derivations.
    pub inputs: Vec<String>,
    /// Output paths, by name.
    pub outputs: Vec<(String, String)>,
    /// The derivation as BuildDerivation sends it; `input_srcs` is filled in with the
    /// shipped input closure at build time.
    pub drv: BasicDerivation,
    /// Estimated seconds at speed 1.
    pub estimate: f64,
}

/// A machine the runner may use.
pub struct MachineConfig {
    pub endpoint: Endpoint,
    pub spec: MachineSpec,
    /// Its CPU cores, when known: builds then share them (`NIX_BUILD_CORES`), a lone
    /// build getting all, many builds a fair part each. `None` leaves the machine's own
    /// `cores` setting alone.
    pub cores: Option<u32>,
}

/// How the run behaves.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Go on after a failure with everything that does not depend on it (`-k`).
    pub keep_going: bool,
    /// Builders first try their own substituters for inputs they lack.
    pub builders_use_substitutes: bool,
    pub settings: BuildSettings,
    /// Nix's log directory (`/nix/var/log/nix`): each build's log is written to
    /// `drvs/XX/REST` there, where `nix log` and `nix-store -l` find it.
    pub log_dir: Option<std::path::PathBuf>,
}

/// Progress, for the CLI to show.
pub trait Reporter: Send + Sync {
    fn build_started(&self, drv: &str, machine: &str);
    fn build_log(&self, drv: &str, machine: &str, line: &str);
    fn build_finished(&self, drv: &str, machine: &str, ok: bool, seconds: f64);
}

/// How one derivation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeResult {
    Built {
        machine: String,
        seconds: f64,
    },
    Failed {
        failure: String,
        log_tail: Vec<String>,
    },
}

/// What a run did.
#[derive(Debug)]
pub struct BuildReport {
    pub results: Vec<NodeResult>,
    pub wall_seconds: f64,
    /// Builds per machine name.
    pub builds_per_machine: Vec<(String, usize)>,
    /// max(critical path, total work / total slots) by the estimates, in seconds.
    pub lower_bound: f64,
    /// The same bound by the measured build times (scaled to speed 1), in seconds.
    pub measured_lower_bound: f64,
    /// Set when copying the requested outputs back failed.
    pub copy_back_error: Option<DriverError>,
}

impl BuildReport {
    pub fn all_built(&self) -> bool {
        self.copy_back_error.is_none()
            && self
                .results
                .iter()
                .all(|r| matches!(r, NodeResult::Built { .. }))
    }
}

struct Shared {
    /// This machine, where requested outputs end up and inputs usually come from.
    local: MachineId,
    pools: Vec<Pool>,
    names: Vec<String>,
    cores: Vec<Option<u32>>,
    registry: Mutex<PathRegistry>,
    /// One upload at a time per machine, so no path goes to a machine twice at once.
    upload_locks: Vec<tokio::sync::Mutex<()>>,
    nodes: Vec<BuildNode>,
    settings: BuildSettings,
    builders_use_substitutes: bool,
    log_dir: Option<std::path::PathBuf>,
    reporter: Arc<dyn Reporter>,
}

struct TaskDone {
    node: usize,
    machine: MachineId,
    outcome: Outcome,
    log_tail: Vec<String>,
    seconds: f64,
    machine_down: bool,
}

/// Builds `nodes` on `machines` (`local` is the index of this machine among them), then
/// brings the closures of `wanted` output paths to the local store.
pub async fn run(
    nodes: Vec<BuildNode>,
    machines: Vec<MachineConfig>,
    local: MachineId,
    wanted: Vec<String>,
    history: Option<&History>,
    options: &BuildOptions,
    reporter: Arc<dyn Reporter>,
) -> Result<BuildReport, DriverError> {
    let started = Instant::now();
    let graph = Graph::new(
        nodes
            .iter()
            .map(|n| NodeSpec {
                key: n.drv_path.clone(),
                system: n.system.clone(),
                required_features: n.required_features.clone(),
                deps: n.deps.clone(),
                duration: n.estimate,
                output_bytes: 1 << 20,
                prefer_local: n.prefer_local,
            })
            .collect(),
    )
    .map_err(|e| DriverError::Io {
        machine: "local".into(),
        op: "checking the build graph",
        source: std::io::Error::other(e.to_string()),
    })?;
    let total_slots: f64 = machines
        .iter()
        .map(|m| f64::from(m.spec.slots) * m.spec.speed)
        .sum();
    let lower_bound = graph
        .critical_path()
        .max(graph.total_work() / total_slots.max(1.0));
    let specs: Vec<MachineSpec> = machines.iter().map(|m| m.spec.clone()).collect();
    let shared = Arc::new(Shared {
        local,
        names: machines.iter().map(|m| m.spec.name.clone()).collect(),
        cores: machines.iter().map(|m| m.cores).collect(),
        upload_locks: machines
            .iter()
            .map(|_| tokio::sync::Mutex::new(()))
            .collect(),
        pools: machines
            .into_iter()
            .map(|m| Pool::new(m.endpoint))
            .collect(),
        registry: Mutex::new(PathRegistry::default()),
        nodes,
        settings: options.settings.clone(),
        builders_use_substitutes: options.builders_use_substitutes,
        log_dir: options.log_dir.clone(),
        reporter,
    });
    learn_local_inputs(&shared, local).await?;

    let mut sched = Scheduler::new(graph, specs.clone(), options.keep_going);
    let mut results: Vec<Option<NodeResult>> = vec![None; shared.nodes.len()];
    let mut builds_per_machine = vec![0usize; specs.len()];
    let mut tasks: JoinSet<TaskDone> = JoinSet::new();
    let mut running: HashMap<usize, (tokio::task::AbortHandle, MachineId)> = HashMap::new();
    let mut actions = sched.start(0.0);
    loop {
        for action in actions.drain(..) {
            match action {
                Action::Start { node, machine } => {
                    shared
                        .reporter
                        .build_started(&shared.nodes[node].drv_path, &shared.names[machine]);
                    // Builds running there now, this one included, share its cores.
                    let cores = shared.cores[machine].map(|total| {
                        let sharing = sched.running_on(machine).len().max(1) as u32;
                        (total / sharing).max(1)
                    });
                    let handle = tasks.spawn(build_task(shared.clone(), node, machine, cores));
                    running.insert(node, (handle, machine));
                }
                Action::Cancel { node, .. } => {
                    if let Some((h, _)) = running.remove(&node) {
                        h.abort();
                    }
                }
                Action::Fail { node, reason } => {
                    if results[node].is_none() {
                        results[node] = Some(NodeResult::Failed {
                            failure: describe_failure(&shared, &reason),
                            log_tail: Vec::new(),
                        });
                    }
                }
            }
        }
        if sched.is_finished() {
            break;
        }
        let joined = tokio::select! {
            joined = tasks.join_next() => joined,
            _ = tokio::signal::ctrl_c() => {
                // Dropping the sessions kills their processes, which stops the builds
                // on every machine; nothing half-done is ever registered.
                let stopped = running.len();
                tasks.shutdown().await;
                return Err(DriverError::Interrupted { stopped });
            }
        };
        let Some(joined) = joined else {
            break;
        };
        let Ok(done) = joined else {
            // Aborted by a Cancel: the scheduler already counts it as stopped.
            continue;
        };
        running.remove(&done.node);
        let now = started.elapsed().as_secs_f64();
        let drv = &shared.nodes[done.node];
        if done.machine_down {
            // Its other builds go elsewhere: stop them here.
            running.retain(|_, (h, m)| {
                if *m == done.machine {
                    h.abort();
                }
                *m != done.machine
            });
            shared
                .registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove_machine(done.machine);
            actions.extend(sched.handle(
                Event::MachineLost {
                    machine: done.machine,
                },
                now,
            ));
        }
        if let Outcome::Lost { reason } = &done.outcome {
            tracing::warn!(machine = %shared.names[done.machine], drv = %drv.drv_path, "build lost, will retry elsewhere: {reason}");
        }
        let outcome = done.outcome.clone();
        actions.extend(sched.handle(
            Event::Finished {
                node: done.node,
                machine: done.machine,
                outcome,
            },
            now,
        ));
        // Count only what the scheduler took: a build of a lost machine is stale.
        let accepted = matches!(sched.state(done.node), NodeState::Done { machine, .. } if *machine == done.machine)
            || matches!(sched.state(done.node), NodeState::Failed(Failure::BuildFailed { machine, .. }) if *machine == done.machine);
        if !accepted {
            continue;
        }
        match &done.outcome {
            Outcome::Built => {
                builds_per_machine[done.machine] += 1;
                results[done.node] = Some(NodeResult::Built {
                    machine: shared.names[done.machine].clone(),
                    seconds: done.seconds,
                });
                if let Some(h) = history {
                    let speed = specs[done.machine].speed;
                    if let Err(e) = h.record(
                        &drv.name,
                        &drv.system,
                        &shared.names[done.machine],
                        done.seconds,
                        speed,
                    ) {
                        tracing::warn!("{e}");
                    }
                }
            }
            Outcome::Failed { reason } => {
                results[done.node] = Some(NodeResult::Failed {
                    failure: format!("{reason} (on {})", shared.names[done.machine]),
                    log_tail: done.log_tail.clone(),
                });
            }
            Outcome::Lost { .. } => {}
        }
        shared.reporter.build_finished(
            &drv.drv_path,
            &shared.names[done.machine],
            done.outcome == Outcome::Built,
            done.seconds,
        );
    }
    tasks.shutdown().await;
    let measured_lower_bound = measured_bound(&shared.nodes, &results, &specs);

    // Outputs of derivations that failed cannot come back; the rest do, with -k too.
    let unbuilt: std::collections::HashSet<&str> = shared
        .nodes
        .iter()
        .zip(&results)
        .filter(|(_, r)| !matches!(r, Some(NodeResult::Built { .. })))
        .flat_map(|(n, _)| n.outputs.iter().map(|(_, p)| p.as_str()))
        .collect();
    let wanted: Vec<String> = wanted
        .into_iter()
        .filter(|p| !unbuilt.contains(p.as_str()))
        .collect();
    let copy_back_error = ensure_on(&shared, local, &wanted, None).await.err();
    for pool in &shared.pools {
        pool.close().await;
    }
    Ok(BuildReport {
        results: results
            .into_iter()
            .map(|r| {
                r.unwrap_or(NodeResult::Failed {
                    failure: "not built".into(),
                    log_tail: Vec::new(),
                })
            })
            .collect(),
        wall_seconds: started.elapsed().as_secs_f64(),
        builds_per_machine: shared
            .names
            .iter()
            .cloned()
            .zip(builds_per_machine)
            .collect(),
        lower_bound,
        measured_lower_bound,
        copy_back_error,
    })
}

/// max(critical path, total work / total slots) over the builds' measured times, each
/// scaled to speed 1 by its machine's speed factor.
fn measured_bound(
    nodes: &[BuildNode],
    results: &[Option<NodeResult>],
    specs: &[MachineSpec],
) -> f64 {
    let speed: HashMap<&str, f64> = specs.iter().map(|s| (s.name.as_str(), s.speed)).collect();
    let specs_nodes: Vec<NodeSpec> = nodes
        .iter()
        .zip(results)
        .map(|(n, r)| NodeSpec {
            key: n.drv_path.clone(),
            system: n.system.clone(),
            required_features: Vec::new(),
            deps: n.deps.clone(),
            duration: match r {
                Some(NodeResult::Built { machine, seconds }) => {
                    seconds * speed.get(machine.as_str()).copied().unwrap_or(1.0)
                }
                _ => 0.0,
            },
            output_bytes: 0,
            prefer_local: false,
        })
        .collect();
    let slots: f64 = specs.iter().map(|s| f64::from(s.slots) * s.speed).sum();
    match Graph::new(specs_nodes) {
        Ok(g) => g.critical_path().max(g.total_work() / slots.max(1.0)),
        Err(_) => 0.0,
    }
}

fn describe_failure(shared: &Shared, failure: &Failure) -> String {
    match failure {
        Failure::NoMachine {
            system,
            features,
            considered,
        } => format!(
            "no machine can build it: it needs system {system}{} and the machines considered were {}",
            if features.is_empty() {
                String::new()
            } else {
                format!(" with features {}", features.join(", "))
            },
            considered.join(", ")
        ),
        Failure::BuildFailed { machine, reason } => {
            format!("{reason} (on {})", shared.names[*machine])
        }
        Failure::DependencyFailed { dep } => {
            format!("dependency {} failed", shared.nodes[*dep].drv_path)
        }
        Failure::TooManyAttempts { attempts, reason } => {
            format!("lost {attempts} times with its machine; last: {reason}")
        }
        Failure::Stopped => "not built: the run stopped after a failure (use --keep-going to go on)".into(),
    }
}

/// Learns the infos of every input that is no node's output: they are in the local
/// store (evaluation put them there, or Nix fetched them).
async fn learn_local_inputs(shared: &Shared, local: MachineId) -> Result<(), DriverError> {
    let outputs: std::collections::HashSet<&str> = shared
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(|(_, p)| p.as_str()))
        .collect();
    let mut roots: Vec<String> = shared
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter())
        .filter(|p| !outputs.contains(p.as_str()))
        .cloned()
        .collect();
    roots.sort();
    roots.dedup();
    if roots.is_empty() {
        return Ok(());
    }
    let mut conn = shared.pools[local].get().await?;
    let closure = conn.query_closure(&roots, false).await?;
    let infos = conn.query_path_infos(&closure).await?;
    shared.pools[local].put(conn);
    let mut registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
    for info in infos {
        registry.insert(info, local);
    }
    Ok(())
}

/// Makes the closure of `paths` valid on `machine`, copying what it lacks from a holder
/// (the local store first). `conn`, when given, is a session with `machine` to use.
async fn ensure_on(
    shared: &Shared,
    machine: MachineId,
    paths: &[String],
    conn: Option<&mut ServeConn>,
) -> Result<(), DriverError> {
    let _upload = shared.upload_locks[machine].lock().await;
    let closure = shared
        .registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .closure(paths);
    let unknown: Vec<String> = {
        let registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
        closure
            .iter()
            .filter(|p| !registry.is_on(p, machine))
            .cloned()
            .collect()
    };
    if unknown.is_empty() {
        return Ok(());
    }
    let mut own = None;
    let target: &mut ServeConn = match conn {
        Some(c) => c,
        None => own.insert(shared.pools[machine].get().await?),
    };
    // The machine may have some already (an earlier run), or fetch them from its own
    // substituters when allowed.
    let substitute = shared.builders_use_substitutes && machine != shared.local;
    let present = target
        .query_valid_paths(&unknown, false, substitute)
        .await?;
    {
        let mut registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
        for p in &present {
            registry.add_holder(p, machine);
        }
    }
    for path in unknown.iter().filter(|p| !present.contains(p)) {
        let (info, source) = {
            let registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
            let info = registry.info(path).cloned();
            let holders: Vec<MachineId> = registry.holders(path).collect();
            (info, holders.into_iter().min_by_key(|&h| h != shared.local))
        };
        let (Some(info), Some(source)) = (info, source) else {
            return Err(DriverError::NotValid {
                machine: "any machine of the fleet".into(),
                path: path.clone(),
            });
        };
        let mut from = shared.pools[source].get().await?;
        let result = target.add_to_store_nar_from(&info, &mut from).await;
        shared.pools[source].put(from);
        result?;
        shared
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_holder(path, machine);
    }
    if let Some(conn) = own {
        shared.pools[machine].put(conn);
    }
    Ok(())
}

async fn build_task(
    shared: Arc<Shared>,
    node: usize,
    machine: MachineId,
    cores: Option<u32>,
) -> TaskDone {
    let started = Instant::now();
    let done = |outcome, log_tail, machine_down| TaskDone {
        node,
        machine,
        outcome,
        log_tail,
        seconds: started.elapsed().as_secs_f64(),
        machine_down,
    };
    let mut conn = match shared.pools[machine].get_with_cores(cores).await {
        Ok(c) => c,
        Err(e) => {
            return done(
                Outcome::Lost {
                    reason: e.to_string(),
                },
                Vec::new(),
                true,
            )
        }
    };
    let n = &shared.nodes[node];
    if let Err(e) = ensure_on(&shared, machine, &n.inputs, Some(&mut conn)).await {
        let down = conn.is_broken();
        return done(
            Outcome::Lost {
                reason: e.to_string(),
            },
            Vec::new(),
            down,
        );
    }
    let mut drv = n.drv.clone();
    drv.input_srcs = shared
        .registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .closure(&n.inputs);
    drv.input_srcs.sort();

    let mut log_file = open_log(shared.log_dir.as_deref(), &n.drv_path);
    let (tx, mut rx) = mpsc::unbounded_channel();
    conn.set_log_sink(Some(tx));
    let mut tail = std::collections::VecDeque::new();
    let result = {
        let build = conn.build_derivation(&n.drv_path, &drv, &shared.settings);
        tokio::pin!(build);
        loop {
            tokio::select! {
                r = &mut build => break r,
                Some(line) = rx.recv() => {
                    shared.reporter.build_log(&n.drv_path, &shared.names[machine], &line);
                    write_log(&mut log_file, &line);
                    tail.push_back(line);
                    if tail.len() > LOG_TAIL_LINES { tail.pop_front(); }
                }
            }
        }
    };
    conn.set_log_sink(None);
    while let Ok(line) = rx.try_recv() {
        shared
            .reporter
            .build_log(&n.drv_path, &shared.names[machine], &line);
        tail.push_back(line);
        if tail.len() > LOG_TAIL_LINES {
            tail.pop_front();
        }
    }
    let tail: Vec<String> = tail.into_iter().collect();
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            return done(
                Outcome::Lost {
                    reason: e.to_string(),
                },
                tail,
                false,
            );
        }
    };
    if !result.status.is_success() {
        shared.pools[machine].put(conn);
        return done(
            Outcome::Failed {
                reason: if result.error_msg.is_empty() {
                    format!("build of {} failed: {:?}", n.drv_path, result.status)
                } else {
                    result.error_msg.clone()
                },
            },
            tail,
            false,
        );
    }
    let outputs: Vec<String> = n.outputs.iter().map(|(_, p)| p.clone()).collect();
    match conn.query_path_infos(&outputs).await {
        Ok(infos) if infos.len() < outputs.len() => {
            shared.pools[machine].put(conn);
            return done(
                Outcome::Failed {
                    reason: format!(
                        "{} reported success but not all of its outputs are valid there",
                        n.drv_path
                    ),
                },
                tail,
                false,
            );
        }
        Ok(infos) => {
            let mut registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
            for info in infos {
                registry.insert(info, machine);
            }
        }
        Err(e) => {
            return done(
                Outcome::Lost {
                    reason: e.to_string(),
                },
                tail,
                false,
            )
        }
    }
    shared.pools[machine].put(conn);
    done(Outcome::Built, tail, false)
}

/// Opens the log file Nix would write for `drv_path` (`drvs/XX/REST` under the log
/// directory). A log that cannot be written is not worth failing a build over.
fn open_log(log_dir: Option<&std::path::Path>, drv_path: &str) -> Option<std::fs::File> {
    let dir = log_dir?;
    let base = drv_path.rsplit('/').next()?;
    let (head, rest) = (base.get(..2)?, base.get(2..)?);
    let sub = dir.join("drvs").join(head);
    if let Err(e) = std::fs::create_dir_all(&sub) {
        tracing::warn!(
            "cannot keep the build log of {drv_path} in {}: {e}",
            sub.display()
        );
        return None;
    }
    std::fs::File::create(sub.join(rest))
        .map_err(|e| tracing::warn!("cannot keep the build log of {drv_path}: {e}"))
        .ok()
}

fn write_log(file: &mut Option<std::fs::File>, line: &str) {
    use std::io::Write as _;
    if let Some(f) = file {
        if writeln!(f, "{line}").is_err() {
            *file = None;
        }
    }
}
