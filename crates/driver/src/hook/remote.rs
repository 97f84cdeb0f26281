//! One accepted build, as Nix's own hook carries it out (`build-remote.cc`): read the
//! inputs and wanted outputs, copy the inputs the builder lacks, build with the log on
//! fd 4, copy the missing outputs back into the local store, exit with Nix's status.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use offload_nix::derivation::Derivation;
use offload_nix::hook::{BuildInputs, BuildInputsDecoder, LogLevel, TryRequest};
use offload_nix::serve::BuildStatus;
use offload_nix::store_path::StorePath;
use offload_nix::wire::{tokio_io::read_message, WireError};
use thiserror::Error;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::{tell, HookExit, HookSettings};
use crate::error::DriverError;
use crate::fleet::{MachineConfig, LOCAL};
use crate::history::History;
use crate::paths::PathRegistry;
use crate::plan::{output_path, PlanError};
use crate::session::ServeConn;
use crate::slots::SlotLedger;
use crate::transport::Endpoint;

/// How long the upload lock is waited for, as Nix's hook does (15 minutes).
const UPLOAD_LOCK_LIMIT: Duration = Duration::from_secs(15 * 60);
/// Where Nix reads the build log of a hook's build.
const BUILD_LOG_FD: &str = "/proc/self/fd/4";

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
enum HookError {
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
}

/// Carries out the build; every failure is told to Nix (an `@nix` error message) and
/// becomes the exit status Nix reads.
pub(super) async fn build(
    job: Job<'_>,
    input: &mut (impl AsyncRead + Unpin),
    replies: &mut impl Write,
) -> HookExit {
    let started = Instant::now();
    let result = match read_message(input, BuildInputsDecoder::default()).await {
        Ok(inputs) => carry_out(&job, &inputs).await,
        Err(e) => Err(HookError::Inputs(e)),
    };
    match result {
        Ok(()) => {
            if let Some(history) = job.history {
                let name = super::name_of(&job.request.drv_path);
                let seconds = started.elapsed().as_secs_f64();
                let spec = &job.machine.spec;
                if let Err(e) =
                    history.record(name, &job.request.system, &spec.name, seconds, spec.speed)
                {
                    tracing::debug!("{e}");
                }
            }
            HookExit::Done
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            if let HookError::Driver(d) = &e {
                if let Some(hint) = d.hint() {
                    msg.push_str(&format!("\nhint: {hint}"));
                }
            }
            tell(replies, LogLevel::Error, &msg);
            match e {
                HookError::Build {
                    status: BuildStatus::TimedOut,
                    ..
                } => HookExit::TimedOut,
                HookError::Build {
                    status: BuildStatus::PermanentFailure,
                    ..
                } => HookExit::PermanentFailure,
                _ => HookExit::Failed,
            }
        }
    }
}

async fn carry_out(job: &Job<'_>, inputs: &BuildInputs) -> Result<(), HookError> {
    let drv_path = &job.request.drv_path;
    let store_root = job
        .settings
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
    let mut local_endpoint = Endpoint::local("local", job.settings.store.clone());
    let held: Vec<&str> = outputs.iter().map(|(_, p)| p.as_str()).collect();
    local_endpoint
        .env
        .push(("NIX_HELD_LOCKS".into(), held.join(" ")));
    let machine = &job.machine.endpoint.name;
    // Both sessions start at once: the ssh handshake is most of a short build's cost.
    let (mut local, mut remote) = tokio::try_join!(
        ServeConn::open(&local_endpoint),
        ServeConn::open(&job.machine.endpoint)
    )?;

    {
        let _upload = job.ledger.upload_lock(machine, UPLOAD_LOCK_LIMIT).await?;
        let substitute = job.settings.builders_use_substitutes;
        let present = remote
            .query_valid_paths(&inputs.inputs, false, substitute)
            .await?;
        let missing: Vec<String> = inputs
            .inputs
            .iter()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        copy(&mut local, &mut remote, &missing).await?;
    }

    // As Nix's hook does: with input derivations, the whole input closure goes as sources.
    let srcs = if drv.input_drvs.is_empty() {
        drv.input_srcs.iter().map(StorePath::to_absolute).collect()
    } else {
        inputs.inputs.clone()
    };
    let basic = drv.to_basic(srcs);
    let mut log = BuildLog::open();
    let (tx, mut rx) = mpsc::unbounded_channel();
    remote.set_log_sink(Some(tx));
    let result = {
        let build = remote.build_derivation(drv_path, &basic, &job.settings.build);
        tokio::pin!(build);
        loop {
            tokio::select! {
                r = &mut build => break r,
                Some(line) = rx.recv() => log.line(&line),
            }
        }
    };
    remote.set_log_sink(None);
    while let Ok(line) = rx.try_recv() {
        log.line(&line);
    }
    let result = result?;
    if !result.status.is_success() {
        return Err(HookError::Build {
            drv: drv_path.clone(),
            machine: machine.clone(),
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
        .filter(|(name, _)| {
            inputs.wanted_outputs.is_empty() || inputs.wanted_outputs.contains(name)
        })
        .map(|(_, p)| p.clone())
        .collect();
    let valid_here = local.query_valid_paths(&wanted, false, false).await?;
    let missing: Vec<String> = wanted
        .into_iter()
        .filter(|p| !valid_here.contains(p))
        .collect();
    copy(&mut remote, &mut local, &missing).await?;
    let _ = local.close().await;
    let _ = remote.close().await;
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
