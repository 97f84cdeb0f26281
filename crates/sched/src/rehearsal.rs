//! Rehearsing a run before it starts: the scheduler plays the whole graph against its
//! own estimates, every build ending when it is expected to, to compare orderings of
//! the ready derivations.
//!
//! Placing each derivation where it finishes first is myopic on a fleet of unequal
//! machines: it piles work on the fast machine while slow ones idle, and pays for it in
//! the last layers. A few orderings near the critical-path one, each played out with
//! the real dispatch, find a shorter plan; the run then follows the best one found, and
//! the critical-path ordering is always among those tried, so a rehearsal never makes
//! the plan longer when the estimates hold.

use crate::events::{Action, Event, NodeState, Outcome};
use crate::fleet::MachineId;
use crate::graph::NodeId;
use crate::scheduler::Scheduler;

/// Work a rehearsal may take: derivations × machines × orderings tried stays under it,
/// so large graphs (where one rehearsal is costly and the ordering matters less) keep
/// the critical-path ordering.
const REHEARSAL_BUDGET: usize = 400_000;
/// Orderings tried at most.
const MAX_ORDERINGS: usize = 128;
/// How far an ordering's priorities stray from the ranks: each is multiplied by a
/// factor drawn from `[1 - SPREAD, 1 + SPREAD]`.
const SPREAD: f64 = 0.5;
/// How far (a fraction of the rehearsed run) a build may end from when its rehearsal
/// had it end before the run is rehearsed again.
const REPLAN_DRIFT: f64 = 0.05;

impl Scheduler {
    /// Chooses the priorities of the ready derivations by rehearsing orderings near the
    /// critical-path one and keeping the one that ends first. Called again during the
    /// run ([`Scheduler::replan_if_drifted`]), it rehearses from the builds running then.
    pub(crate) fn tune_priorities(&mut self, now: f64) {
        let cost = self.graph.len() * self.machines.len().max(1);
        let orderings = (REHEARSAL_BUDGET / cost.max(1)).min(MAX_ORDERINGS);
        if self.graph.len() < 3 || orderings < 2 {
            return;
        }
        let ranks: Vec<f64> = (0..self.graph.len()).map(|i| self.graph.rank(i)).collect();
        // The ordering followed so far is tried first: re-planning never rehearses
        // worse than going on with it; then the ranks, then orderings near them.
        let mut best = (self.rehearse(now), self.priority.clone());
        // A fixed seed: the same inputs always give the same plan.
        let mut random = SplitMix64(0x6f66_666c_6f61_6421 ^ self.graph.len() as u64);
        for i in 0..orderings {
            if i == 0 && best.1 == ranks {
                continue;
            }
            let candidate: Vec<f64> = if i == 0 {
                ranks.clone()
            } else {
                ranks
                    .iter()
                    .map(|r| r * (1.0 - SPREAD + 2.0 * SPREAD * random.unit()))
                    .collect()
            };
            let mut trial = self.clone();
            trial.set_priorities(candidate);
            let rehearsal = trial.rehearse(now);
            if rehearsal.end < best.0.end - 1e-9 {
                best = (rehearsal, trial.priority);
            }
        }
        self.set_priorities(best.1);
        self.rehearsed_on = best.0.placed;
        self.rehearsed_end = best.0.ends;
        self.rehearsed_at = now;
        self.rehearsed_span = best.0.end.max(1.0);
    }

    /// Re-plans when the run has drifted from its rehearsal: a build ended more than
    /// [`REPLAN_DRIFT`] of the rehearsed run away from when the rehearsal had it end
    /// (builds that took longer or shorter than estimated, a machine slower than
    /// planned; not a build whose duration was a guess). The rehearsal's ordering was
    /// the best for a timeline that no longer
    /// holds, and it can leave the longest remaining build for a slow machine; one
    /// rehearsed from the builds running now fits the run as it is. At most once per
    /// second of the run.
    pub(crate) fn replan_if_drifted(&mut self, node: NodeId, now: f64) {
        let Some(&expected) = self.rehearsed_end.get(node) else {
            return;
        };
        if self.duration_guessed[node] {
            return;
        }
        if expected.is_finite()
            && (now - expected).abs() > REPLAN_DRIFT * self.rehearsed_span
            && now - self.rehearsed_at >= 1.0
        {
            self.tune_priorities(now);
        }
    }

    /// Plays the run on from `now` as if every build took what it is expected to take:
    /// when it would end, where each node was built and when each would end; a
    /// derivation that would fail counts as ending the run at once (every ordering
    /// meets the same failures).
    fn rehearse(&self, now: f64) -> Rehearsal {
        let mut sched = self.clone();
        // A rehearsal plays its own plan: it never re-plans.
        sched.rehearsed_end.clear();
        // It plays each build as its original: the slots of duplicates are free.
        sched.release_duplicates();
        let n = self.graph.len();
        let mut placed = vec![None; n];
        let mut ends = vec![f64::INFINITY; n];
        // Builds running now end when expected (or now, when overdue).
        let mut running: Vec<(f64, NodeId, MachineId)> = (0..n)
            .filter_map(|id| match self.state[id] {
                NodeState::Running {
                    machine,
                    expected_end,
                } => {
                    placed[id] = Some(machine);
                    Some((expected_end.max(now), id, machine))
                }
                _ => None,
            })
            .collect();
        let mut started = |sched: &Scheduler, actions: Vec<Action>, running: &mut Vec<_>| {
            for action in actions {
                if let Action::Start { node, machine } = action {
                    if let NodeState::Running { expected_end, .. } = sched.state(node) {
                        running.push((*expected_end, node, machine));
                        placed[node] = Some(machine);
                    }
                }
            }
        };
        let first = sched.start_planned(now);
        started(&sched, first, &mut running);
        let mut end = now;
        while let Some(i) =
            (0..running.len()).min_by(|&a, &b| running[a].0.total_cmp(&running[b].0))
        {
            let (at, node, machine) = running.swap_remove(i);
            end = end.max(at);
            ends[node] = at;
            let outcome = Outcome::Built;
            let actions = sched.handle(
                Event::Finished {
                    node,
                    machine,
                    outcome,
                },
                at,
            );
            started(&sched, actions, &mut running);
        }
        Rehearsal { end, placed, ends }
    }
}

/// What a rehearsal found.
struct Rehearsal {
    /// When the run would end.
    end: f64,
    /// Where each node would be built.
    placed: Vec<Option<MachineId>>,
    /// When each would end (infinite: not in the rehearsal).
    ends: Vec<f64>,
}

/// A small deterministic generator (SplitMix64), enough to perturb priorities.
struct SplitMix64(u64);

impl SplitMix64 {
    /// A number in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use crate::{Graph, MachineSpec, NodeSpec, Scheduler};

    /// A layered graph of 30 (scripts/gen-dag.py layered 30 1): (seconds, dependencies).
    const LAYERED: [(f64, &[usize]); 30] = [
        (0.58, &[]),
        (0.91, &[]),
        (2.33, &[]),
        (1.57, &[1, 0, 2]),
        (2.15, &[2, 0]),
        (0.29, &[0, 2, 1]),
        (2.12, &[2, 0, 1]),
        (2.83, &[0, 2, 1]),
        (2.33, &[0, 2]),
        (2.55, &[1]),
        (2.98, &[8]),
        (1.13, &[8]),
        (1.05, &[9, 8, 4]),
        (1.54, &[6, 7, 3]),
        (1.23, &[8, 4]),
        (2.06, &[6]),
        (2.55, &[7]),
        (1.51, &[15, 10]),
        (1.82, &[16, 14, 15]),
        (0.84, &[14]),
        (2.78, &[14]),
        (2.87, &[14, 12]),
        (1.73, &[12, 15]),
        (1.63, &[16, 15]),
        (1.39, &[16, 14, 11]),
        (1.8, &[16, 12]),
        (1.36, &[13, 16, 12]),
        (1.13, &[14, 16, 15]),
        (0.7, &[15]),
        (1.74, &[16]),
    ];

    fn layered_on_unequal_machines() -> Scheduler {
        let nodes = LAYERED
            .iter()
            .enumerate()
            .map(|(i, &(secs, deps))| {
                NodeSpec::new(format!("n{i}"), "x86_64-linux", deps.to_vec(), secs)
            })
            .collect();
        // This machine, fast, and three builders three times slower.
        let mut machines = vec![MachineSpec::local("x86_64-linux", 2)];
        for b in 1..=3 {
            machines.push(MachineSpec::new(
                format!("b{b}"),
                "x86_64-linux",
                2,
                1.0 / 3.0,
            ));
        }
        for m in &mut machines {
            m.per_build = 0.125;
        }
        Scheduler::new(Graph::new(nodes).unwrap(), machines, false)
    }

    #[test]
    fn a_rehearsed_ordering_ends_sooner_on_a_fleet_of_unequal_machines() {
        let mut sched = layered_on_unequal_machines();
        let by_rank = sched.rehearse(0.0).end;
        sched.tune_priorities(0.0);
        let rehearsed = sched.rehearse(0.0).end;
        // 18.75 s by critical path alone; the optimum, found by a constraint solver
        // without the per-build cost, is 15.72 s.
        assert!(rehearsed < 0.99 * by_rank, "{rehearsed} against {by_rank}");
        assert!(rehearsed > 15.72, "{rehearsed}");
        // The same inputs give the same plan.
        let mut again = layered_on_unequal_machines();
        again.tune_priorities(0.0);
        assert_eq!(again.rehearse(0.0).end, rehearsed);
    }

    /// The (node, machine) of each start among `actions`.
    fn starts(actions: &[crate::Action]) -> Vec<(usize, usize)> {
        actions
            .iter()
            .filter_map(|a| match a {
                crate::Action::Start { node, machine } => Some((*node, *machine)),
                _ => None,
            })
            .collect()
    }

    fn built(node: usize, machine: usize) -> crate::Event {
        crate::Event::Finished {
            node,
            machine,
            outcome: crate::Outcome::Built,
        }
    }

    #[test]
    fn a_run_that_drifts_from_its_rehearsal_is_rehearsed_again_from_where_it_is() {
        let mut sched = layered_on_unequal_machines();
        let mut running = starts(&sched.start(0.0));
        running.sort_by(|a, b| sched.rehearsed_end[a.0].total_cmp(&sched.rehearsed_end[b.0]));
        // The first build to end ends when rehearsed (over a second in): the plan stays.
        let (first, on) = running[0];
        let when = sched.rehearsed_end[first];
        assert!(when >= 1.0, "{when}");
        let started = starts(&sched.handle(built(first, on), when));
        assert_eq!(sched.rehearsed_at, 0.0);
        // The next ends 1.5 s late (over 5 % of the rehearsed run): the run is rehearsed
        // again then, the builds still running ending no earlier than that.
        let (second, on) = running[1];
        let late = sched.rehearsed_end[second] + 1.5;
        let _ = sched.handle(built(second, on), late);
        assert_eq!(sched.rehearsed_at, late);
        for &(n, _) in running[2..].iter().chain(&started) {
            assert!(
                sched.rehearsed_end[n] >= late,
                "{n}: {}",
                sched.rehearsed_end[n]
            );
        }
    }

    #[test]
    fn a_build_whose_duration_was_a_guess_does_not_make_the_run_rehearse_again() {
        let mut sched = layered_on_unequal_machines();
        sched.guess_durations(&(0..30).collect::<Vec<_>>());
        let first = starts(&sched.start(0.0));
        let (node, machine) = first[0];
        let late = sched.rehearsed_end[node] + 3.0;
        let _ = sched.handle(built(node, machine), late);
        assert_eq!(sched.rehearsed_at, 0.0);
    }

    #[test]
    fn the_rehearsed_plan_says_where_a_nodes_outputs_will_be_needed() {
        let mut sched = layered_on_unequal_machines();
        assert!(sched.consumers_planned_on(2).is_empty(), "no rehearsal yet");
        let _ = sched.start(0.0);
        // Node 2 (2.33 s) is an input of most of the second layer, which the plan
        // spreads over this machine and the builders.
        let ahead = sched.consumers_planned_on(2);
        assert!(ahead.iter().any(|&m| m > 0), "{ahead:?}");
        for &m in &ahead {
            assert!(sched
                .graph()
                .dependents(2)
                .iter()
                .any(|&d| sched.rehearsed_on[d] == Some(m)));
        }
    }
}
