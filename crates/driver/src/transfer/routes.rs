//! The direct routes a run starts with: which builder sends to which other itself
//! ([`offload_sched::MachineSpec::peers`]), by what the state knows of each pair. A
//! pair probed recently goes by that answer; a pair that cannot is named once; the
//! others are probed during the run.
//!
//! A pair is planned at what its copies taught only once both of its machines' links
//! to this one are measured too, before that at the prior
//! ([`offload_learn::pair_prior`], never slower than the relay): weighed against a
//! link merely assumed, a measured pair would lose to the assumption, while the worst a
//! direct copy risks is its fixed cost and the worst a relay risks is twice its bytes
//! over a link that may be slow.

use std::collections::HashMap;
use std::fmt::Write as _;

use offload_sched::MachineId;

use super::{cause, direct, unreachable_note, RouteOptions};
use crate::fleet::MachineConfig;
use crate::reporter::Reporter;
use crate::state::{Knowledge, PeerReach, StateDb};

/// Sets the peers of `machines` (keyed in the state by `keys`) from what the state
/// knows; returns the pairs to probe. None with `--relay`.
pub fn direct_routes(
    machines: &mut [MachineConfig],
    keys: &[String],
    history: Option<&StateDb>,
    knowledge: &Knowledge,
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
                    let measured = |m: MachineId| knowledge.link(&keys[m]).is_some();
                    let learned = p.link.filter(|_| measured(from) && measured(to));
                    let link = match learned {
                        Some(l) => offload_sched::Link {
                            bandwidth: l.bandwidth,
                            latency: l.latency,
                        },
                        None => offload_learn::pair_prior(&machines[from].spec, &machines[to].spec),
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

/// Keeps `answers` in the state at `path`, for the builds that follow; a state that
/// cannot be opened keeps nothing (the doctor's report stands without it).
pub fn record(fleet: &[MachineConfig], answers: &[PairAnswer], path: &std::path::Path) {
    let Ok(state) = StateDb::open(path) else {
        return;
    };
    for a in answers {
        let (from, to) = (&fleet[a.from].endpoint.name, &fleet[a.to].endpoint.name);
        let reason = a.answer.as_ref().err().map_or("", String::as_str);
        if let Err(e) = state.record_peer_probe(from, to, a.answer.is_ok(), reason) {
            tracing::warn!("{e}");
        }
    }
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
                    direct::Ran::Failed { reason } => Err(cause(&reason).to_string()),
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

/// Which builder reaches which directly: a row per sender, a column per receiver, and
/// under it why each pair that cannot, cannot (its copies go through this machine).
pub fn matrix_text(names: &[&str], answers: &[PairAnswer]) -> String {
    let mut machines: Vec<usize> = answers.iter().flat_map(|a| [a.from, a.to]).collect();
    machines.sort_unstable();
    machines.dedup();
    let width = machines.iter().map(|&m| names[m].len()).max().unwrap_or(0);
    let mut out = String::from(
        "builder to builder (row sends to column by its own ssh; `no` relays through this \
         machine):\n",
    );
    let _ = write!(out, "  {:width$}", "");
    for (i, _) in machines.iter().enumerate() {
        let _ = write!(out, "  {:>3}", i + 1);
    }
    out.push('\n');
    for (i, &from) in machines.iter().enumerate() {
        let _ = write!(out, "  {:width$}", format!("{} {}", i + 1, names[from]));
        for &to in &machines {
            let cell = match answers.iter().find(|a| a.from == from && a.to == to) {
                _ if from == to => "-",
                Some(PairAnswer { answer: Ok(()), .. }) => "yes",
                Some(_) => "no",
                None => "?",
            };
            let _ = write!(out, "  {cell:>3}");
        }
        out.push('\n');
    }
    for a in answers {
        if let Err(reason) = &a.answer {
            let _ = writeln!(
                out,
                "  {} cannot reach {}: {reason}",
                names[a.from], names[a.to]
            );
        }
    }
    out
}
