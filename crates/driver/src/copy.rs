//! Copying a closure between two stores, both reached through the serve protocol.
//!
//! The source's closure is computed there (QueryClosure), the destination says which of
//! it it already has (QueryValidPaths), and only the rest moves: each NAR streams from a
//! DumpStorePath on the source straight into an AddToStoreNar on the destination, through
//! offload's memory only (a pipe buffer at a time), never landing on local disk.
//!
//! Several transfers run at once, each on its own pair of sessions, in dependency order:
//! a path starts only when every path it refers to is valid on the destination, since
//! Nix refuses to register a path whose references are missing. A failure stops new
//! transfers; the ones already done stay done (no lost work), and the error says how far
//! the copy got.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use offload_nix::serve::PathInfo;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::error::DriverError;
use crate::session::ServeConn;
use crate::transport::Endpoint;

/// How a copy runs.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Transfers in flight at once, each with its own pair of sessions.
    pub jobs: usize,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions { jobs: 4 }
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

/// Copies the closure of `paths` from `from` to `to`.
pub async fn copy_closure(
    from: &Endpoint,
    to: &Endpoint,
    paths: &[String],
    options: &CopyOptions,
) -> Result<CopyStats, CopyFailure> {
    let started = Instant::now();
    let mut stats = CopyStats::default();
    let fail = |stats: &CopyStats, error| CopyFailure {
        from: from.name.clone(),
        to: to.name.clone(),
        stats: CopyStats {
            elapsed: started.elapsed(),
            ..stats.clone()
        },
        error,
    };
    let (src, dst) = tokio::join!(ServeConn::open(from), ServeConn::open(to));
    let mut src = src.map_err(|e| fail(&stats, e))?;
    let mut dst = dst.map_err(|e| fail(&stats, e))?;

    let valid = src
        .query_valid_paths(paths, false, false)
        .await
        .map_err(|e| fail(&stats, e))?;
    if let Some(missing) = paths.iter().find(|p| !valid.contains(p)) {
        let e = DriverError::NotValid {
            machine: from.name.clone(),
            path: missing.clone(),
        };
        return Err(fail(&stats, e));
    }
    let closure = src
        .query_closure(paths, false)
        .await
        .map_err(|e| fail(&stats, e))?;
    stats.closure = closure.len();
    let present: HashSet<String> = dst
        .query_valid_paths(&closure, false, false)
        .await
        .map_err(|e| fail(&stats, e))?
        .into_iter()
        .collect();
    stats.already_present = present.len();
    let missing: Vec<String> = closure
        .into_iter()
        .filter(|p| !present.contains(p))
        .collect();
    if missing.is_empty() {
        stats.elapsed = started.elapsed();
        return Ok(stats);
    }
    let infos = src
        .query_path_infos(&missing)
        .await
        .map_err(|e| fail(&stats, e))?;
    if let Some(lost) = missing
        .iter()
        .find(|p| !infos.iter().any(|i| &i.path == *p))
    {
        // Garbage-collected on the source between the two queries.
        let e = DriverError::NotValid {
            machine: from.name.clone(),
            path: lost.clone(),
        };
        return Err(fail(&stats, e));
    }

    let queue = Arc::new(Queue::new(infos));
    let jobs = options.jobs.clamp(1, missing.len());
    let mut workers = JoinSet::new();
    workers.spawn(worker(
        queue.clone(),
        Some((src, dst)),
        from.clone(),
        to.clone(),
    ));
    for _ in 1..jobs {
        workers.spawn(worker(queue.clone(), None, from.clone(), to.clone()));
    }
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        let result = joined.unwrap_or_else(|e| {
            Err(DriverError::Io {
                machine: to.name.clone(),
                op: "a copy task",
                source: std::io::Error::other(e.to_string()),
            })
        });
        if let Err(e) = result {
            queue.abort();
            first_error.get_or_insert(e);
        }
    }
    let (copied, bytes) = queue.done();
    stats.copied = copied;
    stats.bytes = bytes;
    stats.elapsed = started.elapsed();
    match first_error {
        Some(e) => Err(fail(&stats, e)),
        None => Ok(stats),
    }
}

/// One transfer lane: a session on each side, taking ready paths until none are left.
async fn worker(
    queue: Arc<Queue>,
    conns: Option<(ServeConn, ServeConn)>,
    from: Endpoint,
    to: Endpoint,
) -> Result<(), DriverError> {
    let mut conns = conns;
    while let Some(info) = queue.next().await {
        let (src, dst) = match &mut conns {
            Some(pair) => pair,
            None => {
                let (s, d) = tokio::join!(ServeConn::open(&from), ServeConn::open(&to));
                let pair = match (s, d) {
                    (Ok(s), Ok(d)) => (s, d),
                    (Err(e), _) | (_, Err(e)) => {
                        queue.give_back(info);
                        return Err(e);
                    }
                };
                conns.insert(pair)
            }
        };
        match dst.add_to_store_nar_from(&info, src).await {
            Ok(summary) => queue.finish(&info.path, summary.size),
            Err(e) => {
                queue.give_back(info);
                return Err(e);
            }
        }
    }
    if let Some((src, dst)) = conns {
        let _ = tokio::join!(src.close(), dst.close());
    }
    Ok(())
}

/// Paths waiting for transfer, released in dependency order.
struct Queue {
    state: Mutex<QueueState>,
    changed: Notify,
}

struct QueueState {
    ready: VecDeque<PathInfo>,
    /// Paths whose references are not all on the destination yet, with how many are missing.
    blocked: HashMap<String, (PathInfo, usize)>,
    /// Path → the blocked paths that refer to it.
    dependents: HashMap<String, Vec<String>>,
    in_flight: usize,
    copied: usize,
    bytes: u64,
    aborted: bool,
}

impl Queue {
    fn new(infos: Vec<PathInfo>) -> Self {
        let missing: HashSet<String> = infos.iter().map(|i| i.path.clone()).collect();
        let mut ready = VecDeque::new();
        let mut blocked = HashMap::new();
        let mut dependents: HashMap<String, Vec<String>> = HashMap::new();
        for info in infos {
            let waits: Vec<&String> = info
                .references
                .iter()
                .filter(|r| **r != info.path && missing.contains(*r))
                .collect();
            if waits.is_empty() {
                ready.push_back(info);
            } else {
                for r in &waits {
                    dependents
                        .entry((*r).clone())
                        .or_default()
                        .push(info.path.clone());
                }
                let n = waits.len();
                blocked.insert(info.path.clone(), (info, n));
            }
        }
        Queue {
            state: Mutex::new(QueueState {
                ready,
                blocked,
                dependents,
                in_flight: 0,
                copied: 0,
                bytes: 0,
                aborted: false,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A poisoned lock only means another lane panicked; the counts are still sound.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next path whose references are all on the destination; `None` when nothing
    /// is left (or the copy was aborted).
    async fn next(&self) -> Option<PathInfo> {
        loop {
            let notified = self.changed.notified();
            {
                let mut s = self.lock();
                if s.aborted {
                    return None;
                }
                if let Some(info) = s.ready.pop_front() {
                    s.in_flight += 1;
                    return Some(info);
                }
                if s.in_flight == 0 {
                    // Nothing ready and nothing running: what is still blocked can never
                    // become ready (a reference cycle, which valid stores never have).
                    return None;
                }
            }
            notified.await;
        }
    }

    fn finish(&self, path: &str, bytes: u64) {
        let mut s = self.lock();
        s.in_flight -= 1;
        s.copied += 1;
        s.bytes += bytes;
        for dependent in s.dependents.remove(path).unwrap_or_default() {
            let now_ready = match s.blocked.get_mut(&dependent) {
                Some((_, n)) => {
                    *n -= 1;
                    *n == 0
                }
                None => false,
            };
            if now_ready {
                if let Some((info, _)) = s.blocked.remove(&dependent) {
                    s.ready.push_back(info);
                }
            }
        }
        drop(s);
        self.changed.notify_waiters();
    }

    fn give_back(&self, info: PathInfo) {
        let mut s = self.lock();
        s.in_flight -= 1;
        s.ready.push_front(info);
        drop(s);
        self.changed.notify_waiters();
    }

    fn abort(&self) {
        self.lock().aborted = true;
        self.changed.notify_waiters();
    }

    fn done(&self) -> (usize, u64) {
        let s = self.lock();
        (s.copied, s.bytes)
    }
}
