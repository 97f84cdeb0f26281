//! Each kind's classes in tiers: classes that build the kind equally fast at the same
//! cost per build, each tier's classes ordered by their first slot. A placement walks
//! the tiers fastest first and, in each, the classes by when they are free, and stops
//! where no class left could finish first: on a busy fleet it weighs the few classes
//! free soonest, not every class that could build the derivation.

use std::collections::{BTreeSet, HashMap};

use crate::classes::SlotKey;
use crate::fleet::MachineId;
use crate::scheduler::Scheduler;

/// Classes of one kind with the same speed for it and the same cost per build.
#[derive(Debug, Clone)]
pub(crate) struct Tier {
    /// A machine of the tier: its build time and cost per build are the tier's.
    pub(crate) example: MachineId,
    /// The tier's classes by their first slot (free ones first, then the earliest).
    pub(crate) heads: BTreeSet<(SlotKey, usize)>,
}

impl Tier {
    /// Whether a class of the tier has a slot free now.
    pub(crate) fn has_free(&self) -> bool {
        self.heads.first().is_some_and(|(k, _)| !k.busy)
    }
}

impl Scheduler {
    /// Groups each kind's classes into tiers, fastest first (then the cheaper per
    /// build), after the kinds were matched to classes.
    pub(crate) fn build_tiers(&mut self) {
        self.class_head = self.queues.iter().map(|q| q.first().copied()).collect();
        self.class_tiers = vec![Vec::new(); self.classes.len()];
        for (k, kind) in self.kinds.iter_mut().enumerate() {
            let system = &self.graph.node(kind.example).system;
            let mut index: HashMap<(u64, u64), usize> = HashMap::new();
            let mut tiers: Vec<(f64, f64, Vec<usize>)> = Vec::new();
            for &c in &kind.classes {
                let spec = &self.machines[self.classes[c][0]];
                let (speed, cost) = (spec.speed_for(system), spec.per_build);
                let t = *index
                    .entry((speed.to_bits(), cost.to_bits()))
                    .or_insert_with(|| {
                        tiers.push((speed, cost, Vec::new()));
                        tiers.len() - 1
                    });
                tiers[t].2.push(c);
            }
            tiers.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.total_cmp(&b.1)));
            kind.tiers = tiers
                .into_iter()
                .enumerate()
                .map(|(t, (_, _, classes))| {
                    for &c in &classes {
                        self.class_tiers[c].push((k, t));
                    }
                    Tier {
                        example: self.classes[classes[0]][0],
                        heads: classes
                            .iter()
                            .filter_map(|&c| Some((self.class_head[c]?, c)))
                            .collect(),
                    }
                })
                .collect();
        }
    }

    /// Moves class `c` in its tiers to its first slot now, after its queue changed.
    pub(crate) fn head_moved(&mut self, c: usize) {
        let new = self.queues[c].first().copied();
        let old = std::mem::replace(&mut self.class_head[c], new);
        if old == new {
            return;
        }
        for &(k, t) in &self.class_tiers[c] {
            let heads = &mut self.kinds[k].tiers[t].heads;
            if let Some(old) = old {
                heads.remove(&(old, c));
            }
            if let Some(new) = new {
                heads.insert((new, c));
            }
        }
    }
}
