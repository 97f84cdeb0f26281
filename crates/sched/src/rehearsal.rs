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

impl Scheduler {
    /// Chooses the priorities of the ready derivations by rehearsing orderings near the
    /// critical-path one and keeping the one that ends first.
    pub(crate) fn tune_priorities(&mut self, now: f64) {
        let cost = self.graph.len() * self.machines.len().max(1);
        let orderings = (REHEARSAL_BUDGET / cost.max(1)).min(MAX_ORDERINGS);
        if self.graph.len() < 3 || orderings < 2 {
            return;
        }
        let ranks = self.priority.clone();
        let (end, placed) = self.rehearse(now);
        let mut best = (end, ranks.clone(), placed);
        // A fixed seed: the same inputs always give the same plan.
        let mut random = SplitMix64(0x6f66_666c_6f61_6421 ^ self.graph.len() as u64);
        for _ in 1..orderings {
            let candidate: Vec<f64> = ranks
                .iter()
                .map(|r| r * (1.0 - SPREAD + 2.0 * SPREAD * random.unit()))
                .collect();
            let mut trial = self.clone();
            trial.priority = candidate;
            let (end, placed) = trial.rehearse(now);
            if end < best.0 - 1e-9 {
                best = (end, trial.priority, placed);
            }
        }
        self.priority = best.1;
        self.rehearsed_on = best.2;
    }

    /// When the run would end if every build took what it is expected to take, and
    /// where each node was built; a derivation that would fail counts as ending the
    /// run at once (every ordering meets the same failures).
    fn rehearse(&self, now: f64) -> (f64, Vec<Option<MachineId>>) {
        let mut sched = self.clone();
        let mut running: Vec<(f64, NodeId, MachineId)> = Vec::new();
        let mut placed = vec![None; self.graph.len()];
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
        (end, placed)
    }
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
        let by_rank = sched.rehearse(0.0).0;
        sched.tune_priorities(0.0);
        let rehearsed = sched.rehearse(0.0).0;
        // 18.75 s by critical path alone; the optimum, found by a constraint solver
        // without the per-build cost, is 15.72 s.
        assert!(rehearsed < 0.99 * by_rank, "{rehearsed} against {by_rank}");
        assert!(rehearsed > 15.72, "{rehearsed}");
        // The same inputs give the same plan.
        let mut again = layered_on_unequal_machines();
        again.tune_priorities(0.0);
        assert_eq!(again.rehearse(0.0).0, rehearsed);
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
