//! One accepted build, as Nix's own hook carries it out (`build-remote.cc`): read the
//! inputs and wanted outputs, copy the inputs the builder lacks, build with the log on
//! fd 4, copy the missing outputs back into the local store, exit with Nix's status.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use offload_nix::derivation::Derivation;
use offload_nix::hook::{BuildInputs, BuildInputsDecoder, LogLevel, TryRequest};
use offload_nix::serve::{BuildSettings, BuildStatus};
use offload_nix::store_path::{derivation_name, StorePath};
use offload_nix::wire::{tokio_io::read_message, WireError};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::{tell, HookExit, HookSettings};
use crate::env::{SLOT_WAIT_LIMIT, UPLOAD_LOCK_LIMIT};
use crate::error::DriverError;
use crate::fleet::{MachineConfig, LOCAL};
use crate::history::History;
use crate::plan::{output_path, PlanError};
use crate::session::ServeConn;
use crate::slots::remote::{RemoteSlot, RemoteSlots};
use crate::slots::SlotLedger;
use crate::ssh::Endpoint;
use crate::transfer::PathRegistry;

/// Where Nix reads the build log of a hook's build.
const BUILD_LOG_FD: &str = "/proc/self/fd/4";

/// One accepted build as it travels to whoever carries it out: this hook process, or
/// the agent ([`crate::agent`]) with its warm sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildOrder {
    pub drv_path: String,
    /// The store Nix builds into, unless it is the default local one.
    pub store: Option<String>,
    pub builders_use_substitutes: bool,
    pub max_silent_time: u64,
    pub build_timeout: u64,
    pub max_log_size: u64,
    pub keep_failed: bool,
    /// What Nix sent after the accept.
    pub inputs: Vec<String>,
    pub wanted_outputs: Vec<String>,
    /// The builder's slots, to lock on the builder itself ([`crate::slots::remote`]);
    /// 0 (from a hook that does not send it): no such lock.
    #[serde(default)]
    pub slots: u32,
}

impl BuildOrder {
    fn new(job: &Job<'_>, inputs: BuildInputs) -> BuildOrder {
        let build = &job.settings.build;
        BuildOrder {
            drv_path: job.request.drv_path.clone(),
            store: job.settings.store.clone(),
            builders_use_substitutes: job.settings.builders_use_substitutes,
            max_silent_time: build.max_silent_time,
            build_timeout: build.build_timeout,
            max_log_size: build.max_log_size,
            keep_failed: build.keep_failed,
            inputs: inputs.inputs,
            wanted_outputs: inputs.wanted_outputs,
            slots: job.machine.spec.slots,
        }
    }

    fn build_settings(&self) -> BuildSettings {
        BuildSettings {
            max_silent_time: self.max_silent_time,
            build_timeout: self.build_timeout,
            max_log_size: self.max_log_size,
            keep_failed: self.keep_failed,
            ..BuildSettings::default()
        }
    }
}

/// How a build carried out elsewhere (by the agent) failed, as the hook reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderFailure {
    pub message: String,
    /// Nix's build status code when the builder itself failed.
    pub status: Option<u64>,
}

impl From<&HookError> for OrderFailure {
    fn from(e: &HookError) -> OrderFailure {
        OrderFailure {
            message: describe(e),
            status: match e {
                HookError::Build { status, .. } => Some(status.code()),
                _ => None,
            },
        }
    }
}

/// What the accepted build is.
pub(super) struct Job<'a> {
    pub request: &'a TryRequest,
    pub machine: &'a MachineConfig,
    pub settings: &'a HookSettings,
    pub history: Option<&'a History>,
    pub ledger: &'a SlotLedger,
}

/// Why an accepted build did not end with its outputs here.
#[derive(Debug, Error)]
pub(crate) enum HookError {
    #[error("cannot read the inputs Nix sends after an accept")]
    Inputs(#[source] WireError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("build of '{drv}' on '{machine}' failed: {message}")]
    Build {
        drv: String,
        machine: String,
        message: String,
        status: BuildStatus,
    },
    #[error("{path} was built on '{machine}' but is not valid there")]
    OutputMissing { machine: String, path: String },
    #[error("{}", .0.message)]
    Agent(OrderFailure),
}

/// Carries out the build; every failure is told to Nix (an `@nix` error message) and
/// becomes the exit status Nix reads.
pub(super) async fn build(
    job: Job<'_>,
    session: Option<ServeConn>,
    input: &mut (impl AsyncRead + Unpin),
    replies: &mut impl Write,
) -> HookExit {
    let started = Instant::now();
    let result = match read_message(input, BuildInputsDecoder::default()).await {
        Ok(inputs) => {
            let order = BuildOrder::new(&job, inputs);
            by_agent_or_here(&job, session, &order, replies).await
        }
        Err(e) => Err(HookError::Inputs(e)),
    };
    match result {
        Ok(()) => {
            if let Some(history) = job.history {
                let name = derivation_name(&job.request.drv_path);
                let seconds = started.elapsed().as_secs_f64();
                let spec = &job.machine.spec;
                if let Err(e) = history.record(
                    name,
                    &job.request.system,
                    &job.machine.endpoint.name,
                    seconds,
                    spec.speed,
                    None,
                ) {
                    tracing::debug!("{e}");
                }
            }
            HookExit::Done
        }
        Err(e) => {
            let failure = OrderFailure::from(&e);
            tell(replies, LogLevel::Error, &failure.message);
            match failure.status.map(BuildStatus::from_code) {
                Some(BuildStatus::TimedOut) => HookExit::TimedOut,
                Some(BuildStatus::PermanentFailure) => HookExit::PermanentFailure,
                _ => HookExit::Failed,
            }
        }
    }
}

/// The error with its causes and the driver's hint, as one message for Nix.
fn describe(e: &HookError) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    if let HookError::Driver(d) = e {
        if let Some(hint) = d.hint() {
            msg.push_str(&format!("\nhint: {hint}"));
        }
    }
    msg
}

/// Hands the build to the agent when one listens (its sessions are warm: no ssh
/// handshake), else carries it out in this process; says once in the log which.
async fn by_agent_or_here(
    job: &Job<'_>,
    session: Option<ServeConn>,
    order: &BuildOrder,
    replies: &mut impl Write,
) -> Result<(), HookError> {
    let socket = crate::env::agent_socket();
    let mut log = BuildLog::open();
    if let Some(mut remote) = session {
        let _on_builder = hold_on_builder(&job.machine.endpoint, order).await?;
        return carry_out(order, &mut remote, job.ledger, &mut |line| log.line(line)).await;
    }
    match crate::agent::AgentClient::connect(&socket).await {
        Ok(client) => {
            let done = client
                .build(&job.machine.endpoint, order, &mut |line| log.line(line))
                .await;
            match done {
                Ok(Ok(())) => Ok(()),
                Ok(Err(failure)) => Err(HookError::Agent(failure)),
                Err(e) => Err(HookError::Agent(OrderFailure {
                    message: format!("the offload agent at {} failed: {e}", socket.display()),
                    status: None,
                })),
            }
        }
        Err(e) => {
            tracing::debug!("no agent: {e}");
            tell(
                replies,
                LogLevel::Talkative,
                &format!(
                    "offload hook: no agent at {} ({e}); this build opens its own sessions \
                     (`offload agent` keeps them open between builds)",
                    socket.display()
                ),
            );
            let _on_builder = hold_on_builder(&job.machine.endpoint, order).await?;
            let mut remote = ServeConn::open(&job.machine.endpoint).await?;
            carry_out(order, &mut remote, job.ledger, &mut |line| log.line(line)).await
        }
    }
}

/// A slot of the builder locked on the builder itself, across clients, held by the
/// caller for the build (the client-side slot is held since the choice). This process
/// builds once: its broker lives as long as the slot.
pub(crate) async fn hold_on_builder(
    endpoint: &Endpoint,
    order: &BuildOrder,
) -> Result<Option<RemoteSlot>, DriverError> {
    RemoteSlots::new([(endpoint.clone(), order.slots)])
        .take(0, SLOT_WAIT_LIMIT)
        .await
}

/// Carries out `order` on the machine behind `remote` (a session the caller opened, or a
/// warm one from the agent's pool): the inputs it lacks, the build with its log handed
/// to `log`, the missing outputs back into the local store.
pub(crate) async fn carry_out(
    order: &BuildOrder,
    remote: &mut ServeConn,
    ledger: &SlotLedger,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<(), HookError> {
    let drv_path = &order.drv_path;
    let store_root = order
        .store
        .as_deref()
        .filter(|s| s.starts_with('/'))
        .unwrap_or("/");
    let file = Path::new(store_root).join(drv_path.trim_start_matches('/'));
    let text = std::fs::read(&file).map_err(|source| PlanError::Read {
        path: file.clone(),
        source,
    })?;
    let drv = Derivation::parse(&text).map_err(|source| PlanError::Parse {
        path: drv_path.clone(),
        source,
    })?;
    let parsed = StorePath::from_absolute_path(drv_path).map_err(PlanError::from)?;
    let outputs = drv
        .outputs
        .keys()
        .map(|name| Ok((name.clone(), output_path(&parsed, &drv, name)?)))
        .collect::<Result<Vec<_>, PlanError>>()?;

    // Nix holds the outputs' locks while the hook runs: the local import must not wait
    // for them (LocalStore reads NIX_HELD_LOCKS when it opens).
    let mut local_endpoint = Endpoint::local("local", order.store.clone());
    let held: Vec<&str> = outputs.iter().map(|(_, p)| p.as_str()).collect();
    local_endpoint
        .env
        .push(("NIX_HELD_LOCKS".into(), held.join(" ")));
    let machine = remote.machine().to_string();
    let mut local = ServeConn::open(&local_endpoint).await?;

    {
        let _upload = ledger.upload_lock(&machine, UPLOAD_LOCK_LIMIT).await?;
        let substitute = order.builders_use_substitutes;
        let present = remote
            .query_valid_paths(&order.inputs, false, substitute)
            .await?;
        let missing: Vec<String> = order
            .inputs
            .iter()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        copy(&mut local, remote, &missing).await?;
    }

    // As Nix's hook does: with input derivations, the whole input closure goes as sources.
    let srcs = if drv.input_drvs.is_empty() {
        drv.input_srcs.iter().map(StorePath::to_absolute).collect()
    } else {
        order.inputs.clone()
    };
    let basic = drv.to_basic(srcs);
    let settings = order.build_settings();
    let (tx, mut rx) = mpsc::unbounded_channel();
    remote.set_log_sink(Some(tx));
    let result = {
        let build = remote.build_derivation(drv_path, &basic, &settings);
        tokio::pin!(build);
        loop {
            tokio::select! {
                r = &mut build => break r,
                Some(line) = rx.recv() => log(&line),
            }
        }
    };
    remote.set_log_sink(None);
    while let Ok(line) = rx.try_recv() {
        log(&line);
    }
    let result = result?;
    if !result.status.is_success() {
        return Err(HookError::Build {
            drv: drv_path.clone(),
            machine,
            message: if result.error_msg.is_empty() {
                format!("{:?}", result.status)
            } else {
                result.error_msg
            },
            status: result.status,
        });
    }

    let wanted: Vec<String> = outputs
        .iter()
        .filter(|(name, _)| order.wanted_outputs.is_empty() || order.wanted_outputs.contains(name))
        .map(|(_, p)| p.clone())
        .collect();
    let valid_here = local.query_valid_paths(&wanted, false, false).await?;
    let missing: Vec<String> = wanted
        .into_iter()
        .filter(|p| !valid_here.contains(p))
        .collect();
    copy(remote, &mut local, &missing).await?;
    let _ = local.close().await;
    Ok(())
}

/// Copies `paths` (valid on `from`) to `to`, each after the ones it refers to.
async fn copy(from: &mut ServeConn, to: &mut ServeConn, paths: &[String]) -> Result<(), HookError> {
    if paths.is_empty() {
        return Ok(());
    }
    let infos = from.query_path_infos(paths).await?;
    if let Some(lost) = paths.iter().find(|p| !infos.iter().any(|i| &i.path == *p)) {
        return Err(HookError::OutputMissing {
            machine: from.machine().to_string(),
            path: lost.clone(),
        });
    }
    let mut known = PathRegistry::default();
    for info in infos {
        known.insert(info, LOCAL);
    }
    // Dependencies first; references outside `paths` are valid there already.
    for path in known.closure(paths) {
        if let Some(info) = known.info(&path) {
            to.add_to_store_nar_from(info, from).await?;
        }
    }
    Ok(())
}

/// The build log, written where Nix reads it: fd 4, or stderr when the hook was started
/// without one (by hand).
struct BuildLog {
    to: Option<std::fs::File>,
}

impl BuildLog {
    fn open() -> BuildLog {
        let to = std::fs::OpenOptions::new()
            .write(true)
            .open(BUILD_LOG_FD)
            .map_err(|e| tracing::debug!("no build log pipe at {BUILD_LOG_FD}: {e}"))
            .ok();
        BuildLog { to }
    }

    fn line(&mut self, line: &str) {
        let written = match &mut self.to {
            Some(f) => writeln!(f, "{line}"),
            None => writeln!(std::io::stderr(), "{line}"),
        };
        if written.is_err() {
            // Nix went away: nobody reads the log; the build's own result still counts.
            self.to = None;
        }
    }
}
