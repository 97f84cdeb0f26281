//! What the state database remembers of machines across runs: consecutive connection
//! failures, the last one, and a quarantine's end. The decisions (when to back off,
//! when to quarantine) are the runner's (`build/health.rs`); this only keeps the record.

use super::sql::args;
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
        let found = self.query(
            "reading a machine's record",
            "SELECT failures, last_failure, last_failure_at, quarantined_until
             FROM machines WHERE name = ?1",
            args![name],
            |row| {
                Ok(MachineRecord {
                    failures: row.int(0)?.clamp(0, u32::MAX.into()) as u32,
                    last_failure: row.text(1)?,
                    last_failure_at: row.int(2)?,
                    quarantined_until: row.int(3)?,
                })
            },
        )?;
        Ok(found.into_iter().next())
    }

    /// Counts a connection failure of `name` at `at` (Unix seconds); returns its
    /// consecutive failures, this one included.
    pub fn machine_failed(&self, name: &str, reason: &str, at: i64) -> Result<u32, StateError> {
        let failures = self.query(
            "recording a machine's failure",
            "INSERT INTO machines (name, failures, last_failure, last_failure_at, quarantined_until)
             VALUES (?1, 1, ?2, ?3, 0)
             ON CONFLICT (name) DO UPDATE SET failures = machines.failures + 1,
                 last_failure = ?2, last_failure_at = ?3
             RETURNING failures",
            args![name, reason, at],
            |row| Ok(row.int(0)?.clamp(0, u32::MAX.into()) as u32),
        )?;
        Ok(failures.into_iter().next().unwrap_or(1))
    }

    /// Keeps `name` out of runs until `until` (Unix seconds).
    pub fn quarantine(&self, name: &str, until: i64) -> Result<(), StateError> {
        self.execute(
            "quarantining a machine",
            "UPDATE machines SET quarantined_until = ?2 WHERE name = ?1",
            args![name, until],
        )
    }

    /// `name` answered: its failures and any quarantine are forgotten.
    pub fn machine_ok(&self, name: &str) -> Result<(), StateError> {
        self.execute(
            "clearing a machine's failures",
            "DELETE FROM machines WHERE name = ?1",
            args![name],
        )
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
        let h = StateDb::open_file(&dir.path().join("state.sqlite")).unwrap();
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
