//! The run report: where and when each build of an `offload build` ran, on which
//! machine slot, what each link carried, the critical path as the run went, and the
//! makespan against the lower bound. Every run is kept in the state database
//! ([`record`]); `offload report` reads it back and renders it ([`crate::html`]).

use serde::{Deserialize, Serialize};

use crate::StateDb;

/// One build of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportBuild {
    pub name: String,
    pub machine: String,
    /// Seconds since the run began.
    pub start: f64,
    pub seconds: f64,
    /// On the chain of builds that decided the run's length.
    pub critical: bool,
}

/// A machine of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportMachine {
    pub name: String,
    pub slots: u32,
}

/// A store path copied between two machines during the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportTransfer {
    pub from: String,
    pub to: String,
    pub bytes: u64,
    /// Seconds since the run began.
    pub start: f64,
    pub seconds: f64,
}

/// Everything the report shows, as the state database keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub title: String,
    pub wall_seconds: f64,
    pub lower_bound: f64,
    pub machines: Vec<ReportMachine>,
    pub builds: Vec<ReportBuild>,
    #[serde(default)]
    pub transfers: Vec<ReportTransfer>,
    /// NAR bytes moved, by the way they went.
    #[serde(default)]
    pub route_bytes: RouteBytes,
    /// Where the requested outputs went (`--to`); none: this machine's store.
    #[serde(default)]
    pub delivered_to: Option<String>,
    /// Duplicates of builds that overran their plan (none in runs kept before them).
    #[serde(default)]
    pub hedges: ReportHedges,
}

/// Duplicates of builds that overran their plan, in a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportHedges {
    /// Duplicates started.
    pub duplicates: u32,
    /// Those that finished before their original.
    pub wins: u32,
    /// Slot seconds spent on the copies that lost.
    pub waste_seconds: f64,
}

impl ReportHedges {
    /// What a run's summary and `offload report` say of them; None without any.
    pub fn describe(&self) -> Option<String> {
        (self.duplicates > 0).then(|| {
            format!(
                "duplicates of builds that overran their plan: {} started, {} finished first; \
                 {:.1} s of slot time spent on the copies that lost",
                self.duplicates, self.wins, self.waste_seconds
            )
        })
    }
}

impl From<offload_sched::HedgeCounts> for ReportHedges {
    fn from(c: offload_sched::HedgeCounts) -> Self {
        ReportHedges {
            duplicates: c.duplicates,
            wins: c.wins,
            waste_seconds: c.waste_seconds,
        }
    }
}

/// NAR bytes a run moved, by the way they went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteBytes {
    /// Over this machine's links (a relay crosses two: in and out).
    pub client_links: u64,
    /// Straight from one builder to another.
    pub builder_to_builder: u64,
    /// Into the delivery target (`--to`), whichever way.
    pub to_target: u64,
}

impl RouteBytes {
    /// The bytes as the summary says them, naming the `--to` store; None when the run
    /// moved none.
    pub fn describe(&self, delivered_to: Option<&str>) -> Option<String> {
        use crate::reporter::human_bytes;
        if *self == RouteBytes::default() {
            return None;
        }
        let mut text = format!(
            "bytes moved: {} over this machine's links, {} builder to builder",
            human_bytes(self.client_links),
            human_bytes(self.builder_to_builder)
        );
        if let Some(target) = delivered_to {
            text.push_str(&format!(", {} to {target}", human_bytes(self.to_target)));
        }
        Some(text)
    }
}

/// Keeps `run` in the state database for `offload report`; a run that cannot be kept is
/// reported, not failed.
pub fn record(history: &StateDb, run: &RunReport) {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        - run.wall_seconds as i64;
    let kept = serde_json::to_string(run)
        .map_err(|e| e.to_string())
        .and_then(|json| {
            history
                .record_run(started, &json)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = kept {
        tracing::warn!("cannot keep the run for offload report: {e}");
    }
}

/// The chain of builds that ends last, each waiting on the one before: the critical path
/// as the run went. `deps[i]` are the builds build `i` needed; `end[i]` when it ended.
pub fn critical_chain(deps: &[Vec<usize>], end: &[Option<f64>]) -> Vec<usize> {
    let latest = |a: &usize, b: &usize| {
        end[*a]
            .partial_cmp(&end[*b])
            .unwrap_or(std::cmp::Ordering::Equal)
    };
    let Some(mut at) = (0..end.len()).filter(|&i| end[i].is_some()).max_by(latest) else {
        return Vec::new();
    };
    let mut chain = vec![at];
    while let Some(prev) = deps[at]
        .iter()
        .copied()
        .filter(|&d| end[d].is_some())
        .max_by(latest)
    {
        chain.push(prev);
        at = prev;
    }
    chain.reverse();
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_critical_chain_follows_the_latest_inputs() {
        // 0 → 2, 1 → 2, 2 → 3; 1 ended after 0.
        let deps = vec![vec![], vec![], vec![0, 1], vec![2], vec![]];
        let end = vec![Some(1.0), Some(2.0), Some(3.0), Some(4.0), Some(0.5)];
        assert_eq!(critical_chain(&deps, &end), [1, 2, 3]);
        assert!(critical_chain(&deps, &[None; 5]).is_empty());
    }
}
