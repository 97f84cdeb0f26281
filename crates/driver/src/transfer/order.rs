//! Copies in dependency order: a path starts once every path it refers to is on the
//! target, and runs of paths that each refer to the one before go down one pair of
//! sessions as a chain, without waiting in between.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use offload_sched::MachineId;
use tokio::task::JoinSet;

use super::TransferEngine;
use crate::error::DriverError;

/// Longest chain of paths sent down one pair of sessions without waiting in between.
/// Paths that refer to a chain's paths start when the whole chain has landed.
const CHAIN_LIMIT: usize = 64;

/// A chain from `first` (ready: what it refers to is on the target): each next path
/// refers to the one before, and to nothing else that is still to land, so the target
/// can take them in this order. Paths put in the chain leave `waiting`.
fn chain_from(
    first: String,
    waiting: &mut HashMap<String, usize>,
    dependents: &HashMap<String, Vec<String>>,
) -> Vec<String> {
    let mut chain = vec![first];
    while chain.len() < CHAIN_LIMIT {
        let last = &chain[chain.len() - 1];
        let next = dependents
            .get(last)
            .into_iter()
            .flatten()
            .find(|d| waiting.get(*d) == Some(&1));
        let Some(next) = next.cloned() else { break };
        waiting.remove(&next);
        chain.push(next);
    }
    chain
}

impl TransferEngine {
    /// A copy task to `machine` that panicked or was cancelled.
    pub(super) fn task_failed(&self, machine: MachineId, e: tokio::task::JoinError) -> DriverError {
        DriverError::Io {
            machine: self.pools[machine].endpoint().name.clone(),
            op: "a copy task",
            source: std::io::Error::other(e.to_string()),
        }
    }

    /// Copies `todo` to `machine`, each path once the paths of `todo` it refers to are
    /// there, several at once.
    pub(super) async fn copy_in_order(
        self: &Arc<Self>,
        machine: MachineId,
        todo: Vec<String>,
    ) -> Result<(), DriverError> {
        let wanted: HashSet<&str> = todo.iter().map(String::as_str).collect();
        let mut waiting: HashMap<String, usize> = HashMap::new();
        let mut dependents: HashMap<String, Vec<String>> = HashMap::new();
        let mut ready: VecDeque<String> = VecDeque::new();
        {
            let registry = self.registry();
            for path in &todo {
                let refs: Vec<&String> = registry
                    .info(path)
                    .map(|i| {
                        i.references
                            .iter()
                            .filter(|r| *r != path && wanted.contains(r.as_str()))
                            .collect()
                    })
                    .unwrap_or_default();
                if refs.is_empty() {
                    ready.push_back(path.clone());
                } else {
                    for r in &refs {
                        dependents
                            .entry((*r).clone())
                            .or_default()
                            .push(path.clone());
                    }
                    waiting.insert(path.clone(), refs.len());
                }
            }
        }
        let mut copies: JoinSet<(Vec<String>, Result<(), DriverError>)> = JoinSet::new();
        loop {
            while copies.len() < self.lanes_per_machine {
                let Some(path) = ready.pop_front() else { break };
                let chain = chain_from(path, &mut waiting, &dependents);
                let engine = self.clone();
                copies.spawn(async move {
                    let result = engine.copy_chain(machine, &chain).await;
                    (chain, result)
                });
            }
            let Some(joined) = copies.join_next().await else {
                break;
            };
            let (chain, result) = joined.map_err(|e| self.task_failed(machine, e))?;
            // Dropping `copies` on an error stops the others; what landed stays.
            result?;
            for path in &chain {
                for d in dependents.remove(path).unwrap_or_default() {
                    if let Some(n) = waiting.get_mut(&d) {
                        *n -= 1;
                        if *n == 0 {
                            waiting.remove(&d);
                            ready.push_back(d);
                        }
                    }
                }
            }
        }
        match waiting.keys().next() {
            // Only a reference cycle, which valid stores never have, leaves paths here.
            Some(stuck) => Err(DriverError::NotValid {
                machine: self.pools[machine].endpoint().name.clone(),
                path: stuck.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Copies `chain` to `machine`, where each path refers to paths there or earlier in
    /// the chain: down one pair of sessions, each path sent without waiting for the one
    /// before to be registered. A chain whose paths come from several sources, or go
    /// through this machine's store, goes one path at a time.
    async fn copy_chain(
        self: &Arc<Self>,
        machine: MachineId,
        chain: &[String],
    ) -> Result<(), DriverError> {
        if let [path] = chain {
            return self.copy_path(machine, path).await;
        }
        // Each path's gate, in chain order: dependencies first, as every copy takes them.
        let mut gates = Vec::with_capacity(chain.len());
        for path in chain {
            gates.push(self.gate(machine, path).lock_owned().await);
        }
        let mut infos = Vec::new();
        let mut source = None;
        let mut one_source = true;
        {
            let registry = self.registry();
            for path in chain {
                if registry.is_on(path, machine) {
                    continue;
                }
                let Some((info, way)) = self.way_to(&registry, path, machine) else {
                    one_source = false;
                    break;
                };
                let from = match self.client {
                    Some(c) if way.keeps_in_client() && machine != c => None,
                    client => way.from.or(client),
                };
                if from.is_none() || (source.is_some() && source != from) {
                    one_source = false;
                    break;
                }
                source = from;
                infos.push(info);
            }
        }
        if !one_source {
            drop(gates);
            for path in chain {
                self.copy_path(machine, path).await?;
            }
            return Ok(());
        }
        let Some(source) = source else {
            return Ok(());
        };
        self.send_in_order(machine, source, infos).await
    }
}
