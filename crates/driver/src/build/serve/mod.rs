//! The runner's transport over real machines: build tasks and copies spoken in the serve
//! protocol over pooled sessions. For a build of derivation D on machine M it ships M the
//! inputs it lacks through the transfer engine (`crate::transfer`), runs BuildDerivation
//! while its log streams, and records the outputs' infos and how long the build itself
//! took.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use offload_nix::serve::{BuildResult, BuildSettings};
use offload_sched::{MachineId, Outcome};
use tokio::sync::mpsc;

use super::log::BuildLog;
use super::runner::{BuildFacts, BuildTask, BuildTransport, TaskDone};
use super::{BuildNode, BuildOptions, LogDestination, Reporter};
use crate::error::DriverError;
use crate::fleet::{MachineConfig, LOCAL};
use crate::session::{Pool, ServeConn};
use crate::slots::remote::RemoteSlots;
use crate::slots::SlotLedger;
use crate::transfer::{
    DeliveryTarget, RouteBytes, TransferEngine, TransferNews, LANES_PER_MACHINE,
};
use crate::trust::LocalAccess;

mod check;

/// Sessions with every machine of the fleet, and what each store holds.
pub(crate) struct ServeTransport {
    /// Sessions, what each store holds, and the copies between them.
    engine: Arc<TransferEngine>,
    pub(super) names: Vec<String>,
    pub(super) nodes: Arc<[BuildNode]>,
    settings: BuildSettings,
    local_access: LocalAccess,
    builders_use_substitutes: bool,
    pub(super) logs: LogDestination,
    /// `.drv` paths to check rather than build (`--check`).
    check: HashSet<String>,
    pub(super) reporter: Arc<dyn Reporter>,
    /// Shared with other offload runs and Nix's hook; slots per machine (none: local).
    ledger: SlotLedger,
    slots: Vec<u32>,
    /// The same slots locked on each builder, shared with clients on other machines.
    remote_slots: RemoteSlots,
    /// Those slots also leased in the shared state, when there is one.
    leases: Option<Arc<crate::state::leases::Leases>>,
    /// Machines that refused a session for good.
    refused: Vec<std::sync::atomic::AtomicBool>,
    /// When the builders were last asked for the slots others hold there.
    remote_asked: std::sync::Mutex<Option<Instant>>,
    /// Where the requested outputs go instead of here (`--to`).
    delivery: Option<DeliveryTarget>,
}

impl ServeTransport {
    /// Sessions with `machines` (none opened yet), and the infos of every input that is
    /// no node's output, read from the local store.
    pub(crate) async fn connect(
        machines: Vec<MachineConfig>,
        masters: Vec<Arc<crate::ssh::master::SshMaster>>,
        nodes: Arc<[BuildNode]>,
        options: &BuildOptions,
        reporter: Arc<dyn Reporter>,
    ) -> Result<ServeTransport, DriverError> {
        let mut consumers: HashMap<String, usize> = HashMap::new();
        for input in nodes.iter().flat_map(|n| &n.inputs) {
            *consumers.entry(input.clone()).or_default() += 1;
        }
        let specs = machines.iter().map(|m| m.spec.clone()).collect();
        let pools: Vec<Pool> = machines
            .iter()
            .zip(masters)
            .map(|(m, master)| {
                let mut endpoint = m.endpoint.clone();
                for (name, value) in &options.session_options {
                    endpoint
                        .extra_args
                        .extend(["--option".into(), name.clone(), value.clone()]);
                }
                Pool::with_master(master, endpoint)
            })
            .collect();
        let masters: Vec<_> = pools.iter().map(Pool::master).collect();
        let transport = ServeTransport {
            refused: machines.iter().map(|_| Default::default()).collect(),
            slots: machines
                .iter()
                .map(|m| m.spec.slots * u32::from(!m.spec.is_local))
                .collect(),
            ledger: SlotLedger::from_env(),
            remote_asked: std::sync::Mutex::new(None),
            remote_slots: RemoteSlots::new(machines.iter().map(|m| {
                (
                    m.endpoint.clone(),
                    m.spec.slots * u32::from(!m.spec.is_local),
                )
            }))
            .with_masters(masters),
            leases: crate::state::leases::Leases::open(),
            names: machines.iter().map(|m| m.spec.name.clone()).collect(),
            engine: Arc::new(
                TransferEngine::new(pools, specs, LANES_PER_MACHINE)
                    .with_consumers(consumers)
                    .with_reporter(reporter.clone())
                    .with_signer(options.local_access.signer.clone())
                    .with_relay_forced(options.routes.relay)
                    .with_forwarded_agent(options.routes.forward_agent),
            ),
            delivery: options.routes.deliver_to.clone(),
            nodes,
            settings: options.settings.clone(),
            local_access: options.local_access.clone(),
            builders_use_substitutes: options.builders_use_substitutes,
            logs: options.logs.clone(),
            check: options.check.clone(),
            reporter,
        };
        transport.learn_local_inputs().await?;
        Ok(transport)
    }

    fn pool(&self, machine: MachineId) -> &Pool {
        self.engine.pool(machine)
    }

    /// Leaves `pairs` to be probed when a copy between them is first due
    /// ([`TransferEngine::probe_when_due`]).
    pub(crate) fn probe_when_due(&self, pairs: Vec<(MachineId, MachineId)>) {
        self.engine.probe_when_due(pairs);
    }

    /// Remembers that `machine` refused a session for good (authentication, host key, a
    /// login that prints before the protocol, a protocol too old), or has no room for
    /// what it was to build: another attempt would meet the same answer.
    fn note_refusal(&self, machine: MachineId, e: &DriverError) {
        if matches!(
            e,
            DriverError::SshAuth { .. }
                | DriverError::SshHostKey { .. }
                | DriverError::DaemonOnly { .. }
                | DriverError::NotServeProtocol { .. }
                | DriverError::IncompatibleVersion { .. }
                | DriverError::NoRoom { .. }
                | DriverError::OtherStoreDir { .. }
        ) {
            self.refused[machine].store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl BuildTransport for ServeTransport {
    async fn build(self: Arc<Self>, task: BuildTask) -> TaskDone {
        let (node, machine, cores) = (task.node, task.machine, task.cores);
        let started = Instant::now();
        let mut log = BuildLog::new(&self, node, machine);
        let mut facts = BuildFacts::default();
        let (outcome, machine_down) = self
            .build_on(node, machine, cores, &mut log, &mut facts)
            .await;
        log.finish().await;
        TaskDone {
            node,
            machine,
            outcome,
            log_tail: log.tail.into_iter().collect(),
            seconds: started.elapsed().as_secs_f64(),
            facts,
            machine_down,
        }
    }

    async fn fetch(self: Arc<Self>, paths: Vec<String>) -> Result<(), DriverError> {
        match &self.delivery {
            Some(target) => self.engine.deliver(&paths, target).await.map(|_| ()),
            None => self
                .engine
                .ensure_on(LOCAL, &paths, None, false)
                .await
                .map(|_| ()),
        }
    }

    fn route_bytes(&self) -> RouteBytes {
        self.engine.route_bytes()
    }

    fn set_link(&self, machine: MachineId, bandwidth: f64, latency: f64) {
        self.engine.set_link(machine, bandwidth, latency);
    }

    fn set_peer_link(&self, from: MachineId, to: MachineId, link: offload_sched::Link) {
        self.engine.add_peer(from, to, link);
    }

    async fn send_ahead(self: Arc<Self>, machine: MachineId, paths: Vec<String>) {
        if let Err(e) = self.engine.ensure_on(machine, &paths, None, false).await {
            tracing::debug!(machine = %self.names[machine], "sending outputs ahead failed: {e}");
        }
    }

    fn forget_machine(&self, machine: MachineId) {
        self.engine.forget_machine(machine);
    }

    fn take_news(&self) -> TransferNews {
        self.engine.take_news()
    }

    fn link_bound(&self, machine: MachineId, latency: f64) -> Option<f64> {
        self.engine.crossing_bound(machine, latency)
    }

    fn refused(&self, machine: MachineId) -> bool {
        self.refused[machine].load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn probe(self: Arc<Self>, machine: MachineId, cores: Option<u32>) -> Result<(), String> {
        // The session opened goes to the pool, for the first build there (a build alone
        // gets `cores`) or the first copies; the slot broker starts meanwhile, so the
        // first build there waits for neither.
        // The room its store has is asked meanwhile, by the time the first copy there
        // needs it.
        let engine = self.engine.clone();
        tokio::spawn(async move { engine.learn_space(machine).await });
        let (opened, ()) = tokio::join!(
            self.pool(machine).get_with_cores(cores),
            self.remote_slots.warm(machine)
        );
        let conn = opened.map_err(|e| {
            self.note_refusal(machine, &e);
            e.with_hint()
        })?;
        self.pool(machine).put(conn);
        Ok(())
    }

    async fn close(&self) {
        self.engine.close().await;
    }

    async fn slots_held_elsewhere(self: Arc<Self>) -> Vec<(MachineId, u32)> {
        let machines: Vec<(MachineId, String, u32)> = (0..self.slots.len())
            .filter(|&m| self.slots[m] > 0 && !self.refused(m))
            .map(|m| (m, self.pool(m).endpoint().name.clone(), self.slots[m]))
            .collect();
        if machines.is_empty() {
            return Vec::new();
        }
        let ledger = self.ledger.clone();
        // A ledger this process cannot use counts nothing (the builds' own `hold` says
        // why); the builders' counts below still do.
        let here: Vec<(MachineId, u32)> = tokio::task::spawn_blocking(move || {
            machines
                .into_iter()
                .map(|(m, uri, slots)| (m, ledger.held_elsewhere(&uri, slots).unwrap_or(0)))
                .collect()
        })
        .await
        .unwrap_or_default();
        // The builders' own counts, as last asked (other clients hold slots there too);
        // asked again in the background, at most once a second.
        let due = {
            let mut last = self.remote_asked.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= REMOTE_SLOTS_INTERVAL);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            let transport = self.clone();
            tokio::spawn(async move { transport.remote_slots.refresh_others().await });
        }
        here.into_iter()
            .map(|(m, n)| (m, n.max(self.remote_slots.held_elsewhere(m).unwrap_or(0))))
            .collect()
    }
}

/// How often the builders are asked how many of their slots other clients hold: each
/// asking forks a `flock` per slot there.
const REMOTE_SLOTS_INTERVAL: Duration = Duration::from_secs(1);

impl ServeTransport {
    /// Learns the infos of every input that is no node's output: they are in the local
    /// store (evaluation put them there, or Nix fetched them).
    async fn learn_local_inputs(&self) -> Result<(), DriverError> {
        let outputs: std::collections::HashSet<&str> = self
            .nodes
            .iter()
            .flat_map(|n| n.outputs.iter().map(|(_, p)| p.as_str()))
            .collect();
        let mut roots: Vec<String> = self
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter())
            .filter(|p| !outputs.contains(p.as_str()))
            .cloned()
            .collect();
        roots.sort();
        roots.dedup();
        if roots.is_empty() {
            return Ok(());
        }
        self.learn_local_closure_of(&roots).await
    }

    /// Learns the infos of the closure of `roots`, all valid in the local store.
    async fn learn_local_closure_of(&self, roots: &[String]) -> Result<(), DriverError> {
        self.engine.learn_closure(LOCAL, roots).await
    }

    /// Ships the inputs, builds, and learns the outputs. Returns the outcome and whether
    /// the machine is to be taken out of the run: as for Nix's build hook, a machine whose
    /// session breaks (it cannot be reached, or the connection dies mid-operation) gets no
    /// more work, and what it was doing runs elsewhere.
    async fn build_on(
        &self,
        node: usize,
        machine: MachineId,
        cores: Option<u32>,
        log: &mut BuildLog<'_>,
        facts: &mut BuildFacts,
    ) -> (Outcome, bool) {
        // Held until the build ends, so no other offload or Nix hook overbooks the machine.
        // Taken without waiting: when others hold every slot, the build goes back to the
        // scheduler, which places it where a slot is free.
        let uri = &self.pool(machine).endpoint().name;
        let _slot = match self
            .ledger
            .hold(uri, self.slots[machine], Duration::ZERO)
            .await
        {
            Ok(slot) => slot,
            Err(DriverError::SlotsBusy { .. }) => return (Outcome::Deferred, false),
            Err(e) => return (lost(e), false),
        };
        let take = self.remote_slots.take(machine, Duration::ZERO);
        let n = &self.nodes[node];
        let lease = |slot: Option<&crate::slots::remote::RemoteSlot>| {
            (self.leases.as_ref().zip(slot))
                .map(|(leases, slot)| leases.take(uri, slot.slot(), &n.name, n.estimate))
        };
        if self.check.contains(&self.nodes[node].drv_path) {
            let _remote_slot = match take.await {
                Ok(slot) => slot,
                Err(e) => return slot_refused(e),
            };
            let _lease = lease(_remote_slot.as_ref());
            return self.check_on(node, machine, log).await;
        }
        // The builder's slot is asked for while the session opens and the inputs go:
        // a machine's first builds wait for its broker to start and for their sessions
        // to open, one after the other before (over ssh, 3 s of a tiny build's slot on
        // a busy client). The build itself starts only once the slot is held.
        let (taken, session) =
            tokio::join!(take, self.session_with_inputs(node, machine, cores, facts));
        let _remote_slot = match taken {
            Ok(slot) => slot,
            Err(e) => {
                if let Ok(conn) = session {
                    self.pool(machine).put(conn);
                }
                return slot_refused(e);
            }
        };
        let _lease = lease(_remote_slot.as_ref());
        let mut conn = match session {
            Ok(conn) => conn,
            Err(ended) => return ended,
        };
        let (result, build_seconds) = self.build_with_log(node, machine, &mut conn, log).await;
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.note_refusal(machine, &e);
                return (lost(e), true);
            }
        };
        if let BuildOutcome::Failed(message) = result {
            self.pool(machine).put(conn);
            let mut reason = if message.is_empty() {
                format!("build of {} failed", self.nodes[node].drv_path)
            } else {
                message
            };
            reason.push_str(&log.kept_note());
            return (Outcome::Failed { reason }, false);
        }
        self.learn_outputs(node, machine, conn, build_seconds, facts)
            .await
    }

    /// A session on `machine` with `cores`, once the node's inputs are there: an idle
    /// one, or one that opens while the inputs go over sessions of their own. Else how
    /// the build ends, and whether the machine is to be taken out.
    async fn session_with_inputs(
        &self,
        node: usize,
        machine: MachineId,
        cores: Option<u32>,
        facts: &mut BuildFacts,
    ) -> Result<ServeConn, (Outcome, bool)> {
        let n = &self.nodes[node];
        // A builder may fetch what it lacks from its own substituters when allowed.
        let substitute = self.builders_use_substitutes && machine != LOCAL;
        let shipping = Instant::now();
        // Without an idle session with these cores, one opens (an ssh handshake) while
        // the inputs go over sessions of their own.
        let mut idle = self.pool(machine).take_idle(cores);
        let opening = idle.is_none();
        let open = async {
            if opening {
                Some(self.pool(machine).get_with_cores(cores).await)
            } else {
                None
            }
        };
        let ship = async {
            let shipped = self
                .engine
                .ensure_on(machine, &n.inputs, idle.as_mut(), substitute)
                .await;
            facts.inputs_seconds = Some(shipping.elapsed().as_secs_f64());
            shipped
        };
        let (opened, shipped) = tokio::join!(open, ship);
        let opened = opened.unwrap_or_else(|| Ok(idle.take().expect("a session was idle")));
        let conn = match opened {
            Ok(c) => c,
            Err(e) => {
                self.note_refusal(machine, &e);
                return Err((lost(e), true));
            }
        };
        let mut conn = conn;
        let held = match shipped {
            // Held by the build's own session until it ends, sent again if the builder's
            // garbage collector took any meanwhile.
            Ok(_) => {
                self.engine
                    .hold_inputs(machine, &n.inputs, &mut conn, substitute)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = held {
            // The inputs go over sessions of their own: a failure of this machine's
            // connection takes it out as a broken build session would, and so does a
            // store without room for them.
            self.note_refusal(machine, &e);
            let down = conn.is_broken()
                || self.refused(machine)
                || (e.is_connection_failure() && e.machine() == self.pool(machine).endpoint().name);
            return Err((lost(e), down));
        }
        Ok(conn)
    }

    /// Builds the node on `conn` while its log streams into `log`, to the log's end;
    /// with the build's own time, which is what the planner learns.
    async fn build_with_log(
        &self,
        node: usize,
        machine: MachineId,
        conn: &mut ServeConn,
        log: &mut BuildLog<'_>,
    ) -> (Result<BuildOutcome, DriverError>, f64) {
        let n = &self.nodes[node];
        // As Nix's build hook does: the inputs are the whole shipped closure, as sources.
        let mut drv = n.drv.clone();
        drv.input_srcs = self.engine.registry().closure(&n.inputs);
        drv.input_srcs.sort();

        let (tx, mut rx) = mpsc::unbounded_channel();
        conn.set_log_sink(Some(tx));
        // A nix-daemon builds a derivation it does not hold only for its trusted users;
        // anyone may have it build a valid `.drv` by its path, as `nix-build` does.
        let by_path = machine == LOCAL && !self.local_access.trusted;
        // The build's own time, its inputs' copies left out, is what the planner learns.
        let build_started = Instant::now();
        let result = {
            let build = async {
                if by_path {
                    conn.build_paths(&[n.drv_output_spec()], &self.settings)
                        .await
                        .map(BuildOutcome::from_build_paths)
                } else {
                    conn.build_derivation(&n.drv_path, &drv, &self.settings)
                        .await
                        .map(BuildOutcome::from_build_result)
                }
            };
            tokio::pin!(build);
            loop {
                tokio::select! {
                    r = &mut build => break r,
                    Some(line) = rx.recv() => log.push(line),
                }
            }
        };
        // The log's last lines may still be in the pipe when the result arrives: the
        // pump reads them, then closes the sink, so this reads to the log's true end.
        let build_seconds = build_started.elapsed().as_secs_f64();
        conn.finish_log_sink().await;
        while let Some(line) = rx.recv().await {
            log.push(line);
        }
        (result, build_seconds)
    }

    /// Learns the outputs of a build that succeeded on `machine` (puts `conn` back):
    /// their infos, registered there, and the facts the planner learns.
    async fn learn_outputs(
        &self,
        node: usize,
        machine: MachineId,
        mut conn: ServeConn,
        build_seconds: f64,
        facts: &mut BuildFacts,
    ) -> (Outcome, bool) {
        let n = &self.nodes[node];
        let outputs: Vec<String> = n.outputs.iter().map(|(_, p)| p.clone()).collect();
        let infos = match conn.query_path_infos(&outputs).await {
            Ok(infos) => infos,
            Err(e) => return (lost(e), true),
        };
        self.pool(machine).put(conn);
        if infos.len() < outputs.len() {
            let reason = format!(
                "{} reported success but not all of its outputs are valid there",
                n.drv_path
            );
            return (Outcome::Failed { reason }, false);
        }
        facts.build_seconds = Some(build_seconds);
        facts.output_bytes = Some(infos.iter().map(|i| i.nar_size).sum());
        let mut registry = self.engine.registry();
        for info in infos {
            registry.insert(info, machine);
        }
        (Outcome::Built, false)
    }
}

/// How a build ends that did not get its slot on the builder: another client holds
/// them all (as for the local ledger, it goes back to the scheduler), or the lock failed.
fn slot_refused(e: DriverError) -> (Outcome, bool) {
    match e {
        DriverError::SlotsBusy { .. } => (Outcome::Deferred, false),
        e => (lost(e), false),
    }
}

fn lost(e: DriverError) -> Outcome {
    // The reason travels as text to the final report: the next step goes with it.
    Outcome::Lost {
        reason: e.with_hint(),
    }
}

/// How a build ended, whichever way it was asked for.
enum BuildOutcome {
    Built,
    /// Nix's message.
    Failed(String),
}

impl BuildOutcome {
    fn from_build_result(r: BuildResult) -> Self {
        if r.status.is_success() {
            BuildOutcome::Built
        } else if r.error_msg.is_empty() {
            BuildOutcome::Failed(format!("{:?}", r.status))
        } else {
            BuildOutcome::Failed(r.error_msg)
        }
    }

    fn from_build_paths(r: Result<(), (u64, String)>) -> Self {
        match r {
            Ok(()) => BuildOutcome::Built,
            Err((_, message)) => BuildOutcome::Failed(message),
        }
    }
}
