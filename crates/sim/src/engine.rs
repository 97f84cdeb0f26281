//! The discrete-event engine: a fake clock, machines with slots, links between the
//! client (where offload or Nix runs) and each machine, machine failures at given times,
//! and a [`Policy`] deciding which build starts where.
//!
//! A build started on machine M at time t occupies a slot of M while (1) the inputs M
//! lacks arrive — from the client, or from the machine that built them through the
//! client —, (2) it runs for `duration / speed` plus the policy's fixed per-build cost,
//! and (3) for policies that copy every output back (Nix's hook, Hydra), its outputs go
//! to the client. Other policies copy only the requested outputs (the graph's sinks),
//! each as soon as it is built, over its machine's link. Policies that decide one build
//! at a time on the client add a serial dispatch cost per build.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use offload_sched::{
    route, Direction, Graph, Links, MachineId, MachineSpec, NodeId, Route, RouteKind,
};

use crate::report::{Report, TraceEvent};

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

/// Sends `bytes` along `r` from `ready` on; returns the arrival, and the copy as the
/// client times it when it crosses one link alone: (that link's machine, start, end).
fn send(
    links: &mut Links,
    machines: &[MachineSpec],
    r: &Route,
    bytes: u64,
    ready: f64,
) -> (f64, Option<(MachineId, f64)>) {
    let timed = match (r.kind, r.from) {
        (RouteKind::Direct, None) => Some((r.to, Direction::ToMachine)),
        (RouteKind::Direct, Some(from)) => Some((from, Direction::FromMachine)),
        _ => None,
    }
    .filter(|&(m, _)| !machines[m].is_local)
    .map(|(m, d)| (m, ready.max(links.free_at(m, d))));
    (links.send(machines, r, bytes, ready), timed)
}

/// The machine the client runs on, if it is in the fleet.
fn client_machine(machines: &[MachineSpec]) -> Option<MachineId> {
    machines.iter().position(|m| m.is_local)
}

/// Runs `policy` on `graph` over `machines`, with `failures` (machine, time).
pub fn simulate(
    graph: &Graph,
    machines: &[MachineSpec],
    failures: &[(MachineId, f64)],
    policy: &mut dyn Policy,
    trace: bool,
) -> Report {
    let n = graph.len();
    let costs = policy.costs();
    let client = client_machine(machines);
    // Where each node's outputs are: machines, and whether the client has them.
    let mut on_machine: Vec<Vec<MachineId>> = vec![Vec::new(); n];
    let mut at_client = vec![false; n];
    let mut busy = vec![0.0f64; machines.len()];
    let mut running: Vec<Vec<NodeId>> = vec![Vec::new(); machines.len()];
    let mut generation = vec![0u64; n];
    let mut done = vec![false; n];
    let mut alive = vec![true; machines.len()];
    let mut events = BinaryHeap::new();
    let mut trace_events = Vec::new();
    let mut dispatcher_free = 0.0f64;
    // Each machine's link to the client: inputs sent to it or streamed from it, and
    // requested outputs copied back as each is built, queue on it.
    let mut links = Links::new(machines.len());
    // When the last requested output copied back so far reaches the client.
    let mut copied_back = 0.0f64;
    let mut failures: Vec<(MachineId, f64)> = failures.to_vec();
    failures.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut now = 0.0;
    let mut starts = policy.start(now);
    let mut finished = 0usize;
    loop {
        // Copies kept in the client's store, told to the policy after the starts, and
        // the copies sent.
        let mut landed: Vec<(NodeId, MachineId)> = Vec::new();
        let mut sent: Vec<(MachineId, u64, f64, f64)> = Vec::new();
        for (node, m) in starts.drain(..) {
            if done[node] {
                // Built before, but its outputs were lost with their machine: again.
                done[node] = false;
                finished -= 1;
            }
            let spec = &machines[m];
            let begin = if costs.dispatch_serial > 0.0 {
                let t = now.max(dispatcher_free) + costs.dispatch_serial;
                dispatcher_free = t;
                t
            } else {
                now
            };
            // Inputs arrive one after another, each when the links it uses are free,
            // by the routes the live driver takes.
            let mut arrived = begin;
            for &d in &graph.node(node).deps {
                let bytes = graph.node(d).output_bytes;
                let consumers = graph.dependents(d).len();
                let Some(r) = route(machines, &on_machine[d], at_client[d], m, consumers, bytes)
                else {
                    continue;
                };
                if r.is_present() {
                    continue;
                }
                let (arrival, timed) = send(&mut links, machines, &r, bytes, arrived);
                if let Some((link, start)) = timed {
                    sent.push((link, bytes, start, arrival));
                }
                arrived = arrival;
                if r.keeps_in_client() {
                    at_client[d] = true;
                    if let Some(c) = client {
                        if !on_machine[d].contains(&c) {
                            on_machine[d].push(c);
                            landed.push((d, c));
                        }
                    }
                }
                if spec.is_local {
                    at_client[d] = true;
                }
                on_machine[d].push(m);
            }
            let transfer = arrived - begin;
            let build = spec.build_time(graph.node(node)) + costs.per_build;
            let back = if policy.copies_outputs_back() && !spec.is_local {
                let bytes = graph.node(node).output_bytes;
                links.count(m, bytes);
                spec.transfer_time(bytes)
            } else {
                0.0
            };
            let end = begin + transfer + build + back;
            running[m].push(node);
            generation[node] += 1;
            if trace {
                trace_events.push(TraceEvent {
                    name: graph.node(node).key.clone(),
                    machine: m,
                    start: begin,
                    duration: end - begin,
                });
            }
            events.push(Pending {
                at: end,
                node,
                machine: m,
                generation: generation[node],
            });
        }
        for (link, bytes, start, end) in sent {
            policy.copy_sent(link, bytes, start, end);
        }
        for (d, c) in landed {
            starts.extend(policy.outputs_at(d, c, now));
        }
        if !starts.is_empty() {
            continue;
        }
        // The next thing to happen: a machine failing, a build ending, a wake-up.
        let next_failure = failures.last().copied();
        let next_end = events.peek().map(|p: &Pending| p.at);
        let wakeup = policy.next_wakeup();
        let first = [next_failure.map(|f| f.1), next_end, wakeup]
            .into_iter()
            .flatten()
            .fold(f64::INFINITY, f64::min);
        match (next_failure, next_end, wakeup) {
            (Some((m, at)), _, _) if at <= first => {
                failures.pop();
                now = at;
                if m >= machines.len() || !alive[m] {
                    continue;
                }
                alive[m] = false;
                let lost = std::mem::take(&mut running[m]);
                for &node in &lost {
                    generation[node] += 1;
                }
                for holders in &mut on_machine {
                    holders.retain(|&h| h != m);
                }
                starts = policy.machine_lost(m, &lost, now);
            }
            (_, Some(end), _) if end <= first => {
                let Some(p) = events.pop() else { break };
                if p.generation != generation[p.node] || done[p.node] {
                    continue;
                }
                now = p.at;
                running[p.machine].retain(|&x| x != p.node);
                let spec = &machines[p.machine];
                busy[p.machine] += spec.build_time(graph.node(p.node)) + costs.per_build;
                done[p.node] = true;
                finished += 1;
                on_machine[p.node].push(p.machine);
                if policy.copies_outputs_back() || Some(p.machine) == client {
                    at_client[p.node] = true;
                } else if graph.dependents(p.node).is_empty() {
                    let bytes = graph.node(p.node).output_bytes;
                    // Home over its machine's link (the client may not be in the fleet).
                    let home = Route::home(p.machine, client.unwrap_or(p.machine));
                    let (arrival, timed) = send(&mut links, machines, &home, bytes, now);
                    if let Some((link, start)) = timed {
                        policy.copy_sent(link, bytes, start, arrival);
                    }
                    copied_back = copied_back.max(arrival);
                    at_client[p.node] = true;
                }
                starts = policy.finished(p.node, p.machine, now);
            }
            (_, _, Some(at)) => {
                now = now.max(at);
                starts = policy.wake(now);
            }
            _ => break,
        }
    }
    // The run ends when the last requested output has reached the client.
    let makespan = copied_back.max(now);
    Report::new(
        policy.name(),
        graph,
        machines,
        makespan,
        finished,
        busy,
        links.bytes().to_vec(),
        trace_events,
    )
}
