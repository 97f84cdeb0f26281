//! Build-duration history in SQLite: how long each derivation took, where, so the next
//! plan can estimate it.
//!
//! Builds are keyed by the derivation's name without its hash (`hello-2.12.1`), with a
//! version-insensitive fallback (`hello`), since a version bump rarely changes the cost
//! much. Durations are stored as measured together with the machine's speed factor and
//! estimated back at speed 1 (`seconds × speed`), so one history serves every machine.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

/// Estimate for a derivation nothing is known about.
pub const DEFAULT_SECONDS: f64 = offload_sched::DEFAULT_ESTIMATE_SECONDS;
/// How many recent builds of a name an estimate averages.
const RECENT: u32 = 5;

/// The history database could not be used.
#[derive(Debug, Error)]
#[error("build history {path}: {op}")]
pub struct HistoryError {
    pub path: PathBuf,
    pub op: &'static str,
    #[source]
    pub source: rusqlite::Error,
}

/// Where an estimate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimateSource {
    /// Earlier builds of the same name.
    Exact,
    /// Earlier builds of the same package at another version.
    OtherVersion,
    /// Nothing known: [`DEFAULT_SECONDS`].
    Default,
}

/// The duration history.
pub struct History {
    conn: Connection,
    path: PathBuf,
}

impl History {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<History, HistoryError> {
        let err = |op| {
            let path = path.to_path_buf();
            move |source| HistoryError { path, op, source }
        };
        if let Some(dir) = path.parent() {
            // A missing directory surfaces as the open error below, with the path.
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err("opening"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err("setting the busy timeout"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS builds (
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
        )
        .map_err(err("creating the schema"))?;
        Ok(History {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// The default location: `$OFFLOAD_HISTORY`, else
    /// `$XDG_STATE_HOME/offload/history.sqlite`, else `~/.local/state/offload/…`.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("OFFLOAD_HISTORY") {
            return PathBuf::from(p);
        }
        let state = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .unwrap_or_else(std::env::temp_dir);
        state.join("offload").join("history.sqlite")
    }

    /// Records a finished build of `name` that took `seconds` on a machine of `speed`.
    pub fn record(
        &self,
        name: &str,
        system: &str,
        machine: &str,
        seconds: f64,
        speed: f64,
    ) -> Result<(), HistoryError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.conn
            .execute(
                "INSERT INTO builds (name, pname, system, machine, seconds, speed, finished_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    name,
                    package_name(name),
                    system,
                    machine,
                    seconds,
                    speed,
                    now
                ],
            )
            .map(|_| ())
            .map_err(|source| HistoryError {
                path: self.path.clone(),
                op: "recording a build",
                source,
            })
    }

    /// Estimated seconds for `name` on a machine of speed 1.
    pub fn estimate(&self, name: &str) -> Result<(f64, EstimateSource), HistoryError> {
        let query = |column: &str, key: &str| -> Result<Option<f64>, HistoryError> {
            let sql = format!(
                "SELECT avg(seconds * speed) FROM
                   (SELECT seconds, speed FROM builds WHERE {column} = ?1
                    ORDER BY finished_at DESC, rowid DESC LIMIT {RECENT})"
            );
            self.conn
                .query_row(&sql, params![key], |row| row.get::<_, Option<f64>>(0))
                .optional()
                .map(Option::flatten)
                .map_err(|source| HistoryError {
                    path: self.path.clone(),
                    op: "reading estimates",
                    source,
                })
        };
        if let Some(s) = query("name", name)? {
            return Ok((s, EstimateSource::Exact));
        }
        if let Some(s) = query("pname", package_name(name))? {
            return Ok((s, EstimateSource::OtherVersion));
        }
        Ok((DEFAULT_SECONDS, EstimateSource::Default))
    }
}

/// A derivation name without its version: everything before the first `-` that is
/// followed by a digit, as Nix's `parseDrvName` splits `hello-2.12.1`.
pub fn package_name(name: &str) -> &str {
    let bytes = name.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return &name[..i];
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_drop_versions() {
        assert_eq!(package_name("hello-2.12.1"), "hello");
        assert_eq!(package_name("python3.11-numpy-1.26"), "python3.11-numpy");
        assert_eq!(package_name("source"), "source");
        assert_eq!(package_name("gcc-wrapper-13"), "gcc-wrapper");
    }

    #[test]
    fn estimates_scale_by_speed_and_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(&dir.path().join("h.sqlite")).unwrap();
        assert_eq!(
            h.estimate("hello-1.0").unwrap(),
            (DEFAULT_SECONDS, EstimateSource::Default)
        );
        h.record("hello-1.0", "x86_64-linux", "fast", 2.0, 2.0)
            .unwrap();
        h.record("hello-1.0", "x86_64-linux", "slow", 4.0, 1.0)
            .unwrap();
        assert_eq!(
            h.estimate("hello-1.0").unwrap(),
            (4.0, EstimateSource::Exact)
        );
        assert_eq!(
            h.estimate("hello-1.1").unwrap(),
            (4.0, EstimateSource::OtherVersion)
        );
        drop(h);
        // It persists.
        let h = History::open(&dir.path().join("h.sqlite")).unwrap();
        assert_eq!(h.estimate("hello-1.0").unwrap().1, EstimateSource::Exact);
    }
}
