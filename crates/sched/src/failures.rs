//! What the scheduler does when things go wrong: a machine taken down (its builds go
//! back to the ready set, outputs only it held are built again), a build failed or tried
//! too often (it and its dependants fail; without keep-going the run stops), and
//! derivations no machine can build.

use crate::events::{Action, Failure, NodeState};
use crate::fleet::MachineId;
use crate::graph::NodeId;
use crate::scheduler::{Scheduler, MAX_ATTEMPTS};

impl Scheduler {
    /// Stops using a live `machine`: its running builds go back to the ready set (the
    /// loss is the machine's, not theirs: no attempt is counted), and the outputs only it
    /// held are built again where still needed.
    pub(crate) fn take_down(&mut self, machine: MachineId, actions: &mut Vec<Action>) {
        if !self.alive[machine] {
            return;
        }
        let class = self.class_of[machine];
        self.free_in_class[class] -= self.free_on(machine);
        self.alive[machine] = false;
        self.replace_queue_key(machine);
        let lost = std::mem::take(&mut self.running[machine]);
        self.running_count -= lost.len();
        self.home_pending[machine] = 0;
        for node in lost {
            self.make_ready(node);
        }
        self.holders
            .drop_machine(&self.machines, &self.graph, machine);
        self.match_kinds();
        self.rebuild_lost_outputs();
        self.fail_unplaceable(actions);
    }

    pub(crate) fn requeue(&mut self, node: NodeId, reason: String, actions: &mut Vec<Action>) {
        self.attempts[node] += 1;
        if self.attempts[node] >= MAX_ATTEMPTS {
            let attempts = self.attempts[node];
            self.fail(node, Failure::TooManyAttempts { attempts, reason }, actions);
        } else {
            self.make_ready(node);
        }
    }

    /// Marks `node` failed, and everything that depends on it; without keep-going,
    /// stops the run and cancels what is running.
    pub(crate) fn fail(&mut self, node: NodeId, failure: Failure, actions: &mut Vec<Action>) {
        if matches!(self.state[node], NodeState::Failed(_)) {
            return;
        }
        self.unready(node);
        self.set_state(node, NodeState::Failed(failure.clone()));
        actions.push(Action::Fail {
            node,
            reason: failure,
        });
        let mut stack: Vec<NodeId> = self.graph.dependents(node).to_vec();
        while let Some(d) = stack.pop() {
            // A running dependent already has its inputs (this node was being built
            // again only for others, its outputs lost with a machine): it goes on.
            if matches!(
                self.state[d],
                NodeState::Failed(_) | NodeState::Done { .. } | NodeState::Running { .. }
            ) {
                continue;
            }
            self.unready(d);
            let f = Failure::DependencyFailed { dep: node };
            self.set_state(d, NodeState::Failed(f.clone()));
            actions.push(Action::Fail { node: d, reason: f });
            stack.extend_from_slice(self.graph.dependents(d));
        }
        if !self.keep_going && !self.stopping {
            self.stopping = true;
            for m in 0..self.running.len() {
                let mut cancelled = Vec::new();
                self.change_free(m, |s| cancelled = std::mem::take(&mut s.running[m]));
                for n in cancelled {
                    self.running_count -= 1;
                    actions.push(Action::Cancel {
                        node: n,
                        machine: m,
                    });
                    actions.push(Action::Fail {
                        node: n,
                        reason: Failure::Stopped,
                    });
                    self.set_state(n, NodeState::Failed(Failure::Stopped));
                }
            }
            for id in 0..self.state.len() {
                if matches!(self.state[id], NodeState::Ready | NodeState::Waiting(_)) {
                    self.set_state(id, NodeState::Failed(Failure::Stopped));
                    actions.push(Action::Fail {
                        node: id,
                        reason: Failure::Stopped,
                    });
                }
            }
            for ready in &mut self.ready {
                ready.clear();
            }
        }
    }

    /// After a machine loss: outputs that only it held and that an unfinished node still
    /// needs must be built again, and so must, transitively, their own lost inputs.
    fn rebuild_lost_outputs(&mut self) {
        let n = self.graph.len();
        loop {
            let mut changed = false;
            for id in 0..n {
                let unfinished = matches!(self.state[id], NodeState::Waiting(_) | NodeState::Ready);
                if !unfinished {
                    continue;
                }
                for i in 0..self.graph.node(id).deps.len() {
                    let dep = self.graph.node(id).deps[i];
                    if matches!(self.state[dep], NodeState::Done { .. })
                        && self.holders[dep].is_empty()
                    {
                        self.set_state(dep, NodeState::Waiting(0));
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        // Recount what each unfinished node waits for.
        for id in 0..n {
            if !matches!(self.state[id], NodeState::Waiting(_) | NodeState::Ready) {
                continue;
            }
            let waiting = self
                .graph
                .node(id)
                .deps
                .iter()
                .filter(|&&d| !matches!(self.state[d], NodeState::Done { .. }))
                .count();
            self.unready(id);
            if waiting == 0 {
                self.make_ready(id);
            } else {
                self.set_state(id, NodeState::Waiting(waiting));
            }
        }
    }

    /// Fails ready or waiting nodes that no machine can build: none that is live, and
    /// none that is down for now and may come back.
    pub(crate) fn fail_unplaceable(&mut self, actions: &mut Vec<Action>) {
        let unplaceable: Vec<bool> = self
            .kinds
            .iter()
            .map(|k| {
                let node = self.graph.node(k.example);
                k.classes.is_empty()
                    && !(0..self.machines.len()).any(|m| {
                        !self.alive[m]
                            && !self.gone[m]
                            && self.machines[m].slots > 0
                            && self.machines[m].can_build(node)
                    })
            })
            .collect();
        if !unplaceable.contains(&true) {
            return;
        }
        let considered: Vec<String> = self
            .machines
            .iter()
            .zip(&self.alive)
            .filter(|(_, &a)| a)
            .map(|(m, _)| m.name.clone())
            .collect();
        for id in 0..self.graph.len() {
            if !unplaceable[self.kind_of[id]]
                || !matches!(self.state[id], NodeState::Waiting(_) | NodeState::Ready)
            {
                continue;
            }
            let node = self.graph.node(id);
            let failure = Failure::NoMachine {
                system: node.system.clone(),
                features: node.required_features.clone(),
                considered: considered.clone(),
            };
            self.fail(id, failure, actions);
        }
    }
}
