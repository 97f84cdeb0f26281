//! offload's policy as the live driver runs it, learning as it goes, with the driver's
//! own model (`offload-learn`). When a build ends, before the scheduler hears of it:
//! its outputs' size goes into the plan (when sizes are guessed), links whose copies
//! under way show them several times slower than planned are planned at what they show,
//! the build is recorded as the state records it (its own time, at its machine's true
//! speed), and as often as the driver's cadence says ([`Refits`]) the machines' speeds
//! are fitted again with the earlier runs' builds and this one's so far, and the links
//! with the copies that landed (each pair link between two builders with the direct
//! copies over it, as [`PairLinks`]); those that moved by more than a tenth replace the
//! planned ones.

use offload_learn::{
    bound_under_way, link_figures, moved_link, moved_pair, slower_under_way, BuildRow, Knowledge,
    PairLinks, Refits, Transfer, LOCAL_KEY, RECENT_TRANSFERS, ROWS_READ,
};
use offload_sched::{Graph, Link, MachineId, MachineSpec, NodeId};

use crate::engine::{Costs, Policy};
use crate::policy::OffloadPolicy;

/// offload's scheduler, told what the run teaches as the live driver tells it.
pub struct LearningPolicy<'a> {
    policy: OffloadPolicy,
    graph: &'a Graph,
    machines: &'a [MachineSpec],
    declared: &'a [MachineSpec],
    /// The speeds and links each machine is planned with now.
    planned: Vec<MachineSpec>,
    /// Earlier runs' builds and this one's, oldest first.
    rows: Vec<BuildRow>,
    run: String,
    local_system: String,
    refits: Refits,
    /// Whether the plan guesses output sizes (a first run).
    guessing_outputs: bool,
    /// Copies over one link, as the client times them: (machine, bytes, start, end),
    /// until they land; then their timings per machine.
    copies: Vec<(MachineId, u64, f64, f64)>,
    landed: Vec<Vec<Transfer>>,
    /// Direct copies between two builders: (from, to, bytes, start, end) until they
    /// land; then their timings per pair.
    pair_copies: Vec<(MachineId, MachineId, u64, f64, f64)>,
    pairs: PairLinks<MachineId>,
    /// Machines whose link to the client is measured (copies landed or under way told
    /// its figures): pairs between two of them go by what their copies showed.
    link_measured: Vec<bool>,
}

impl<'a> LearningPolicy<'a> {
    /// offload on `fleet` (the machines as they are, and as their machines file
    /// declares them), building `graph` while it plans with `planning` (the estimates
    /// it has; those of `durations` are guesses, and so is each output size `planning`
    /// does not have from `graph`) and `believed` (the machines as it knows them), with
    /// `earlier` runs' builds (oldest first) in its state; this run is called `run`.
    pub fn new(
        fleet: (&'a [MachineSpec], &'a [MachineSpec]),
        graph: &'a Graph,
        planning: Graph,
        durations: &[NodeId],
        believed: Vec<MachineSpec>,
        earlier: Vec<BuildRow>,
        run: &str,
    ) -> LearningPolicy<'a> {
        let (machines, declared) = fleet;
        let guessed: Vec<NodeId> = (0..planning.len())
            .filter(|&i| planning.node(i).output_bytes != graph.node(i).output_bytes)
            .collect();
        let mut policy = crate::offload_policy(planning, &believed);
        policy.guess_output_sizes(&guessed);
        policy.guess_durations(durations);
        LearningPolicy {
            policy,
            graph,
            machines,
            declared,
            planned: believed,
            rows: earlier,
            run: run.to_string(),
            local_system: local_system(machines),
            refits: Refits::default(),
            guessing_outputs: !guessed.is_empty(),
            copies: Vec::new(),
            landed: vec![Vec::new(); machines.len()],
            pair_copies: Vec::new(),
            pairs: PairLinks::default(),
            link_measured: vec![false; machines.len()],
        }
    }

    /// Whether the requested outputs go to a delivery target rather than home.
    pub fn outputs_stay_away(&mut self, away: bool) {
        self.policy.outputs_stay_away(away);
    }

    /// The builds in the state after the run: the earlier runs' and this one's, oldest
    /// first.
    pub fn into_rows(self) -> Vec<BuildRow> {
        self.rows
    }

    /// The machines as they are planned with now.
    pub fn planned(&self) -> &[MachineSpec] {
        &self.planned
    }

    fn learn(&mut self, node: NodeId, machine: MachineId, now: f64) {
        let n = self.graph.node(node);
        if self.guessing_outputs {
            self.policy.outputs_measured(node, n.output_bytes);
        }
        let seconds = self.machines[machine].build_time(n);
        self.policy.built(node, machine, seconds);
        self.rows.push(BuildRow {
            name: n.key.clone(),
            system: n.system.clone(),
            machine: state_key(&self.machines[machine]),
            seconds,
            declared_speed: self.declared[machine].speed_for(&n.system),
            run: Some(self.run.clone()),
        });
        self.links_under_way(now);
        if !self.refits.due(now) {
            return;
        }
        let knowledge = Knowledge::from_builds(&newest_first(&self.rows), &self.local_system);
        self.refits.fitted(knowledge.rows());
        for (m, spec) in self.planned.iter_mut().enumerate() {
            let declared = self.declared[m].speed;
            if let Some((speed, per_system)) =
                knowledge.moved_speeds(&state_key(spec), spec, declared)
            {
                spec.speed = speed;
                spec.system_speeds = per_system.clone();
                self.policy.set_speeds(m, speed, per_system);
            }
        }
        self.links_landed(now);
    }

    /// Links whose copies under way show them several times slower than planned.
    fn links_under_way(&mut self, now: f64) {
        for (m, spec) in self.planned.iter_mut().enumerate() {
            let under_way: Vec<(f64, u64)> = self
                .copies
                .iter()
                .filter(|&&(l, _, start, end)| l == m && start <= now && now < end)
                .map(|&(_, bytes, start, _)| (now - start, bytes))
                .collect();
            if let Some(bound) = bound_under_way(&under_way, spec.latency) {
                if slower_under_way(spec, bound) {
                    spec.bandwidth = bound;
                    self.policy.set_link(m, bound, spec.latency);
                    self.link_measured[m] = true;
                }
            }
        }
    }

    /// Links fitted with the copies that landed by `now` (at most as many as the
    /// state keeps per link).
    fn links_landed(&mut self, now: f64) {
        let (landed, under_way): (Vec<_>, Vec<_>) =
            self.copies.iter().partition(|&&(_, _, _, end)| end <= now);
        self.copies = under_way;
        for (m, bytes, start, end) in landed {
            self.landed[m].push(Transfer {
                bytes,
                seconds: end - start,
                concurrent: 1,
            });
        }
        for (m, spec) in self.planned.iter_mut().enumerate() {
            let recent = &self.landed[m][self.landed[m].len().saturating_sub(RECENT_TRANSFERS)..];
            let learned = link_figures(recent);
            self.link_measured[m] |= learned.is_some();
            if let Some(link) = moved_link(spec, learned) {
                spec.bandwidth = link.bandwidth;
                spec.latency = link.latency;
                self.policy.set_link(m, link.bandwidth, link.latency);
            }
        }
        self.pairs_landed(now);
    }

    /// Pair links fitted with the direct copies that landed by `now`, each planned at
    /// its figures once both its machines' links are measured ([`moved_pair`]).
    fn pairs_landed(&mut self, now: f64) {
        let (landed, under_way): (Vec<_>, Vec<_>) = self
            .pair_copies
            .iter()
            .partition(|&&(_, _, _, _, end)| end <= now);
        self.pair_copies = under_way;
        for (from, to, bytes, start, end) in landed {
            self.pairs.record(from, to, bytes, end - start, 1);
        }
        let mut pairs: Vec<(MachineId, MachineId)> = self.pairs.pairs().copied().collect();
        pairs.sort_unstable();
        for (from, to) in pairs {
            let Some(planned) = self.planned[from].peer_link(to).copied() else {
                continue;
            };
            let learned = self.pairs.figures(&from, &to).map(|f| Link {
                bandwidth: f.bandwidth,
                latency: f.latency,
            });
            let measured = self.link_measured[from] && self.link_measured[to];
            if let Some(link) = moved_pair(planned, learned, measured) {
                self.planned[from].set_peer_link(to, Some(link));
                self.policy.set_peer_link(from, to, Some(link));
            }
        }
    }
}

impl Policy for LearningPolicy<'_> {
    fn name(&self) -> &'static str {
        self.policy.name()
    }

    fn costs(&self) -> Costs {
        self.policy.costs()
    }

    fn copies_outputs_back(&self) -> bool {
        self.policy.copies_outputs_back()
    }

    fn sends_directly(&self) -> bool {
        self.policy.sends_directly()
    }

    fn start(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        self.policy.start(now)
    }

    fn finished(&mut self, node: NodeId, machine: MachineId, now: f64) -> Vec<(NodeId, MachineId)> {
        // As the driver: what the build showed goes into the plan before its end places
        // the builds that waited for it.
        self.learn(node, machine, now);
        self.policy.finished(node, machine, now)
    }

    fn copy_sent(&mut self, machine: MachineId, bytes: u64, start: f64, end: f64) {
        self.copies.push((machine, bytes, start, end));
    }

    fn pair_copy_sent(&mut self, from: MachineId, to: MachineId, bytes: u64, start: f64, end: f64) {
        self.pair_copies.push((from, to, bytes, start, end));
    }

    fn machine_lost(
        &mut self,
        machine: MachineId,
        lost: &[NodeId],
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        self.policy.machine_lost(machine, lost, now)
    }

    fn next_wakeup(&self) -> Option<f64> {
        self.policy.next_wakeup()
    }

    fn wake(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        self.policy.wake(now)
    }

    fn outputs_at(
        &mut self,
        node: NodeId,
        machine: MachineId,
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        self.policy.outputs_at(node, machine, now)
    }
}

/// What the state calls `machine`.
pub fn state_key(machine: &MachineSpec) -> String {
    if machine.is_local {
        LOCAL_KEY.to_string()
    } else {
        machine.name.clone()
    }
}

/// The newest of `rows` (oldest first), newest first, as many as `offload build` reads
/// from its state for a fit.
pub fn newest_first(rows: &[BuildRow]) -> Vec<BuildRow> {
    rows.iter().rev().take(ROWS_READ).cloned().collect()
}

/// This machine's native system: the unit of speed (none without a local machine).
pub fn local_system(machines: &[MachineSpec]) -> String {
    machines
        .iter()
        .find(|m| m.is_local)
        .and_then(|m| m.systems.first())
        .cloned()
        .unwrap_or_default()
}
