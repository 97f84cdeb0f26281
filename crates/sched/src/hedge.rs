//! Hedged stragglers: a running build that overruns what the plan expected of it by a
//! clear margin, while a free slot elsewhere would finish it sooner by current
//! estimates, gets a duplicate there. The first copy to finish wins; the other is
//! cancelled (its slot freed here, its process stopped by the caller).
//!
//! One rule for the live driver and the simulator: [`decide`] is the decision itself
//! (pure, on figures), [`Hedger`] keeps what it needs between events beside a
//! [`Scheduler`]: the running builds indexed by when each would count as overrunning
//! (so a check costs only the builds that are due, never a scan of all running ones),
//! which derivations were hedged (at most one duplicate each), those never to be
//! built twice, the slot time duplicates may still take, and the counts a run reports.
//!
//! The caller's part:
//! - each [`Action::Start`] it carries out is told with [`Hedger::started`];
//! - each build's end goes through [`Hedger::finished`] instead of
//!   [`Scheduler::handle`]; the actions it returns may hold an [`Action::Cancel`] for
//!   the losing copy;
//! - a machine going down or lost is told with [`Hedger::machine_failing`] before the
//!   scheduler hears of it;
//! - at [`Hedger::next_due`] (or any time after), [`Hedger::poll`] gives the
//!   duplicates to start;
//! - a build that ended well is told with [`Hedger::built`] (its own seconds) first;
//! - after an end, [`Hedger::take_slower`] gives the machines that builds showed
//!   slower than planned; the hedger has planned them at that bound
//!   in the scheduler already (the caller updates its own copy of their specs), and
//!   [`Hedger::capped`] keeps later fits from planning them faster.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use crate::events::{Action, Event, NodeState, Outcome};
use crate::fleet::MachineId;
use crate::graph::NodeId;
use crate::scheduler::Scheduler;
use witness::Witness;
pub use witness::{capped_speeds, speed_under_way};

/// The bounds of hedging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HedgeRule {
    /// A build overruns when it has run this many times its planned seconds …
    pub overrun: f64,
    /// … plus these seconds (short builds' noise is no overrun).
    pub slack: f64,
    /// A duplicate starts only when it would finish this many times sooner than what
    /// is left of the original by current estimates.
    pub gain: f64,
    /// Slot time duplicates may take, as a share of the run's: of its planned work, or
    /// of its slots' time so far (all slots × the seconds since the run began) once that
    /// is more.
    pub budget_share: f64,
}

impl Default for HedgeRule {
    fn default() -> Self {
        HedgeRule {
            overrun: 1.5,
            slack: 1.0,
            gain: 1.25,
            budget_share: 0.10,
        }
    }
}

/// What the decision on one overrunning build weighs, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// What the plan expected of the build when it started.
    pub planned: f64,
    /// How long it has run.
    pub elapsed: f64,
    /// What is left of it by the machine's current estimates (zero or less when
    /// those say it should be done).
    pub remaining: f64,
    /// How long a duplicate on the best free slot would take, inputs included.
    pub duplicate: f64,
    /// Slot seconds duplicates may still take in this run.
    pub budget_left: f64,
}

/// Whether to start a duplicate of a running build: it overruns its plan
/// ([`HedgeRule::overrun`], [`HedgeRule::slack`]), a duplicate would finish
/// [`HedgeRule::gain`] times sooner than what is left of it, and the duplicate fits in
/// the budget. What is left is at least what has run already: a build seen running
/// `e` seconds past its plan is as likely to need another `e` as to end now, whatever
/// the machine's estimates still say.
pub fn decide(rule: &HedgeRule, e: &Estimate) -> bool {
    let overruns = e.elapsed >= rule.overrun * e.planned.max(0.0) + rule.slack;
    let remaining = e.remaining.max(e.elapsed);
    overruns
        && e.duplicate.is_finite()
        && e.duplicate * rule.gain <= remaining
        && e.duplicate <= e.budget_left
}

/// A duplicate to start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hedge {
    pub node: NodeId,
    /// Where the original runs.
    pub from: MachineId,
    /// Where the duplicate goes.
    pub to: MachineId,
}

/// What a [`Hedger::poll`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Poll {
    pub hedges: Vec<Hedge>,
}

/// Duplicates of a run, as reported.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HedgeCounts {
    /// Duplicates started.
    pub duplicates: u32,
    /// Those that finished first.
    pub wins: u32,
    /// Slot seconds spent on copies that lost or failed.
    pub waste_seconds: f64,
}

/// A time as an ordered key.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Due(f64);

impl Eq for Due {}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A running build as the hedger saw it start.
#[derive(Debug, Clone, Copy)]
struct Watched {
    due: f64,
    started: f64,
    planned: f64,
    /// Of that, the build's own seconds (its inputs' copies and session left out).
    planned_build: f64,
    /// The speed its machine was planned at then, for its system.
    speed: f64,
}

/// A duplicate running.
#[derive(Debug, Clone, Copy)]
struct Duplicate {
    machine: MachineId,
    started: f64,
    /// The seconds taken from the budget for it.
    charged: f64,
    /// The original as the hedger saw it start.
    original: Watched,
}

/// Hedging's state beside a [`Scheduler`] (see the module's doc).
#[derive(Debug, Clone)]
pub struct Hedger {
    rule: HedgeRule,
    /// Running builds by when they would overrun.
    due: BTreeSet<(Due, NodeId)>,
    watched: HashMap<NodeId, Watched>,
    duplicates: HashMap<NodeId, Duplicate>,
    /// Derivations hedged once already, and those never to be built twice.
    hedged: Vec<bool>,
    never: Vec<bool>,
    /// The run's planned work (seconds at speed 1) and its slots.
    work: f64,
    slots: f64,
    /// Slot seconds duplicates took so far (those running at what they were expected
    /// to take).
    spent: f64,
    counts: HedgeCounts,
    /// Machines planned slower since the last [`Hedger::take_slower`].
    slower: Vec<MachineId>,
    /// Overrunning builds whose duplicate waits only for a free slot, and the
    /// duplicates started when one freed, for the next [`Hedger::poll`].
    awaiting: Vec<NodeId>,
    pending: Vec<Hedge>,
    /// Per machine, the most its speed can be by what builds under way showed.
    caps: Vec<Option<f64>>,
    /// Per machine, the builds seen overrunning their plan there since the last one
    /// that kept to it, each with the speed it showed last: one overrun may be a
    /// derivation estimated short, two on one machine are the machine.
    suspects: HashMap<MachineId, Vec<(NodeId, f64)>>,
}

impl Hedger {
    /// A hedger for the run `sched` is about to make, from time 0.
    pub fn new(rule: HedgeRule, sched: &Scheduler) -> Hedger {
        let n = sched.graph().len();
        Hedger {
            work: sched.graph().total_work(),
            slots: sched.machines().iter().map(|m| f64::from(m.slots)).sum(),
            rule,
            due: BTreeSet::new(),
            watched: HashMap::new(),
            duplicates: HashMap::new(),
            hedged: vec![false; n],
            never: vec![false; n],
            spent: 0.0,
            counts: HedgeCounts::default(),
            slower: Vec::new(),
            awaiting: Vec::new(),
            pending: Vec::new(),
            caps: vec![None; sched.machines().len()],
            suspects: HashMap::new(),
        }
    }

    /// Marks `nodes` as never to be hedged: their outputs must not be built twice
    /// (`__impure`, or marked by the user). Ids past the end are ignored.
    pub fn never_hedge(&mut self, nodes: &[NodeId]) {
        for &id in nodes {
            if let Some(f) = self.never.get_mut(id) {
                *f = true;
            }
        }
    }

    pub fn counts(&self) -> HedgeCounts {
        self.counts
    }

    /// The rule it applies.
    pub fn rule(&self) -> &HedgeRule {
        &self.rule
    }

    /// Where the duplicate of `node` runs, if one does.
    pub fn duplicate_of(&self, node: NodeId) -> Option<MachineId> {
        self.duplicates.get(&node).map(|d| d.machine)
    }

    /// The scheduler started `node` (an [`Action::Start`]) at `now`: it is watched for
    /// an overrun, unless it may not be hedged or its duration is a guess.
    pub fn started(&mut self, sched: &Scheduler, node: NodeId, now: f64) {
        self.unwatch(node);
        if self.never.get(node) != Some(&false) || self.hedged[node] || sched.duration_guessed[node]
        {
            return;
        }
        let NodeState::Running {
            machine,
            expected_end,
        } = *sched.state(node)
        else {
            return;
        };
        let planned = (expected_end - now).max(0.0);
        let due = now + self.rule.overrun * planned + self.rule.slack;
        let spec = &sched.machines()[machine];
        let node_spec = sched.graph().node(node);
        let speed = spec.speed_for(&node_spec.system);
        self.due.insert((Due(due), node));
        self.watched.insert(
            node,
            Watched {
                due,
                started: now,
                planned,
                planned_build: spec.build_time(node_spec),
                speed,
            },
        );
    }

    fn unwatch(&mut self, node: NodeId) {
        if let Some(w) = self.watched.remove(&node) {
            self.due.remove(&(Due(w.due), node));
        }
    }

    /// When the next watched build would overrun, or `-inf` when duplicates started
    /// at a build's end wait to be taken by [`Hedger::poll`].
    pub fn next_due(&self) -> Option<f64> {
        if !self.pending.is_empty() {
            return Some(f64::NEG_INFINITY);
        }
        self.due.first().map(|(d, _)| d.0)
    }

    /// Looks at the builds that overran by `now`: starts a duplicate of each where
    /// [`decide`] says so (its slot taken in `sched`). A build not hedged now is looked
    /// at again after half as long again as it has run, or at the next end of a build
    /// when only a free slot was missing. The duplicates started at builds' ends since
    /// the last poll come first.
    pub fn poll(&mut self, sched: &mut Scheduler, now: f64) -> Poll {
        let mut poll = Poll {
            hedges: std::mem::take(&mut self.pending),
        };
        while let Some(&(Due(due), node)) = self.due.first() {
            if due > now {
                break;
            }
            self.due.pop_first();
            let Some(w) = self.watched.get(&node).copied() else {
                continue;
            };
            let NodeState::Running { machine: from, .. } = *sched.state(node) else {
                self.watched.remove(&node);
                continue;
            };
            // A build running past its plan is a witness against its machine (with
            // another, it is planned slower: the builds placed next avoid it).
            let timing = (w.speed, w.planned);
            self.showed(sched, node, from, timing, now - w.started, Witness::Running);
            match self.consider(sched, node, from, w, now) {
                Ok(hedge) => poll.hedges.push(hedge),
                Err(no_slot) => {
                    if no_slot && !self.awaiting.contains(&node) {
                        self.awaiting.push(node);
                    }
                    let again = now + (0.5 * (now - w.started)).max(self.rule.slack);
                    self.due.insert((Due(again), node));
                    if let Some(w) = self.watched.get_mut(&node) {
                        w.due = again;
                    }
                }
            }
        }
        poll
    }

    /// Starts a duplicate of overrunning `node` (running on `from`, watched as `w`)
    /// when [`decide`] says so; else whether only a free slot was missing.
    fn consider(
        &mut self,
        sched: &mut Scheduler,
        node: NodeId,
        from: MachineId,
        w: Watched,
        now: f64,
    ) -> Result<Hedge, bool> {
        let spec = &sched.machines()[from];
        let node_spec = sched.graph().node(node);
        let remaining = w.started + spec.build_time(node_spec) + spec.per_build - now;
        let best = sched.free_machine_for(node, from, now);
        let estimate = Estimate {
            planned: w.planned,
            elapsed: now - w.started,
            remaining,
            duplicate: best.map_or(f64::INFINITY, |(_, s)| s),
            budget_left: self.budget(now) - self.spent,
        };
        let Some((to, seconds)) = best else {
            let overruns = decide(
                &self.rule,
                &Estimate {
                    duplicate: 0.0,
                    ..estimate
                },
            );
            return Err(overruns);
        };
        if !decide(&self.rule, &estimate) {
            return Err(false);
        }
        sched.start_duplicate(node, to);
        self.watched.remove(&node);
        self.awaiting.retain(|&n| n != node);
        self.hedged[node] = true;
        self.spent += seconds;
        self.counts.duplicates += 1;
        self.duplicates.insert(
            node,
            Duplicate {
                machine: to,
                started: now,
                charged: seconds,
                original: w,
            },
        );
        Ok(Hedge { node, from, to })
    }

    /// A build ended and freed its slot (not yet given to anything): the overrunning
    /// builds that waited for a free slot take it first, ahead of the ready builds,
    /// since the builds after them wait on them.
    fn first_pick(&mut self, sched: &mut Scheduler, now: f64) {
        for node in std::mem::take(&mut self.awaiting) {
            let Some(w) = self.watched.get(&node).copied() else {
                continue;
            };
            let NodeState::Running { machine: from, .. } = *sched.state(node) else {
                continue;
            };
            match self.consider(sched, node, from, w, now) {
                Ok(hedge) => self.pending.push(hedge),
                Err(true) => self.awaiting.push(node),
                Err(false) => {}
            }
        }
    }

    /// The build of `node` on `machine` ended with `outcome` at `now`: the scheduler
    /// hears of it, and when `node` was hedged, of the winner only; the loser's slot is
    /// freed and an [`Action::Cancel`] for it leads the actions returned.
    pub fn finished(
        &mut self,
        sched: &mut Scheduler,
        node: NodeId,
        machine: MachineId,
        outcome: Outcome,
        now: f64,
    ) -> Vec<Action> {
        self.unwatch(node);
        let event = |machine| Event::Finished {
            node,
            machine,
            outcome: outcome.clone(),
        };
        let Some(dup) = self.duplicates.get(&node).copied() else {
            if self.awaiting.is_empty() {
                return sched.handle(event(machine), now);
            }
            let mut actions = sched.handle_undispatched(event(machine), now);
            self.first_pick(sched, now);
            sched.dispatch(now, &mut actions);
            return actions;
        };
        let NodeState::Running {
            machine: original, ..
        } = *sched.state(node)
        else {
            self.duplicates.remove(&node);
            return sched.handle(event(machine), now);
        };
        let original_started = sched.started_at[node];
        let built = outcome == Outcome::Built;
        let mut actions = Vec::new();
        if machine == dup.machine {
            self.duplicates.remove(&node);
            self.settle(&dup, now);
            if built {
                // The duplicate won: the original is cancelled, the end is the
                // duplicate's.
                self.counts.wins += 1;
                self.counts.waste_seconds += now - original_started;
                let o = dup.original;
                let timing = (o.speed, o.planned);
                self.showed(
                    sched,
                    node,
                    original,
                    timing,
                    now - o.started,
                    Witness::Lost,
                );
                sched.release(node, original);
                sched.set_state(
                    node,
                    NodeState::Running {
                        machine,
                        expected_end: now,
                    },
                );
                actions.push(Action::Cancel {
                    node,
                    machine: original,
                });
                actions.extend(sched.handle(event(machine), now));
            } else {
                // The duplicate failed: the original runs on alone.
                self.counts.waste_seconds += now - dup.started;
                sched.release(node, machine);
                sched.dispatch(now, &mut actions);
            }
        } else if machine == original {
            self.duplicates.remove(&node);
            self.settle(&dup, now);
            if built {
                self.counts.waste_seconds += now - dup.started;
                sched.release(node, dup.machine);
                actions.push(Action::Cancel {
                    node,
                    machine: dup.machine,
                });
                actions.extend(sched.handle(event(machine), now));
            } else {
                // The original failed or was lost: the duplicate carries on as the
                // build.
                self.counts.waste_seconds += now - original_started;
                self.promote(sched, node, original, dup.machine, now);
                sched.dispatch(now, &mut actions);
            }
        } else {
            // Stale: neither copy.
            return sched.handle(event(machine), now);
        }
        actions
    }

    /// Slot seconds duplicates may take by `now` ([`HedgeRule::budget_share`]).
    pub fn budget(&self, now: f64) -> f64 {
        self.rule.budget_share * self.work.max(self.slots * now)
    }

    /// The duplicate `dup` ended: the budget is charged what it really took.
    fn settle(&mut self, dup: &Duplicate, now: f64) {
        self.spent += (now - dup.started) - dup.charged;
    }

    /// The original of `node` on `original` is gone: the duplicate on `dup` is the
    /// build from now on.
    fn promote(
        &mut self,
        sched: &mut Scheduler,
        node: NodeId,
        original: MachineId,
        dup: MachineId,
        now: f64,
    ) {
        sched.release(node, original);
        let spec = &sched.machines()[dup];
        let expected_end = now + spec.build_time(sched.graph().node(node));
        sched.set_state(
            node,
            NodeState::Running {
                machine: dup,
                expected_end,
            },
        );
        sched.started_at[node] = now;
        sched.replace_queue_key(dup);
    }

    /// `machine` is about to go down or be lost (call before the scheduler hears of
    /// it): duplicates running there are given up, and builds whose original runs
    /// there go on as their duplicate. Returns the nodes whose copy there is dropped,
    /// for the caller to forget.
    pub fn machine_failing(
        &mut self,
        sched: &mut Scheduler,
        machine: MachineId,
        now: f64,
    ) -> Vec<NodeId> {
        let involved: Vec<(NodeId, Duplicate)> = self
            .duplicates
            .iter()
            .filter(|(&n, d)| {
                d.machine == machine
                    || matches!(sched.state(n), NodeState::Running { machine: m, .. } if *m == machine)
            })
            .map(|(&n, &d)| (n, d))
            .collect();
        let mut dropped = Vec::new();
        for (node, dup) in involved {
            self.duplicates.remove(&node);
            self.settle(&dup, now);
            if dup.machine == machine {
                self.counts.waste_seconds += now - dup.started;
                sched.release(node, machine);
            } else {
                self.counts.waste_seconds += now - sched.started_at[node];
                self.promote(sched, node, machine, dup.machine, now);
            }
            dropped.push(node);
        }
        dropped
    }
}

mod scheduler;
#[cfg(test)]
mod tests;
mod witness;
