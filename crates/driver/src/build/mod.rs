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
use tokio::task::JoinSet;

use crate::error::DriverError;
use crate::history::History;
use crate::paths::PathRegistry;
use crate::pool::Pool;
use crate::transport::Endpoint;

mod task;

use task::{build_task, ensure_on, learn_local_inputs};

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
        /// When its task started, in seconds since the run began.
        started: f64,
        /// How long the task took: input copies and the build.
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
    /// How many builds take each store path as a direct input.
    consumers: HashMap<String, usize>,
    settings: BuildSettings,
    builders_use_substitutes: bool,
    log_dir: Option<std::path::PathBuf>,
    reporter: Arc<dyn Reporter>,
}

fn count_consumers(nodes: &[BuildNode]) -> HashMap<String, usize> {
    let mut consumers: HashMap<String, usize> = HashMap::new();
    for node in nodes {
        for input in &node.inputs {
            *consumers.entry(input.clone()).or_default() += 1;
        }
    }
    consumers
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
        consumers: count_consumers(&nodes),
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
    // Requested outputs start back to this machine as soon as they are built, while
    // the rest of the graph builds; the copy at the end only picks up what is left.
    let wanted_set: std::collections::HashSet<String> = wanted.iter().cloned().collect();
    let mut early_copies: JoinSet<()> = JoinSet::new();
    let mut running: HashMap<usize, (tokio::task::AbortHandle, MachineId)> = HashMap::new();
    let mut started_at = vec![0.0f64; shared.nodes.len()];
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
                    started_at[node] = started.elapsed().as_secs_f64();
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
                let back: Vec<String> = drv
                    .outputs
                    .iter()
                    .map(|(_, p)| p.clone())
                    .filter(|p| wanted_set.contains(p))
                    .collect();
                if !back.is_empty() && done.machine != local {
                    let shared = shared.clone();
                    early_copies.spawn(async move {
                        // Best effort: the copy at the end reports what still fails.
                        if let Err(e) = ensure_on(&shared, local, &back, None).await {
                            tracing::debug!("early copy of {back:?} failed: {e}");
                        }
                    });
                }
                builds_per_machine[done.machine] += 1;
                results[done.node] = Some(NodeResult::Built {
                    machine: shared.names[done.machine].clone(),
                    started: started_at[done.node],
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
    while early_copies.join_next().await.is_some() {}
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
                Some(NodeResult::Built {
                    machine, seconds, ..
                }) => seconds * speed.get(machine.as_str()).copied().unwrap_or(1.0),
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
