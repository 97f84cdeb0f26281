//! Which machine reaches which other by its own ssh: a pair the state has no recent
//! answer for is probed the first time a copy between them is due, by opening the
//! other's store from the first as a direct copy would (copies that want the same pair
//! meanwhile wait for that one probe). A pair that answers becomes a direct route of
//! the model; one that does not relays, and the run is told once.

use std::collections::HashSet;
use std::sync::Arc;

use offload_sched::{Link, MachineId};
use tokio::sync::OnceCell;

use super::direct::{self, Ran};
use super::{PeerRecord, TransferEngine};

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
        let mut ran = direct::run_on(&source, &script).await;
        if let Ran::Done { .. } = ran {
            // Again, over the connection the first left open, as later copies go.
            ran = direct::run_on(&source, &script).await;
        }
        let answer = match ran {
            Ran::Done { seconds } => {
                // Planned at the prior; the probe's time is what every copy between
                // them costs besides its bytes (the ssh to the source, the source's to
                // the other, Nix starting): the pair's latency, which copies alone
                // cannot tell from bandwidth, learned as a copy of nothing.
                let link = self.prior_link(from, to);
                self.add_peer(from, to, link);
                Self::lock(&self.news).peer_transfers.push(PeerRecord {
                    from,
                    to,
                    bytes: 0,
                    seconds,
                    concurrent: 1,
                });
                Ok(link)
            }
            Ran::Failed { reason } => Err(cause(&reason).to_string()),
        };
        let reachable = answer.is_ok();
        Self::lock(&self.news)
            .probed
            .push(Probed { from, to, answer });
        reachable
    }

    /// The link a reachable pair is planned at before its copies are timed
    /// ([`offload_learn::pair_prior`]).
    fn prior_link(&self, from: MachineId, to: MachineId) -> Link {
        let specs = self.specs();
        offload_learn::pair_prior(&specs[from], &specs[to])
    }

    /// `machine`'s link to this one, as learned during the run.
    pub fn set_link(&self, machine: MachineId, bandwidth: f64, latency: f64) {
        let mut specs = self.specs_mut();
        if let Some(spec) = specs.get_mut(machine) {
            spec.bandwidth = bandwidth;
            spec.latency = latency;
        }
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
    pub(super) fn store_dir(&self) -> String {
        let registry = self.registry();
        registry
            .any_path()
            .and_then(|p| p.rsplit_once('/').map(|(dir, _)| dir.to_string()))
            .unwrap_or_else(|| offload_nix::store_path::store_dir().to_string())
    }
}

/// What the run says, once, of a pair that cannot copy directly.
pub fn unreachable_note(from: &str, to: &str, reason: &str) -> String {
    format!(
        "{from} cannot reach {to} directly ({}); copies from {from} to {to} go through this \
         machine",
        cause(reason)
    )
}

/// What a failed copy or probe said of its cause: ssh's own complaint when there is
/// one (the connection is what failed), else Nix's error, else its last line.
pub fn cause(text: &str) -> &str {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("offload:"))
        .collect();
    lines
        .iter()
        .rev()
        .find(|l| {
            l.starts_with("ssh:") || l.contains("Permission denied") || l.contains("Host key")
        })
        .or_else(|| lines.iter().rev().find(|l| l.starts_with("error:")))
        .or(lines.last())
        .copied()
        .or_else(|| text.trim().lines().last())
        .unwrap_or("it failed without a word")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_what_failed_first_in_line() {
        let ssh = "ssh: connect to host 127.0.0.1 port 9: Connection refused\n\
                   error: cannot connect to 'b2'\n\
                   offload: the export exited with 0, the import with 1\n";
        assert_eq!(
            cause(ssh),
            "ssh: connect to host 127.0.0.1 port 9: Connection refused"
        );
        let nix = "error: path '/nix/store/x' is not valid\noffload: the export exited with 1, the import with 1";
        assert_eq!(cause(nix), "error: path '/nix/store/x' is not valid");
        let ours = "offload: the export exited with 1, the import with 0";
        assert_eq!(cause(ours), ours);
        assert_eq!(cause(""), "it failed without a word");
    }
}
