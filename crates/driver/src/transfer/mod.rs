//! The transfer engine: how store paths move between the machines of a run, for builds
//! and for `offload copy` alike.
//!
//! Each NAR streams from a DumpStorePath on its source straight into an AddToStoreNar
//! on its target, through offload's memory only. The engine follows the scheduler's
//! model of transfers ([`offload_sched::route`]): the source is this machine's store
//! when it has the path, else the holder with the quickest link; a path that several
//! builds need stops in this machine's store on the way.
//!
//! - Paths are released in dependency order: one starts when every path it refers to
//!   is on the target, since Nix refuses a path whose references are missing.
//! - Several copies run to one machine at once, up to its lanes; each on its own pair
//!   of pooled sessions.
//! - A path goes to a machine once, however many builds want it at the same time: the
//!   later ones wait for that copy.
//! - A failed copy registers nothing there; the ones already done stay done.
//!
//! Dependency order and chains are in `order.rs`, the streaming and timing of each copy
//! in `send.rs`; `offload copy` ([`copy_closure`]) runs the same engine between two
//! stores, and [`PathRegistry`] knows which store holds what.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use offload_sched::{route, MachineId, MachineSpec};
use tokio::sync::Semaphore;

use crate::error::DriverError;
use crate::reporter::Reporter;
use crate::session::{Pool, ServeConn};
use crate::trust::signing::PathSigner;

mod copy;
mod deliver;
pub mod direct;
mod hold;
mod order;
mod paths;
mod peer;
mod reach;
pub mod routes;
mod send;

pub use crate::reporter::human_bytes;
pub use crate::state::report::RouteBytes;
pub use copy::{copy_closure, CopyFailure, CopyOptions, CopyStats};
pub use deliver::{Delivered, DeliveryTarget};
pub(crate) use hold::directory_on_disk;
pub use hold::StoreSpace;
pub use paths::PathRegistry;
pub use peer::{PeerRecord, Unreachable};
pub use reach::{cause, unreachable_note, Probed};

/// How copies go and where the requested outputs end up.
#[derive(Debug, Clone, Default)]
pub struct RouteOptions {
    /// Every copy goes through this machine (`--relay`).
    pub relay: bool,
    /// This machine's ssh agent goes with the copies builders make to others
    /// (`--forward-agent`).
    pub forward_agent: bool,
    /// The requested outputs go there rather than here (`--to`).
    pub deliver_to: Option<DeliveryTarget>,
}

impl RouteOptions {
    /// `--dry-run`'s word on routes, for a fleet of `builders`: which way copies
    /// between builders and the requested outputs would go.
    pub fn describe(&self, builders: usize) -> String {
        let mut text = String::from("routes:\n");
        if builders > 1 {
            text.push_str(if self.relay {
                "  between builders: through this machine (--relay)\n"
            } else {
                "  between builders: straight from one to the other where it reaches the other \
                 by its own ssh (each pair probed once and kept), else through this machine\n"
            });
        }
        match &self.deliver_to {
            Some(target) if target.reachable_from_builders && !self.relay => {
                text.push_str(&format!(
                "  requested outputs: to {}, straight from the builders that hold them (through \
                 this machine for one that cannot reach it); nothing comes here\n",
                target.uri
            ))
            }
            Some(target) => text.push_str(&format!(
                "  requested outputs: to {}, through this machine without entering its store\n",
                target.uri
            )),
            None => text.push_str("  requested outputs: to this machine's store\n"),
        }
        text
    }
}

/// Copies to one machine at once during builds. They hide the round trip each path
/// costs on a link with latency. Into a loopback store on a 2-core machine, where the
/// disk and hashing bound a copy, more lanes do not help: `JOBS=N PATHS=400 MB=200
/// scripts/bench-copy.sh` took 0.69 s with 1 lane, 0.73 s with 2, 0.83 s with 4 and
/// 0.96 s with 8 (`nix copy` 0.85–1.46 s in the same runs).
pub const LANES_PER_MACHINE: usize = 4;

/// A copy between this machine and another, timed, for learning the link.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferRecord {
    /// The other machine.
    pub machine: MachineId,
    /// From this machine to it (else from it to this machine).
    pub to_machine: bool,
    pub bytes: u64,
    pub seconds: f64,
    /// Copies over that link when it started, this one included.
    pub concurrent: u32,
}

/// What happened since it was last asked ([`TransferEngine::take_news`]).
#[derive(Debug, Default)]
pub struct TransferNews {
    /// Paths that became valid on a machine by a copy.
    pub landed: Vec<(String, MachineId)>,
    pub transfers: Vec<TransferRecord>,
    /// Copies straight from one machine to another.
    pub peer_transfers: Vec<PeerRecord>,
    /// Pairs that could not copy directly: their copies relay from now on.
    pub unreachable: Vec<Unreachable>,
    /// Pairs probed, with their answers.
    pub probed: Vec<Probed>,
}

/// The closure [`TransferEngine::ensure_on`] made valid, in numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Landing {
    /// Paths in the closure asked for.
    pub closure: usize,
    /// Of those, valid there already (known, or the machine said so).
    pub already_present: usize,
}

/// Copies crossing one link: when each started and its NAR's size, keyed by the call
/// that sends it and its place in that call.
type Crossing = HashMap<(u64, usize), (Instant, u64)>;

/// Held while one path goes to one machine.
type PathGate = Arc<tokio::sync::Mutex<()>>;

/// Sessions with every machine, what each store holds, and the copies between them.
pub struct TransferEngine {
    pools: Vec<Pool>,
    /// The machines as the model sees them; a pair that fails to copy directly loses
    /// its peer link here.
    specs: std::sync::RwLock<Vec<MachineSpec>>,
    /// Each machine's store URI as Nix on another machine opens it (None: only this
    /// machine reaches it), for direct copies to it.
    peer_uris: Vec<Option<String>>,
    /// Forward this machine's ssh agent to the sources of direct copies.
    forward_agent: bool,
    /// Every copy goes through this machine (`--relay`).
    relay_forced: bool,
    /// Machines that could not send to the delivery target themselves.
    target_unreachable: Mutex<HashSet<String>>,
    /// Held while a delivery to the target runs.
    delivering: tokio::sync::Mutex<()>,
    /// Paths the delivery target has.
    on_target: Mutex<HashSet<String>>,
    /// Pairs to probe when a copy between them is first due, each probed once.
    pair_probes: Mutex<HashMap<(MachineId, MachineId), reach::PairProbe>>,
    /// Direct copies running per (source, target).
    pairs_busy: Mutex<HashMap<(MachineId, MachineId), u32>>,
    /// NAR bytes over this machine's links, straight between builders, and to the
    /// delivery target.
    client_bytes: AtomicU64,
    direct_bytes: AtomicU64,
    target_bytes: AtomicU64,
    registry: Mutex<PathRegistry>,
    /// How many builds take each store path as an input.
    consumers: HashMap<String, usize>,
    /// Copies to each machine at once.
    lanes: Vec<Semaphore>,
    lanes_per_machine: usize,
    /// A path on its way to a machine: wants of the same path wait for that copy.
    copying: Mutex<HashMap<(MachineId, String), PathGate>>,
    /// Copies crossing each machine's link now.
    on_link: Vec<AtomicU32>,
    /// Those that cross that link alone.
    crossing: Mutex<Vec<Crossing>>,
    calls: AtomicU64,
    news: Mutex<TransferNews>,
    copied: AtomicUsize,
    bytes: AtomicU64,
    reporter: Option<Arc<dyn Reporter>>,
    /// Signs what enters this machine's store (for a daemon that trusts the key).
    signer: Option<PathSigner>,
    /// This machine, when it is one of the fleet.
    client: Option<MachineId>,
    /// The room each machine's store has.
    space: hold::SpaceLedger,
}

impl TransferEngine {
    /// An engine over `pools`, one per machine of `specs` (same order), copying up to
    /// `lanes` paths to one machine at once.
    pub fn new(pools: Vec<Pool>, specs: Vec<MachineSpec>, lanes: usize) -> TransferEngine {
        let n = pools.len();
        let lanes = lanes.max(1);
        TransferEngine {
            client: specs.iter().position(|s| s.is_local),
            peer_uris: pools
                .iter()
                .map(|p| direct::uri_from_elsewhere(p.endpoint()))
                .collect(),
            forward_agent: false,
            relay_forced: false,
            target_unreachable: Mutex::new(HashSet::new()),
            delivering: tokio::sync::Mutex::new(()),
            on_target: Mutex::new(HashSet::new()),
            pairs_busy: Mutex::new(HashMap::new()),
            pair_probes: Mutex::new(HashMap::new()),
            client_bytes: AtomicU64::new(0),
            direct_bytes: AtomicU64::new(0),
            target_bytes: AtomicU64::new(0),
            lanes: (0..n).map(|_| Semaphore::new(lanes)).collect(),
            lanes_per_machine: lanes,
            on_link: (0..n).map(|_| AtomicU32::new(0)).collect(),
            crossing: Mutex::new(vec![HashMap::new(); n]),
            calls: AtomicU64::new(0),
            pools,
            specs: std::sync::RwLock::new(specs),
            registry: Mutex::new(PathRegistry::default()),
            consumers: HashMap::new(),
            copying: Mutex::new(HashMap::new()),
            news: Mutex::new(TransferNews::default()),
            copied: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            reporter: None,
            signer: None,
            space: hold::SpaceLedger::new(n),
        }
    }

    /// Tells the engine how many builds take each path as an input (for routes).
    pub fn with_consumers(mut self, consumers: HashMap<String, usize>) -> Self {
        self.consumers = consumers;
        self
    }

    pub fn with_reporter(mut self, reporter: Arc<dyn Reporter>) -> Self {
        self.reporter = Some(reporter);
        self
    }

    pub fn with_signer(mut self, signer: Option<PathSigner>) -> Self {
        self.signer = signer;
        self
    }

    /// Forwards this machine's ssh agent to the machines that copy to others directly.
    pub fn with_forwarded_agent(mut self, forward: bool) -> Self {
        self.forward_agent = forward;
        self
    }

    /// Sends every copy through this machine (`--relay`): no machine sends to another
    /// itself.
    pub fn with_relay_forced(mut self, relay: bool) -> Self {
        self.relay_forced = relay;
        if relay {
            for spec in self.specs_mut().iter_mut() {
                spec.peers.clear();
            }
        }
        self
    }

    /// The machines as the model sees them now.
    fn specs(&self) -> std::sync::RwLockReadGuard<'_, Vec<MachineSpec>> {
        self.specs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn specs_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<MachineSpec>> {
        self.specs.write().unwrap_or_else(|p| p.into_inner())
    }

    /// NAR bytes moved so far, by route.
    pub fn route_bytes(&self) -> RouteBytes {
        RouteBytes {
            client_links: self.client_bytes.load(Ordering::Relaxed),
            builder_to_builder: self.direct_bytes.load(Ordering::Relaxed),
            to_target: self.target_bytes.load(Ordering::Relaxed),
        }
    }

    /// `machine`'s endpoint for a command run there: over its shared connection when
    /// one is up, with the agent forwarded when asked.
    async fn command_endpoint(&self, machine: MachineId) -> crate::ssh::Endpoint {
        let pool = &self.pools[machine];
        let mut endpoint = pool.endpoint().clone();
        endpoint.control_path = pool.master().socket().await.ok().flatten();
        endpoint.forward_agent = self.forward_agent;
        endpoint
    }

    pub fn pool(&self, machine: MachineId) -> &Pool {
        &self.pools[machine]
    }

    pub fn machines(&self) -> usize {
        self.pools.len()
    }

    pub fn registry(&self) -> std::sync::MutexGuard<'_, PathRegistry> {
        // The registry stays consistent through a panic elsewhere: every change is one call.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What landed and what was timed since the last call.
    pub fn take_news(&self) -> TransferNews {
        std::mem::take(&mut *Self::lock(&self.news))
    }

    /// The most `machine`'s link can carry by what the copies crossing it now show
    /// ([`offload_learn::bound_under_way`]).
    pub fn crossing_bound(&self, machine: MachineId, latency: f64) -> Option<f64> {
        let crossing = Self::lock(&self.crossing);
        let copies: Vec<(f64, u64)> = crossing
            .get(machine)?
            .values()
            .map(|&(started, bytes)| (started.elapsed().as_secs_f64(), bytes))
            .collect();
        offload_learn::bound_under_way(&copies, latency)
    }

    /// Paths copied and their NAR bytes, over the engine's life.
    pub fn copied(&self) -> (usize, u64) {
        (
            self.copied.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Learns the infos of the closure of `roots`, all valid on `machine`.
    pub async fn learn_closure(
        &self,
        machine: MachineId,
        roots: &[String],
    ) -> Result<(), DriverError> {
        let mut conn = self.pools[machine].get().await?;
        let closure = conn.query_closure(roots, false).await?;
        let infos = conn.query_path_infos(&closure).await?;
        self.pools[machine].put(conn);
        if let Some(lost) = closure
            .iter()
            .find(|p| !infos.iter().any(|i| &i.path == *p))
        {
            // Garbage-collected there between the two queries.
            return Err(DriverError::NotValid {
                machine: self.pools[machine].endpoint().name.clone(),
                path: lost.clone(),
            });
        }
        let mut registry = self.registry();
        for info in infos {
            registry.insert(info, machine);
        }
        Ok(())
    }

    /// Makes the closure of `paths` valid on `machine`, copying what it lacks. `conn`,
    /// when given, is a session with `machine` for the question of what it has;
    /// `substitute` lets it fetch those from its own substituters first.
    pub async fn ensure_on(
        self: &Arc<Self>,
        machine: MachineId,
        paths: &[String],
        conn: Option<&mut ServeConn>,
        substitute: bool,
    ) -> Result<Landing, DriverError> {
        let closure = self.registry().closure(paths);
        let unknown: Vec<String> = {
            let registry = self.registry();
            closure
                .iter()
                .filter(|p| !registry.is_on(p, machine))
                .cloned()
                .collect()
        };
        let mut landing = Landing {
            closure: closure.len(),
            already_present: closure.len() - unknown.len(),
        };
        if unknown.is_empty() && conn.is_none() {
            return Ok(landing);
        }
        // The machine may have some already (an earlier run). A build's own session
        // asks about the whole closure and holds what it finds (temporary GC roots);
        // what it no longer finds went to the builder's garbage collector.
        let (present, todo) = match conn {
            Some(c) => {
                let valid = c.hold_valid(&closure, substitute).await?;
                let todo: Vec<String> = closure
                    .iter()
                    .filter(|p| !valid.contains(*p))
                    .cloned()
                    .collect();
                let mut registry = self.registry();
                for p in &todo {
                    registry.remove_holder(p, machine);
                }
                landing.already_present = closure.len() - todo.len();
                (valid, todo)
            }
            None => {
                let mut c = self.pools[machine].get().await?;
                let present = c.query_valid_paths(&unknown, true, substitute).await?;
                self.pools[machine].put(c);
                landing.already_present += present.len();
                let present: HashSet<String> = present.into_iter().collect();
                let todo = unknown
                    .into_iter()
                    .filter(|p| !present.contains(p))
                    .collect();
                (present, todo)
            }
        };
        {
            let mut registry = self.registry();
            for p in &present {
                registry.add_found_holder(p, machine);
            }
        }
        if todo.is_empty() {
            return Ok(landing);
        }
        self.make_room(machine, &todo).await?;
        let todo = self.copy_direct(machine, todo).await?;
        self.copy_in_order(machine, todo).await?;
        Ok(landing)
    }

    /// Copies one path to `machine` (its references are there), by the route the
    /// model gives, unless another copy brought it meanwhile.
    async fn copy_path(
        self: &Arc<Self>,
        machine: MachineId,
        path: &str,
    ) -> Result<(), DriverError> {
        let _gate = self.gate(machine, path).lock_owned().await;
        if self.registry().is_on(path, machine) {
            return Ok(());
        }
        let not_valid = || DriverError::NotValid {
            machine: "any machine of the fleet".into(),
            path: path.to_string(),
        };
        let found = self.way_to(&self.registry(), path, machine);
        let (info, way) = found.ok_or_else(not_valid)?;
        let source = match (way.from, self.client) {
            (Some(_), Some(client)) if way.keeps_in_client() && machine != client => {
                self.keep_in_client(client, &info.path).await?;
                client
            }
            (Some(from), _) => from,
            (None, Some(client)) => client,
            (None, None) => return Err(not_valid()),
        };
        self.send_in_order(machine, source, vec![info]).await
    }

    /// The infos of `path` and the way the model sends it to `machine` from the
    /// machines that hold it; None when none does.
    fn way_to(
        &self,
        registry: &PathRegistry,
        path: &str,
        machine: MachineId,
    ) -> Option<(offload_nix::serve::PathInfo, offload_sched::Route)> {
        let info = registry.info(path)?.clone();
        let holders: Vec<MachineId> = registry.holders(path).collect();
        let consumers = self.consumers.get(path).copied().unwrap_or(0);
        let way = route(
            &self.specs(),
            &holders,
            false,
            machine,
            consumers,
            info.nar_size,
        )?;
        Some((info, way))
    }

    /// The gate of one path's copy to one machine: wants of the same path wait on it.
    fn gate(&self, machine: MachineId, path: &str) -> PathGate {
        Self::lock(&self.copying)
            .entry((machine, path.to_string()))
            .or_default()
            .clone()
    }

    /// Brings `path` into this machine's store on its way elsewhere. Boxed: the copy
    /// that needs it is itself part of an [`TransferEngine::ensure_on`].
    fn keep_in_client<'a>(
        self: &'a Arc<Self>,
        client: MachineId,
        path: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Landing, DriverError>> + Send + 'a>,
    > {
        Box::pin(async move {
            self.ensure_on(client, &[path.to_string()], None, false)
                .await
        })
    }

    /// `machine` is lost: nothing it held can be copied from it any more.
    pub fn forget_machine(&self, machine: MachineId) {
        self.registry().remove_machine(machine);
    }

    /// Ends every idle session.
    pub async fn close(&self) {
        for pool in &self.pools {
            pool.close().await;
        }
    }
}
