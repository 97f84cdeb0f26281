//! Machines that builds show slower than planned: each build that overran its plan is
//! a witness against its machine, and enough witnesses plan it at the speed they
//! showed for the rest of the run (in the scheduler, and as a cap on later fits).

use super::{HedgeRule, Hedger};
use crate::events::NodeState;
use crate::fleet::MachineId;
use crate::graph::NodeId;
use crate::scheduler::Scheduler;

/// The most a machine's speed can be, planned at `speed` for a build expected to take
/// `planned` seconds that has run `elapsed` without ending; `None` unless the build
/// overruns its plan ([`HedgeRule::overrun`], [`HedgeRule::slack`]): the overrun that
/// makes a build a straggler, once its duplicate finished first, also makes its machine
/// planned slower, so the builds that start after it go elsewhere.
pub fn speed_under_way(rule: &HedgeRule, speed: f64, planned: f64, elapsed: f64) -> Option<f64> {
    (planned > 0.0 && elapsed >= rule.overrun * planned + rule.slack)
        .then(|| speed * planned / elapsed)
}

/// `speed` and `per_system` (a machine's speed and its speeds per system) no faster than
/// `cap`, what builds under way showed of it ([`speed_under_way`]); the per-system speeds
/// keep their proportions.
pub fn capped_speeds(
    cap: Option<f64>,
    speed: f64,
    per_system: Vec<(String, f64)>,
) -> (f64, Vec<(String, f64)>) {
    match cap {
        Some(cap) if speed > cap => {
            let share = cap / speed;
            let per_system = per_system.into_iter().map(|(s, v)| (s, v * share));
            (cap, per_system.collect())
        }
        _ => (speed, per_system),
    }
}

/// What a build that overran its plan shows of its machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Witness {
    /// It is still running (its time so far counts its inputs' copies and session).
    Running,
    /// It ended well, after its own build time.
    Built,
    /// A duplicate of it elsewhere finished first.
    Lost,
}

impl Hedger {
    /// The machines planned slower since the last call, by what their builds under way
    /// showed (an overrun, a late end, a loss to a duplicate): the scheduler has their
    /// new speeds already; the caller copies them where it keeps its own.
    pub fn take_slower(&mut self) -> Vec<MachineId> {
        std::mem::take(&mut self.slower)
    }

    /// `speed` and `per_system` for `machine`, no faster than what its builds under way
    /// showed: a fit of the machine's speed during the run goes through this.
    pub fn capped(
        &self,
        machine: MachineId,
        speed: f64,
        per_system: Vec<(String, f64)>,
    ) -> (f64, Vec<(String, f64)>) {
        capped_speeds(self.caps.get(machine).copied().flatten(), speed, per_system)
    }

    /// The build of `node` on `machine` took `seconds` of its own (its inputs' copies
    /// and session left out) and ended well; call before [`Hedger::finished`]. A build
    /// that took clearly longer than planned ([`speed_under_way`]) is a witness
    /// against its machine; one that kept to its plan clears it. Builds whose duration
    /// was a guess show nothing.
    pub fn built(&mut self, sched: &mut Scheduler, node: NodeId, machine: MachineId, seconds: f64) {
        let Some(w) = self.watched.get(&node).copied() else {
            return;
        };
        if !matches!(sched.state(node), NodeState::Running { machine: m, .. } if *m == machine) {
            return;
        }
        let timing = (w.speed, w.planned_build);
        if !self.showed(sched, node, machine, timing, seconds, Witness::Built) {
            self.suspects.remove(&machine);
        }
    }

    /// A build of `node` planned to take `planned` seconds on `machine` at `speed` took
    /// `elapsed` (so far, or in all): whether that overruns its plan
    /// ([`speed_under_way`]) by more than noise. The machine is planned at the speed
    /// its builds showed from now on once two builds there overran, or at once on one
    /// build that lost to its duplicate, or that took more than twice as long as
    /// planned by its own build time.
    pub(super) fn showed(
        &mut self,
        sched: &mut Scheduler,
        node: NodeId,
        machine: MachineId,
        (speed, planned): (f64, f64),
        elapsed: f64,
        witness: Witness,
    ) -> bool {
        let Some(bound) = speed_under_way(&self.rule, speed, planned, elapsed) else {
            return false;
        };
        let spec = &sched.machines()[machine];
        let current = spec.speed_for(&sched.graph().node(node).system);
        if bound >= current * 0.9 {
            return true;
        }
        let witnesses = self.suspects.entry(machine).or_default();
        match witnesses.iter_mut().find(|(n, _)| *n == node) {
            Some(seen) => seen.1 = bound,
            None => witnesses.push((node, bound)),
        }
        // The mildest witness: one of them may be a derivation estimated short.
        let mildest = witnesses.iter().map(|&(_, b)| b).fold(0.0, f64::max);
        let alone = match witness {
            Witness::Running => false,
            Witness::Built => bound <= 0.5 * current,
            Witness::Lost => true,
        };
        if !alone && witnesses.len() < 2 {
            return true;
        }
        let bound = mildest;
        self.suspects.remove(&machine);
        // The machine's speed at the share of the planned one its builds showed (its
        // per-system speeds in proportion), kept as its cap.
        let cap = spec.speed * bound / current;
        let (speed, per_system) = capped_speeds(Some(cap), spec.speed, spec.system_speeds.clone());
        if let Some(cap) = self.caps.get_mut(machine) {
            *cap = Some(speed);
        }
        sched.set_speeds(machine, speed, per_system);
        if !self.slower.contains(&machine) {
            self.slower.push(machine);
        }
        true
    }
}
