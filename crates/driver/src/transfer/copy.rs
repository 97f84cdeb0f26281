//! Copying a closure between two stores, both reached through the serve protocol
//! (`offload copy`).
//!
//! The source's closure is computed there (QueryClosure), the destination says which of
//! it it already has (QueryValidPaths), and only the rest moves, through the transfer
//! engine that builds use too (`crate::transfer`). Between two machines reached over
//! ssh, the source sends it straight to the destination itself (`direct.rs`), by the
//! name this machine uses for it; when it cannot (or with `--relay`), each NAR streams
//! from the source into the destination through offload's memory, several at once, in
//! dependency order. A failure stops new transfers; the ones already done stay done (no
//! lost work), and the error says how far the copy got.

use std::sync::Arc;
use std::time::{Duration, Instant};

use offload_sched::{Link, MachineId, MachineSpec};

use super::TransferEngine;
use crate::error::DriverError;
use crate::session::Pool;
use crate::ssh::Endpoint;

/// How a copy runs.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Transfers in flight at once, each with its own pair of sessions.
    pub jobs: usize,
    /// Everything through this machine, even between two machines that could copy
    /// directly (`--relay`).
    pub relay: bool,
    /// This machine's ssh agent goes with the source's copy (`--forward-agent`).
    pub forward_agent: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            jobs: 4,
            relay: false,
            forward_agent: false,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Paths in the closure of what was asked for.
    pub closure: usize,
    /// Of those, already valid on the destination.
    pub already_present: usize,
    /// Paths transferred.
    pub copied: usize,
    /// NAR bytes transferred.
    pub bytes: u64,
    pub elapsed: Duration,
    /// Why the copy went through this machine although the source might have sent it
    /// straight: the source could not reach the destination.
    pub relayed_because: Option<String>,
    /// The NAR bytes that went straight from the source to the destination.
    pub direct_bytes: u64,
}

/// A copy that stopped on an error, with what it had finished by then.
#[derive(Debug, thiserror::Error)]
#[error("copy from {from} to {to} failed{}", progress(stats))]
pub struct CopyFailure {
    pub from: String,
    pub to: String,
    pub stats: CopyStats,
    #[source]
    pub error: DriverError,
}

fn progress(stats: &CopyStats) -> String {
    if stats.closure == 0 {
        String::new()
    } else {
        format!(
            " after copying {} of {} missing paths (those stay valid there)",
            stats.copied,
            stats.closure - stats.already_present
        )
    }
}

/// Copies the closure of `paths` from `from` to `to`, through the transfer engine.
pub async fn copy_closure(
    from: &Endpoint,
    to: &Endpoint,
    paths: &[String],
    options: &CopyOptions,
) -> Result<CopyStats, CopyFailure> {
    let started = Instant::now();
    let spec = |e: &Endpoint| MachineSpec::new(e.name.clone(), "", 1, 1.0);
    let mut source = spec(from);
    if from.is_ssh() && super::direct::uri_from_elsewhere(to).is_some() {
        // A direct copy spares this machine both links: it goes first, at a tie.
        let ideal = Link {
            bandwidth: f64::INFINITY,
            latency: 0.0,
        };
        source.peers = vec![(TARGET, ideal)];
    }
    let engine = Arc::new(
        TransferEngine::new(
            vec![Pool::new(from.clone()), Pool::new(to.clone())],
            vec![source, spec(to)],
            options.jobs,
        )
        .with_relay_forced(options.relay)
        .with_forwarded_agent(options.forward_agent),
    );
    let result = copy_with(&engine, from, paths).await;
    let (copied, bytes) = engine.copied();
    engine.close().await;
    let closure = engine.registry().closure(paths);
    let on_target = closure
        .iter()
        .filter(|p| engine.registry().is_on(p, TARGET))
        .count();
    let news = engine.take_news();
    let stats = CopyStats {
        closure: closure.len(),
        already_present: on_target.saturating_sub(copied),
        copied,
        bytes,
        elapsed: started.elapsed(),
        relayed_because: news.unreachable.into_iter().next().map(|u| u.reason),
        direct_bytes: engine.route_bytes().builder_to_builder,
    };
    match result {
        Ok(()) => Ok(stats),
        Err(error) => Err(CopyFailure {
            from: from.name.clone(),
            to: to.name.clone(),
            stats,
            error,
        }),
    }
}

/// The source and target machines of a copy's engine.
const SOURCE: MachineId = 0;
const TARGET: MachineId = 1;

async fn copy_with(
    engine: &Arc<TransferEngine>,
    from: &Endpoint,
    paths: &[String],
) -> Result<(), DriverError> {
    let mut src = engine.pool(SOURCE).get().await?;
    let valid = src.query_valid_paths(paths, false, false).await?;
    engine.pool(SOURCE).put(src);
    if let Some(missing) = paths.iter().find(|p| !valid.contains(p)) {
        return Err(DriverError::NotValid {
            machine: from.name.clone(),
            path: missing.clone(),
        });
    }
    engine.learn_closure(SOURCE, paths).await?;
    engine.ensure_on(TARGET, paths, None, false).await?;
    Ok(())
}
