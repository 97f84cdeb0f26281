//! The state's schema, one for both databases: [`MIGRATIONS`] run in order, each a
//! step that never changes once released, and the database records how many have run
//! (SQLite in its `user_version`, PostgreSQL in `offload_schema`, `pg.rs`), so a state of
//! an older offload gains the new tables on its first open, and one of a newer offload
//! is refused rather than damaged. The steps are written in SQLite's DDL and turned into
//! PostgreSQL's mechanically (`sql::postgres_ddl`).
//!
//! The SQLite file: WAL mode and a busy timeout let runs that overlap share it.

use std::path::Path;

use rusqlite::Connection;

/// The schema, one step per entry; an entry never changes once released, a change is a
/// new entry. The first is the duration history as it was before versioning (hence
/// `IF NOT EXISTS`: files of that time already have it).
pub(crate) const MIGRATIONS: &[&str] = &[
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
    // Builder slots held by the clients of a shared state (`leases.rs`): each held by a
    // database session (`pid`, with an advisory lock), with who holds it, for which
    // build, since when and until when the plan expects it (Unix seconds). A row whose
    // session has ended is no lease. SQLite keeps none (it has no sessions).
    "CREATE TABLE leases (
         machine TEXT NOT NULL,
         slot INTEGER NOT NULL,
         pid INTEGER NOT NULL,
         who TEXT NOT NULL,
         what TEXT NOT NULL,
         since INTEGER NOT NULL,
         expected_end INTEGER NOT NULL,
         PRIMARY KEY (machine, slot)
     );",
];

/// Opens (creating if needed) the SQLite state at `path`, its schema brought up to date.
pub(crate) fn open_sqlite(path: &Path) -> Result<Connection, (&'static str, rusqlite::Error)> {
    if let Some(dir) = path.parent() {
        // A missing directory surfaces as the open error below, with the path.
        let _ = std::fs::create_dir_all(dir);
    }
    let mut conn = Connection::open(path).map_err(|e| ("opening", e))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| ("setting the busy timeout", e))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| ("turning on WAL mode", e))?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Runs the migrations this file has not had yet, each in its own transaction.
/// Each takes the write lock before it reads the version (an immediate
/// transaction), so runs that open a new file at once migrate it once, in turn.
fn migrate(conn: &mut Connection) -> Result<(), (&'static str, rusqlite::Error)> {
    let err = |op| move |e| (op, e);
    loop {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err("upgrading the schema"))?;
        let done: usize = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(err("reading the schema version"))?;
        if done > MIGRATIONS.len() {
            return Err((
                "reading the schema: it was made by a newer offload (upgrade offload, or \
                 give another file with --history)",
                rusqlite::Error::InvalidQuery,
            ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{EstimateSource, StateDb, DEFAULT_SECONDS};

    fn user_version(path: &Path) -> usize {
        Connection::open(path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn estimates_scale_by_speed_and_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let h = StateDb::open_file(&dir.path().join("h.sqlite")).unwrap();
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
        let h = StateDb::open_file(&dir.path().join("h.sqlite")).unwrap();
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
                std::thread::spawn(move || StateDb::open_file(&path).map(|h| h.place()))
            })
            .collect();
        for run in opened {
            run.join().unwrap().expect("every concurrent open succeeds");
        }
        assert_eq!(user_version(&path), MIGRATIONS.len());
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
        let h = StateDb::open_file(&path).unwrap();
        assert_eq!(
            h.knowledge("x86_64-linux").unwrap().estimate("hello-1.0"),
            (3.0, EstimateSource::Exact)
        );
        assert_eq!(user_version(&path), MIGRATIONS.len());
        let mode: String = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        h.machine_failed("b1", "connection refused", 100).unwrap();
        drop(h);
        // Opening it again runs nothing twice and keeps what was recorded.
        let h = StateDb::open_file(&path).unwrap();
        assert_eq!(h.machine("b1").unwrap().map(|m| m.failures), Some(1));
        // A file of a newer offload is refused, not damaged.
        drop(h);
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .unwrap();
        let e = StateDb::open_file(&path)
            .err()
            .expect("a newer schema is refused");
        assert!(e.op.contains("newer offload"), "{e}");
    }
}
