//! offload's own policy: the real scheduler of `offload-sched`, unchanged.

use offload_sched::{
    Action, Event, Graph, Link, MachineId, MachineSpec, NodeId, Outcome, Scheduler,
};

use crate::engine::{Costs, Policy};

/// The live scheduler, driven by simulated events.
pub struct OffloadPolicy {
    sched: Scheduler,
    costs: Costs,
}

impl OffloadPolicy {
    pub fn new(graph: Graph, mut machines: Vec<MachineSpec>, costs: Costs) -> Self {
        // The live driver's estimates hold what a build costs besides its own work (its
        // durations are measured through a session); a simulated graph's durations do
        // not, so the scheduler is told the simulated cost per build.
        for m in &mut machines {
            m.per_build = m.per_build.max(costs.per_build);
        }
        OffloadPolicy {
            sched: Scheduler::new(graph, machines, true),
            costs,
        }
    }

    /// The machine's speeds as a fit during the run says, as the live driver tells
    /// its scheduler.
    pub fn set_speeds(&mut self, machine: MachineId, speed: f64, per_system: Vec<(String, f64)>) {
        self.sched.set_speeds(machine, speed, per_system);
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

    fn starts(actions: Vec<Action>) -> Vec<(NodeId, MachineId)> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Start { node, machine } => Some((node, machine)),
                _ => None,
            })
            .collect()
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
        Self::starts(self.sched.start(now))
    }

    fn finished(&mut self, node: NodeId, machine: MachineId, now: f64) -> Vec<(NodeId, MachineId)> {
        let event = Event::Finished {
            node,
            machine,
            outcome: Outcome::Built,
        };
        Self::starts(self.sched.handle(event, now))
    }

    fn machine_lost(
        &mut self,
        machine: MachineId,
        _lost: &[NodeId],
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        Self::starts(self.sched.handle(Event::MachineLost { machine }, now))
    }

    fn outputs_at(
        &mut self,
        node: NodeId,
        machine: MachineId,
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        Self::starts(self.sched.handle(Event::OutputsAt { node, machine }, now))
    }
}
