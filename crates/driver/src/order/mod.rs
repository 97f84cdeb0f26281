//! A build order: one build Nix's hook accepted, carried out on the builder by whoever
//! holds a session there (the hook process itself, or the agent with its warm
//! sessions): the inputs the builder lacks, the build with its log, the missing outputs
//! back into the local store.

mod held_locks;

use offload_nix::serve::{BuildSettings, BuildStatus};
use offload_nix::store_path::StorePath;
use offload_nix::wire::WireError;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::env::UPLOAD_LOCK_LIMIT;
use crate::error::DriverError;
use crate::fleet::LOCAL;
use crate::plan::{output_path, PlanError};
use crate::session::ServeConn;
use crate::slots::SlotLedger;
use crate::ssh::Endpoint;
use crate::transfer::PathRegistry;

/// One accepted build as it travels to whoever carries it out: this hook process, or
/// the agent (`offload agent`) with its warm sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildOrder {
    pub drv_path: String,
    /// The store Nix builds into, unless it is the default local one.
    pub store: Option<String>,
    /// The store directory of the hook's paths; None (from a hook that does not send
    /// it): the carrier's own.
    #[serde(default)]
    pub store_dir: Option<String>,
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
    /// Nix's `experimental-features`: with `ca-derivations`, floating content-addressed
    /// outputs are registered here as Nix's hook registers them (`realise.rs`).
    #[serde(default)]
    pub experimental_features: Vec<String>,
}

impl BuildOrder {
    /// The derivation's name (`hello-2.12`), as leases name the build.
    pub(crate) fn name(&self) -> &str {
        crate::state::leases::drv_name(&self.drv_path)
    }

    pub(crate) fn build_settings(&self) -> BuildSettings {
        BuildSettings {
            max_silent_time: self.max_silent_time,
            build_timeout: self.build_timeout,
            max_log_size: self.max_log_size,
            keep_failed: self.keep_failed,
            ..BuildSettings::default()
        }
    }
}

/// NAR bytes a build order moved: inputs to the builder (`sent`), outputs home
/// (`fetched`); what landed counts, even when a later step failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub sent: u64,
    pub fetched: u64,
}

/// How a build carried out elsewhere (by the agent) failed, as the hook reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderFailure {
    pub message: String,
    /// Nix's build status code when the builder itself failed.
    pub status: Option<u64>,
}

impl From<&OrderError> for OrderFailure {
    fn from(e: &OrderError) -> OrderFailure {
        OrderFailure {
            message: describe(e),
            status: match e {
                OrderError::Build { status, .. } => Some(status.code()),
                _ => None,
            },
        }
    }
}

/// Why an accepted build did not end with its outputs here.
#[derive(Debug, Error)]
pub enum OrderError {
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
    #[error(
        "the build's paths are under the store directory {order}, but this offload agent's \
         is {here}; start the agent with NIX_STORE_DIR={order}, as Nix runs"
    )]
    OtherStoreDir { order: String, here: String },
    #[error(transparent)]
    Realise(#[from] crate::realise::RealiseError),
}

impl From<crate::drv::ReadError> for OrderError {
    fn from(e: crate::drv::ReadError) -> OrderError {
        match e {
            crate::drv::ReadError::Plan(e) => OrderError::Plan(e),
            crate::drv::ReadError::Driver(e) => OrderError::Driver(e),
        }
    }
}

/// The error with its causes and the driver's hint, as one message for Nix.
fn describe(e: &OrderError) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    if let OrderError::Driver(d) = e {
        if let Some(hint) = d.hint() {
            msg.push_str(&format!("\nhint: {hint}"));
        }
    }
    msg
}

/// Carries out `order` on the machine behind `remote` (a session the caller opened, or a
/// warm one from the agent's pool): the inputs it lacks, the build with its log handed
/// to `log`, the missing outputs back into the local store. What it is doing goes to
/// `note`, in the words of Nix's hook; the bytes copied are added to `moved`.
pub(crate) async fn carry_out(
    order: &BuildOrder,
    remote: &mut ServeConn,
    ledger: &SlotLedger,
    log: &mut (dyn FnMut(&str) + Send),
    note: &mut (dyn FnMut(&str) + Send),
    moved: &mut Moved,
) -> Result<(), OrderError> {
    let drv_path = &order.drv_path;
    same_store_dir(order)?;
    // Through the store Nix names, as Nix's hook reads it (a binary cache has no file).
    let drv = crate::drv::read(order.store.as_deref(), drv_path).await?;
    let parsed = StorePath::from_absolute_path(drv_path).map_err(PlanError::from)?;
    // Floating content-addressed outputs have no path before they are built.
    let floating = crate::realise::Floating::of(&drv);
    let outputs = match floating {
        Some(_) => Vec::new(),
        None => drv
            .outputs
            .keys()
            .map(|name| Ok((name.clone(), output_path(&parsed, &drv, name)?)))
            .collect::<Result<Vec<_>, PlanError>>()?,
    };

    // Nix holds the outputs' locks while the hook runs: the local import must not wait
    // for them (LocalStore reads NIX_HELD_LOCKS when it opens, up to Nix 2.28; see
    // order/held_locks.rs for later ones).
    let mut local_endpoint = Endpoint::local("local", order.store.clone());
    let held: Vec<&str> = outputs.iter().map(|(_, p)| p.as_str()).collect();
    local_endpoint
        .env
        .push(("NIX_HELD_LOCKS".into(), held.join(" ")));
    let machine = remote.machine().to_string();
    let mut local = ServeConn::open(&local_endpoint).await?;

    {
        // Nix's hook says these at `-v` (lvlTalkative); so does offload's.
        note(&format!("waiting for the upload lock to '{machine}'..."));
        let _upload = ledger.upload_lock(&machine, UPLOAD_LOCK_LIMIT).await?;
        note(&format!("copying dependencies to '{machine}'..."));
        let substitute = order.builders_use_substitutes;
        // With `lock`: what the builder has is held by this session (a temporary GC
        // root) until it ends, as what is copied through it is; its garbage collector
        // cannot take an input between this answer and the build.
        let present = remote
            .query_valid_paths(&order.inputs, true, substitute)
            .await?;
        let missing: Vec<String> = order
            .inputs
            .iter()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        copy(&mut local, remote, &missing, &mut moved.sent).await?;
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
        return Err(OrderError::Build {
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

    let home = (&mut local, &local_endpoint);
    match floating {
        Some(floating) => {
            let built = crate::realise::reported(
                &floating,
                &order.wanted_outputs,
                &result,
                &machine,
                drv_path,
            )?;
            realised_home(order, built, remote, home, note, &mut moved.fetched).await?;
        }
        None => {
            let wanted: Vec<String> = outputs
                .iter()
                .filter(|(name, _)| {
                    order.wanted_outputs.is_empty() || order.wanted_outputs.contains(name)
                })
                .map(|(_, p)| p.clone())
                .collect();
            outputs_home(remote, home, wanted, note, &mut moved.fetched).await?;
        }
    }
    let _ = local.close().await;
    Ok(())
}

/// An error when `order` comes from a hook whose store directory is not this process's.
fn same_store_dir(order: &BuildOrder) -> Result<(), OrderError> {
    let here = offload_nix::store_path::store_dir();
    match order.store_dir.as_ref().filter(|d| *d != here.as_str()) {
        Some(dir) => Err(OrderError::OtherStoreDir {
            order: dir.clone(),
            here: here.to_string(),
        }),
        None => Ok(()),
    }
}

/// Floating content-addressed outputs the builder reported (`built`), as Nix's hook
/// brings them home: those the local store has no realisation for are copied here, then
/// their realisations registered.
async fn realised_home(
    order: &BuildOrder,
    built: Vec<crate::realise::Built>,
    remote: &mut ServeConn,
    local: (&mut ServeConn, &Endpoint),
    note: &mut (dyn FnMut(&str) + Send),
    fetched: &mut u64,
) -> Result<(), OrderError> {
    let features = &order.experimental_features;
    let mut here =
        crate::realise::LocalRealisations::open(order.store.as_deref(), features).await?;
    let built = here.missing(built).await?;
    let paths: Vec<String> = built.iter().map(|b| b.out_path.clone()).collect();
    outputs_home(remote, local, paths, note, fetched).await?;
    here.register(&built).await?;
    Ok(())
}

/// Copies those of `wanted` (outputs valid on the builder behind `remote`) that are not
/// valid in `local` there, with what they refer to that `local` lacks: a binary cache
/// holds the inputs' closures only as far as Nix put them there.
async fn outputs_home(
    remote: &mut ServeConn,
    (local, local_endpoint): (&mut ServeConn, &Endpoint),
    wanted: Vec<String>,
    note: &mut (dyn FnMut(&str) + Send),
    fetched: &mut u64,
) -> Result<(), OrderError> {
    let closure = if wanted.is_empty() {
        wanted
    } else {
        remote.query_closure(&wanted, false).await?
    };
    let valid_here = local.query_valid_paths(&closure, false, false).await?;
    let missing: Vec<String> = closure
        .into_iter()
        .filter(|p| !valid_here.contains(p))
        .collect();
    note(&format!("copying outputs from '{}'...", remote.machine()));
    for lock in held_locks::release_held_output_locks(local_endpoint, &missing).await {
        tracing::debug!("removed the name of {lock}, held by the Nix that runs this hook");
    }
    copy(remote, local, &missing, fetched).await
}

/// Copies `paths` (valid on `from`) to `to`, each after the ones it refers to; adds
/// the NAR bytes of each that lands to `bytes`.
async fn copy(
    from: &mut ServeConn,
    to: &mut ServeConn,
    paths: &[String],
    bytes: &mut u64,
) -> Result<(), OrderError> {
    if paths.is_empty() {
        return Ok(());
    }
    let infos = from.query_path_infos(paths).await?;
    if let Some(lost) = paths.iter().find(|p| !infos.iter().any(|i| &i.path == *p)) {
        return Err(OrderError::OutputMissing {
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
            *bytes += info.nar_size;
        }
    }
    Ok(())
}

/// How often a wait is said.
pub(crate) const WAIT_NOTICE: std::time::Duration = std::time::Duration::from_secs(30);

/// Awaits `work`, telling `say` every [`WAIT_NOTICE`] that it waits and for what.
pub(crate) async fn saying_while<T>(
    work: impl std::future::Future<Output = T>,
    what: &str,
    say: &mut (dyn FnMut(&str) + Send),
) -> T {
    tokio::pin!(work);
    let started = std::time::Instant::now();
    let first = tokio::time::Instant::now() + WAIT_NOTICE;
    let mut tick = tokio::time::interval_at(first, WAIT_NOTICE);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tick.tick() => say(&format!(
                "{what}; {} s so far, giving up after {} s",
                started.elapsed().as_secs(),
                crate::env::SLOT_WAIT_LIMIT.as_secs()
            )),
        }
    }
}
