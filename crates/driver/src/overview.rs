//! What offload knows of each machine of a fleet now, for `offload machines`: its
//! declared systems, features, slots and speed factor; its current load (slots held in
//! the shared ledger by any offload or Nix hook build on this machine); what the planner
//! learned of it from the state database (speed per system relative to this machine's
//! native one, the link's bandwidth and latency, what a build costs there besides its
//! own time, CPU cores, and how many builds or transfers each figure rests on); and its
//! state (up, failing since, or quarantined until).

use std::path::Path;

use crate::fleet::{MachineConfig, LOCAL};
use crate::slots::SlotLedger;
use crate::state::{Knowledge, Learned, LinkFigures};
use crate::{format_utc, StateDb};

/// One machine of the fleet as offload knows it now.
#[derive(Debug, Clone)]
pub struct MachineOverview {
    pub name: String,
    pub uri: String,
    pub systems: String,
    pub features: String,
    pub slots: u32,
    pub speed: f64,
    /// Slots held now, when the ledger can tell.
    pub busy: Option<u32>,
    /// Per system it builds: its learned speed (this machine's native system is 1).
    pub learned: Vec<(String, Learned)>,
    /// Per system, the speed the planner uses: the learned one, else its speed factor
    /// on the scale the other builders showed, else its speed factor.
    pub planned: Vec<(String, f64)>,
    pub link: Option<LinkFigures>,
    /// Seconds a build costs there besides its own time, and the builds behind it.
    pub per_build: Option<(f64, usize)>,
    pub cores: Option<u32>,
    /// `up`, `failing`, or `quarantined`, and what the record says.
    pub state: &'static str,
    pub state_detail: Option<String>,
}

/// Each machine of `fleet` (the local machine first) with the state database at
/// `state` (none is fine) and the slot `ledger`; `local_system` is this machine's.
pub fn overview(
    fleet: &[MachineConfig],
    local_system: &str,
    state: &Path,
    ledger: &SlotLedger,
) -> Vec<MachineOverview> {
    let history = StateDb::open(state)
        .map_err(|e| tracing::debug!("no machine records: {e}"))
        .ok();
    let knowledge = history
        .as_ref()
        .and_then(|h| h.knowledge(local_system).ok())
        .unwrap_or_default();
    fleet
        .iter()
        .enumerate()
        .map(|(m, c)| machine(m, c, ledger, history.as_ref(), &knowledge))
        .collect()
}

/// What the state database says of a machine now.
fn state(name: &str, history: Option<&StateDb>) -> (&'static str, Option<String>) {
    let record = history.and_then(|h| h.machine(name).ok().flatten());
    let Some(r) = record else {
        return ("up", None);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if r.quarantined_until > now {
        let detail = format!(
            "until {}: {}",
            format_utc(r.quarantined_until),
            r.last_failure
        );
        ("quarantined", Some(detail))
    } else if r.failures > 0 {
        let detail = format!(
            "{} failures, last at {}: {}",
            r.failures,
            format_utc(r.last_failure_at),
            r.last_failure
        );
        ("failing", Some(detail))
    } else {
        ("up", None)
    }
}

fn machine(
    m: usize,
    config: &MachineConfig,
    ledger: &SlotLedger,
    history: Option<&StateDb>,
    knowledge: &Knowledge,
) -> MachineOverview {
    let spec = &config.spec;
    let mut features: Vec<String> = spec.supported_features.clone();
    features.extend(
        spec.mandatory_features
            .iter()
            .map(|f| format!("{f}(mandatory)")),
    );
    // The local machine's slots are Nix's max-jobs, not ledger locks.
    let busy = (m != LOCAL)
        .then(|| {
            let _choosing = ledger.choosing(&config.endpoint.name).ok()?;
            ledger
                .probe(&config.endpoint.name, spec.slots)
                .ok()
                .map(|p| p.busy)
        })
        .flatten();
    let (state, state_detail) = if m == LOCAL {
        ("up", None)
    } else {
        state(&spec.name, history)
    };
    let key = &config.endpoint.name;
    let learned = spec
        .systems
        .iter()
        .filter_map(|system| {
            let l = knowledge.speed(key, system)?;
            (l.samples > 0).then(|| (system.clone(), l))
        })
        .collect();
    let cores = if m == LOCAL {
        config.cores
    } else {
        history.and_then(|h| h.cores(key).ok().flatten())
    };
    let planned = knowledge
        .planned_speeds(key, spec, spec.speed)
        .map(|(_, per_system)| per_system)
        .unwrap_or_default();
    let planned = spec
        .systems
        .iter()
        .map(|s| {
            let speed = planned
                .iter()
                .find(|(x, _)| x == s)
                .map_or(spec.speed, |e| e.1);
            (s.clone(), speed)
        })
        .collect();
    MachineOverview {
        learned,
        planned,
        link: knowledge.link(key),
        per_build: knowledge.per_build(key),
        cores,
        state,
        state_detail,
        name: spec.name.clone(),
        uri: config.endpoint.name.clone(),
        systems: spec.systems.join(","),
        features: features.join(","),
        slots: spec.slots,
        speed: spec.speed,
        busy,
    }
}
