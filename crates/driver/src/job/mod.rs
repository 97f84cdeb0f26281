//! One `offload build`, from request to outcome: Nix evaluates what the request names,
//! Nix says what to build and fetch, the fleet is checked for trust, the runner builds
//! the graph ([`crate::build::run`]), the run is recorded in the state database, and
//! the requested outputs come home as result links, as nix-build makes them.
//!
//! The caller (the CLI) turns its flags and config file into a [`BuildRequest`], shows
//! the [`Events`] as they come, and prints the [`Outcome`] or the [`JobError`].
//!
//! - `evaluate.rs` — the request's targets as `.drv` paths (`nix-instantiate`, `nix build`);
//! - `access.rs` — the trust check, and the builders it drops;
//! - `finish.rs` — after the build: result links, `--repair`, `--through-daemon`, logs;
//! - `record.rs` — the run's report: its transfers, builds and critical path;
//! - `error.rs` — [`JobError`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use offload_nix::derivation::Derivation;
use offload_nix::serve::BuildSettings;
use offload_nix::store_path::StorePath;
use tokio_util::sync::CancellationToken;

use crate::build::{self, BuildOptions, BuildReport, LogDestination, NodeResult, Reliability};
use crate::fleet::nixconf::NixSettings;
use crate::fleet::{build_fleet, MachineChoice, MachineConfig};
use crate::metrics::http::Exposed;
use crate::metrics::Serving;
use crate::plan::dry_run::{dry_run, DryRun};
use crate::plan::{build_nodes, output_path, read_drv_closure};
use crate::state::report::{record, ReportMachine, RunReport};
use crate::transfer::{DeliveryTarget, RouteOptions};
use crate::StateDb;

mod access;
mod error;
mod evaluate;
mod finish;
mod metrics;
mod record;

pub use error::JobError;
use evaluate::Target;
pub use evaluate::{is_flake_installable, Evaluation};

/// An `offload build`, checked and typed: what to evaluate, on which machines, how.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    pub evaluation: Evaluation,
    /// The machines chosen (groups already expanded).
    pub machines: MachineChoice,
    /// Go on with everything that does not depend on a failed build (`-k`).
    pub keep_going: bool,
    /// `max-silent-time`, `timeout` and `keep-failed` for every build.
    pub settings: BuildSettings,
    pub reliability: Reliability,
    /// Builders fetch inputs from their own substituters (else Nix's setting decides).
    pub builders_use_substitutes: bool,
    /// Build the requested derivations again and compare (`--check`).
    pub check: bool,
    /// Repair the requested closures in the local store afterwards (`--repair`).
    pub repair: bool,
    /// Copy every built output home, not only the requested ones.
    pub fetch_all_outputs: bool,
    /// Say what would be built and fetched, and stop.
    pub dry_run: bool,
    /// Sign what other machines build with this secret key.
    pub sign_key: Option<PathBuf>,
    /// Stop when a builder's outputs could not enter the local store.
    pub no_local_fallback: bool,
    /// Let the nix-daemon build, through its `offload hook`.
    pub through_daemon: bool,
    /// The result links' name (`result`); `None`: no links.
    pub out_link: Option<String>,
    /// Deliver the requested outputs to this store rather than the local one (`--to`):
    /// no result links then.
    pub deliver_to: Option<String>,
    /// Every copy between machines goes through this one (`--relay`).
    pub relay: bool,
    /// Forward the user's ssh agent to builders for their copies (`--forward-agent`).
    pub forward_agent: bool,
    /// The state database.
    pub state: PathBuf,
    /// Files to write the run to once it is over (`--trace`, `--report`), in order.
    pub files: Vec<RunFile>,
    /// Serve Prometheus metrics of the run here while it lasts (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}

/// A file the run is written to once it is over.
#[derive(Debug, Clone)]
pub struct RunFile {
    /// What it holds, for errors: `report`, `trace`.
    pub what: &'static str,
    pub path: PathBuf,
    pub render: fn(&RunReport) -> String,
}

impl RunFile {
    /// Writes `run` to the file.
    pub fn write(&self, run: &RunReport) -> Result<(), JobError> {
        std::fs::write(&self.path, (self.render)(run)).map_err(|source| JobError::WriteFile {
            what: self.what,
            path: self.path.clone(),
            source,
        })
    }
}

/// What a job tells its user besides the builds themselves ([`crate::reporter::Reporter`]).
pub trait Events: crate::reporter::Reporter {
    /// Nix fetches `paths` store paths from substituters before the build.
    fn fetching(&self, paths: usize);
    /// Something to tell the user as it is (each line ends with a newline): builders
    /// dropped, where logs go.
    fn notice(&self, text: &str);
    /// The plan: `derivations` to build, their estimates summed at speed 1 (`work`), on
    /// `machines`.
    fn planned(&self, derivations: usize, work: f64, machines: &[MachineConfig]);
    /// The run is over.
    fn summary(&self, summary: &Summary<'_>);
}

/// How a run ended, for the summary.
pub struct Summary<'a> {
    pub report: &'a BuildReport,
    /// The derivations, in the order of `report.results`.
    pub drvs: &'a [String],
    /// The requested output paths.
    pub outputs: &'a [String],
    /// CPU seconds offload itself used (children not counted).
    pub cpu_seconds: f64,
    /// The store the requested outputs went to (`--to`); None: this machine's.
    pub delivered_to: Option<&'a str>,
}

/// What a job did.
pub enum Outcome {
    /// `dry_run`: what Nix would build and fetch, the machines, and the way copies
    /// and the requested outputs would go.
    DryRun {
        plan: DryRun,
        machines: Vec<MachineConfig>,
        routes: RouteOptions,
    },
    /// The requested outputs are in the local store (linked when asked): their paths,
    /// in the order of the request.
    Built { outputs: Vec<String> },
}

/// What the evaluation and Nix's dry run decided.
struct Planned {
    targets: Vec<Target>,
    drvs: HashMap<StorePath, Derivation>,
    /// The requested `.drv` paths.
    roots: Vec<String>,
    plan: DryRun,
}

/// Runs `request`, telling `events` as it goes; `stop` cancels the build (a signal).
/// With `request.metrics`, the address is bound first and serves the run's metrics
/// until it ends.
pub async fn run(
    request: &BuildRequest,
    events: Arc<dyn Events>,
    stop: CancellationToken,
) -> Result<Outcome, JobError> {
    let exposed = Exposed::bind(request.metrics, Serving::Run).await?;
    let events: Arc<dyn Events> = match exposed.addr() {
        Some(addr) => {
            events.notice(&format!("metrics at http://{addr}/metrics\n"));
            Arc::new(metrics::MetricEvents::new(events, exposed.metrics()))
        }
        None => events,
    };
    exposed.around(run_counted(request, events, stop)).await
}

/// [`run`], its events counted.
async fn run_counted(
    request: &BuildRequest,
    events: Arc<dyn Events>,
    stop: CancellationToken,
) -> Result<Outcome, JobError> {
    let settings = NixSettings::load().map_err(|e| JobError::Settings(Box::new(e)))?;
    let mut choice = request.machines.clone();
    if request.through_daemon {
        // The hosts are the daemon's builders, which the hook checks them against.
        choice.on.clear();
        choice.exclude.clear();
    }
    let mut machines = build_fleet(&choice, &settings)?;
    let mut options = options(request, &settings)?;
    let planned = plan(request)?;
    options.routes = routes(request).await?;
    if request.check {
        options.check = planned.roots.iter().cloned().collect();
    }
    if request.dry_run {
        return Ok(Outcome::DryRun {
            plan: planned.plan,
            machines,
            routes: options.routes,
        });
    }
    finish::substitute(&planned.plan.will_fetch, &*events)?;
    let mut will_build: Vec<StorePath> = planned
        .plan
        .will_build
        .iter()
        .filter_map(|p| StorePath::from_absolute_path(p).ok())
        .collect();
    if request.check {
        // Checked targets are built again wherever the plan puts them, valid or not.
        will_build.extend(planned.targets.iter().map(|t| t.drv.clone()));
    }
    let history = open_state(&request.state, &settings.system, &mut options)?;
    let nodes = build_nodes(&planned.drvs, &will_build, &options.knowledge)?;
    let links = result_links(request, &planned)?;
    if request.through_daemon {
        finish::through_daemon(&request.machines, &planned.plan.will_build, &planned.roots).await?;
        return finish::link(request.out_link.is_some(), &links);
    }
    let mut wanted: Vec<String> = links.iter().map(|(_, p)| p.clone()).collect();
    if request.fetch_all_outputs {
        wanted.extend(
            nodes
                .iter()
                .flat_map(|n| n.outputs.iter().map(|(_, p)| p.clone())),
        );
    }
    if !will_build.is_empty() || !options.check.is_empty() {
        let sign_key = request.sign_key.as_deref();
        options.local_access =
            access::check(sign_key, request.no_local_fallback, &mut machines, &*events).await?;
    }
    options.logs = finish::log_destination(&options.local_access, &request.state, &*events);
    let job = Job {
        request,
        options,
        history,
        links,
        roots: planned.roots,
        events,
    };
    job.build(nodes, machines, wanted, stop).await
}

/// The build's options from the request and Nix's settings.
fn options(request: &BuildRequest, settings: &NixSettings) -> Result<BuildOptions, JobError> {
    let mut options = BuildOptions {
        keep_going: request.keep_going,
        builders_use_substitutes: request.builders_use_substitutes
            || settings.builders_use_substitutes,
        settings: request.settings.clone(),
        local_access: Default::default(),
        logs: LogDestination::Nowhere,
        session_options: Vec::new(),
        check: Default::default(),
        reliability: request.reliability.clone(),
        knowledge: Default::default(),
        routes: Default::default(),
    };
    for (name, value) in &request.evaluation.options {
        options
            .set_nix_option(name, value)
            .map_err(JobError::NixOption)?;
    }
    Ok(options)
}

/// How copies go and where the outputs end up; a `--to` target is opened here first,
/// so that one that cannot be used is named before any build starts.
async fn routes(request: &BuildRequest) -> Result<RouteOptions, JobError> {
    let deliver_to = match &request.deliver_to {
        Some(uri) => {
            let target = DeliveryTarget::new(uri, request.sign_key.as_deref())
                .map_err(|e| JobError::Target(Box::new(e)))?;
            target
                .probe(offload_nix::store_path::store_dir().as_str())
                .await
                .map_err(|e| JobError::Target(Box::new(e)))?;
            Some(target)
        }
        None => None,
    };
    Ok(RouteOptions {
        relay: request.relay,
        forward_agent: request.forward_agent,
        deliver_to,
    })
}

/// Evaluates the request, reads the derivations and asks Nix what it would build and
/// fetch.
fn plan(request: &BuildRequest) -> Result<Planned, JobError> {
    let targets = evaluate::evaluate(&request.evaluation)?;
    let roots: Vec<StorePath> = targets.iter().map(|t| t.drv.clone()).collect();
    let read_started = std::time::Instant::now();
    let drvs = tokio::task::block_in_place(|| read_drv_closure(Path::new("/"), &roots))?;
    tracing::info!(
        "read {} derivations in {:.0} ms",
        drvs.len(),
        read_started.elapsed().as_secs_f64() * 1e3
    );
    // Nix decides what must be built and what it can fetch; offload builds the first.
    let roots: Vec<String> = roots.iter().map(StorePath::to_absolute).collect();
    let plan = dry_run(None, &roots).map_err(JobError::DryRun)?;
    Ok(Planned {
        targets,
        drvs,
        roots,
        plan,
    })
}

/// The state database, and what it learned into `options`; without it, default
/// estimates.
fn open_state(
    path: &Path,
    system: &str,
    options: &mut BuildOptions,
) -> Result<Option<StateDb>, JobError> {
    let history = match StateDb::open(path) {
        Ok(h) => Some(h),
        // A shared state this offload must not use is not quietly replaced.
        Err(e) if e.refuses() => return Err(JobError::State(Box::new(e))),
        Err(e) => {
            tracing::warn!("{e}; planning with default estimates");
            None
        }
    };
    if let Some(h) = &history {
        match h.knowledge(system) {
            Ok(k) => options.knowledge = k,
            Err(e) => tracing::warn!("{e}; planning with default estimates"),
        }
    }
    Ok(history)
}

/// Each requested output with its result link's name, as nix-build names them.
fn result_links(
    request: &BuildRequest,
    planned: &Planned,
) -> Result<Vec<(String, String)>, JobError> {
    let base = request.out_link.as_deref().unwrap_or_default();
    let mut links = Vec::new();
    for t in &planned.targets {
        let drv = &planned.drvs[&t.drv];
        let outputs: Vec<String> = match &t.outputs {
            Some(o) => o.clone(),
            None => drv.outputs.keys().cloned().collect(),
        };
        for o in outputs {
            let path = output_path(&t.drv, drv, &o)?;
            let mut link = format!("{base}{}", t.link_suffix);
            if o != "out" {
                link.push_str(&format!("-{o}"));
            }
            links.push((link, path));
        }
    }
    Ok(links)
}

/// A job past its plan: what the build needs besides the graph and the fleet.
struct Job<'a> {
    request: &'a BuildRequest,
    options: BuildOptions,
    history: Option<StateDb>,
    /// Result links and the output paths they point at.
    links: Vec<(String, String)>,
    /// The requested `.drv` paths.
    roots: Vec<String>,
    events: Arc<dyn Events>,
}

impl Job<'_> {
    /// Builds, keeps the run, tells the summary, then links the results.
    async fn build(
        self,
        nodes: Vec<build::BuildNode>,
        machines: Vec<MachineConfig>,
        wanted: Vec<String>,
        stop: CancellationToken,
    ) -> Result<Outcome, JobError> {
        let work: f64 = nodes.iter().map(|n| n.estimate).sum();
        let recorder = record::Recorder::new(self.events.clone());
        self.events.planned(nodes.len(), work, &machines);
        let names: Vec<String> = nodes.iter().map(|n| n.drv_path.clone()).collect();
        let deps: Vec<Vec<usize>> = nodes.iter().map(|n| n.deps.clone()).collect();
        let fleet: Vec<ReportMachine> = machines
            .iter()
            .map(|m| ReportMachine {
                name: m.spec.name.clone(),
                slots: m.spec.slots,
            })
            .collect();
        let report = build::run(
            nodes,
            machines,
            wanted,
            self.history.as_ref(),
            &self.options,
            recorder.clone(),
            stop,
        )
        .await
        .map_err(|e| JobError::Build(Box::new(e)))?;
        let mut run = record::run_report(&names, &deps, fleet, &report);
        run.transfers = recorder.transfers();
        run.delivered_to = self.request.deliver_to.clone();
        for file in &self.request.files {
            file.write(&run)?;
        }
        if let Some(h) = &self.history {
            record(h, &run);
        }
        let outputs: Vec<String> = self.links.iter().map(|(_, p)| p.clone()).collect();
        self.events.summary(&Summary {
            report: &report,
            drvs: &names,
            outputs: &outputs,
            cpu_seconds: finish::own_cpu_seconds(),
            delivered_to: self.request.deliver_to.as_deref(),
        });
        failures(&report, &names)?;
        if self.request.repair {
            finish::repair(&self.roots)?;
        }
        // Delivered elsewhere, the outputs are not here to link to.
        let link = self.request.out_link.is_some() && self.request.deliver_to.is_none();
        finish::link(link, &self.links)
    }
}

/// The failed builds and a failed copy-back, as one error with each log's last lines.
fn failures(report: &BuildReport, names: &[String]) -> Result<(), JobError> {
    let failed: Vec<(usize, &NodeResult)> = report
        .results
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, NodeResult::Failed { .. }))
        .collect();
    if failed.is_empty() && report.copy_back_error.is_none() {
        return Ok(());
    }
    let mut details = String::new();
    for (i, r) in &failed {
        if let NodeResult::Failed { failure, log_tail } = r {
            details.push_str(&format!("\n  {}: {failure}", names[*i]));
            if !log_tail.is_empty() {
                details.push_str(&format!("\n    last {} log lines:", log_tail.len()));
                for l in log_tail {
                    details.push_str(&format!("\n    > {l}"));
                }
            }
        }
    }
    if let Some(e) = &report.copy_back_error {
        details.push_str(&format!("\n  copying the results back failed: {e}"));
    }
    Err(JobError::Failed {
        failed: failed.len(),
        total: report.results.len(),
        details,
    })
}
