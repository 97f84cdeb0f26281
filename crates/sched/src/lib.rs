//! The pure build scheduler of offload.
//!
//! Given a build graph ([`Graph`]: derivations, dependencies, estimated durations and
//! output sizes) and a fleet ([`MachineSpec`]: systems, features, slots, speed, links),
//! the [`Scheduler`] decides which derivation runs where and when. Its whole interface
//! is [`Scheduler::start`] and [`Scheduler::handle`]: events in, [`Action`]s out, with
//! the current time passed in.
//!
//! This crate must not depend on tokio, on any I/O (`std::{fs, net, process}`) or read a
//! clock (`clippy.toml` bans `Instant::now`/`SystemTime::now`): the live driver and a
//! simulator run the same code and get the same plan from the same inputs.
//!
//! Layout:
//! - [`graph`]: the derivation DAG and priorities; [`fleet`]: machines and what they can
//!   build;
//! - [`events`]: the scheduler's inputs ([`Event`]) and outputs ([`Action`]);
//! - [`scheduler`]: the state machine, event by event;
//! - [`hedge`]: duplicates of builds that overrun their plan, one rule for the driver
//!   and the simulator;
//! - [`bound`]: the lower bound of any schedule, that runs are measured against;
//! - [`transfers`]: how paths travel (routes, link queues), one model for the planner,
//!   the simulator and the driver;
//! - `classes` (machines interchangeable for planning, ordered by first free slot),
//!   `dispatch` (which ready derivation goes where) and `rehearsal` (the ordering of
//!   ready derivations, chosen by playing the run out first), all private.

pub mod bound;
mod classes;
mod dispatch;
pub mod events;
mod failures;
pub mod fleet;
pub mod graph;
pub mod hedge;
pub mod holding;
mod rehearsal;
pub mod scheduler;
mod tiers;
pub mod transfers;

pub use bound::lower_bound;
pub use events::{Action, Event, Failure, NodeState, Outcome};
pub use fleet::{Link, MachineId, MachineSpec};
pub use graph::{Graph, GraphError, NodeId, NodeSpec};
pub use hedge::{HedgeCounts, HedgeRule, Hedger};
pub use holding::Holding;
pub use scheduler::{Scheduler, MAX_ATTEMPTS};
pub use transfers::{has_pair_links, route, route_in, Direction, Links, Route, RouteKind};

/// Seconds (at speed 1) assumed for a derivation nothing is known about: what the live
/// driver plans with before the history has a build of its name, and what a simulated
/// run without history plans with.
pub const DEFAULT_ESTIMATE_SECONDS: f64 = 5.0;

/// Bytes assumed for the outputs of a derivation never built before, until a build of
/// the run measures some ([`Scheduler::outputs_measured`]).
pub const DEFAULT_OUTPUT_BYTES: u64 = 1 << 20;
