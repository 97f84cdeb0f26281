//! What offload learns from its builds and copies, as pure functions: how fast each
//! machine builds each system, how long each derivation takes, how big its outputs are,
//! how fast each link is (to the client, or straight between two builders), and when
//! during a run to fit them again. The live driver (reading its state database) and the
//! simulator's learning policy (reading the builds it simulated) both plan with this
//! one model.
//!
//! Machines are keyed by their store URI as written ([`LOCAL_KEY`] for this machine),
//! so a host reached with two stores, or with other parameters, is two machines.
//!
//! Speeds are fitted, not taken from the machines file: a build's duration is modelled
//! as `work(name) / speed(machine, system)`, with this machine's native system as the
//! unit. Alternating medians fit both sides over the recent builds (the median of each
//! derivation's last builds on each machine), so one slow build on a loaded machine
//! moves nothing. A machine or system with few comparisons stays near its declared
//! speed factor: one comparison moves it 80 % of the way, in log space.
//!
//! Layout:
//! - [`speeds`]: the fit of work and speeds ([`fit`], [`Learned`]);
//! - [`links`]: link figures from copies that landed and copies under way;
//! - [`pairs`]: the direct links between two builders, learned by the same estimator
//!   per ordered pair ([`PairLinks`]: record each timed copy from one builder to
//!   another, read the [`offload_sched::Link`] back), with the prior of a pair not yet
//!   measured ([`pair_prior`]: the better of the two machines' links to the client),
//!   and when a run plans a pair at what its copies showed ([`moved_pair`]);
//! - [`knowledge`]: all of it together, as the planner asks ([`Knowledge`]);
//! - [`cadence`]: when a run fits again ([`Refits`]) and which figures moved;
//! - [`estimate`]: where an estimate comes from, and package names;
//! - `stats`: medians and spreads, private.
//!
//! Like `offload-sched`, below which it sits, this crate must not do I/O, read a clock
//! (`clippy.toml` bans it) or depend on an async runtime: the rows, copies and times
//! are passed in.

pub mod cadence;
pub mod estimate;
pub mod knowledge;
pub mod links;
pub mod pairs;
pub mod speeds;
mod stats;

pub use cadence::{moved, refit_interval, Refits, REFIT_INTERVAL};
pub use estimate::{package_name, EstimateSource, DEFAULT_SECONDS};
pub use knowledge::Knowledge;
pub use links::{
    bound_under_way, link_figures, moved_link, slower_under_way, LinkFigures, Transfer,
    DEFAULT_BANDWIDTH, DEFAULT_LATENCY, RECENT_TRANSFERS, SLOWER_UNDER_WAY,
};
pub use pairs::{moved_pair, pair_prior, PairLinks};
pub use speeds::{fit, Learned, RECENT_PER_CELL};

/// What `machines` tables and the planner call this machine in the state.
pub const LOCAL_KEY: &str = "local";
/// Build rows read for a fit (the most recent).
pub const ROWS_READ: usize = 20_000;

/// One recorded build, as the fit reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRow {
    pub name: String,
    pub system: String,
    pub machine: String,
    pub seconds: f64,
    /// The speed factor the machines file gave the machine then.
    pub declared_speed: f64,
    /// The run it was part of, when recorded.
    pub run: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::BuildRow;

    pub const SYS: &str = "x86_64-linux";

    pub fn row(name: &str, system: &str, machine: &str, seconds: f64) -> BuildRow {
        BuildRow {
            name: name.into(),
            system: system.into(),
            machine: machine.into(),
            seconds,
            declared_speed: 1.0,
            run: None,
        }
    }
}
