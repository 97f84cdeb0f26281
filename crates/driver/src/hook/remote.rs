//! One accepted build, as Nix's own hook carries it out (`build-remote.cc`): read the
//! inputs and wanted outputs, hand the build order to the agent or carry it out here
//! ([`crate::order`]) with the log on fd 4, exit with Nix's status.

use std::io::Write;
use std::time::Instant;

use offload_nix::hook::{BuildInputs, BuildInputsDecoder, LogLevel, TryRequest};
use offload_nix::store_path::derivation_name;
use offload_nix::wire::tokio_io::read_message;
use tokio::io::AsyncRead;

use super::{tell, HookExit, HookSettings};
use crate::env::SLOT_WAIT_LIMIT;
use crate::error::DriverError;
use crate::fleet::MachineConfig;
use crate::order::{carry_out, saying_while, BuildOrder, Moved, OrderError, OrderFailure};
use crate::session::ServeConn;
use crate::slots::remote::{RemoteSlot, RemoteSlots};
use crate::slots::SlotLedger;
use crate::ssh::Endpoint;
use crate::state::leases::{Lease, Leases};
use crate::state::StateDb;

/// Where Nix reads the build log of a hook's build.
const BUILD_LOG_FD: &str = "/proc/self/fd/4";

/// The order for the accepted build `job`, with the inputs Nix sent after the accept.
fn order_for(job: &Job<'_>, inputs: BuildInputs) -> BuildOrder {
    let build = &job.settings.build;
    BuildOrder {
        drv_path: job.request.drv_path.clone(),
        store: job.settings.store.clone(),
        store_dir: Some(offload_nix::store_path::store_dir().to_string()),
        builders_use_substitutes: job.settings.builders_use_substitutes,
        max_silent_time: build.max_silent_time,
        build_timeout: build.build_timeout,
        max_log_size: build.max_log_size,
        keep_failed: build.keep_failed,
        inputs: inputs.inputs,
        wanted_outputs: inputs.wanted_outputs,
        slots: job.machine.spec.slots,
        experimental_features: job.settings.experimental_features.clone(),
    }
}

/// What the accepted build is.
pub(super) struct Job<'a> {
    pub request: &'a TryRequest,
    pub machine: &'a MachineConfig,
    pub settings: &'a HookSettings,
    pub history: Option<&'a StateDb>,
    pub ledger: &'a SlotLedger,
}

/// Carries out the build; every failure is told to Nix (an `@nix` error message) and
/// becomes the exit status Nix reads.
pub(super) async fn build(
    job: Job<'_>,
    session: Option<ServeConn>,
    input: &mut (impl AsyncRead + Unpin),
    replies: &mut (impl Write + Send),
) -> HookExit {
    let started = Instant::now();
    let result = match read_message(input, BuildInputsDecoder::default()).await {
        Ok(inputs) => {
            let order = order_for(&job, inputs);
            by_agent_or_here(&job, session, &order, replies).await
        }
        Err(e) => Err(OrderError::Inputs(e)),
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
            HookExit::Failed
        }
    }
}

/// Hands the build to the agent when one listens (its sessions are warm: no ssh
/// handshake), else carries it out in this process; says once in the log which.
async fn by_agent_or_here(
    job: &Job<'_>,
    session: Option<ServeConn>,
    order: &BuildOrder,
    replies: &mut (impl Write + Send),
) -> Result<(), OrderError> {
    let socket = crate::env::agent_socket();
    let mut log = HookLog::open();
    let endpoint = &job.machine.endpoint;
    if let Some(mut remote) = session {
        let _on_builder =
            hold_on_builder(endpoint, order, &mut |m| tell(replies, LogLevel::Info, m)).await?;
        let mut note = |msg: &str| tell(replies, LogLevel::Talkative, msg);
        return carry_out(
            order,
            &mut remote,
            job.ledger,
            &mut |l| log.line(l),
            &mut note,
            // The hook runs once per build and serves no metrics.
            &mut Moved::default(),
        )
        .await;
    }
    match crate::agent::AgentClient::connect(&socket).await {
        Ok(client) => {
            let mut note = |level: LogLevel, msg: &str| tell(replies, level, msg);
            let done = client
                .build(endpoint, order, &mut |line| log.line(line), &mut note)
                .await;
            match done {
                Ok(Ok(())) => Ok(()),
                Ok(Err(failure)) => Err(OrderError::Agent(failure)),
                Err(e) => Err(OrderError::Agent(OrderFailure {
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
            let _on_builder =
                hold_on_builder(endpoint, order, &mut |m| tell(replies, LogLevel::Info, m)).await?;
            let mut note = |msg: &str| tell(replies, LogLevel::Talkative, msg);
            let mut remote = ServeConn::open(endpoint).await?;
            carry_out(
                order,
                &mut remote,
                job.ledger,
                &mut |l| log.line(l),
                &mut note,
                &mut Moved::default(),
            )
            .await
        }
    }
}

/// A slot of the builder locked on the builder itself, across clients, held by the
/// caller for the build (the client-side slot is held since the choice). This process
/// builds once: its broker lives as long as the slot. While others hold every slot,
/// `waiting` hears so every [`crate::order::WAIT_NOTICE`]; after [`SLOT_WAIT_LIMIT`]
/// it is an error naming the machine. With a shared state, the slot is also leased
/// there (its expected end unknown here: its start).
pub(crate) async fn hold_on_builder(
    endpoint: &Endpoint,
    order: &BuildOrder,
    waiting: &mut (dyn FnMut(&str) + Send),
) -> Result<(Option<RemoteSlot>, Option<Lease>), DriverError> {
    let slots = RemoteSlots::new([(endpoint.clone(), order.slots)]);
    let what = format!(
        "waiting for a build slot on '{}': other clients hold all {} of its slots",
        endpoint.name, order.slots
    );
    let held = saying_while(slots.take(0, SLOT_WAIT_LIMIT), &what, waiting).await?;
    let lease = (held.as_ref().zip(Leases::open()))
        .map(|(slot, leases)| leases.take(&endpoint.name, slot.slot(), order.name(), 0.0));
    Ok((held, lease))
}

/// The build log, written where Nix reads it: fd 4, or stderr when the hook was started
/// without one (by hand).
struct HookLog {
    to: Option<std::fs::File>,
}

impl HookLog {
    fn open() -> HookLog {
        let to = std::fs::OpenOptions::new()
            .write(true)
            .open(BUILD_LOG_FD)
            .map_err(|e| tracing::debug!("no build log pipe at {BUILD_LOG_FD}: {e}"))
            .ok();
        HookLog { to }
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
