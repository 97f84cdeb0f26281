//! offload's state database in SQLite, one [`StateDb`] over one file: how long each
//! derivation took and where, so the next plan can estimate it (`db.rs`); which machines
//! keep failing, so the next run skips them until their quarantine ends (`machines.rs`);
//! each run's record for `offload report` (`runs.rs`); which builders reach which
//! others directly, and how fast (`peers.rs`). What the builds teach (speeds,
//! links, sizes, task costs) is read from it for `offload-learn`'s fit (`learned.rs`), and
//! each builder's cores are kept there.
//!
//! Beside the database, [`report`]: the run report (where and when each build ran and
//! what each link carried), kept for `offload report` and rendered by [`crate::html`].

mod db;
mod learned;
mod machines;
mod peers;
pub mod report;
mod runs;

pub(crate) use db::unix_now;
pub use db::{package_name, BuildRecord, EstimateSource, StateDb, StateError, DEFAULT_SECONDS};
pub use machines::{format_utc, MachineRecord};
/// What the state teaches, as `offload-learn` fits it ([`StateDb::knowledge`]).
pub use offload_learn::{Knowledge, Learned, LinkFigures};
pub use peers::PeerReach;
pub use runs::RunRecord;
