//! The machines during a run: quarantined ones skipped and the others probed before
//! the first build, a failing machine taken down (probed again after its backoff, or
//! lost for the run), a build that failed for a full disk told apart, and the slots
//! others hold on each, watched.

use std::future::Future;

use offload_sched::{Event, MachineId, NodeState, Outcome};

use super::{BuildTransport, NodeResult, Runner};
use crate::build::health::AfterFailure;
use crate::error::DriverError;
use crate::fleet::LOCAL;

impl<T: BuildTransport> Runner<'_, T> {
    /// Others held every slot the rest of the graph could use for `waited` seconds:
    /// what is left fails, naming the machines and their holders' lock files.
    pub(super) fn give_up_on_held_slots(&mut self, waited: f64) {
        let held: Vec<String> = (0..self.machines.len())
            .filter(|&m| self.sched.slots_held_elsewhere(m) > 0)
            .map(|m| {
                DriverError::SlotsBusy {
                    machine: self.machines[m].name.clone(),
                    slots: self.machines[m].slots,
                    dir: "here or on the machine".into(),
                    secs: waited as u64,
                }
                .with_hint()
            })
            .collect();
        let why = held.join("; ");
        self.reporter.machine_warning(&why);
        for (node, result) in self.results.iter_mut().enumerate() {
            if result.is_none() && *self.sched.state(node) == NodeState::Ready {
                *result = Some(NodeResult::Failed {
                    failure: format!("not built: {why}"),
                    log_tail: Vec::new(),
                });
            }
        }
    }

    /// Tells the scheduler how many slots of each machine others hold now.
    pub(super) async fn watch_slots(&mut self) {
        let held = self.transport.clone().slots_held_elsewhere().await;
        let now = self.now();
        for (machine, count) in held {
            let actions = self
                .sched
                .handle(Event::SlotsHeldElsewhere { machine, count }, now);
            self.apply(actions);
        }
    }

    /// Before the first build: skips the machines still quarantined by earlier runs,
    /// and probes the others while the first builds start: one that cannot be reached
    /// is said once (by its probe or by the first build there, whichever fails first)
    /// and its work goes elsewhere.
    pub(super) fn check_machines(&mut self) {
        for m in 0..self.machines.len() {
            if m == LOCAL || self.machines[m].slots == 0 {
                continue;
            }
            if let Some(why) = self.health.quarantined(m) {
                let name = &self.machines[m].name;
                self.reporter
                    .machine_warning(&format!("skipping {name}: {why}"));
                self.reporter.machine_event("machine_skipped", name, &why);
                let actions = self.sched.handle(Event::MachineLost { machine: m }, 0.0);
                self.apply(actions);
                continue;
            }
            let probe = self.probe(m);
            let handle = self.probes.spawn(async move { (m, probe.await) });
            self.first_probes.insert(m, handle);
        }
    }

    /// `machine`'s connection failed: it is down until a probe after its backoff, or
    /// lost for the run when it keeps failing. Its running builds go elsewhere.
    pub(super) fn machine_failed(&mut self, machine: MachineId, why: &str, doing: &str) {
        // A build there failed before the first probe answered: one failure, not two,
        // said as the probe would have said it.
        let doing = match self.first_probes.remove(&machine) {
            Some(probe) => {
                probe.abort();
                "skipping it"
            }
            None => doing,
        };
        self.hedge_machine_failing(machine);
        self.running.retain(|_, (handle, m)| {
            if *m == machine {
                handle.abort();
            }
            *m != machine
        });
        self.transport.forget_machine(machine);
        let name = self.machines[machine].name.clone();
        if self.transport.refused(machine) {
            // Not a fault that passes: no backoff, no quarantine; the fix is the user's.
            self.reporter.machine_warning(&format!(
                "{name} cannot be used ({why}); {doing}, and it is not tried again in this \
                 run: a retry would meet the same refusal"
            ));
            self.reporter.machine_event("machine_lost", &name, why);
            let actions = self
                .sched
                .handle(Event::MachineLost { machine }, self.now());
            self.apply(actions);
            return;
        }
        let (event, next, kind) = match self.health.failed(machine, why) {
            AfterFailure::RetryIn(wait) => {
                let probe = self.probe(machine);
                self.probes.spawn(async move {
                    tokio::time::sleep(wait).await;
                    (machine, probe.await)
                });
                (
                    Event::MachineDown { machine },
                    format!("trying it again in {} s", wait.as_secs_f64()),
                    "machine_lost",
                )
            }
            AfterFailure::Quarantined(until) => (
                Event::MachineLost { machine },
                format!(
                    "it failed too often: quarantined until {}",
                    crate::state::format_utc(until)
                ),
                "machine_quarantined",
            ),
        };
        self.reporter
            .machine_warning(&format!("{name} cannot be used ({why}); {doing}, {next}"));
        self.reporter.machine_event(kind, &name, why);
        let actions = self.sched.handle(event, self.now());
        self.apply(actions);
    }

    /// A probe of `machine`, bounded: a host that takes the connection and then says
    /// nothing (no keepalive notices a silent program) counts as down too.
    pub(super) fn probe(
        &self,
        machine: MachineId,
    ) -> impl Future<Output = Result<(), String>> + 'static {
        let limit = self.health.probe_timeout();
        let probe = self.transport.clone().probe(machine, self.cores[machine]);
        async move {
            match tokio::time::timeout(limit, probe).await {
                Ok(answer) => answer,
                Err(_) => Err(format!(
                    "no serve-protocol answer within {} s",
                    limit.as_secs()
                )),
            }
        }
    }

    pub(super) fn on_probed(&mut self, machine: MachineId, answer: Result<(), String>) {
        let first = self.first_probes.remove(&machine).is_some();
        match answer {
            Ok(()) => {
                if !first {
                    tracing::info!(machine = %self.machines[machine].name, "answers again");
                }
                // The probe's session waits in the pool for the next build there.
                self.sched.session_open(machine);
                let actions = self
                    .sched
                    .handle(Event::MachineBack { machine }, self.now());
                self.apply(actions);
            }
            Err(why) if first => self.machine_failed(machine, &why, "skipping it"),
            Err(why) => self.machine_failed(machine, &why, "still down"),
        }
    }

    /// `; lost: NAME (why); …` for the machines whose connections failed in this run.
    pub(super) fn why_machines_were_lost(&self) -> String {
        let failures = self.health.failures();
        if failures.is_empty() {
            return String::new();
        }
        let each: Vec<String> = failures
            .iter()
            .map(|(name, why)| format!("{name} ({why})"))
            .collect();
        format!(
            "; not used, as their connections failed: {}",
            each.join("; ")
        )
    }
}

/// Whether a build failed because its machine's disk is full: Nix says so in its
/// message when the store or the build directory has too little space left after a
/// failure ("may have been caused by lack of free disk space", `derivation-goal.cc`), and
/// the builder's own log names the error (ENOSPC) when Nix's check came too late.
pub(super) fn out_of_space(outcome: &Outcome, log_tail: &[String]) -> bool {
    match outcome {
        Outcome::Failed { reason } => {
            reason.contains("lack of free disk space")
                || log_tail
                    .iter()
                    .any(|l| l.contains("No space left on device"))
        }
        _ => false,
    }
}
