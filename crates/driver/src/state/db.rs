//! The database itself: opening it, its schema and migrations, and the builds it
//! records.
//!
//! One schema, upgraded in place: [`MIGRATIONS`] run in order, and SQLite's
//! `user_version` records how many have run, so a state file of an older offload
//! gains the new tables on its first open. WAL mode and a busy timeout let runs that
//! overlap share the file.
//!
//! Builds are keyed by the derivation's name without its hash (`hello-2.12.1`), with a
//! version-insensitive fallback (`hello`), since a version bump rarely changes the cost
//! much. Durations are stored as measured, with the machine and its declared speed
//! factor; `learned.rs` reads them for `offload-learn`'s fit of speeds and estimates.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};
use thiserror::Error;

pub use offload_learn::{package_name, EstimateSource, DEFAULT_SECONDS};

/// The schema, one step per entry; an entry never changes once released, a change is a
/// new entry. The first is the duration history as it was before versioning (hence
/// `IF NOT EXISTS`: files of that time already have it).
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS builds (
         name TEXT NOT NULL,
         pname TEXT NOT NULL,
         system TEXT NOT NULL,
         machine TEXT NOT NULL,
         seconds REAL NOT NULL,
         speed REAL NOT NULL,
         finished_at INTEGER NOT NULL
     );
     CREATE INDEX IF NOT EXISTS builds_name ON builds (name, finished_at);
     CREATE INDEX IF NOT EXISTS builds_pname ON builds (pname, finished_at);",
    // Machines that failed: consecutive connection failures (reset by a success), the
    // last one, and the end of a quarantine (Unix seconds; 0 for none).
    "CREATE TABLE machines (
         name TEXT PRIMARY KEY,
         failures INTEGER NOT NULL,
         last_failure TEXT NOT NULL,
         last_failure_at INTEGER NOT NULL,
         quarantined_until INTEGER NOT NULL
     );",
    // Every `offload build` run, for `offload report`: when it started (Unix seconds)
    // and the run as the CLI records it (JSON).
    "CREATE TABLE runs (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         started_at INTEGER NOT NULL,
         report TEXT NOT NULL
     );",
    // What the planner learns (`learned.rs`): from here on `builds.machine` is the store
    // URI as written and `seconds` the build's own time (its inputs' copies left out);
    // NAR bytes of the outputs, the run the build was part of and the task's time but
    // for its inputs' copies (the session and the build); every copy between this
    // machine and another, with how many copies shared the link when it started; each
    // machine's CPU cores.
    "ALTER TABLE builds ADD COLUMN output_bytes INTEGER;
     ALTER TABLE builds ADD COLUMN run TEXT;
     ALTER TABLE builds ADD COLUMN task_seconds REAL;
     CREATE TABLE transfers (
         machine TEXT NOT NULL,
         direction TEXT NOT NULL,
         bytes INTEGER NOT NULL,
         seconds REAL NOT NULL,
         concurrent INTEGER NOT NULL,
         at INTEGER NOT NULL
     );
     CREATE INDEX transfers_machine ON transfers (machine, at);
     CREATE TABLE machine_cores (
         machine TEXT PRIMARY KEY,
         cores INTEGER NOT NULL,
         learned_at INTEGER NOT NULL
     );",
    // Copies straight from one machine to another (`peers.rs`): whether the first
    // reaches the second by its own ssh, as last probed, and each such copy, timed.
    "CREATE TABLE peer_reach (
         from_machine TEXT NOT NULL,
         to_machine TEXT NOT NULL,
         reachable INTEGER NOT NULL,
         reason TEXT NOT NULL,
         probed_at INTEGER NOT NULL,
         PRIMARY KEY (from_machine, to_machine)
     );
     CREATE TABLE peer_transfers (
         from_machine TEXT NOT NULL,
         to_machine TEXT NOT NULL,
         bytes INTEGER NOT NULL,
         seconds REAL NOT NULL,
         concurrent INTEGER NOT NULL,
         at INTEGER NOT NULL
     );
     CREATE INDEX peer_transfers_pair ON peer_transfers (from_machine, to_machine, at);",
];

/// The history database could not be used.
#[derive(Debug, Error)]
#[error("build history {path}: {op}")]
pub struct StateError {
    pub path: PathBuf,
    pub op: &'static str,
    #[source]
    pub source: rusqlite::Error,
}

/// The duration history.
pub struct StateDb {
    conn: Connection,
    path: PathBuf,
}

impl StateDb {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<StateDb, StateError> {
        let err = |op| {
            let path = path.to_path_buf();
            move |source| StateError { path, op, source }
        };
        if let Some(dir) = path.parent() {
            // A missing directory surfaces as the open error below, with the path.
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err("opening"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err("setting the busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err("turning on WAL mode"))?;
        let mut history = StateDb {
            conn,
            path: path.to_path_buf(),
        };
        history.migrate()?;
        Ok(history)
    }

    /// Runs the migrations this file has not had yet, each in its own transaction.
    /// Each takes the write lock before it reads the version (an immediate
    /// transaction), so runs that open a new file at once migrate it once, in turn.
    fn migrate(&mut self) -> Result<(), StateError> {
        let err = |op| {
            let path = self.path.clone();
            move |source| StateError { path, op, source }
        };
        loop {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(err("upgrading the schema"))?;
            let done: usize = tx
                .pragma_query_value(None, "user_version", |row| row.get(0))
                .map_err(err("reading the schema version"))?;
            if done > MIGRATIONS.len() {
                return Err(StateError {
                    path: self.path.clone(),
                    op: "reading the schema: it was made by a newer offload (give another \
                         file with --history)",
                    source: rusqlite::Error::InvalidQuery,
                });
            }
            let Some(sql) = MIGRATIONS.get(done) else {
                return Ok(());
            };
            tx.execute_batch(sql).map_err(err("upgrading the schema"))?;
            tx.pragma_update(None, "user_version", done + 1)
                .map_err(err("upgrading the schema"))?;
            tx.commit().map_err(err("upgrading the schema"))?;
        }
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn error(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
        let path = self.path.clone();
        move |source| StateError { path, op, source }
    }

    /// Records a finished build of `name` for `system` that took `seconds` on
    /// `machine` (its store URI as written, or `local`), whose speed factor was `speed`;
    /// `output_bytes` is the NAR size of its outputs, when known.
    pub fn record(
        &self,
        name: &str,
        system: &str,
        machine: &str,
        seconds: f64,
        speed: f64,
        output_bytes: Option<u64>,
    ) -> Result<(), StateError> {
        self.record_build(&BuildRecord {
            name,
            system,
            machine,
            seconds,
            declared_speed: speed,
            output_bytes,
            run: None,
            task_seconds: None,
        })
    }

    /// Records a finished build.
    pub fn record_build(&self, b: &BuildRecord<'_>) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO builds (name, pname, system, machine, seconds, speed,
                                     finished_at, output_bytes, run, task_seconds)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    b.name,
                    package_name(b.name),
                    b.system,
                    b.machine,
                    b.seconds,
                    b.declared_speed,
                    unix_now(),
                    b.output_bytes.map(|n| n as i64),
                    b.run,
                    b.task_seconds
                ],
            )
            .map(|_| ())
            .map_err(|source| StateError {
                path: self.path.clone(),
                op: "recording a build",
                source,
            })
    }
}

/// One finished build, as the state keeps it.
#[derive(Debug, Clone, Copy)]
pub struct BuildRecord<'a> {
    pub name: &'a str,
    pub system: &'a str,
    /// The machine's store URI as written, or `local`.
    pub machine: &'a str,
    /// The build's own seconds.
    pub seconds: f64,
    /// The speed factor its machines-file line declares.
    pub declared_speed: f64,
    /// NAR bytes of its outputs, when known.
    pub output_bytes: Option<u64>,
    /// The run it was part of.
    pub run: Option<&'a str>,
    /// The task's seconds but for its inputs' copies: the session and the build.
    pub task_seconds: Option<f64>,
}

/// Seconds since the Unix epoch (0 on a clock before it).
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_scale_by_speed_and_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let h = StateDb::open(&dir.path().join("h.sqlite")).unwrap();
        assert_eq!(
            h.knowledge("x86_64-linux").unwrap().estimate("hello-1.0"),
            (DEFAULT_SECONDS, EstimateSource::Default)
        );
        h.record("hello-1.0", "x86_64-linux", "fast", 2.0, 2.0, None)
            .unwrap();
        h.record("hello-1.0", "x86_64-linux", "slow", 4.0, 1.0, None)
            .unwrap();
        assert_eq!(
            h.knowledge("x86_64-linux").unwrap().estimate("hello-1.0"),
            (4.0, EstimateSource::Exact)
        );
        assert_eq!(
            h.knowledge("x86_64-linux").unwrap().estimate("hello-1.1"),
            (4.0, EstimateSource::OtherVersion)
        );
        drop(h);
        // It persists.
        let h = StateDb::open(&dir.path().join("h.sqlite")).unwrap();
        assert_eq!(
            h.knowledge("x86_64-linux").unwrap().estimate("hello-1.0").1,
            EstimateSource::Exact
        );
    }

    #[test]
    fn runs_that_open_a_new_file_at_once_all_get_the_whole_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let opened: Vec<_> = (0..12)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    StateDb::open(&path).map(|h| h.conn().path().map(str::to_owned))
                })
            })
            .collect();
        for run in opened {
            run.join().unwrap().expect("every concurrent open succeeds");
        }
        let h = StateDb::open(&path).unwrap();
        let version: usize = h
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
    }

    #[test]
    fn a_history_file_from_before_versioning_upgrades_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        {
            // The schema as offload created it before migrations, with one build.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(MIGRATIONS[0]).unwrap();
            old.execute(
                "INSERT INTO builds VALUES ('hello-1.0', 'hello', 'x86_64-linux', 'b1', 3.0, 1.0, 1)",
                [],
            )
            .unwrap();
        }
        let h = StateDb::open(&path).unwrap();
        assert_eq!(
            h.knowledge("x86_64-linux").unwrap().estimate("hello-1.0"),
            (3.0, EstimateSource::Exact)
        );
        let version: usize = h
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
        let mode: String = h
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        h.machine_failed("b1", "connection refused", 100).unwrap();
        drop(h);
        // Opening it again runs nothing twice and keeps what was recorded.
        let h = StateDb::open(&path).unwrap();
        assert_eq!(h.machine("b1").unwrap().map(|m| m.failures), Some(1));
        // A file of a newer offload is refused, not damaged.
        h.conn
            .pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .unwrap();
        drop(h);
        let e = StateDb::open(&path)
            .err()
            .expect("a newer schema is refused");
        assert!(e.op.contains("newer offload"), "{e}");
    }
}
