//! What was learned, applied to the fleet a run plans with: each machine's speeds, the
//! cost of a build there besides its own time, and its link ([`ApplyKnowledge`]); and
//! each builder's CPU cores, asked once with `nproc` and kept in the state
//! ([`learn_cores`]).

use offload_learn::Knowledge;

use std::sync::Arc;

use super::MachineConfig;
use crate::env::CORES_QUESTION_TIMEOUT;
use crate::ssh::master::SshMaster;
use crate::state::StateDb;

/// Gives a fleet's planning figures what was learned ([`Knowledge::apply_to`] for each
/// machine, by its key in the state).
pub trait ApplyKnowledge {
    /// Per system, the learned speed where there is one (the first system's also
    /// becomes the machine's own); what a build costs there besides its own time; each
    /// remote link's bandwidth and latency.
    fn apply(&self, fleet: &mut [MachineConfig]);
}

impl ApplyKnowledge for Knowledge {
    fn apply(&self, fleet: &mut [MachineConfig]) {
        for m in fleet {
            self.apply_to(&m.endpoint.name, &mut m.spec);
        }
    }
}

/// Gives each builder of `fleet` its CPU cores, so that builds there share them as they
/// do here (a build alone gets all). Learned once per machine, by running `nproc`
/// there the way its sessions run, and kept in the state database; a machine that
/// cannot say keeps its own `cores` setting. `masters` (in the fleet's order) are the
/// machines' ssh connections for the run: the question starts them, so the run's
/// first sessions find them open rather than each machine costing a first run two
/// handshakes before its first build.
pub async fn learn_cores(
    fleet: &mut [MachineConfig],
    masters: &[Arc<SshMaster>],
    history: Option<&StateDb>,
) {
    let mut asking = tokio::task::JoinSet::new();
    for (i, m) in fleet.iter_mut().enumerate() {
        // A machine that runs only the daemon runs no `nproc` either.
        if m.cores.is_some()
            || m.spec.is_local
            || m.spec.slots == 0
            || m.endpoint.protocol.is_daemon_only()
        {
            continue;
        }
        let key = &m.endpoint.name;
        if let Some(cores) = history.and_then(|h| h.cores(key).ok().flatten()) {
            m.cores = Some(cores);
            continue;
        }
        let mut endpoint = m.endpoint.clone();
        let master = masters.get(i).cloned();
        asking.spawn(async move {
            if let Some(master) = master {
                // A master that cannot start leaves the question its own connection.
                endpoint.control_path = master.socket().await.ok().flatten();
            }
            let answer = endpoint.ask("nproc", CORES_QUESTION_TIMEOUT).await;
            (i, answer.and_then(|out| out.trim().parse::<u32>().ok()))
        });
    }
    while let Some(joined) = asking.join_next().await {
        let Ok((i, answer)) = joined else { continue };
        match answer.filter(|&n| n > 0) {
            Some(cores) => {
                fleet[i].cores = Some(cores);
                if let Some(h) = history {
                    if let Err(e) = h.set_cores(&fleet[i].endpoint.name, cores) {
                        tracing::debug!("{e}");
                    }
                }
            }
            None => tracing::debug!(
                machine = %fleet[i].spec.name,
                "its cores are unknown (nproc gave no answer): its own setting stays"
            ),
        }
    }
}
