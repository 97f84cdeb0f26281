//! Hedged stragglers in a live run, by `offload_sched::hedge`'s rule (the simulator's
//! too): a build that overruns its plan while a free slot elsewhere would finish it
//! sooner gets a duplicate there (a `build_hedged` event, not a second start); the
//! first copy to finish wins and the other's task is aborted. Aborting drops its serve
//! session: over ssh the connection closes, the builder's `nix-store --serve` sees its
//! input hang up during BuildDerivation and stops the build, so nothing of the loser
//! runs on or comes home. A machine a build under way shows slower than planned is
//! planned at that bound for the rest of the run (refits do not plan it faster).

use std::collections::HashMap;

use offload_nix::serve::BasicDerivation;
use offload_sched::hedge::{HedgeRule, Hedger};
use offload_sched::{MachineId, Scheduler};
use tokio::task::AbortHandle;

use super::{BuildTask, BuildTransport, Runner};

/// The environment attribute a derivation sets (to anything but the empty string: Nix
/// writes `true` as `1`) when its outputs must never be built twice at once.
pub(crate) const NO_HEDGE_ATTRIBUTE: &str = "offloadNoHedge";

/// Whether a duplicate of `drv` may run beside it: not for an `__impure` derivation,
/// nor for one that sets [`NO_HEDGE_ATTRIBUTE`].
pub(crate) fn may_build_twice(drv: &BasicDerivation) -> bool {
    !drv.env.iter().any(|(k, v)| {
        (k.as_slice() == b"__impure" || k.as_slice() == NO_HEDGE_ATTRIBUTE.as_bytes())
            && !v.is_empty()
    })
}

/// Hedging's part of a run.
pub(super) struct Hedging {
    pub(super) hedger: Hedger,
    /// Each running duplicate's task and machine, by node.
    duplicates: HashMap<usize, (AbortHandle, MachineId)>,
}

impl Hedging {
    pub(super) fn new(sched: &Scheduler, never: &[usize]) -> Hedging {
        let mut hedger = Hedger::new(HedgeRule::default(), sched);
        hedger.never_hedge(never);
        Hedging {
            hedger,
            duplicates: HashMap::new(),
        }
    }
}

impl<T: BuildTransport> Runner<'_, T> {
    /// Starts the duplicates the rule asks for now, and plans the machines seen slower
    /// than planned at what their builds under way show.
    pub(super) fn hedge_now(&mut self) {
        let now = self.now();
        if self.hedging.hedger.next_due().is_none_or(|due| due > now) {
            return;
        }
        let poll = self.hedging.hedger.poll(&mut self.sched, now);
        tracing::debug!(
            "overruns at {now:.2} s: {} duplicates, budget {:.1} s",
            poll.hedges.len(),
            self.hedging.hedger.budget(now)
        );
        for h in poll.hedges {
            let cores = self.cores[h.to].map(|total| {
                let sharing = self.sched.running_on(h.to).len().max(1) as u32;
                (total / sharing).max(1)
            });
            self.reporter.build_hedged(
                &self.nodes[h.node].drv_path,
                &self.machines[h.from].name,
                &self.machines[h.to].name,
            );
            let task = BuildTask {
                node: h.node,
                machine: h.to,
                cores,
            };
            let handle = self.tasks.spawn(self.transport.clone().build(task));
            self.hedging.duplicates.insert(h.node, (handle, h.to));
        }
    }

    /// Takes the task `id` that ended with a build of `node` off the running ones:
    /// whether it is one the run still waits for (the build, or its duplicate).
    pub(super) fn take_task(&mut self, id: tokio::task::Id, node: usize) -> bool {
        if matches!(self.running.get(&node), Some((h, _)) if h.id() == id) {
            self.running.remove(&node);
            return true;
        }
        if matches!(self.hedging.duplicates.get(&node), Some((h, _)) if h.id() == id) {
            self.hedging.duplicates.remove(&node);
            return true;
        }
        false
    }

    /// Whether the build of `node` on `machine` is its duplicate.
    pub(super) fn is_duplicate(&self, node: usize, machine: MachineId) -> bool {
        self.hedging.hedger.duplicate_of(node) == Some(machine)
    }

    /// Stops the copy of `node` on `machine` (the scheduler's Cancel).
    pub(super) fn cancel_copy(&mut self, node: usize, machine: MachineId) {
        if matches!(self.hedging.duplicates.get(&node), Some((_, m)) if *m == machine) {
            if let Some((handle, _)) = self.hedging.duplicates.remove(&node) {
                handle.abort();
            }
        } else if let Some((handle, _)) = self.running.remove(&node) {
            handle.abort();
        }
    }

    /// Takes the speeds the hedger planned the machines its builds under way showed
    /// slower at.
    pub(super) fn plan_slower(&mut self) {
        for m in self.hedging.hedger.take_slower() {
            let planned = &self.sched.machines()[m];
            tracing::debug!(machine = %planned.name, "speed at most {:.2} by its builds under way", planned.speed);
            self.machines[m].speed = planned.speed;
            self.machines[m].system_speeds = planned.system_speeds.clone();
        }
    }

    /// After a build of `node` ended: a duplicate that outlived its original is the
    /// build from now on.
    pub(super) fn hedge_settled(&mut self, node: usize) {
        self.plan_slower();
        if self.hedging.hedger.duplicate_of(node).is_none() {
            if let Some(dup) = self.hedging.duplicates.remove(&node) {
                self.running.insert(node, dup);
            }
        }
    }

    /// `machine` fails (before the scheduler hears of it): duplicates there are given
    /// up; builds whose original ran there go on as their duplicate.
    pub(super) fn hedge_machine_failing(&mut self, machine: MachineId) {
        let now = self.now();
        for node in self
            .hedging
            .hedger
            .machine_failing(&mut self.sched, machine, now)
        {
            match self.hedging.duplicates.remove(&node) {
                Some((handle, m)) if m == machine => handle.abort(),
                Some(dup) => {
                    if let Some((handle, _)) = self.running.insert(node, dup) {
                        handle.abort();
                    }
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(env: &[(&str, &str)]) -> BasicDerivation {
        BasicDerivation {
            outputs: Vec::new(),
            input_srcs: Vec::new(),
            platform: "x86_64-linux".into(),
            builder: b"/bin/sh".to_vec(),
            args: Vec::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn impure_and_marked_derivations_are_built_once() {
        assert!(may_build_twice(&drv(&[("name", "x")])));
        assert!(!may_build_twice(&drv(&[("__impure", "1")])));
        assert!(!may_build_twice(&drv(&[("offloadNoHedge", "1")])));
        // `false` is written as the empty string.
        assert!(may_build_twice(&drv(&[("offloadNoHedge", "")])));
    }
}
