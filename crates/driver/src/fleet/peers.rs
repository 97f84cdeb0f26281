//! The direct routes a run starts with: which builder sends to which other itself
//! ([`offload_sched::MachineSpec::peers`]), by what the state knows of each pair. A
//! pair probed recently goes by that answer (at the link its copies taught, else the
//! prior); a pair that cannot is named once; the others are probed during the run.

use std::collections::HashMap;

use offload_sched::MachineId;

use super::MachineConfig;
use crate::reporter::Reporter;
use crate::state::{PeerReach, StateDb};
use crate::transfer::{direct, prior_link, unreachable_note, RouteOptions};

/// Sets the peers of `machines` (keyed in the state by `keys`) from what the state
/// knows; returns the pairs to probe. None with `--relay`.
pub fn direct_routes(
    machines: &mut [MachineConfig],
    keys: &[String],
    history: Option<&StateDb>,
    routes: &RouteOptions,
    reporter: &dyn Reporter,
) -> Vec<(MachineId, MachineId)> {
    if routes.relay {
        return Vec::new();
    }
    let able: Vec<MachineId> = (0..machines.len())
        .filter(|&m| {
            !machines[m].spec.is_local
                && direct::uri_from_elsewhere(&machines[m].endpoint).is_some()
        })
        .collect();
    if able.len() < 2 {
        return Vec::new();
    }
    let reach: Vec<PeerReach> = history
        .and_then(|h| h.peer_reach().map_err(|e| tracing::warn!("{e}")).ok())
        .unwrap_or_default();
    let known: HashMap<(&str, &str), &PeerReach> = reach
        .iter()
        .filter(|p| p.is_fresh())
        .map(|p| ((p.from.as_str(), p.to.as_str()), p))
        .collect();
    let mut to_probe = Vec::new();
    for &from in &able {
        for &to in &able {
            if from == to {
                continue;
            }
            match known.get(&(keys[from].as_str(), keys[to].as_str())) {
                Some(p) if p.reachable => {
                    let link = match p.link {
                        Some(l) => offload_sched::Link {
                            bandwidth: l.bandwidth,
                            latency: l.latency,
                        },
                        None => prior_link(&machines[from].spec, &machines[to].spec),
                    };
                    machines[from].spec.peers.push((to, link));
                }
                Some(p) => reporter.machine_warning(&unreachable_note(
                    &machines[from].spec.name,
                    &machines[to].spec.name,
                    &p.reason,
                )),
                None => to_probe.push((from, to)),
            }
        }
        machines[from].spec.peers.sort_by_key(|&(m, _)| m);
    }
    to_probe
}

/// One ordered pair's answer to a probe: whether the first reaches the second's store
/// by its own ssh, and why not.
#[derive(Debug, Clone, PartialEq)]
pub struct PairAnswer {
    pub from: MachineId,
    pub to: MachineId,
    pub answer: Result<(), String>,
}

/// Probes every ordered pair of `fleet`'s machines that could copy directly, all at
/// once (`offload doctor`'s matrix).
pub async fn probe_all(fleet: &[MachineConfig], store_dir: &str) -> Vec<PairAnswer> {
    let able: Vec<MachineId> = (0..fleet.len())
        .filter(|&m| {
            !fleet[m].spec.is_local && direct::uri_from_elsewhere(&fleet[m].endpoint).is_some()
        })
        .collect();
    let mut probes = tokio::task::JoinSet::new();
    for &from in &able {
        for &to in &able {
            let Some(to_uri) = direct::uri_from_elsewhere(&fleet[to].endpoint) else {
                continue;
            };
            if from == to {
                continue;
            }
            let source = fleet[from].endpoint.clone();
            let script = direct::probe_command(&source, &to_uri, store_dir);
            probes.spawn(async move {
                let answer = match direct::run_on(&source, &script).await {
                    direct::Ran::Done { .. } => Ok(()),
                    direct::Ran::Failed { reason } => Err(reason
                        .trim_end()
                        .lines()
                        .last()
                        .unwrap_or_default()
                        .to_string()),
                };
                PairAnswer { from, to, answer }
            });
        }
    }
    let mut answers = Vec::new();
    while let Some(done) = probes.join_next().await {
        if let Ok(a) = done {
            answers.push(a);
        }
    }
    answers.sort_by_key(|a| (a.from, a.to));
    answers
}
