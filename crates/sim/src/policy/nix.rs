//! A model of Nix 2.8 building with `--builders`: its worker loop (`worker.cc`), the
//! derivation goal's build steps (`derivation-goal.cc`) and the build hook
//! (`build-remote.cc`).
//!
//! - The worker works its awake goals in passes, each pass in the order of the goals'
//!   keys (the derivation's name, then its path); goals woken during a pass wait for
//!   the next one. It does this on one thread, so every hook round trip is serial.
//! - A goal whose inputs are built asks the hook. The hook takes the remote machine
//!   with a free slot and the lowest `load / speedFactor` (integer division; ties to
//!   the faster, then the less loaded, then the first in the file), connects to it, and
//!   accepts; the worker then needs a new hook process for the next question.
//! - No remote slot free: the hook declines when the worker is willing to build
//!   locally (fewer local builds than `max-jobs`, and the local system and features
//!   fit), and the goal tries a local build in the next pass; if by then the local
//!   slots are full it waits for any build to end, then asks the hook again. Otherwise
//!   the hook postpones it, and the worker wakes postponed goals only every
//!   `build-poll-interval` (5 s).
//! - A remote build holds its slot until its outputs are back on the client. A build
//!   whose machine is lost fails: Nix does not retry it elsewhere.

use std::collections::BTreeSet;

use offload_sched::{Graph, MachineId, MachineSpec, NodeId};

use super::Kinds;
use crate::engine::{Costs, Policy};

// An accepted build costs the client HOOK_START + HOOK_CONNECT: 0.047 s, the middle of
// the 0.044-0.049 s between build starts in Nix's `--log-format internal-json` log of
// 200 trivial builds on loopback machines (ten runs of 8.7-10.2 s, one of 14.2 s while
// the machine was busy compiling).

/// Seconds to start a hook process (`nix __build-remote`: configuration, machines).
pub const HOOK_START_SECONDS: f64 = 0.033;
/// Seconds for a question to a running hook that it declines or postpones.
pub const HOOK_ASK_SECONDS: f64 = 0.002;
/// Seconds per slot the hook tries to lock at each question: it opens and
/// `fcntl`-locks a file per slot of every machine of the right type (open, F_SETLK
/// and close of a lock file measured 3.8 us here).
pub const HOOK_SLOT_LOCK_SECONDS: f64 = 4e-6;
/// Seconds for the hook to open the store of the machine it picked (before it
/// accepts: `nix-store --serve` started, handshake).
pub const HOOK_CONNECT_SECONDS: f64 = 0.014;
/// Seconds for the worker to start a local build.
pub const LOCAL_START_SECONDS: f64 = 0.01;
/// Nix's `build-poll-interval`.
pub const POLL_INTERVAL_SECONDS: f64 = 5.0;

/// What a goal does when the worker works it next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    AskHook,
    TryLocal,
}

/// Nix's worker and build hook.
pub struct NixPolicy {
    graph: Graph,
    machines: Vec<MachineSpec>,
    costs: Costs,
    alive: Vec<bool>,
    /// Remote builds per machine (the hook's slot locks held).
    load: Vec<u32>,
    local: Option<MachineId>,
    local_builds: u32,
    /// Whether the fleet has any remote machine: without one the hook declines for good.
    has_remotes: bool,
    waiting: Vec<usize>,
    /// Each node's place in the worker's goal order.
    order: Vec<u32>,
    step: Vec<Step>,
    /// The pass being worked, and goals woken for the next one.
    pass: BTreeSet<(u32, NodeId)>,
    next_pass: BTreeSet<(u32, NodeId)>,
    /// Goals the hook postponed, and when the worker last woke such goals.
    postponed: Vec<NodeId>,
    last_woken: Option<f64>,
    /// Goals waiting for a local build slot.
    want_slot: Vec<NodeId>,
    /// Whether a hook process is running and free for a question.
    hook_ready: bool,
    /// The worker is busy with a hook round trip until then; the builds decided are
    /// started then.
    busy_until: f64,
    deciding: Vec<(NodeId, MachineId)>,
    /// Remote machines able to build each kind of node, and their free slots.
    kinds: Kinds,
}

impl NixPolicy {
    pub fn new(graph: Graph, machines: Vec<MachineSpec>, costs: Costs) -> Self {
        let n = graph.len();
        let m = machines.len();
        let waiting: Vec<usize> = (0..n).map(|i| graph.node(i).deps.len()).collect();
        // Goal keys: the derivation's name (a store path's part after the hash), then
        // the whole key.
        let mut by_key: Vec<NodeId> = (0..n).collect();
        by_key.sort_by(|&a, &b| {
            let (ka, kb) = (&graph.node(a).key, &graph.node(b).key);
            (drv_name(ka), ka).cmp(&(drv_name(kb), kb))
        });
        let mut order = vec![0u32; n];
        for (i, &id) in by_key.iter().enumerate() {
            order[id] = i as u32;
        }
        let local = machines.iter().position(|s| s.is_local);
        let has_remotes = machines.iter().any(|m| !m.is_local);
        let kinds = Kinds::new(&graph, &machines, |m| !m.is_local);
        let mut policy = NixPolicy {
            graph,
            alive: vec![true; m],
            load: vec![0; m],
            machines,
            costs,
            local,
            local_builds: 0,
            has_remotes,
            waiting,
            order,
            step: vec![Step::AskHook; n],
            pass: BTreeSet::new(),
            next_pass: BTreeSet::new(),
            postponed: Vec::new(),
            last_woken: None,
            want_slot: Vec::new(),
            hook_ready: false,
            busy_until: 0.0,
            deciding: Vec::new(),
            kinds,
        };
        for id in 0..n {
            if policy.waiting[id] == 0 {
                policy.wake_goal(id);
            }
        }
        policy
    }

    fn wake_goal(&mut self, id: NodeId) {
        self.next_pass.insert((self.order[id], id));
    }

    fn local_max_jobs(&self) -> u32 {
        self.local.map_or(0, |l| self.machines[l].slots)
    }

    fn local_can_build(&self, id: NodeId) -> bool {
        self.local
            .is_some_and(|l| self.machines[l].can_build(self.graph.node(id)))
    }

    fn take_remote_slot(&mut self, m: MachineId, delta: i64) {
        self.load[m] = (i64::from(self.load[m]) + delta) as u32;
        self.kinds.take(m, delta);
    }

    /// The hook's choice: build-remote.cc's comparison, machines in file order.
    fn pick_remote(&self, id: NodeId) -> Option<MachineId> {
        if !self.kinds.has_free(id) {
            return None;
        }
        let mut best: Option<MachineId> = None;
        for &m in &self.kinds.machines[self.kinds.of(id)] {
            if !self.alive[m] || self.load[m] >= self.machines[m].slots {
                continue;
            }
            let speed = nix_speed(&self.machines[m]);
            let better = match best {
                None => true,
                Some(b) => {
                    let bs = nix_speed(&self.machines[b]);
                    let (l, bl) = (self.load[m], self.load[b]);
                    l / speed < bl / bs
                        || (l / speed == bl / bs && (speed > bs || (speed == bs && l < bl)))
                }
            };
            if better {
                best = Some(m);
            }
        }
        best
    }

    /// Works goals until a hook round trip keeps the worker busy, or nothing is awake.
    fn run(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        let mut starts = Vec::new();
        if now + 1e-12 < self.busy_until {
            return starts;
        }
        starts.append(&mut self.deciding);
        loop {
            if self.pass.is_empty() {
                if self.next_pass.is_empty() {
                    // The worker waits for input: with nothing postponed, its poll
                    // timer starts afresh at the next postponement.
                    if self.postponed.is_empty() {
                        self.last_woken = None;
                    }
                    break;
                }
                std::mem::swap(&mut self.pass, &mut self.next_pass);
            }
            let Some((_, id)) = self.pass.pop_first() else {
                continue;
            };
            let cost = match self.step[id] {
                Step::AskHook => self.ask_hook(id, now),
                Step::TryLocal => self.try_local(id),
            };
            if cost > 0.0 {
                self.busy_until = now + cost;
                break;
            }
        }
        starts
    }

    /// One question to the hook; returns the seconds it takes.
    fn ask_hook(&mut self, id: NodeId, now: f64) -> f64 {
        if !self.has_remotes {
            // "decline-permanently": the worker stops asking.
            self.step[id] = Step::TryLocal;
            self.wake_goal(id);
            return 0.0;
        }
        let slot_locks = self.kinds.slots[self.kinds.of(id)] as f64 * HOOK_SLOT_LOCK_SECONDS;
        let mut cost = slot_locks
            + if self.hook_ready {
                HOOK_ASK_SECONDS
            } else {
                HOOK_START_SECONDS
            };
        self.hook_ready = true;
        if let Some(m) = self.pick_remote(id) {
            cost += HOOK_CONNECT_SECONDS;
            self.take_remote_slot(m, 1);
            self.deciding.push((id, m));
            // The goal keeps this hook process; the next question starts another.
            self.hook_ready = false;
            return cost;
        }
        let willing = self.local_builds < self.local_max_jobs();
        let right_type = self.kinds.machines[self.kinds.of(id)]
            .iter()
            .any(|&m| self.alive[m]);
        if willing && self.local_can_build(id) {
            self.step[id] = Step::TryLocal;
            self.wake_goal(id);
        } else if right_type {
            if self.postponed.is_empty() && self.last_woken.is_none() {
                self.last_woken = Some(now);
            }
            self.postponed.push(id);
        }
        // Else no machine at all can build it: Nix fails it, and what needs it.
        cost
    }

    fn try_local(&mut self, id: NodeId) -> f64 {
        self.step[id] = Step::AskHook;
        let Some(local) = self.local else {
            return 0.0;
        };
        if !self.machines[local].can_build(self.graph.node(id)) {
            return 0.0;
        }
        if self.local_builds < self.local_max_jobs() {
            self.local_builds += 1;
            self.deciding.push((id, local));
            LOCAL_START_SECONDS
        } else {
            self.want_slot.push(id);
            0.0
        }
    }

    /// A build ended (or was lost): its slot frees, and goals waiting for a slot wake.
    fn child_ended(&mut self, machine: MachineId) {
        if Some(machine) == self.local {
            self.local_builds = self.local_builds.saturating_sub(1);
        } else if self.load[machine] > 0 && self.alive[machine] {
            self.take_remote_slot(machine, -1);
        }
        for id in std::mem::take(&mut self.want_slot) {
            self.wake_goal(id);
        }
    }
}

impl Policy for NixPolicy {
    fn name(&self) -> &'static str {
        "nix"
    }

    fn costs(&self) -> Costs {
        self.costs
    }

    fn copies_outputs_back(&self) -> bool {
        true
    }

    fn start(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        self.run(now)
    }

    fn next_wakeup(&self) -> Option<f64> {
        let busy =
            (!self.deciding.is_empty() || !self.pass.is_empty() || !self.next_pass.is_empty())
                .then_some(self.busy_until);
        let poll = (!self.postponed.is_empty())
            .then(|| self.last_woken.map(|t| t + POLL_INTERVAL_SECONDS))
            .flatten();
        [busy, poll].into_iter().flatten().reduce(f64::min)
    }

    fn wake(&mut self, now: f64) -> Vec<(NodeId, MachineId)> {
        if self
            .last_woken
            .is_some_and(|t| t + POLL_INTERVAL_SECONDS <= now + 1e-12)
            && !self.postponed.is_empty()
        {
            self.last_woken = Some(now);
            for id in std::mem::take(&mut self.postponed) {
                self.wake_goal(id);
            }
        }
        self.run(now)
    }

    fn finished(&mut self, node: NodeId, machine: MachineId, now: f64) -> Vec<(NodeId, MachineId)> {
        self.child_ended(machine);
        for i in 0..self.graph.dependents(node).len() {
            let d = self.graph.dependents(node)[i];
            self.waiting[d] -= 1;
            if self.waiting[d] == 0 {
                self.wake_goal(d);
            }
        }
        self.wake(now)
    }

    fn machine_lost(
        &mut self,
        machine: MachineId,
        lost: &[NodeId],
        now: f64,
    ) -> Vec<(NodeId, MachineId)> {
        // The lost builds fail; the hook no longer picks the machine.
        for _ in lost {
            self.child_ended(machine);
        }
        if self.alive[machine] && Some(machine) != self.local {
            let slots = self.machines[machine].slots;
            self.kinds
                .lose(machine, slots, slots.saturating_sub(self.load[machine]));
        }
        self.alive[machine] = false;
        self.wake(now)
    }
}

/// A goal's name as Nix orders goals: the key's store path name (`.drv` kept); a key
/// that is not a store path (a generated graph's) is its own name.
fn drv_name(key: &str) -> &str {
    offload_nix::store_path::path_name(key).unwrap_or(key)
}

/// Nix 2.8 reads the speed factor as an unsigned integer.
fn nix_speed(m: &MachineSpec) -> u32 {
    (m.speed.max(1.0)) as u32
}

#[cfg(test)]
mod tests {
    use offload_sched::NodeSpec;

    use super::*;
    use crate::calibration::NIX;
    use crate::simulate;

    fn machine(name: &str, slots: u32, is_local: bool) -> MachineSpec {
        MachineSpec {
            is_local,
            ..MachineSpec::new(name, "x86_64-linux", slots, 1.0)
        }
    }

    fn wide(n: usize) -> Graph {
        let nodes = (0..n)
            .map(|i| NodeSpec {
                key: format!("w{i}"),
                system: "x86_64-linux".into(),
                required_features: vec![],
                deps: vec![],
                duration: 1.0,
                output_bytes: 0,
                prefer_local: false,
            })
            .collect();
        Graph::new(nodes).unwrap()
    }

    /// Start time of each node, from a traced run.
    fn starts(graph: &Graph, machines: Vec<MachineSpec>) -> Vec<(String, usize, f64)> {
        let mut p = NixPolicy::new(graph.clone(), machines.clone(), NIX);
        let report = simulate(graph, &machines, None, &[], &mut p, true);
        assert_eq!(report.built, graph.len());
        let mut starts: Vec<_> = report
            .trace
            .iter()
            .map(|e| (e.name.clone(), e.machine, e.start))
            .collect();
        starts.sort_by(|a, b| a.2.total_cmp(&b.2));
        starts
    }

    #[test]
    fn a_postponed_build_waits_for_the_poll_interval() {
        // One remote slot, no local one: the second build is postponed, not started
        // when the first ends a second later.
        let s = starts(&wide(2), vec![machine("b", 1, false)]);
        assert_eq!(s[0].0, "w0");
        assert!(s[1].2 >= POLL_INTERVAL_SECONDS, "{s:?}");
    }

    #[test]
    fn remote_machines_first_then_local_when_willing() {
        let s = starts(
            &wide(3),
            vec![machine("local", 1, true), machine("b", 2, false)],
        );
        let on: Vec<usize> = s.iter().map(|x| x.1).collect();
        assert_eq!(on, vec![1, 1, 0], "{s:?}");
        // Hook round trips are serial on the client.
        assert!(s[1].2 > s[0].2 && s[2].2 > s[1].2, "{s:?}");
        assert!(
            s[2].2 < 1.0,
            "the local build does not wait for a poll: {s:?}"
        );
    }

    #[test]
    fn goals_go_in_order_of_their_names() {
        assert_eq!(
            drv_name("/nix/store/00000000000000000000000000000000-zlib.drv"),
            "zlib.drv"
        );
        assert_eq!(drv_name("b-2"), "b-2");
        let s = starts(&wide(3), vec![machine("b", 3, false)]);
        let names: Vec<&str> = s.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, vec!["w0", "w1", "w2"]);
    }
}
