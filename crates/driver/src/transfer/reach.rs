//! Which machine reaches which other by its own ssh: a pair the state has no recent
//! answer for is probed the first time a copy between them is due, by opening the
//! other's store from the first as a direct copy would (copies that want the same pair
//! meanwhile wait for that one probe). A pair that answers becomes a direct route of
//! the model; one that does not relays, and the run is told once.

use std::collections::HashSet;
use std::sync::Arc;

use offload_sched::{Link, MachineId, MachineSpec};
use tokio::sync::OnceCell;

use super::direct::{self, Ran};
use super::TransferEngine;

/// A probe's answer for one ordered pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Probed {
    pub from: MachineId,
    pub to: MachineId,
    /// The link it is planned at from now on, or why it cannot copy directly.
    pub answer: Result<Link, String>,
}

/// The probe of one pair, run once.
pub(super) type PairProbe = Arc<OnceCell<bool>>;

impl TransferEngine {
    /// Whether `from` may copy to `to` directly at all: both are reached over ssh by
    /// names another machine can use, and copies are not forced through here.
    pub fn may_copy_directly(&self, from: MachineId, to: MachineId) -> bool {
        from != to
            && !self.relay_forced
            && self.peer_uris[to].is_some()
            && self.pools[from].endpoint().is_ssh()
    }

    /// Leaves `pairs` to be probed when a copy between them is first due.
    pub fn probe_when_due(&self, pairs: Vec<(MachineId, MachineId)>) {
        let mut probes = Self::lock(&self.pair_probes);
        for pair in pairs {
            probes.entry(pair).or_default();
        }
    }

    /// Probes those of `pairs` left to probe (once each, all at once), so that the
    /// routes after it know which reach.
    pub(super) async fn probe_due(self: &Arc<Self>, pairs: HashSet<(MachineId, MachineId)>) {
        let due: Vec<((MachineId, MachineId), PairProbe)> = {
            let probes = Self::lock(&self.pair_probes);
            pairs
                .into_iter()
                .filter_map(|pair| probes.get(&pair).map(|p| (pair, p.clone())))
                .filter(|(_, p)| !p.initialized())
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let mut probing = tokio::task::JoinSet::new();
        for ((from, to), probe) in due {
            let engine = self.clone();
            probing.spawn(async move {
                probe.get_or_init(|| engine.probe(from, to)).await;
            });
        }
        while probing.join_next().await.is_some() {}
    }

    /// Probes whether `from` reaches `to`; a pair that does becomes a direct route.
    async fn probe(self: Arc<Self>, from: MachineId, to: MachineId) -> bool {
        let Some(to_uri) = self.peer_uris[to].clone() else {
            return false;
        };
        let source = self.command_endpoint(from).await;
        let script = direct::probe_command(&source, &to_uri, &self.store_dir());
        let answer = match direct::run_on(&source, &script).await {
            Ran::Done { .. } => {
                let link = self.prior_link(from, to);
                self.add_peer(from, to, link);
                Ok(link)
            }
            Ran::Failed { reason } => Err(last_line(&reason).to_string()),
        };
        let reachable = answer.is_ok();
        Self::lock(&self.news)
            .probed
            .push(Probed { from, to, answer });
        reachable
    }

    fn prior_link(&self, from: MachineId, to: MachineId) -> Link {
        let specs = self.specs();
        prior_link(&specs[from], &specs[to])
    }

    /// Makes `from` → `to` a direct route at `link`.
    pub fn add_peer(&self, from: MachineId, to: MachineId, link: Link) {
        let mut specs = self.specs_mut();
        let peers = &mut specs[from].peers;
        match peers.binary_search_by_key(&to, |&(m, _)| m) {
            Ok(i) => peers[i].1 = link,
            Err(i) => peers.insert(i, (to, link)),
        }
    }

    /// The store directory of the paths this run knows (Nix's default without any).
    fn store_dir(&self) -> String {
        let registry = self.registry();
        registry
            .any_path()
            .and_then(|p| p.rsplit_once('/').map(|(dir, _)| dir.to_string()))
            .unwrap_or_else(|| "/nix/store".to_string())
    }
}

/// The link a reachable pair is planned at before its copies are timed: the better of
/// the two machines' links to this one, so a direct copy is never planned slower than
/// the relay it saves.
pub fn prior_link(from: &MachineSpec, to: &MachineSpec) -> Link {
    Link {
        bandwidth: from.bandwidth.max(to.bandwidth),
        latency: from.latency.min(to.latency),
    }
}

/// What the run says, once, of a pair that cannot copy directly.
pub fn unreachable_note(from: &str, to: &str, reason: &str) -> String {
    format!(
        "{from} cannot reach {to} directly ({}); copies from {from} to {to} go through this \
         machine",
        last_line(reason)
    )
}

/// The last line of a command's stderr: what it said as it failed.
pub(super) fn last_line(text: &str) -> &str {
    text.trim_end().lines().last().unwrap_or(text)
}
