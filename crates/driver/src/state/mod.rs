//! offload's state database, one [`StateDb`] over a SQLite file (the default) or a
//! PostgreSQL database a team's clients share (`state = "postgresql://…"` in the config
//! file, or `$OFFLOAD_STATE`; `pg.rs`), one schema and one set of queries for both
//! (`schema.rs`, `sql.rs`): how long each
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
pub mod leases;
mod machines;
mod peers;
mod pg;
pub mod report;
mod runs;
mod schema;
mod sql;

use std::sync::OnceLock;

pub(crate) use db::unix_now;
pub use db::{
    package_name, redact, BuildRecord, EstimateSource, StateDb, StateError, DEFAULT_SECONDS,
};
pub use machines::{format_utc, MachineRecord};
/// What the state teaches, as `offload-learn` fits it ([`StateDb::knowledge`]).
pub use offload_learn::{Knowledge, Learned, LinkFigures};
pub use peers::PeerReach;
pub use runs::RunRecord;
pub use sql::DbError;

/// The shared database the config file names, set once a process by the CLI.
static CONFIGURED: OnceLock<String> = OnceLock::new();

/// Makes `uri` (the config file's `state`) the state of every [`StateDb::open`] in this
/// process; `$OFFLOAD_STATE` still wins.
pub fn use_shared(uri: Option<String>) {
    if let Some(uri) = uri.filter(|u| !u.trim().is_empty()) {
        let _ = CONFIGURED.set(uri);
    }
}

/// The shared database to use, if any: `$OFFLOAD_STATE`, else the config file's.
pub fn shared_uri() -> Option<String> {
    crate::env::state_uri_from_env().or_else(|| CONFIGURED.get().cloned())
}
