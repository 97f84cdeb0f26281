//! The runs the state database keeps for `offload report`: each `offload build`'s record
//! (JSON the CLI writes and reads back), numbered in order.

use super::sql::{args, Row};
use super::{StateDb, StateError};

/// One recorded run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub id: i64,
    /// Unix seconds.
    pub started_at: i64,
    pub report: String,
}

impl StateDb {
    /// Keeps a run; returns its number.
    pub fn record_run(&self, started_at: i64, report: &str) -> Result<i64, StateError> {
        let id = self.query(
            "recording the run",
            "INSERT INTO runs (started_at, report) VALUES (?1, ?2) RETURNING id",
            args![started_at, report],
            |r| r.int(0),
        )?;
        Ok(id.into_iter().next().unwrap_or_default())
    }

    /// Run `id`, or the last one.
    pub fn run(&self, id: Option<i64>) -> Result<Option<RunRecord>, StateError> {
        let row = |r: &Row| {
            Ok(RunRecord {
                id: r.int(0)?,
                started_at: r.int(1)?,
                report: r.text(2)?,
            })
        };
        let found = match id {
            Some(id) => self.query(
                "reading a run",
                "SELECT id, started_at, report FROM runs WHERE id = ?1",
                args![id],
                row,
            ),
            None => self.query(
                "reading a run",
                "SELECT id, started_at, report FROM runs ORDER BY id DESC LIMIT 1",
                args![],
                row,
            ),
        }?;
        Ok(found.into_iter().next())
    }

    /// The numbers and start times of the last `limit` runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<(i64, i64)>, StateError> {
        self.query(
            "listing runs",
            "SELECT id, started_at FROM runs ORDER BY id DESC LIMIT ?1",
            args![limit as i64],
            |r| Ok((r.int(0)?, r.int(1)?)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_numbered_and_the_last_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let h = StateDb::open_file(&dir.path().join("h.sqlite")).unwrap();
        assert_eq!(h.run(None).unwrap(), None);
        let first = h.record_run(100, "{\"a\":1}").unwrap();
        let second = h.record_run(200, "{\"a\":2}").unwrap();
        assert!(second > first);
        assert_eq!(h.run(None).unwrap().unwrap().report, "{\"a\":2}");
        assert_eq!(h.run(Some(first)).unwrap().unwrap().started_at, 100);
        assert_eq!(h.run(Some(999)).unwrap(), None);
        assert_eq!(h.runs(10).unwrap(), [(second, 200), (first, 100)]);
    }
}
