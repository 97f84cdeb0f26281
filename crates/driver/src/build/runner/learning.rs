//! What a run learns as it goes: where copies landed and how long they took, each
//! build's time and output size, recorded in the state, and the machines' speeds and
//! links fitted again from them, so the rest of the run is planned on what was seen.

use offload_learn::{moved_link, moved_pair, slower_under_way};
use offload_sched::Event;
use offload_sched::{Link, MachineId};

use super::{BuildTransport, Runner, TaskDone};
use crate::fleet::LOCAL;
use crate::state::{BuildRecord, StateDb, StateError};
use crate::transfer::{unreachable_note, TransferNews};

/// Lets the run's commits to the state return once SQLite's write-ahead log has them,
/// without an fsync each (`synchronous = NORMAL`; the log is synced at checkpoints).
/// A run commits each build's and each copy's row from its event loop, between one
/// build's end and the next build's start there: an fsync each took most of the
/// loop's time on a run of tiny builds (6 ms a commit on a busy disk, a few hundred
/// commits a second). In WAL mode this keeps the database intact across a crash; a
/// power loss may take the last rows, which only cost estimates.
pub(super) fn commit_without_waiting_for_the_disk(history: &StateDb) {
    // A shared state (PostgreSQL) has no such setting.
    if history.is_shared() {
        return;
    }
    let quick = history.execute("skipping fsync", "PRAGMA synchronous = NORMAL", &[]);
    if let Err(e) = quick {
        tracing::debug!("the state's commits wait for the disk: {e}");
    }
}

impl<T: BuildTransport> Runner<'_, T> {
    /// Tells the scheduler where copies landed and the history how long they took.
    pub(super) fn take_news(&mut self) {
        let news = self.transport.take_news();
        let now = self.now();
        for (path, machine) in &news.landed {
            if let Some(&node) = self.output_of.get(path) {
                let machine = *machine;
                let actions = self.sched.handle(Event::OutputsAt { node, machine }, now);
                self.apply(actions);
            }
        }
        self.learn_routes(&news);
        if let Some(h) = self.history {
            for t in &news.transfers {
                let key = &self.state_keys[t.machine];
                if let Err(e) =
                    h.record_transfer(key, t.to_machine, t.bytes, t.seconds, t.concurrent)
                {
                    tracing::warn!("{e}");
                }
            }
        }
    }

    /// Learns which builders reach which directly, and how fast: probes answered,
    /// pairs that failed to copy (named once), and direct copies timed.
    fn learn_routes(&mut self, news: &TransferNews) {
        for p in &news.probed {
            let (from, to) = (&self.state_keys[p.from], &self.state_keys[p.to]);
            let recorded = match &p.answer {
                Ok(link) => {
                    self.sched.set_peer_link(p.from, p.to, Some(*link));
                    self.state_op(|h| h.record_peer_probe(from, to, true, ""))
                }
                Err(reason) => {
                    self.reporter.machine_warning(&unreachable_note(
                        &self.machines[p.from].name,
                        &self.machines[p.to].name,
                        reason,
                    ));
                    self.state_op(|h| h.record_peer_probe(from, to, false, reason))
                }
            };
            if let Err(e) = recorded {
                tracing::warn!("{e}");
            }
        }
        for u in &news.unreachable {
            self.sched.set_peer_link(u.from, u.to, None);
            self.reporter.machine_warning(&unreachable_note(
                &self.machines[u.from].name,
                &self.machines[u.to].name,
                &u.reason,
            ));
            let (from, to) = (&self.state_keys[u.from], &self.state_keys[u.to]);
            if let Err(e) = self.state_op(|h| h.record_peer_probe(from, to, false, &u.reason)) {
                tracing::warn!("{e}");
            }
        }
        for t in &news.peer_transfers {
            self.pair_links
                .record(t.from, t.to, t.bytes, t.seconds, t.concurrent);
            self.plan_pair(t.from, t.to);
            let (from, to) = (&self.state_keys[t.from], &self.state_keys[t.to]);
            let recorded = self
                .state_op(|h| h.record_peer_transfer(from, to, t.bytes, t.seconds, t.concurrent));
            if let Err(e) = recorded {
                tracing::warn!("{e}");
            }
        }
    }

    /// Plans the pair `from` → `to` at what its copies in this run showed, by
    /// [`offload_learn::moved_pair`] (the simulator's rule too): once both of its
    /// machines' links to this one are measured, and only when it moved, since each
    /// change regroups the machines.
    fn plan_pair(&mut self, from: MachineId, to: MachineId) {
        let Some(planned) = self.sched.machines()[from].peer_link(to).copied() else {
            return;
        };
        let learned = self.pair_links.figures(&from, &to).map(|f| Link {
            bandwidth: f.bandwidth,
            latency: f.latency,
        });
        let measured = self.link_measured[from] && self.link_measured[to];
        if let Some(link) = moved_pair(planned, learned, measured) {
            self.sched.set_peer_link(from, to, Some(link));
            self.transport.set_peer_link(from, to, link);
        }
    }

    /// `machine`'s link counts as measured from now on: the pairs it is in go by what
    /// their copies showed.
    fn link_now_measured(&mut self, machine: MachineId) {
        if std::mem::replace(&mut self.link_measured[machine], true) {
            return;
        }
        let pairs: Vec<(MachineId, MachineId)> = self
            .pair_links
            .pairs()
            .filter(|&&(a, b)| a == machine || b == machine)
            .copied()
            .collect();
        for (from, to) in pairs {
            self.plan_pair(from, to);
        }
    }

    /// Runs `op` on the state, when the run has one.
    fn state_op(
        &self,
        op: impl FnOnce(&StateDb) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        self.history.map_or(Ok(()), op)
    }

    /// Learns from a build that ended well: the real size of its outputs, and (with a
    /// state) its time, recorded, and the speeds fitted again.
    pub(super) fn learn_from(&mut self, done: &TaskDone) {
        if let Some(bytes) = done.facts.output_bytes {
            self.sched.outputs_measured(done.node, bytes);
        }
        if let Some(seconds) = done.facts.build_seconds {
            let hedger = &mut self.hedging.hedger;
            hedger.built(&mut self.sched, done.node, done.machine, seconds);
            self.plan_slower();
        }
        let node = &self.nodes[done.node];
        if let Some(h) = self.history {
            let recorded = h.record_build(&BuildRecord {
                name: &node.name,
                system: &node.system,
                machine: &self.state_keys[done.machine],
                seconds: done.facts.build_seconds.unwrap_or(done.seconds),
                declared_speed: self.declared_speeds[done.machine],
                output_bytes: done.facts.output_bytes,
                run: Some(&self.run_id),
                // The inputs' copies are the links' to learn, not the machine's.
                task_seconds: Some(done.seconds - done.facts.inputs_seconds.unwrap_or(0.0)),
            });
            if let Err(e) = recorded {
                tracing::warn!("{e}");
            }
        }
        self.refit_speeds();
    }

    /// Fits the machines' speeds and links again with this run's builds and copies so
    /// far, as often as [`offload_learn::Refits`] says: a machine or link that turns out
    /// slower or faster than planned gets the rest of the run's decisions right.
    pub(super) fn refit_speeds(&mut self) {
        self.slow_links_under_way();
        let now = self.now();
        let Some(h) = self.history else { return };
        if !self.refits.due(now) {
            return;
        }
        let Some(system) = self.machines[LOCAL].systems.first().cloned() else {
            return;
        };
        let knowledge = match h.knowledge(&system) {
            Ok(k) => k,
            Err(e) => return tracing::debug!("{e}"),
        };
        self.refits.fitted(knowledge.rows());
        for m in 0..self.machines.len() {
            let spec = &self.machines[m];
            if let Some((speed, per_system)) =
                knowledge.moved_speeds(&self.state_keys[m], spec, self.declared_speeds[m])
            {
                let (speed, per_system) = self.hedging.hedger.capped(m, speed, per_system);
                tracing::debug!(machine = %spec.name, "speed now {speed:.2}: {per_system:?}");
                self.machines[m].speed = speed;
                self.machines[m].system_speeds = per_system.clone();
                self.sched.set_speeds(m, speed, per_system);
            }
        }
        for m in 0..self.machines.len() {
            let learned = knowledge.link(&self.state_keys[m]);
            if learned.is_some() {
                self.link_now_measured(m);
            }
            let spec = &self.machines[m];
            let Some(link) = moved_link(spec, learned) else {
                continue;
            };
            tracing::debug!(machine = %spec.name, "link now {:.1} MB/s", link.bandwidth / 1e6);
            self.machines[m].bandwidth = link.bandwidth;
            self.machines[m].latency = link.latency;
            self.sched.set_link(m, link.bandwidth, link.latency);
            self.transport.set_link(m, link.bandwidth, link.latency);
        }
    }

    /// Links that carry their copies under way several times slower than planned
    /// ([`slower_under_way`]) are planned at what
    /// those copies show, before the first of them lands: on a first run every link is
    /// planned at the default until then, and a copy over a slow one can take tens of
    /// seconds.
    pub(super) fn slow_links_under_way(&mut self) {
        for m in 0..self.machines.len() {
            let spec = &self.machines[m];
            if spec.is_local {
                continue;
            }
            let Some(bound) = self.transport.link_bound(m, spec.latency) else {
                continue;
            };
            if slower_under_way(spec, bound) {
                tracing::debug!(machine = %spec.name, "link at most {:.1} MB/s by the copies under way", bound / 1e6);
                let latency = spec.latency;
                self.machines[m].bandwidth = bound;
                self.sched.set_link(m, bound, latency);
                self.transport.set_link(m, bound, latency);
                self.link_now_measured(m);
            }
        }
    }
}
