//! Delivery (`offload build --to STORE`): the requested outputs' closures go straight
//! from the machines that hold them to STORE, never into this machine's store.
//!
//! A builder sends its share itself (`export | import` run there, `direct.rs`) when STORE
//! is an ssh store it reaches by the name this machine uses; otherwise, and for stores
//! only this machine can open (a `file://` cache, a store on its file system, a cache
//! whose credentials or signing key are here), the export is piped through this machine
//! into an import run here. STORE is asked first which paths it has, so only the rest
//! moves; each share carries its references that STORE lacks, so it can take them in
//! the order they come.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use offload_nix::store_uri::StoreUri;
use offload_sched::MachineId;

use super::direct::{self, Ran};
use super::reach::cause;
use super::TransferEngine;
use crate::error::DriverError;
use crate::ssh::shell_quote;

/// Where `--to` delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryTarget {
    /// The store URI as the user gave it, for messages.
    pub uri: String,
    /// The URI Nix opens: with `secret-key=` for a binary cache when signing.
    pub open_as: String,
    /// Builders may reach it themselves: an `ssh://` or `ssh-ng://` store, not signed
    /// here.
    pub reachable_from_builders: bool,
}

/// What a delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Paths in the closure of what was asked for.
    pub closure: usize,
    /// Of those, already in the target.
    pub already_there: usize,
    /// NAR bytes sent.
    pub bytes: u64,
}

impl DeliveryTarget {
    /// The target `uri`, signing what enters a binary cache with `sign_key`.
    pub fn new(uri: &str, sign_key: Option<&Path>) -> Result<DeliveryTarget, DriverError> {
        let bad = |reason: String| DriverError::Delivery {
            target: uri.to_string(),
            reason,
        };
        let mut parsed = StoreUri::parse(uri).map_err(|e| bad(e.reason))?;
        let cache = matches!(parsed.scheme.as_str(), "file" | "http" | "https" | "s3");
        if let Some(key) = sign_key {
            if !cache {
                return Err(bad(format!(
                    "--sign-key signs what enters a binary cache (file://, http(s)://, s3://); \
                     {uri} is a store that takes the paths as its Nix trusts them, unsigned"
                )));
            }
            parsed
                .params
                .insert("secret-key".into(), key.display().to_string());
        }
        Ok(DeliveryTarget {
            uri: uri.to_string(),
            open_as: parsed.to_string(),
            reachable_from_builders: parsed.is_ssh() && !parsed.is_localhost(),
        })
    }

    /// Opens the store from this machine, as a delivery would: an error names it and
    /// says why, before any build starts.
    pub async fn probe(&self, store_dir: &str) -> Result<(), DriverError> {
        let script = format!(
            "NIX_SSHOPTS={} nix-store --store {} --check-validity --print-invalid {}",
            shell_quote(&direct::local_sshopts()),
            shell_quote(&self.open_as),
            shell_quote(&format!(
                "{store_dir}/00000000000000000000000000000000-offload-probe"
            ))
        );
        match direct::run_here(&script).await {
            Ran::Done { .. } => Ok(()),
            Ran::Failed { reason } => Err(self.unreachable(reason)),
        }
    }

    fn unreachable(&self, reason: String) -> DriverError {
        DriverError::Delivery {
            target: self.uri.clone(),
            reason,
        }
    }

    /// Which of `paths` the target lacks.
    async fn missing(&self, paths: &[String]) -> Result<Vec<String>, DriverError> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = tokio::process::Command::new("nix-store");
        cmd.env("NIX_SSHOPTS", direct::local_sshopts())
            .arg("--store")
            .arg(&self.open_as)
            .args(["--check-validity", "--print-invalid"])
            .args(paths)
            .kill_on_drop(true);
        let out = cmd
            .output()
            .await
            .map_err(|e| self.unreachable(format!("cannot run nix-store: {e}")))?;
        if !out.status.success() {
            return Err(self.unreachable(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }
}

impl TransferEngine {
    /// Delivers the closures of `roots` to `target`, each share from a machine that
    /// holds it; what it delivered (or found there) is not asked about again.
    pub async fn deliver(
        self: &Arc<Self>,
        roots: &[String],
        target: &DeliveryTarget,
    ) -> Result<Delivered, DriverError> {
        // One delivery at a time: each asks the target what it lacks after the one
        // before has landed, so a path two outputs share is sent once.
        let _one_at_a_time = self.delivering.lock().await;
        self.learn_local_roots(roots).await?;
        let closure = self.registry().closure(roots);
        let unknown: Vec<String> = {
            let there = Self::lock(&self.on_target);
            closure
                .iter()
                .filter(|p| !there.contains(*p))
                .cloned()
                .collect()
        };
        let missing = target.missing(&unknown).await?;
        let mut delivered = Delivered {
            closure: closure.len(),
            already_there: closure.len() - missing.len(),
            bytes: 0,
        };
        let missing_set: HashSet<&str> = missing.iter().map(String::as_str).collect();
        let shares = self.shares(roots, &missing_set);
        let mut sends = tokio::task::JoinSet::new();
        for (from, paths) in shares {
            let (engine, target) = (self.clone(), target.clone());
            sends.spawn(async move { engine.send_share(from, paths, &target).await });
        }
        while let Some(sent) = sends.join_next().await {
            delivered.bytes += sent.map_err(|e| target.unreachable(e.to_string()))??;
        }
        // Every import exited well: Nix registered each path whole.
        Self::lock(&self.on_target).extend(closure);
        Ok(delivered)
    }

    /// Learns the closures of the `roots` valid in this machine's store that no build
    /// of the run made (they were there already).
    async fn learn_local_roots(&self, roots: &[String]) -> Result<(), DriverError> {
        let Some(client) = self.client else {
            return Ok(());
        };
        let unknown: Vec<String> = {
            let registry = self.registry();
            roots
                .iter()
                .filter(|p| registry.info(p).is_none())
                .cloned()
                .collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        self.learn_closure(client, &unknown).await
    }

    /// The paths each machine sends: per root, the machine it comes from (this
    /// machine's store when it has it, else a builder that reaches the target itself,
    /// else any holder), with every path of the root's closure the target lacks.
    fn shares(
        &self,
        roots: &[String],
        missing: &HashSet<&str>,
    ) -> BTreeMap<MachineId, Vec<String>> {
        let registry = self.registry();
        let mut by_source: BTreeMap<MachineId, Vec<String>> = BTreeMap::new();
        for root in roots {
            let mut holders: Vec<MachineId> = registry.holders(root).collect();
            holders.sort_unstable();
            let from = holders
                .iter()
                .copied()
                .find(|&m| Some(m) == self.client)
                .or_else(|| {
                    holders
                        .iter()
                        .copied()
                        .find(|&m| self.peer_uris[m].is_some())
                })
                .or_else(|| holders.first().copied());
            if let Some(from) = from {
                by_source.entry(from).or_default().push(root.clone());
            }
        }
        by_source
            .into_iter()
            .map(|(from, roots)| {
                let paths = registry
                    .closure(&roots)
                    .into_iter()
                    .filter(|p| missing.contains(p.as_str()))
                    .collect();
                (from, paths)
            })
            .filter(|(_, paths): &(MachineId, Vec<String>)| !paths.is_empty())
            .collect()
    }

    /// Sends `paths` from `from` to the target: from there when it can, else through
    /// this machine. Returns the NAR bytes sent.
    async fn send_share(
        self: &Arc<Self>,
        from: MachineId,
        paths: Vec<String>,
        target: &DeliveryTarget,
    ) -> Result<u64, DriverError> {
        let bytes: u64 = {
            let registry = self.registry();
            paths
                .iter()
                .filter_map(|p| registry.info(p))
                .map(|i| i.nar_size)
                .sum()
        };
        let source = self.command_endpoint(from).await;
        let name = self.specs()[from].name.clone();
        let remote_target = u64::from(target.reachable_from_builders);
        let copy = direct::copy_command(&source, &target.open_as, &paths);
        // Crossings of this machine's links, by the way the share went.
        let crossings = if source.is_local_process() {
            // From a store on this machine: out over its link to a remote target.
            match direct::run_on(&source, &copy).await {
                Ran::Done { .. } => remote_target,
                Ran::Failed { reason } => return Err(target.unreachable(reason)),
            }
        } else {
            let tried_direct = target.reachable_from_builders
                && !self.relay_forced
                && !Self::lock(&self.target_unreachable).contains(&name);
            let direct = if tried_direct {
                direct::run_on(&source, &copy).await
            } else {
                Ran::Failed {
                    reason: String::new(),
                }
            };
            match direct {
                Ran::Done { .. } => 0,
                Ran::Failed { reason } => {
                    if tried_direct {
                        self.note_unreachable_target(&name, target, &reason);
                    }
                    let relay = direct::relay_command(&source, &target.open_as, &paths)
                        .map_err(|reason| target.unreachable(reason))?;
                    match direct::run_here(&relay).await {
                        // In over the source's link, out again to a remote target.
                        Ran::Done { .. } => 1 + remote_target,
                        Ran::Failed { reason } => {
                            return Err(target.unreachable(format!("from {name}: {reason}")))
                        }
                    }
                }
            }
        };
        self.target_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(r) = &self.reporter {
            let route = crate::reporter::ByteRoute::ToTarget;
            r.bytes_moved(route, &name, &target.uri, bytes);
        }
        self.client_bytes
            .fetch_add(bytes * crossings, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Tells the run, once per machine, that it could not send to the target itself.
    fn note_unreachable_target(&self, machine: &str, target: &DeliveryTarget, reason: &str) {
        let first = Self::lock(&self.target_unreachable).insert(machine.to_string());
        if first {
            if let Some(r) = &self.reporter {
                r.machine_warning(&format!(
                    "{machine} cannot reach {} directly ({}); its outputs go there through this machine",
                    target.uri,
                    cause(reason)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_cache_is_signed_here_and_an_ssh_store_reached_by_builders() {
        let cache = DeliveryTarget::new("file:///tmp/c", Some(Path::new("/k/sk"))).unwrap();
        assert_eq!(cache.open_as, "file:///tmp/c?secret-key=/k/sk");
        assert!(!cache.reachable_from_builders);
        let ssh = DeliveryTarget::new("ssh://root@target", None).unwrap();
        assert!(ssh.reachable_from_builders);
        let err = DeliveryTarget::new("ssh://root@target", Some(Path::new("/k/sk"))).unwrap_err();
        assert!(err.to_string().contains("--sign-key"), "{err}");
    }
}
