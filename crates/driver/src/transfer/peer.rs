//! Builder to builder: the paths the model routes straight from one builder to another
//! ([`offload_sched::RouteKind::Peer`]) go in one `export | import` run on the source
//! (`direct.rs`), each source's share with its references that the target lacks, so
//! that the target can take them in the order they come. A source that fails to send
//! stops being used for that target in this run (the note names the pair once), and
//! what did not land goes the relay's way through this machine.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use offload_nix::serve::PathInfo;
use offload_sched::{MachineId, RouteKind};

use super::direct::{self, Ran};
use super::TransferEngine;
use crate::error::DriverError;

/// A copy straight from one machine to another, timed, for learning that pair's link.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRecord {
    pub from: MachineId,
    pub to: MachineId,
    pub bytes: u64,
    pub seconds: f64,
    /// Copies over that pair when it started, this one included.
    pub concurrent: u32,
}

/// A pair that could not copy directly in this run, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreachable {
    pub from: MachineId,
    pub to: MachineId,
    pub reason: String,
}

impl TransferEngine {
    /// Sends the paths of `todo` (all missing on `machine`) that the model routes from
    /// another builder straight from there; returns those still to copy.
    pub(super) async fn copy_direct(
        self: &Arc<Self>,
        machine: MachineId,
        todo: Vec<String>,
    ) -> Result<Vec<String>, DriverError> {
        let Some(to_uri) = self.peer_uris[machine].clone() else {
            return Ok(todo);
        };
        self.probe_due(self.pairs_due(machine, &todo)).await;
        let groups = self.direct_groups(machine, &todo);
        if groups.is_empty() {
            return Ok(todo);
        }
        let mut sends = tokio::task::JoinSet::new();
        for (from, infos) in groups {
            let (engine, to_uri) = (self.clone(), to_uri.clone());
            sends.spawn(async move { engine.send_direct(from, machine, &to_uri, infos).await });
        }
        let mut landed: HashSet<String> = HashSet::new();
        while let Some(sent) = sends.join_next().await {
            landed.extend(sent.map_err(|e| self.task_failed(machine, e))??);
        }
        Ok(todo.into_iter().filter(|p| !landed.contains(p)).collect())
    }

    /// The pairs (holder, `machine`) a copy of `todo` may take.
    fn pairs_due(&self, machine: MachineId, todo: &[String]) -> HashSet<(MachineId, MachineId)> {
        let registry = self.registry();
        todo.iter()
            .flat_map(|p| registry.holders(p))
            .filter(|&h| self.may_copy_directly(h, machine))
            .map(|h| (h, machine))
            .collect()
    }

    /// Per source builder, the paths of `todo` it sends to `machine`: those the model
    /// routes from it, with every path of their closures in `todo` (the source has
    /// them all: a valid path's closure is valid).
    fn direct_groups(
        &self,
        machine: MachineId,
        todo: &[String],
    ) -> Vec<(MachineId, Vec<PathInfo>)> {
        let registry = self.registry();
        let mut roots: BTreeMap<MachineId, Vec<String>> = BTreeMap::new();
        for path in todo {
            let Some((_, way)) = self.way_to(&registry, path, machine) else {
                continue;
            };
            if let (RouteKind::Peer, Some(from)) = (way.kind, way.from) {
                roots.entry(from).or_default().push(path.clone());
            }
        }
        let wanted: HashSet<&str> = todo.iter().map(String::as_str).collect();
        roots
            .into_iter()
            .map(|(from, roots)| {
                let infos = registry
                    .closure(&roots)
                    .iter()
                    .filter(|p| wanted.contains(p.as_str()))
                    .filter_map(|p| registry.info(p).cloned())
                    .collect();
                (from, infos)
            })
            .collect()
    }

    /// Sends `infos` from `from` to `machine` (`to_uri` as `from` opens it) in one
    /// `export | import` there; returns the paths that landed. A failure takes the pair
    /// out of this run's direct routes; what landed before it stays.
    async fn send_direct(
        self: &Arc<Self>,
        from: MachineId,
        machine: MachineId,
        to_uri: &str,
        infos: Vec<PathInfo>,
    ) -> Result<Vec<String>, DriverError> {
        let paths: Vec<String> = infos.iter().map(|i| i.path.clone()).collect();
        let bytes: u64 = infos.iter().map(|i| i.nar_size).sum();
        let source = self.command_endpoint(from).await;
        let (from_name, to_name) = {
            let specs = self.specs();
            (specs[from].name.clone(), specs[machine].name.clone())
        };
        if let Some(r) = &self.reporter {
            for i in &infos {
                r.transfer_started(&i.path, &from_name, &to_name, i.nar_size);
            }
        }
        let concurrent = self.on_pair(from, machine, 1);
        let ran = direct::run_on(&source, &direct::copy_command(&source, to_uri, &paths)).await;
        self.on_pair(from, machine, -1);
        match ran {
            Ran::Done { seconds } => {
                self.direct_bytes.fetch_add(bytes, Ordering::Relaxed);
                if let Some(r) = &self.reporter {
                    let route = crate::reporter::ByteRoute::BuilderToBuilder;
                    r.bytes_moved(route, &from_name, &to_name, bytes);
                }
                self.record_landed(&infos, from, machine, seconds);
                Self::lock(&self.news).peer_transfers.push(PeerRecord {
                    from,
                    to: machine,
                    bytes,
                    seconds,
                    concurrent,
                });
                Ok(paths)
            }
            Ran::Failed { reason } => {
                self.drop_pair(from, machine, reason);
                // The import registers whole paths: ask which landed before it stopped.
                let mut conn = self.pools[machine].get().await?;
                let valid = conn.query_valid_paths(&paths, false, false).await?;
                self.pools[machine].put(conn);
                let valid: HashSet<&String> = valid.iter().collect();
                let landed: Vec<PathInfo> = infos
                    .into_iter()
                    .filter(|i| valid.contains(&i.path))
                    .collect();
                self.record_landed(&landed, from, machine, 0.0);
                Ok(landed.into_iter().map(|i| i.path).collect())
            }
        }
    }

    /// Records that `infos` landed on `machine` from `from` (which holds them too).
    fn record_landed(&self, infos: &[PathInfo], from: MachineId, machine: MachineId, seconds: f64) {
        {
            let mut registry = self.registry();
            for i in infos {
                registry.add_holder_like(&i.path, machine, from);
            }
        }
        if let Some(r) = &self.reporter {
            let specs = self.specs();
            for i in infos {
                r.transfer_finished(
                    &i.path,
                    &specs[from].name,
                    &specs[machine].name,
                    i.nar_size,
                    seconds,
                    true,
                );
            }
        }
        self.copied.fetch_add(infos.len(), Ordering::Relaxed);
        self.bytes
            .fetch_add(infos.iter().map(|i| i.nar_size).sum(), Ordering::Relaxed);
        let mut news = Self::lock(&self.news);
        news.landed
            .extend(infos.iter().map(|i| (i.path.clone(), machine)));
    }

    /// Counts a copy starting (`+1`) or ending (`-1`) between `from` and `to`; returns
    /// how many run there now.
    fn on_pair(&self, from: MachineId, to: MachineId, change: i32) -> u32 {
        let mut pairs = Self::lock(&self.pairs_busy);
        let n = pairs.entry((from, to)).or_insert(0);
        *n = n.saturating_add_signed(change);
        *n
    }

    /// Takes the pair out of this run's direct routes, telling the run once.
    fn drop_pair(&self, from: MachineId, to: MachineId, reason: String) {
        let first = {
            let mut specs = self.specs_mut();
            let had = specs[from].peers.iter().any(|&(m, _)| m == to);
            specs[from].peers.retain(|&(m, _)| m != to);
            had
        };
        if first {
            let reason = super::reach::cause(&reason).to_string();
            Self::lock(&self.news)
                .unreachable
                .push(Unreachable { from, to, reason });
        }
    }
}
