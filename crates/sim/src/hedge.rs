//! Hedged stragglers in a simulated run, by the live driver's rule
//! (`offload_sched::hedge`): offload's policy watches each build it starts, is woken
//! when one would overrun its plan, and starts a duplicate where the rule says; the
//! engine runs both copies and keeps the first to end (`Copies`). Machines a build
//! under way shows slower than planned are planned at that bound, and a fit during the
//! run does not plan them faster, as in the driver.

use offload_sched::hedge::{HedgeCounts, HedgeRule, Hedger};
use offload_sched::{Action, MachineId, NodeId, Outcome, Scheduler};

/// Hedging beside the simulated scheduler.
#[derive(Debug, Clone)]
pub struct Hedging {
    hedger: Hedger,
}

impl Hedging {
    pub fn new(sched: &Scheduler) -> Hedging {
        Hedging {
            hedger: Hedger::new(HedgeRule::default(), sched),
        }
    }

    /// Duplicates started, won and the slot time lost to them so far.
    pub fn counts(&self) -> HedgeCounts {
        self.hedger.counts()
    }

    /// The starts among `actions` (each told to the hedger).
    pub fn starts(
        &mut self,
        sched: &Scheduler,
        actions: Vec<Action>,
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Start { node, machine } => {
                    self.hedger.started(sched, node, now);
                    Some((node, machine))
                }
                _ => None,
            })
            .collect()
    }

    /// A build of `node` on `machine` took `seconds` of its own and ended well (told
    /// before [`Hedging::finished`]).
    pub fn built(&mut self, sched: &mut Scheduler, node: NodeId, machine: MachineId, seconds: f64) {
        self.hedger.built(sched, node, machine, seconds);
    }

    /// A build ended well: the scheduler hears of it through the hedger (the losing
    /// copy of a hedged build is cancelled there; the engine drops it itself).
    pub fn finished(
        &mut self,
        sched: &mut Scheduler,
        node: NodeId,
        machine: MachineId,
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        let actions = self
            .hedger
            .finished(sched, node, machine, Outcome::Built, now);
        // Machines its build showed slower are planned so already, in the scheduler.
        self.hedger.take_slower();
        self.starts(sched, actions, now)
    }

    /// `machine` is lost: the hedger first.
    pub fn machine_failing(&mut self, sched: &mut Scheduler, machine: MachineId, now: f64) {
        self.hedger.machine_failing(sched, machine, now);
    }

    /// When the next watched build would overrun.
    pub fn next_due(&self) -> Option<f64> {
        self.hedger.next_due()
    }

    /// The duplicates to start now.
    pub fn poll(&mut self, sched: &mut Scheduler, now: f64) -> Vec<(NodeId, MachineId)> {
        let poll = self.hedger.poll(sched, now);
        poll.hedges.iter().map(|h| (h.node, h.to)).collect()
    }

    /// `speed` and `per_system` for `machine`, no faster than builds under way showed.
    pub fn capped(
        &self,
        machine: MachineId,
        speed: f64,
        per_system: Vec<(String, f64)>,
    ) -> (f64, Vec<(String, f64)>) {
        self.hedger.capped(machine, speed, per_system)
    }
}

/// How many copies of each node the engine runs: a second one is a duplicate (started
/// while the first runs), and the first copy to end is the build.
#[derive(Debug, Clone)]
pub(crate) struct Copies {
    running: Vec<u8>,
}

impl Copies {
    pub(crate) fn new(nodes: usize) -> Copies {
        Copies {
            running: vec![0; nodes],
        }
    }

    /// A copy of `node` starts. Unless it is a duplicate of one running, the ends of
    /// earlier copies are forgotten (its `generation` moves on).
    pub(crate) fn start(&mut self, node: NodeId, generation: &mut [u64]) {
        self.running[node] = self.running[node].saturating_add(1);
        if self.running[node] == 1 {
            generation[node] += 1;
        }
    }

    /// The copy of `node` that counts ended: whether another ran beside it, to be
    /// dropped (its end forgotten: the `generation` moves on).
    pub(crate) fn end(&mut self, node: NodeId, generation: &mut [u64]) -> bool {
        let beside = std::mem::replace(&mut self.running[node], 0) > 1;
        if beside {
            generation[node] += 1;
        }
        beside
    }

    /// The builds `lost` with a machine: one copy of each is gone. Those with another
    /// copy running elsewhere go on there and leave `lost`; the others' ends are
    /// forgotten (their `generation` moves on).
    pub(crate) fn keep_lost(&mut self, lost: &mut Vec<NodeId>, generation: &mut [u64]) {
        lost.retain(|&node| {
            let alone = self.running[node] <= 1;
            self.running[node] = self.running[node].saturating_sub(1);
            if alone {
                generation[node] += 1;
            }
            alone
        });
    }
}

/// The copy of `node` (called `key`) on `winner` ended first at `now`: the other copy
/// stops where it runs, and its trace event ends now. The caller forgets its end.
pub(crate) fn stop_loser(
    node: NodeId,
    key: &str,
    winner: MachineId,
    now: f64,
    running: &mut [Vec<NodeId>],
    trace: &mut [crate::report::TraceEvent],
) {
    for r in running.iter_mut() {
        r.retain(|&x| x != node);
    }
    let loser = trace
        .iter_mut()
        .rev()
        .find(|e| e.name == key && e.machine != winner && e.start + e.duration > now);
    if let Some(e) = loser {
        e.duration = now - e.start;
    }
}
