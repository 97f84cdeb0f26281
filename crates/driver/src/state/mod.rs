//! offload's state database in SQLite, one [`StateDb`] over one file: how long each
//! derivation took and where, so the next plan can estimate it (`db.rs`); which machines
//! keep failing, so the next run skips them until their quarantine ends (`machines.rs`);
//! each run's record for `offload report` (`runs.rs`). What the builds teach (speeds,
//! links, sizes, cores) is read from it by `learn.rs`.

mod db;
mod machines;
mod runs;

pub(crate) use db::unix_now;
pub use db::{package_name, BuildRecord, EstimateSource, StateDb, StateError, DEFAULT_SECONDS};
pub use machines::{format_utc, MachineRecord};
pub use runs::RunRecord;
