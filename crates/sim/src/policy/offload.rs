//! offload's own policy: the real scheduler of `offload-sched`, unchanged, with the
//! driver's hedging of stragglers beside it ([`crate::hedge`]).

use offload_sched::{Event, Graph, HedgeCounts, Link, MachineId, MachineSpec, NodeId, Scheduler};

use crate::engine::{Costs, Policy};
use crate::hedge::Hedging;

/// The live scheduler, driven by simulated events.
pub struct OffloadPolicy {
    sched: Scheduler,
    costs: Costs,
    hedging: Hedging,
}

impl OffloadPolicy {
    pub fn new(graph: Graph, mut machines: Vec<MachineSpec>, costs: Costs) -> Self {
        // The live driver's estimates hold what a build costs besides its own work (its
        // durations are measured through a session); a simulated graph's durations do
        // not, so the scheduler is told the simulated cost per build.
        for m in &mut machines {
            m.per_build = m.per_build.max(costs.per_build);
        }
        let sched = Scheduler::new(graph, machines, true);
        OffloadPolicy {
            hedging: Hedging::new(&sched),
            sched,
            costs,
        }
    }

    /// The machine's speeds as a fit during the run says, as the live driver tells
    /// its scheduler.
    /// No faster than builds under way showed it.
    pub fn set_speeds(&mut self, machine: MachineId, speed: f64, per_system: Vec<(String, f64)>) {
        let (speed, per_system) = self.hedging.capped(machine, speed, per_system);
        self.sched.set_speeds(machine, speed, per_system);
    }

    /// A build of `node` on `machine` took `seconds` of its own and ended well: a
    /// machine it shows slower than planned is planned so at once (the hedger's rule).
    pub fn built(&mut self, node: NodeId, machine: MachineId, seconds: f64) {
        self.hedging.built(&mut self.sched, node, machine, seconds);
    }

    /// Duplicates of builds that overran their plan: started, won, slot time lost.
    pub fn hedges(&self) -> HedgeCounts {
        self.hedging.counts()
    }

    /// The machine's link as a fit during the run says.
    pub fn set_link(&mut self, machine: MachineId, bandwidth: f64, latency: f64) {
        self.sched.set_link(machine, bandwidth, latency);
    }

    /// Whether the requested outputs go to a delivery target rather than home
    /// ([`Scheduler::outputs_stay_away`]).
    pub fn outputs_stay_away(&mut self, away: bool) {
        self.sched.outputs_stay_away(away);
    }

    /// A pair link as a fit during the run says ([`Scheduler::set_peer_link`]).
    pub fn set_peer_link(&mut self, from: MachineId, to: MachineId, link: Option<Link>) {
        self.sched.set_peer_link(from, to, link);
    }

    /// Which nodes' durations the policy guesses ([`Scheduler::guess_durations`]).
    pub fn guess_durations(&mut self, nodes: &[NodeId]) {
        self.sched.guess_durations(nodes);
    }

    /// Which nodes' output sizes the policy guesses ([`Scheduler::guess_output_sizes`]).
    pub fn guess_output_sizes(&mut self, nodes: &[NodeId]) {
        self.sched.guess_output_sizes(nodes);
    }

    /// A build's outputs turned out `bytes` ([`Scheduler::outputs_measured`]).
    pub fn outputs_measured(&mut self, node: NodeId, bytes: u64) {
        self.sched.outputs_measured(node, bytes);
    }
}

impl Policy for OffloadPolicy {
    fn name(&self) -> &'static str {
        "offload"
    }

    fn costs(&self) -> Costs {
        self.costs
    }

    fn copies_outputs_back(&self) -> bool {
        false
    }

    fn sends_directly(&self) -> bool {
        true
    }

    fn start(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        let actions = self.sched.start(now);
        self.hedging.starts(&self.sched, actions, now)
    }

    fn finished(&mut self, node: NodeId, machine: MachineId, now: f64) -> Vec<(NodeId, MachineId)> {
        self.hedging.finished(&mut self.sched, node, machine, now)
    }

    fn machine_lost(
        &mut self,
        machine: MachineId,
        _lost: &[NodeId],
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        self.hedging.machine_failing(&mut self.sched, machine, now);
        let actions = self.sched.handle(Event::MachineLost { machine }, now);
        self.hedging.starts(&self.sched, actions, now)
    }

    fn next_wakeup(&self) -> Option<f64> {
        self.hedging.next_due()
    }

    fn wake(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        self.hedging.poll(&mut self.sched, now)
    }

    fn outputs_at(
        &mut self,
        node: NodeId,
        machine: MachineId,
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        let actions = self.sched.handle(Event::OutputsAt { node, machine }, now);
        self.hedging.starts(&self.sched, actions, now)
    }
}
