//! The database itself: where the state lives (a local SQLite file, or a PostgreSQL
//! database shared by every client of a team), the one way queries run on either, the
//! fall-back to the local file when the shared database is lost, and the builds it
//! records.
//!
//! Builds are keyed by the derivation's name without its hash (`hello-2.12.1`), with a
//! version-insensitive fallback (`hello`), since a version bump rarely changes the cost
//! much. Durations are stored as measured, with the machine and its declared speed
//! factor; `learned.rs` reads them for `offload-learn`'s fit of speeds and estimates.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use thiserror::Error;

use super::pg::{ConnectError, PgState};
use super::schema::{open_sqlite, MIGRATIONS};
use super::sql::{args, DbError, Row, Value};

pub use offload_learn::{package_name, EstimateSource, DEFAULT_SECONDS};

/// The state could not be used.
#[derive(Debug, Error)]
#[error("state {place}: {op}: {cause}")]
pub struct StateError {
    /// The file, or the shared database's URI (its password hidden).
    pub place: String,
    pub op: &'static str,
    /// What the database said; part of the message (not a separate cause, so that it
    /// is said once).
    pub cause: DbError,
}

impl StateError {
    /// This offload must not go on with the state as it is (a URI that does not parse, a
    /// schema of a newer offload); other errors cost a run its estimates, not the run.
    pub fn refuses(&self) -> bool {
        matches!(self.cause, DbError::Other(_)) && self.op.starts_with("opening")
    }
}

/// Where the state's queries run.
enum Backend {
    Sqlite(Connection),
    Postgres(PgState),
}

/// The state: build history, what was learned, machine records and runs.
pub struct StateDb {
    backend: Mutex<Backend>,
    /// The SQLite file: the state itself, or where it goes when the shared one is lost.
    local: PathBuf,
    /// The shared database's URI as messages name it, when it is the state.
    shared: Option<String>,
}

/// The loss of the shared database has been said (once a process).
static LOSS_SAID: AtomicBool = AtomicBool::new(false);
/// When the shared database was last found gone, in this process.
static DOWN_SINCE: Mutex<Option<Instant>> = Mutex::new(None);
/// How long a database found gone is not asked again by what can do without it (leases).
const DOWN_FOR: Duration = Duration::from_secs(60);

/// Notes that the shared database is gone (unreachable, or lost).
pub(crate) fn note_down() {
    *DOWN_SINCE.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
}

/// Whether the shared database was found gone in the last minute: leases are not tried
/// then (each try could wait for the connect timeout).
pub(crate) fn recently_down() -> bool {
    DOWN_SINCE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_some_and(|at| at.elapsed() < DOWN_FOR)
}

impl StateDb {
    /// Opens the state: the shared database when one is configured (`state` in the
    /// config file, `$OFFLOAD_STATE`), with `path` as its local stand-in; else the
    /// SQLite file at `path`.
    pub fn open(path: &Path) -> Result<StateDb, StateError> {
        match super::shared_uri() {
            Some(uri) => StateDb::open_shared(&uri, path),
            None => StateDb::open_file(path),
        }
    }

    /// Opens (creating if needed) the SQLite state at `path`.
    pub fn open_file(path: &Path) -> Result<StateDb, StateError> {
        let conn = open_sqlite(path).map_err(|(op, e)| StateError {
            place: path.display().to_string(),
            op,
            cause: e.into(),
        })?;
        Ok(StateDb {
            backend: Mutex::new(Backend::Sqlite(conn)),
            local: path.to_path_buf(),
            shared: None,
        })
    }

    /// Opens the PostgreSQL state at `uri`, its schema brought up to date; one that
    /// cannot be reached is said and the local file at `local` used instead.
    pub fn open_shared(uri: &str, local: &Path) -> Result<StateDb, StateError> {
        let place = redact(uri);
        let unreachable = match PgState::connect(uri) {
            Ok(pg) => match pg.migrate(MIGRATIONS) {
                Ok(()) => {
                    return Ok(StateDb {
                        backend: Mutex::new(Backend::Postgres(pg)),
                        local: local.to_path_buf(),
                        shared: Some(place),
                    })
                }
                Err(e) if e.is_lost() => e.to_string(),
                Err(cause) => {
                    return Err(StateError {
                        place,
                        op: "opening it",
                        cause,
                    })
                }
            },
            Err(ConnectError::Uri(why)) => {
                return Err(StateError {
                    place,
                    op: "opening it",
                    cause: DbError::Other(format!(
                        "{why}; fix `state` in offload's config file or $OFFLOAD_STATE \
                         (e.g. postgresql:///offload?host=/run/postgresql&user=offload)"
                    )),
                })
            }
            Err(ConnectError::Unreachable(why)) => why,
        };
        say_lost(&format!(
            "the shared state {place} cannot be reached ({unreachable}); offload uses the \
             local state {} instead, and the builder locks keep slots apart: check that the \
             server runs and the URI (`state` in offload's config file, or $OFFLOAD_STATE)",
            local.display()
        ));
        StateDb::open_file(local)
    }

    /// Where the state is, for messages: the shared database, or the file.
    pub fn place(&self) -> String {
        match &*self.backend() {
            Backend::Postgres(_) => self.shared.clone().unwrap_or_default(),
            Backend::Sqlite(_) => self.local.display().to_string(),
        }
    }

    /// Whether the state is the shared database (and it has not been lost).
    pub fn is_shared(&self) -> bool {
        matches!(&*self.backend(), Backend::Postgres(_))
    }

    fn backend(&self) -> std::sync::MutexGuard<'_, Backend> {
        self.backend.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `sql` (SQLite's spelling, `sql.rs`) and reads each row it returns with
    /// `read`; `op` names what it does in an error.
    pub(crate) fn query<T>(
        &self,
        op: &'static str,
        sql: &str,
        params: &[Value],
        read: impl Fn(&Row) -> Result<T, DbError>,
    ) -> Result<Vec<T>, StateError> {
        let err = |cause| StateError {
            place: self.place(),
            op,
            cause,
        };
        let rows = self.rows(sql, params).map_err(err)?;
        rows.iter().map(|r| read(r).map_err(err)).collect()
    }

    /// Runs `sql`, its rows unread.
    pub(crate) fn execute(
        &self,
        op: &'static str,
        sql: &str,
        params: &[Value],
    ) -> Result<(), StateError> {
        self.query(op, sql, params, |_| Ok(())).map(|_| ())
    }

    /// The rows of `sql`: on the shared database while it answers, else (from its loss
    /// on, said once) on the local file.
    fn rows(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let mut backend = self.backend();
        let lost = match &*backend {
            Backend::Sqlite(conn) => return sqlite_rows(conn, sql, params),
            Backend::Postgres(pg) => match pg.query(sql, params) {
                Err(e) if e.is_lost() => e,
                answer => return answer,
            },
        };
        let conn = open_sqlite(&self.local).map_err(|(_, e)| e)?;
        say_lost(&format!(
            "lost the shared state {} ({lost}); what is left of this run is kept in {} and \
             the builder locks keep slots apart",
            self.shared.as_deref().unwrap_or_default(),
            self.local.display()
        ));
        *backend = Backend::Sqlite(conn);
        let Backend::Sqlite(conn) = &*backend else {
            unreachable!("just set")
        };
        sqlite_rows(conn, sql, params)
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
        self.execute(
            "recording a build",
            "INSERT INTO builds (name, pname, system, machine, seconds, speed,
                                 finished_at, output_bytes, run, task_seconds)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            args![
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
    }
}

/// Says `what` of the shared database, once a process (every later loss is the same
/// news).
fn say_lost(what: &str) {
    note_down();
    if LOSS_SAID.swap(true, Ordering::Relaxed) {
        tracing::debug!("{what}");
    } else {
        tracing::warn!("{what}");
    }
}

/// `sql`'s rows on SQLite.
fn sqlite_rows(conn: &Connection, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let columns = stmt.column_count();
    let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
        (0..columns)
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(v) => Value::Int(v),
                    rusqlite::types::ValueRef::Real(v) => Value::Real(v),
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                })
            })
            .collect::<rusqlite::Result<Vec<_>>>()
            .map(Row)
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Real(v) => ValueRef::Real(*v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
        }))
    }
}

/// `uri` with its password hidden, for messages.
pub fn redact(uri: &str) -> String {
    let mut out = uri.to_string();
    // postgresql://user:password@host/…
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                let (from, to) = (scheme_end + 3 + colon + 1, scheme_end + 3 + at);
                out.replace_range(from..to, "***");
            }
        }
    }
    // password=… as a query parameter or a key=value pair.
    if let Some(at) = out.find("password=") {
        let from = at + "password=".len();
        let to = out[from..]
            .find(['&', ' '])
            .map_or(out.len(), |end| from + end);
        out.replace_range(from..to, "***");
    }
    out
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
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgresql://ann:s3cret@db.example/offload?sslmode=prefer"),
            "postgresql://ann:***@db.example/offload?sslmode=prefer"
        );
        assert_eq!(
            redact("postgresql:///offload?host=/run/pg&password=x&user=u"),
            "postgresql:///offload?host=/run/pg&password=***&user=u"
        );
        assert_eq!(
            redact("postgresql:///offload?host=/run/pg&port=5439"),
            "postgresql:///offload?host=/run/pg&port=5439"
        );
    }
}
