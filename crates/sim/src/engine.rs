//! The discrete-event engine: a fake clock, machines with slots, links between the
//! client (where offload or Nix runs) and each machine, machine failures at given times,
//! and a [`Policy`] deciding which build starts where.
//!
//! A build started on machine M at time t occupies a slot of M while (1) the inputs M
//! lacks arrive — from the client, from the machine that built them through the client,
//! or straight from it over the pair's own link —, (2) it runs for `duration / speed`
//! plus the policy's fixed per-build cost, and (3) for policies that copy every output
//! back (Nix's hook, Hydra), its outputs go to the client. Other policies copy only the
//! requested outputs (the graph's sinks), each as soon as it is built, over its
//! machine's link. Policies that decide one build at a time on the client add a serial
//! dispatch cost per build.
//!
//! With a delivery target ([`Delivery`]: `offload build --to STORE`), the requested
//! outputs go there instead of home as the driver delivers them: each as soon as it is
//! built, one delivery at a time, with what of its closure is not there yet, in one
//! stream by the routes of the transfer model, never kept in the client; for a policy that copies every output back, from the client's
//! store once every build has ended (`nix-build`, then `nix copy --to`). The run ends
//! when the last has arrived.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use offload_sched::{
    Direction, Graph, Holding, Links, MachineId, MachineSpec, NodeId, Route, RouteKind,
};

use crate::delivery::{closure_of, inputs_closure, topo_positions, Delivery};
use crate::report::{Report, RouteBytes, TraceEvent};

/// Per-build costs of a policy, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// Client-side work per build start, done one build at a time.
    pub dispatch_serial: f64,
    /// Fixed time per build on its machine (session, round trips).
    pub per_build: f64,
}

/// A scheduling policy under simulation.
pub trait Policy {
    fn name(&self) -> &'static str;
    fn costs(&self) -> Costs;
    /// Whether each output is copied to the client right after its build.
    fn copies_outputs_back(&self) -> bool;
    /// Whether builders send each other paths directly over their pair links
    /// ([`MachineSpec::peers`]); else every copy leaves from the client's store or
    /// relays through the client, as Nix's hook and Hydra do.
    fn sends_directly(&self) -> bool {
        false
    }
    /// First starts.
    fn start(&mut self, now: f64) -> Vec<(NodeId, MachineId)>;
    /// A build ended successfully.
    fn finished(&mut self, node: NodeId, machine: MachineId, now: f64) -> Vec<(NodeId, MachineId)>;
    /// A machine failed; its running builds (`lost`) must run again.
    fn machine_lost(
        &mut self,
        machine: MachineId,
        lost: &[NodeId],
        now: f64,
    ) -> Vec<(NodeId, MachineId)>;
    /// When the policy wants to be woken with nothing else happening (Nix's poll
    /// interval for postponed builds).
    fn next_wakeup(&self) -> Option<f64> {
        None
    }
    /// Woken at [`Policy::next_wakeup`].
    fn wake(&mut self, _now: f64) -> Vec<(NodeId, MachineId)> {
        Vec::new()
    }
    /// A copy crosses `machine`'s link alone (the client on its other end) from `start`
    /// until `end`, as the policy could time it; told when the copy starts.
    fn copy_sent(&mut self, _machine: MachineId, _bytes: u64, _start: f64, _end: f64) {}
    /// A copy goes straight from `from` to `to` over the pair's own link from `start`
    /// until `end`; told when the copy starts.
    fn pair_copy_sent(
        &mut self,
        _from: MachineId,
        _to: MachineId,
        _bytes: u64,
        _start: f64,
        _end: f64,
    ) {
    }
    /// A copy of the node's outputs landed on `machine` (kept in the client's store
    /// on the way to a builder).
    fn outputs_at(
        &mut self,
        _node: NodeId,
        _machine: MachineId,
        _now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        Vec::new()
    }
}

#[derive(Debug, PartialEq)]
struct Pending {
    at: f64,
    node: NodeId,
    machine: MachineId,
    generation: u64,
}

impl Eq for Pending {}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        // Earliest first (BinaryHeap is a max-heap), then by node for determinism.
        other
            .at
            .total_cmp(&self.at)
            .then_with(|| other.node.cmp(&self.node))
    }
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A copy as it can be timed: over one link alone (that link's machine), or over a
/// pair link (from, to); with its start.
#[derive(Debug, Clone, Copy)]
enum Timed {
    Link(MachineId, f64),
    Pair(MachineId, MachineId, f64),
}

/// Sends `bytes` along `r` from `ready` on; returns the arrival, and the copy as it
/// can be timed: over one link alone (the client on its other end), or over a pair's.
fn send(
    links: &mut Links,
    machines: &[MachineSpec],
    r: &Route,
    bytes: u64,
    ready: f64,
) -> (f64, Option<Timed>) {
    let timed = match (r.kind, r.from) {
        (RouteKind::Direct, None) => Some((r.to, Direction::ToMachine)),
        (RouteKind::Direct, Some(from)) => Some((from, Direction::FromMachine)),
        _ => None,
    }
    .filter(|&(m, _)| !machines[m].is_local)
    .map(|(m, d)| Timed::Link(m, ready.max(links.free_at(m, d))));
    let timed = match (r.kind, r.from) {
        (RouteKind::Peer, Some(from)) => Some(Timed::Pair(
            from,
            r.to,
            ready.max(links.pair_free_at(from, r.to)),
        )),
        _ => timed,
    };
    (links.send(machines, r, bytes, ready), timed)
}

/// Tells `policy` of a copy it can time.
fn tell(policy: &mut dyn Policy, timed: Option<Timed>, bytes: u64, end: f64) {
    match timed {
        Some(Timed::Link(m, start)) => policy.copy_sent(m, bytes, start, end),
        Some(Timed::Pair(from, to, start)) => policy.pair_copy_sent(from, to, bytes, start, end),
        None => {}
    }
}

/// The machine the client runs on, if it is in the fleet.
fn client_machine(machines: &[MachineSpec]) -> Option<MachineId> {
    machines.iter().position(|m| m.is_local)
}

/// The simulated world: where outputs are, what runs where, the links, the clock.
struct World<'a> {
    graph: &'a Graph,
    machines: &'a [MachineSpec],
    costs: Costs,
    trace: bool,
    client: Option<MachineId>,
    /// Where each node's outputs are: machines, and whether the client has them.
    on_machine: Holding,
    at_client: Vec<bool>,
    busy: Vec<f64>,
    running: Vec<Vec<NodeId>>,
    /// Copies of each node running: a duplicate runs beside its original.
    copies: crate::hedge::Copies,
    generation: Vec<u64>,
    done: Vec<bool>,
    alive: Vec<bool>,
    events: BinaryHeap<Pending>,
    trace_events: Vec<TraceEvent>,
    dispatcher_free: f64,
    /// Each machine's link to the client: inputs sent to it or streamed from it, and
    /// requested outputs copied back as each is built, queue on it.
    links: Links,
    /// When the last requested output copied back so far reaches the client (or the
    /// delivery target).
    copied_back: f64,
    now: f64,
    finished: usize,
    delivery: Option<Delivery>,
    /// With a delivery: each node's place in the topological order, and when its
    /// outputs arrive at the target (infinite: not sent); the bytes sent there.
    topo_pos: Vec<usize>,
    delivered_at: Vec<f64>,
    /// When the last delivery so far lands at the target: deliveries go one at a time.
    target_free: f64,
    to_target: u64,
    /// Of those, the bytes sent over pair links.
    peer_to_target: u64,
    /// Whether the report breaks bytes down by route (a fleet with pair links or a
    /// delivery target).
    routes: bool,
    /// Whether any machine has pair links (as this policy sees the fleet).
    pair_links: bool,
}

/// What starting builds did that the policy hears of: copies kept in the client's
/// store, and copies it can time (how, bytes, end).
#[derive(Default)]
struct Started {
    landed: Vec<(NodeId, MachineId)>,
    sent: Vec<(Timed, u64, f64)>,
}

impl<'a> World<'a> {
    fn new(
        graph: &'a Graph,
        machines: &'a [MachineSpec],
        costs: Costs,
        trace: bool,
        delivery: Option<Delivery>,
    ) -> Self {
        let n = graph.len();
        World {
            graph,
            machines,
            costs,
            trace,
            client: client_machine(machines),
            on_machine: Holding::new(n),
            at_client: vec![false; n],
            busy: vec![0.0f64; machines.len()],
            running: vec![Vec::new(); machines.len()],
            copies: crate::hedge::Copies::new(n),
            generation: vec![0u64; n],
            done: vec![false; n],
            alive: vec![true; machines.len()],
            events: BinaryHeap::new(),
            trace_events: Vec::new(),
            dispatcher_free: 0.0,
            links: Links::new(machines.len()),
            copied_back: 0.0,
            now: 0.0,
            finished: 0,
            topo_pos: delivery.map_or_else(Vec::new, |_| topo_positions(graph)),
            delivered_at: vec![f64::INFINITY; if delivery.is_some() { n } else { 0 }],
            target_free: 0.0,
            delivery,
            to_target: 0,
            peer_to_target: 0,
            routes: false,
            pair_links: offload_sched::has_pair_links(machines),
        }
    }

    /// Starts `node` on machine `m` now: its inputs travel, it builds, and (for a
    /// policy that copies every output back) its outputs come home; its end is queued.
    fn start(&mut self, node: NodeId, m: MachineId, copies_back: bool, started: &mut Started) {
        if self.done[node] {
            // Built before, but its outputs were lost with their machine: again.
            self.done[node] = false;
            self.finished -= 1;
        }
        let machines = self.machines;
        let spec = &machines[m];
        let begin = if self.costs.dispatch_serial > 0.0 {
            let t = self.now.max(self.dispatcher_free) + self.costs.dispatch_serial;
            self.dispatcher_free = t;
            t
        } else {
            self.now
        };
        let arrived = self.ship_inputs(node, m, begin, started);
        let transfer = arrived - begin;
        let build = spec.build_time(self.graph.node(node)) + self.costs.per_build;
        let back = if copies_back && !spec.is_local {
            let bytes = self.graph.node(node).output_bytes;
            self.links.count(m, bytes);
            spec.transfer_time(bytes)
        } else {
            0.0
        };
        let end = begin + transfer + build + back;
        self.running[m].push(node);
        self.copies.start(node, &mut self.generation);
        if self.trace {
            self.trace_events.push(TraceEvent {
                name: self.graph.node(node).key.clone(),
                machine: m,
                start: begin,
                duration: end - begin,
            });
        }
        self.events.push(Pending {
            at: end,
            node,
            machine: m,
            generation: self.generation[node],
        });
    }

    /// Sends the inputs machine `m` lacks for `node`, one after another from `begin`,
    /// each when the links it uses are free, by the routes the live driver takes;
    /// returns when the last arrives.
    fn ship_inputs(
        &mut self,
        node: NodeId,
        m: MachineId,
        begin: f64,
        started: &mut Started,
    ) -> f64 {
        let (graph, machines) = (self.graph, self.machines);
        let mut arrived = begin;
        // Outputs that refer to their inputs reach a machine with their closure, as
        // Nix registers a path only once its references are valid.
        let closed: Vec<NodeId>;
        let inputs: &[NodeId] = match self.delivery {
            Some(d) if d.closure => {
                closed = inputs_closure(graph, node, &self.topo_pos);
                &closed
            }
            _ => &graph.node(node).deps,
        };
        for &d in inputs {
            let bytes = graph.node(d).output_bytes;
            let consumers = graph.dependents(d).len();
            let Some(r) = self.on_machine.route(
                machines,
                self.pair_links,
                d,
                self.at_client[d],
                m,
                consumers,
                bytes,
            ) else {
                continue;
            };
            if r.is_present() {
                continue;
            }
            let (arrival, timed) = send(&mut self.links, machines, &r, bytes, arrived);
            if let Some(timed) = timed {
                started.sent.push((timed, bytes, arrival));
            }
            arrived = arrival;
            if r.keeps_in_client() {
                self.at_client[d] = true;
                if let Some(c) = self.client {
                    if !self.on_machine.contains(d, c) {
                        self.on_machine.add(machines, d, c, bytes);
                        started.landed.push((d, c));
                    }
                }
            }
            if machines[m].is_local {
                self.at_client[d] = true;
            }
            self.on_machine.add(machines, d, m, bytes);
        }
        arrived
    }

    /// Machine `m` fails at `at`: the builds running there are lost (returned), and so
    /// are the outputs it held. None when it was already gone.
    fn fail(&mut self, m: MachineId, at: f64) -> Option<Vec<NodeId>> {
        self.now = at;
        if m >= self.machines.len() || !self.alive[m] {
            return None;
        }
        self.alive[m] = false;
        let mut lost = std::mem::take(&mut self.running[m]);
        self.copies.keep_lost(&mut lost, &mut self.generation);
        self.on_machine.drop_machine(self.machines, self.graph, m);
        Some(lost)
    }

    /// The build of `p` ends, unless it was lost or built again since; its outputs are
    /// on its machine, and a requested output starts home. Whether it counted.
    fn end(&mut self, p: &Pending, policy: &mut dyn Policy) -> bool {
        if p.generation != self.generation[p.node] || self.done[p.node] {
            return false;
        }
        self.now = p.at;
        self.running[p.machine].retain(|&x| x != p.node);
        if self.copies.end(p.node, &mut self.generation) {
            let key = &self.graph.node(p.node).key;
            let (running, trace) = (&mut self.running, &mut self.trace_events);
            crate::hedge::stop_loser(p.node, key, p.machine, self.now, running, trace);
        }
        let spec = &self.machines[p.machine];
        self.busy[p.machine] += spec.build_time(self.graph.node(p.node)) + self.costs.per_build;
        self.done[p.node] = true;
        self.finished += 1;
        let bytes = self.graph.node(p.node).output_bytes;
        self.on_machine.add(self.machines, p.node, p.machine, bytes);
        if policy.copies_outputs_back() || Some(p.machine) == self.client {
            self.at_client[p.node] = true;
        } else if self.delivery.is_none() && self.graph.dependents(p.node).is_empty() {
            let bytes = self.graph.node(p.node).output_bytes;
            // Home over its machine's link (the client may not be in the fleet).
            let home = Route::home(p.machine, self.client.unwrap_or(p.machine));
            let (arrival, timed) = send(&mut self.links, self.machines, &home, bytes, self.now);
            tell(policy, timed, bytes, arrival);
            self.copied_back = self.copied_back.max(arrival);
            self.at_client[p.node] = true;
        }
        if !policy.copies_outputs_back() && self.graph.dependents(p.node).is_empty() {
            let delivered = self.deliver(&[p.node], self.now, true);
            if let Some((timed, bytes, end)) = delivered {
                tell(policy, Some(timed), bytes, end);
            }
        }
        true
    }

    /// Delivers the requested outputs `roots` to the target as the driver does: one
    /// delivery at a time (after the one before has landed), which asks the target what
    /// it lacks (a round trip over the target's link when `ask`) and sends what of the
    /// roots' closures is not there, in one stream from where the first root is, by the
    /// quickest route; returns the copy if it can be timed (how, bytes, end).
    fn deliver(&mut self, roots: &[NodeId], ready: f64, ask: bool) -> Option<(Timed, u64, f64)> {
        let d = self.delivery?;
        let mut missing: Vec<NodeId> = roots
            .iter()
            .flat_map(|&r| closure_of(self.graph, r, d.closure, &self.topo_pos))
            .filter(|&n| self.delivered_at[n].is_infinite())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let &first = roots.first()?;
        if missing.is_empty() {
            return None;
        }
        let asking = if ask {
            2.0 * self.machines[d.target].latency
        } else {
            0.0
        };
        let ready = ready.max(self.target_free) + asking;
        let bytes: u64 = missing
            .iter()
            .map(|&n| self.graph.node(n).output_bytes)
            .sum();
        let r = self.on_machine.route(
            self.machines,
            self.pair_links,
            first,
            self.at_client[first],
            d.target,
            0,
            bytes,
        )?;
        let (arrival, timed) = send(&mut self.links, self.machines, &r, bytes, ready);
        self.to_target += bytes;
        if r.kind == RouteKind::Peer {
            self.peer_to_target += bytes;
        }
        for n in missing {
            self.delivered_at[n] = arrival;
        }
        self.target_free = arrival;
        self.copied_back = self.copied_back.max(arrival);
        timed.map(|t| (t, bytes, arrival))
    }

    /// For a policy that copies every output back: the requested outputs go to the
    /// delivery target from the client's store once every build has ended, in one
    /// copy (`nix copy --to`).
    fn deliver_from_client(&mut self) {
        if self.delivery.is_none() {
            return;
        }
        let roots: Vec<NodeId> = (0..self.graph.len())
            .filter(|&n| self.done[n] && self.graph.dependents(n).is_empty())
            .collect();
        let start = self.now.max(self.copied_back);
        self.deliver(&roots, start, false);
    }

    /// The report of the run so far, ended when the last requested output has reached
    /// the client.
    fn report(mut self, policy: &dyn Policy) -> Report {
        if policy.copies_outputs_back() {
            self.deliver_from_client();
        }
        let makespan = self.copied_back.max(self.now);
        let routes = self.route_bytes();
        let mut report = Report::new(
            policy.name(),
            self.graph,
            self.machines,
            makespan,
            self.finished,
            self.busy,
            self.links.bytes().to_vec(),
            self.trace_events,
        );
        report.bytes_by_route = self.routes.then_some(routes);
        report
    }

    /// The bytes the run moved, by route.
    fn route_bytes(&self) -> RouteBytes {
        RouteBytes {
            client_links: self.links.bytes().iter().sum(),
            builder_to_builder: self.links.peer_bytes() - self.peer_to_target,
            to_target: self.to_target,
        }
    }
}

/// Runs `policy` on `graph` over `machines`, with `failures` (machine, time); the
/// requested outputs go home, or to `delivery`'s target.
pub fn simulate(
    graph: &Graph,
    machines: &[MachineSpec],
    delivery: Option<Delivery>,
    failures: &[(MachineId, f64)],
    policy: &mut dyn Policy,
    trace: bool,
) -> Report {
    // A policy that sends nothing directly sees a fleet without pair links.
    let relayed: Vec<MachineSpec>;
    let peers = machines.iter().any(|m| !m.peers.is_empty());
    let machines = if !policy.sends_directly() && peers {
        relayed = machines
            .iter()
            .map(|m| MachineSpec {
                peers: Vec::new(),
                ..m.clone()
            })
            .collect();
        &relayed
    } else {
        machines
    };
    let mut world = World::new(graph, machines, policy.costs(), trace, delivery);
    world.routes = peers || delivery.is_some();
    let mut failures: Vec<(MachineId, f64)> = failures.to_vec();
    failures.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut starts = policy.start(world.now);
    loop {
        // Copies kept in the client's store, told to the policy after the starts, and
        // the copies sent.
        let mut started = Started::default();
        for (node, m) in starts.drain(..) {
            let copies_back = policy.copies_outputs_back();
            world.start(node, m, copies_back, &mut started);
        }
        for (timed, bytes, end) in started.sent {
            tell(policy, Some(timed), bytes, end);
        }
        for (d, c) in started.landed {
            starts.extend(policy.outputs_at(d, c, world.now));
        }
        if !starts.is_empty() {
            continue;
        }
        // The next thing to happen: a machine failing, a build ending, a wake-up.
        let next_failure = failures.last().copied();
        let next_end = world.events.peek().map(|p: &Pending| p.at);
        let wakeup = policy.next_wakeup();
        let first = [next_failure.map(|f| f.1), next_end, wakeup]
            .into_iter()
            .flatten()
            .fold(f64::INFINITY, f64::min);
        match (next_failure, next_end, wakeup) {
            (Some((m, at)), _, _) if at <= first => {
                failures.pop();
                if let Some(lost) = world.fail(m, at) {
                    starts = policy.machine_lost(m, &lost, world.now);
                }
            }
            (_, Some(end), _) if end <= first => {
                let Some(p) = world.events.pop() else { break };
                if world.end(&p, policy) {
                    starts = policy.finished(p.node, p.machine, world.now);
                }
            }
            (_, _, Some(at)) => {
                world.now = world.now.max(at);
                starts = policy.wake(world.now);
            }
            _ => break,
        }
    }
    world.report(policy)
}
