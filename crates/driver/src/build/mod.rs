//! Building a graph of derivations over a fleet, as the scheduler plans it.
//!
//! The scheduler (pure, in `offload-sched`) decides what runs where; the runner
//! (`runner/`) turns its actions into build tasks and their results back into events;
//! the transport in `serve/` carries the tasks out with serve-protocol operations over
//! pooled sessions (no handshake per build). At the end, the closures of the requested
//! outputs come back to the local store; nothing else is copied back.

use std::collections::HashSet;
use std::sync::Arc;

use offload_nix::serve::{BasicDerivation, BuildSettings};
use tokio_util::sync::CancellationToken;

use crate::error::DriverError;
use crate::fleet::learned::{learn_cores, ApplyKnowledge};
pub use crate::fleet::MachineConfig;
use crate::reporter::Reporter;
use crate::state::StateDb;
use crate::transfer::{RouteBytes, RouteOptions};
use crate::trust::LocalAccess;
pub use health::Reliability;
use offload_learn::Knowledge;

mod health;
mod leftovers;
mod log;
mod runner;
mod serve;
#[cfg(test)]
mod tests;

use runner::Runner;
use serve::ServeTransport;

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
    /// Whether the history gave the estimate (else it is the default guess).
    pub estimate_known: bool,
    /// NAR bytes of its outputs, when an earlier build measured them.
    pub output_bytes: Option<u64>,
}

impl BuildNode {
    /// `DRV!OUT,OUT…`: the derivation and all its outputs, as BuildPaths takes them.
    pub fn drv_output_spec(&self) -> String {
        let outputs: Vec<&str> = self.outputs.iter().map(|(name, _)| name.as_str()).collect();
        format!("{}!{}", self.drv_path, outputs.join(","))
    }
}

/// How the run behaves.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Go on after a failure with everything that does not depend on it (`-k`).
    pub keep_going: bool,
    /// Builders first try their own substituters for inputs they lack.
    pub builders_use_substitutes: bool,
    pub settings: BuildSettings,
    /// What the local store lets this user do ([`crate::trust::check`]).
    pub local_access: LocalAccess,
    /// Where each build's log is kept.
    pub logs: LogDestination,
    /// `--option NAME VALUE` pairs given to every machine's serve session.
    pub session_options: Vec<(String, String)>,
    /// Derivations to build again and compare with their valid outputs (`--check`),
    /// by `.drv` path. The serve protocol builds only in Nix's normal mode, so these run
    /// as `nix-store --realise --check` on the machine the plan chose.
    pub check: HashSet<String>,
    /// Backoff, quarantine and stall detection for machines that fail.
    pub reliability: Reliability,
    /// What earlier runs taught about the fleet: speeds, links, sizes.
    pub knowledge: Knowledge,
    /// How copies go between machines and where the requested outputs end up.
    pub routes: RouteOptions,
}

/// Where build logs are kept.
#[derive(Debug, Clone, Default)]
pub enum LogDestination {
    /// Not kept.
    #[default]
    Nowhere,
    /// `drvs/XX/REST` under this directory: Nix's log directory (`/nix/var/log/nix`),
    /// where `nix log` finds it, or one of offload's own.
    Dir(std::path::PathBuf),
    /// Handed to the nix-daemon at this socket after each build on another machine,
    /// where `nix log` finds it (for a trusted user who cannot write Nix's log
    /// directory). The daemon keeps the logs of local builds itself.
    Daemon(std::path::PathBuf),
}

/// Nix settings that shape a build on the machine running it, besides the ones the
/// serve protocol carries with each build (see [`BuildOptions::set_nix_option`]).
const SESSION_SETTINGS: &[&str] = &[
    "sandbox",
    "sandbox-fallback",
    "sandbox-paths",
    "sandbox-dev-shm-size",
    "allowed-impure-host-deps",
    "allow-new-privileges",
    "filter-syscalls",
    "impersonate-linux-26",
    "build-poll-interval",
    "pre-build-hook",
    "post-build-hook",
    "diff-hook",
    "run-diff-hook",
    "keep-env-derivations",
    "fsync-metadata",
    "compress-build-log",
    "enforce-determinism",
    "build-users-group",
    "auto-allocate-uids",
];

impl BuildOptions {
    /// Applies a `--option NAME VALUE` to the builds. Settings the serve protocol sends
    /// with each build (`max-silent-time`, `timeout`, `max-build-log-size`,
    /// `keep-failed`) go there, since the build's values override the session's; other
    /// build settings go to every session's command line; the rest concern evaluation
    /// or this machine only and are left out. Returns what is wrong with `value`.
    pub fn set_nix_option(&mut self, name: &str, value: &str) -> Result<(), String> {
        let number = || {
            value.parse::<u64>().map_err(|_| {
                format!("`--option {name}` takes a number of seconds or bytes, not {value:?}")
            })
        };
        match name {
            "max-silent-time" => self.settings.max_silent_time = number()?,
            "timeout" => self.settings.build_timeout = number()?,
            "max-build-log-size" => self.settings.max_log_size = number()?,
            "keep-failed" => {
                self.settings.keep_failed = match value {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(format!(
                            "`--option keep-failed` takes true or false, not {value:?}"
                        ))
                    }
                }
            }
            _ => {
                let base = name.strip_prefix("extra-").unwrap_or(name);
                if SESSION_SETTINGS.contains(&base) {
                    self.session_options
                        .push((name.to_string(), value.to_string()));
                }
            }
        }
        Ok(())
    }
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
    /// The lower bound of the run ([`offload_sched::lower_bound`]) by the estimates, in
    /// seconds.
    pub lower_bound: f64,
    /// The same bound by the measured build times (scaled to speed 1), in seconds.
    pub measured_lower_bound: f64,
    /// Set when copying the requested outputs back failed.
    pub copy_back_error: Option<DriverError>,
    /// NAR bytes moved, by the way they went.
    pub route_bytes: RouteBytes,
    /// Duplicates of builds that overran their plan: started, won, slot time wasted.
    pub hedges: offload_sched::HedgeCounts,
}

impl BuildReport {
    /// What `build` says at the end: builds, wall time against the lower bound,
    /// offload's own CPU (`cpu` seconds), builds per machine, and duplicates if any.
    pub fn summary_text(&self, cpu: f64) -> String {
        let used: Vec<String> = self
            .builds_per_machine
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(m, n)| format!("{m} {n}"))
            .collect();
        let built = self
            .builds_per_machine
            .iter()
            .map(|(_, n)| n)
            .sum::<usize>();
        // Nothing built, or builds too short to measure: no ratio worth printing.
        let ratio = if self.measured_lower_bound > 0.001 {
            format!(" ({:.2}x)", self.wall_seconds / self.measured_lower_bound)
        } else {
            String::new()
        };
        let mut text = format!(
            "built {built} derivations in {:.2} s; lower bound {:.2} s by the measured build \
             times{ratio}; offload's own CPU {:.0} ms ({:.1} ms per build)\nbuilds per \
             machine: {}",
            self.wall_seconds,
            self.measured_lower_bound,
            cpu * 1e3,
            cpu * 1e3 / built.max(1) as f64,
            if used.is_empty() {
                "none".to_string()
            } else {
                used.join(", ")
            }
        );
        let hedges = crate::state::report::ReportHedges::from(self.hedges);
        if let Some(line) = hedges.describe() {
            text.push('\n');
            text.push_str(&line);
        }
        text
    }

    pub fn all_built(&self) -> bool {
        self.copy_back_error.is_none()
            && self
                .results
                .iter()
                .all(|r| matches!(r, NodeResult::Built { .. }))
    }
}

/// Builds `nodes` on `machines` (the local machine first, as [`crate::fleet`] makes
/// them), then brings the closures of `wanted` output paths to the local store.
/// Cancelling `stop` ([`crate::shutdown::Shutdown`] does on SIGINT and SIGTERM) stops
/// every build and transfer and ends the run with [`DriverError::Interrupted`].
pub async fn run(
    nodes: Vec<BuildNode>,
    machines: Vec<MachineConfig>,
    wanted: Vec<String>,
    history: Option<&StateDb>,
    options: &BuildOptions,
    reporter: Arc<dyn Reporter>,
    stop: CancellationToken,
) -> Result<BuildReport, DriverError> {
    let nodes: Arc<[BuildNode]> = nodes.into();
    let mut machines = machines;
    for m in &mut machines {
        m.endpoint.ssh_options = options.reliability.ssh_options();
    }
    // The state knows machines by their store URIs and declared speeds; the plan uses
    // what was learned of them.
    let keys: Vec<String> = machines.iter().map(|m| m.endpoint.name.clone()).collect();
    let declared: Vec<f64> = machines.iter().map(|m| m.spec.speed).collect();
    options.knowledge.apply(&mut machines);
    // One ssh connection per machine for the whole run, from its first question on.
    let masters: Vec<Arc<crate::ssh::master::SshMaster>> = machines
        .iter()
        .map(|m| Arc::new(crate::ssh::master::SshMaster::new(&m.endpoint)))
        .collect();
    learn_cores(&mut machines, &masters, history).await;
    let to_probe = crate::transfer::routes::direct_routes(
        &mut machines,
        &keys,
        history,
        &options.knowledge,
        &options.routes,
        &*reporter,
    );
    let specs = machines.iter().map(|m| m.spec.clone()).collect();
    // What failed imports here leave on disk is removed at the end, however the run ends.
    let local = machines
        .iter()
        .find(|m| m.spec.is_local)
        .map(|m| m.endpoint.clone());
    let imports = leftovers::Imports::new(reporter);
    let reporter: Arc<dyn Reporter> = imports.clone();
    let cores = machines.iter().map(|m| m.cores).collect();
    let connect =
        ServeTransport::connect(machines, masters, nodes.clone(), options, reporter.clone());
    let transport = tokio::select! {
        transport = connect => transport?,
        () = stop.cancelled() => return Err(DriverError::Interrupted { stopped: 0 }),
    };
    transport.probe_when_due(to_probe);
    let runner = Runner::new(
        Arc::new(transport),
        nodes,
        specs,
        cores,
        wanted,
        options.keep_going,
        options.reliability.clone(),
        history,
        reporter,
    )?
    .with_state_keys(keys, declared)
    .with_links_measured(&options.knowledge)
    .with_outputs_away(options.routes.deliver_to.is_some());
    let report = runner.run(stop).await;
    if let Some(local) = &local {
        imports.remove_leftovers(local).await;
    }
    report
}
