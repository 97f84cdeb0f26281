//! What the state database remembers of machines across runs: consecutive connection
//! failures, the last one, and a quarantine's end. The decisions (when to back off,
//! when to quarantine) are the runner's (`build/health.rs`); this only keeps the record.

use rusqlite::{params, OptionalExtension};

use super::{StateDb, StateError};

/// A machine's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRecord {
    /// Connection failures since its last success, over every run.
    pub failures: u32,
    pub last_failure: String,
    /// Unix seconds of the last failure.
    pub last_failure_at: i64,
    /// Unix seconds when its quarantine ends; 0 when it is not quarantined.
    pub quarantined_until: i64,
}

impl StateDb {
    /// The record of machine `name`, if it ever failed.
    pub fn machine(&self, name: &str) -> Result<Option<MachineRecord>, StateError> {
        self.conn()
            .query_row(
                "SELECT failures, last_failure, last_failure_at, quarantined_until
                 FROM machines WHERE name = ?1",
                params![name],
                |row| {
                    Ok(MachineRecord {
                        failures: row.get(0)?,
                        last_failure: row.get(1)?,
                        last_failure_at: row.get(2)?,
                        quarantined_until: row.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(self.error("reading a machine's record"))
    }

    /// Counts a connection failure of `name` at `at` (Unix seconds); returns its
    /// consecutive failures, this one included.
    pub fn machine_failed(&self, name: &str, reason: &str, at: i64) -> Result<u32, StateError> {
        self.conn()
            .query_row(
                "INSERT INTO machines (name, failures, last_failure, last_failure_at, quarantined_until)
                 VALUES (?1, 1, ?2, ?3, 0)
                 ON CONFLICT (name) DO UPDATE SET failures = failures + 1,
                     last_failure = ?2, last_failure_at = ?3
                 RETURNING failures",
                params![name, reason, at],
                |row| row.get(0),
            )
            .map_err(self.error("recording a machine's failure"))
    }

    /// Keeps `name` out of runs until `until` (Unix seconds).
    pub fn quarantine(&self, name: &str, until: i64) -> Result<(), StateError> {
        self.conn()
            .execute(
                "UPDATE machines SET quarantined_until = ?2 WHERE name = ?1",
                params![name, until],
            )
            .map(|_| ())
            .map_err(self.error("quarantining a machine"))
    }

    /// `name` answered: its failures and any quarantine are forgotten.
    pub fn machine_ok(&self, name: &str) -> Result<(), StateError> {
        self.conn()
            .execute("DELETE FROM machines WHERE name = ?1", params![name])
            .map(|_| ())
            .map_err(self.error("clearing a machine's failures"))
    }
}

/// `secs` (Unix seconds) as `YYYY-MM-DD HH:MM:SS UTC`, for messages.
pub fn format_utc(secs: i64) -> String {
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_until_a_success_and_quarantines_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let h = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
        assert_eq!(h.machine("b1").unwrap(), None);
        assert_eq!(h.machine_failed("b1", "refused", 10).unwrap(), 1);
        assert_eq!(h.machine_failed("b1", "timed out", 20).unwrap(), 2);
        h.quarantine("b1", 600).unwrap();
        let record = h.machine("b1").unwrap().unwrap();
        assert_eq!(
            record,
            MachineRecord {
                failures: 2,
                last_failure: "timed out".into(),
                last_failure_at: 20,
                quarantined_until: 600,
            }
        );
        h.machine_ok("b1").unwrap();
        assert_eq!(h.machine("b1").unwrap(), None);
    }

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_735_689_599), "2024-12-31 23:59:59 UTC");
    }
}
