//! The runs the state database keeps for `offload report`: each `offload build`'s record
//! (JSON the CLI writes and reads back), numbered in order.

use rusqlite::{params, OptionalExtension};

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
        self.conn()
            .execute(
                "INSERT INTO runs (started_at, report) VALUES (?1, ?2)",
                params![started_at, report],
            )
            .map_err(self.error("recording the run"))?;
        Ok(self.conn().last_insert_rowid())
    }

    /// Run `id`, or the last one.
    pub fn run(&self, id: Option<i64>) -> Result<Option<RunRecord>, StateError> {
        let row = |r: &rusqlite::Row<'_>| {
            Ok(RunRecord {
                id: r.get(0)?,
                started_at: r.get(1)?,
                report: r.get(2)?,
            })
        };
        let found = match id {
            Some(id) => self.conn().query_row(
                "SELECT id, started_at, report FROM runs WHERE id = ?1",
                params![id],
                row,
            ),
            None => self.conn().query_row(
                "SELECT id, started_at, report FROM runs ORDER BY id DESC LIMIT 1",
                [],
                row,
            ),
        };
        found.optional().map_err(self.error("reading a run"))
    }

    /// The numbers and start times of the last `limit` runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<(i64, i64)>, StateError> {
        let mut stmt = self
            .conn()
            .prepare("SELECT id, started_at FROM runs ORDER BY id DESC LIMIT ?1")
            .map_err(self.error("listing runs"))?;
        let rows = stmt
            .query_map(params![limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.error("listing runs"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.error("listing runs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_numbered_and_the_last_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let h = StateDb::open(&dir.path().join("h.sqlite")).unwrap();
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
