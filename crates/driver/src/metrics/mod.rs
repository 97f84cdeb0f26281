//! Prometheus metrics for operators: what the agent (`offload agent --metrics ADDR`) and
//! a long `offload build --metrics ADDR` are doing, served at `http://ADDR/metrics` in
//! Prometheus's text format ([`http`]). Nothing listens unless asked.
//!
//! [`Metrics`] holds the registry (the official `prometheus-client`) and the families
//! below; the agent records its builds through [`Metrics::build`], a run through
//! `job/metrics.rs`, which watches the events a run tells its user. Every metric
//! about a machine has the label `machine`: its store URI as the machines file writes
//! it (`local` for this machine).
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `offload_builds_running{machine}` | gauge | builds running there now |
//! | `offload_builds_queued{machine}` | gauge | builds waiting for a slot there (the agent) |
//! | `offload_builds_pending` | gauge | builds of the run not started yet (`offload build`: a build has no machine until it starts) |
//! | `offload_slots_held{machine}`, `offload_slots{machine}` | gauge | slots held by builds from this process; the machine's slots |
//! | `offload_builds_finished_total{machine}`, `offload_builds_failed_total{machine}` | counter | builds that ended there, built or failed |
//! | `offload_build_duration_seconds{machine}` | histogram | how long those builds took |
//! | `offload_bytes_total{route,from,to}` | counter | NAR bytes moved, by route (below) |
//! | `offload_machine_failures_total{machine}` | counter | connection failures: the machine was down for a while |
//! | `offload_quarantines_total{machine}`, `offload_machine_quarantined{machine}` | counter, gauge | quarantines started; 1 while the machine is skipped as quarantined |
//! | `offload_hedges_started_total`, `offload_hedges_won_total`, `offload_hedge_wasted_seconds_total` | counter | duplicates of overrunning builds: started, finished first, slot time spent on losers |
//!
//! Routes: `client_to_machine` and `machine_to_client` over this machine's link,
//! `relayed` from one builder to another through this machine (both of its links),
//! `builder_to_builder` straight between builders, `to_target` into a `--to` store.

pub mod http;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::reporter::ByteRoute;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MachineLabel {
    machine: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    route: String,
    from: String,
    to: String,
}

type ByMachine<M, C = fn() -> M> = Family<MachineLabel, M, C>;

/// Build durations from half a second to about two days.
fn durations() -> Histogram {
    Histogram::new(exponential_buckets(0.5, 4.0, 10))
}

/// The registry and every metric in it; shared by whatever records and the server.
pub struct Metrics {
    registry: Registry,
    running: ByMachine<Gauge>,
    queued: ByMachine<Gauge>,
    pending: Gauge,
    slots_held: ByMachine<Gauge>,
    slots: ByMachine<Gauge>,
    finished: ByMachine<Counter>,
    failed: ByMachine<Counter>,
    durations: ByMachine<Histogram>,
    bytes: Family<LinkLabels, Counter>,
    machine_failures: ByMachine<Counter>,
    quarantines: ByMachine<Counter>,
    quarantined: ByMachine<Gauge>,
    hedges_started: Counter,
    hedges_won: Counter,
    hedge_waste: Counter<f64, std::sync::atomic::AtomicU64>,
}

/// Who serves the metrics: each has only those that mean something for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// `offload agent`: builds queued per machine; no plan, no quarantine, no hedging.
    Agent,
    /// `offload build`: builds pending in the plan, quarantines, hedged duplicates.
    Run,
}

fn label(machine: &str) -> MachineLabel {
    MachineLabel {
        machine: machine.to_string(),
    }
}

impl Metrics {
    pub fn new(serving: Serving) -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            running: Family::default(),
            queued: Family::default(),
            pending: Gauge::default(),
            slots_held: Family::default(),
            slots: Family::default(),
            finished: Family::default(),
            failed: Family::default(),
            durations: Family::new_with_constructor(durations),
            bytes: Family::default(),
            machine_failures: Family::default(),
            quarantines: Family::default(),
            quarantined: Family::default(),
            hedges_started: Counter::default(),
            hedges_won: Counter::default(),
            hedge_waste: Counter::default(),
        };
        let mut registry = Registry::with_prefix("offload");
        m.register(&mut registry, serving);
        Metrics { registry, ..m }
    }

    /// Puts the metrics `serving` has in `r`, with their help texts.
    fn register(&self, r: &mut Registry, serving: Serving) {
        let m = self;
        r.register("builds_running", "Builds running", m.running.clone());
        match serving {
            Serving::Agent => r.register(
                "builds_queued",
                "Builds waiting for a slot on the machine",
                m.queued.clone(),
            ),
            Serving::Run => r.register(
                "builds_pending",
                "Builds of the run not started yet",
                m.pending.clone(),
            ),
        }
        r.register(
            "slots_held",
            "Slots held by builds from this process",
            m.slots_held.clone(),
        );
        r.register("slots", "The machine's slots", m.slots.clone());
        r.register(
            "builds_finished",
            "Builds that ended built",
            m.finished.clone(),
        );
        r.register(
            "builds_failed",
            "Builds that ended failed",
            m.failed.clone(),
        );
        r.register(
            "build_duration_seconds",
            "How long builds took",
            m.durations.clone(),
        );
        r.register("bytes", "NAR bytes moved, by route", m.bytes.clone());
        r.register(
            "machine_failures",
            "Connection failures of the machine",
            m.machine_failures.clone(),
        );
        if serving == Serving::Agent {
            return;
        }
        r.register("quarantines", "Quarantines started", m.quarantines.clone());
        r.register(
            "machine_quarantined",
            "1 while the machine is skipped as quarantined",
            m.quarantined.clone(),
        );
        r.register(
            "hedges_started",
            "Duplicates of overrunning builds started",
            m.hedges_started.clone(),
        );
        r.register(
            "hedges_won",
            "Duplicates that finished first",
            m.hedges_won.clone(),
        );
        r.register(
            "hedge_wasted_seconds",
            "Slot seconds spent on duplicates that lost or failed",
            m.hedge_waste.clone(),
        );
    }

    /// The metrics in Prometheus's text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }

    /// A build the agent carries out on `machine` (of `slots` slots; 0: unknown): queued
    /// until [`AgentBuild::started`], counted when [`AgentBuild::ended`].
    pub fn build(self: &Arc<Self>, machine: &str, slots: u32) -> AgentBuild {
        if slots > 0 {
            self.set_slots(machine, slots);
        }
        self.queued.get_or_create(&label(machine)).inc();
        AgentBuild {
            metrics: self.clone(),
            machine: machine.to_string(),
            state: Stage::Queued,
        }
    }

    /// `bytes` NAR bytes landed by `route`, from machine `from` to `to`.
    pub fn bytes(&self, route: ByteRoute, from: &str, to: &str, bytes: u64) {
        let labels = LinkLabels {
            route: route.as_str().to_string(),
            from: from.to_string(),
            to: to.to_string(),
        };
        self.bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// A connection to `machine` failed.
    pub fn machine_failed(&self, machine: &str) {
        self.machine_failures.get_or_create(&label(machine)).inc();
    }

    /// A build of the run runs on `machine` (`by` 1), or no longer (`by` -1).
    pub(crate) fn running(&self, machine: &str, by: i64) {
        self.running.get_or_create(&label(machine)).inc_by(by);
        self.slots_held.get_or_create(&label(machine)).inc_by(by);
    }

    pub(crate) fn set_slots(&self, machine: &str, slots: u32) {
        self.slots
            .get_or_create(&label(machine))
            .set(i64::from(slots));
    }

    pub(crate) fn set_pending(&self, builds: usize) {
        self.pending.set(builds as i64);
    }

    /// `machine` is skipped as quarantined; `now`: its quarantine starts now.
    pub(crate) fn quarantined(&self, machine: &str, now: bool) {
        if now {
            self.quarantines.get_or_create(&label(machine)).inc();
        }
        self.quarantined.get_or_create(&label(machine)).set(1);
    }

    pub(crate) fn hedge_started(&self) {
        self.hedges_started.inc();
    }

    /// The run's hedges when it ends: duplicates that won, slot seconds lost.
    pub(crate) fn hedges_ended(&self, wins: u32, waste_seconds: f64) {
        self.hedges_won.inc_by(u64::from(wins));
        self.hedge_waste.inc_by(waste_seconds);
    }

    pub(crate) fn ended(&self, machine: &str, ok: bool, seconds: f64) {
        let family = if ok { &self.finished } else { &self.failed };
        family.get_or_create(&label(machine)).inc();
        self.durations
            .get_or_create(&label(machine))
            .observe(seconds);
    }
}

/// One build of the agent, from its request to its end; what it still counts is undone
/// when it is dropped (the hook went away).
pub struct AgentBuild {
    metrics: Arc<Metrics>,
    machine: String,
    state: Stage,
}

enum Stage {
    Queued,
    Running(std::time::Instant),
    Done,
}

impl AgentBuild {
    /// It holds a slot and runs.
    pub fn started(&mut self) {
        if let Stage::Queued = self.state {
            let (m, at) = (&self.metrics, label(&self.machine));
            m.queued.get_or_create(&at).dec();
            m.running.get_or_create(&at).inc();
            m.slots_held.get_or_create(&at).inc();
            self.state = Stage::Running(std::time::Instant::now());
        }
    }

    /// It ended: built (`ok`) or failed, with what it moved: `sent` to the builder and
    /// `fetched` home. A build that never started failed on its machine's connection.
    pub fn ended(mut self, ok: bool, sent: u64, fetched: u64) {
        let (m, local) = (self.metrics.clone(), crate::fleet::LOCAL_NAME);
        if sent > 0 {
            m.bytes(ByteRoute::ClientToMachine, local, &self.machine, sent);
        }
        if fetched > 0 {
            m.bytes(ByteRoute::MachineToClient, &self.machine, local, fetched);
        }
        match self.state {
            Stage::Running(at) => m.ended(&self.machine, ok, at.elapsed().as_secs_f64()),
            _ => m.machine_failed(&self.machine),
        }
        self.release();
    }

    /// Takes it off the gauges, once.
    fn release(&mut self) {
        let (m, at) = (&self.metrics, label(&self.machine));
        match std::mem::replace(&mut self.state, Stage::Done) {
            Stage::Queued => {
                m.queued.get_or_create(&at).dec();
            }
            Stage::Running(_) => {
                m.running.get_or_create(&at).dec();
                m.slots_held.get_or_create(&at).dec();
            }
            Stage::Done => {}
        }
    }
}

impl Drop for AgentBuild {
    fn drop(&mut self) {
        self.release();
    }
}
