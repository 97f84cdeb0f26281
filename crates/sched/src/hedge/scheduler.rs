//! What hedging asks of the scheduler: a free slot elsewhere for a duplicate, and the
//! slots duplicates take.

use crate::events::NodeState;
use crate::fleet::MachineId;
use crate::graph::NodeId;
use crate::scheduler::Scheduler;

impl Scheduler {
    /// The live machine other than `except` with a slot free now where `node` would
    /// be built first, and the seconds it would take there (its inputs' transfer
    /// included): one machine per class that can build it.
    pub(crate) fn free_machine_for(
        &self,
        node: NodeId,
        except: MachineId,
        now: f64,
    ) -> Option<(MachineId, f64)> {
        let spec = self.graph.node(node);
        let mut best: Option<(MachineId, f64)> = None;
        for &c in &self.kinds[self.kind_of[node]].classes {
            if self.free_in_class[c] == 0 {
                continue;
            }
            let free = self.queues[c]
                .iter()
                .take_while(|k| !k.busy)
                .find(|k| k.machine != except);
            let Some(key) = free else { continue };
            let m = key.machine;
            let machine = &self.machines[m];
            let setup = if self.session_ready[m] {
                0.0
            } else {
                machine.session_setup
            };
            let seconds = self.inputs_arrive(node, m, now) - now
                + machine.build_time(spec)
                + machine.per_build
                + setup;
            if best.is_none_or(|(_, s)| seconds < s) {
                best = Some((m, seconds));
            }
        }
        best
    }

    /// Frees the slots duplicates take (`node` running on a machine other than its
    /// state's), for a rehearsal that plays each build as its original.
    pub(crate) fn release_duplicates(&mut self) {
        for m in 0..self.running.len() {
            let dups: Vec<NodeId> = self.running[m]
                .iter()
                .copied()
                .filter(|&n| !matches!(self.state[n], NodeState::Running { machine, .. } if machine == m))
                .collect();
            for n in dups {
                self.release(n, m);
            }
        }
    }

    /// A duplicate of running `node` takes a slot of `machine`.
    pub(crate) fn start_duplicate(&mut self, node: NodeId, machine: MachineId) {
        self.change_free(machine, |s| s.running[machine].push(node));
        self.running_count += 1;
        self.session_ready[machine] = true;
    }
}
