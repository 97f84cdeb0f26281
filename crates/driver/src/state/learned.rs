//! What the state database teaches, read for the planner: the recorded builds, output
//! sizes, copies and task times that `offload-learn` fits into [`Knowledge`]
//! ([`StateDb::knowledge`]), the copies recorded as they land, and each builder's CPU
//! cores once asked (`crate::fleet::learned::learn_cores` asks). The fitting itself is
//! pure and lives in `offload-learn`, shared with the simulator.

use std::collections::HashMap;

use super::sql::{args, DbError, Row};
use super::{StateDb, StateError};
use offload_learn::{BuildRow, Knowledge, Transfer, RECENT_PER_CELL, RECENT_TRANSFERS, ROWS_READ};

impl StateDb {
    /// Fits what the recorded builds and transfers say; `local_system` is this
    /// machine's native system, the unit of speed.
    pub fn knowledge(&self, local_system: &str) -> Result<Knowledge, StateError> {
        const OP: &str = "reading what was learned";
        let rows: Vec<BuildRow> = self.query(
            OP,
            "SELECT name, system, machine, seconds, speed, run FROM builds
             ORDER BY rowid DESC LIMIT ?1",
            args![ROWS_READ as i64],
            |r| {
                Ok(BuildRow {
                    name: r.text(0)?,
                    system: r.text(1)?,
                    machine: r.text(2)?,
                    seconds: r.real(3)?,
                    declared_speed: r.real(4)?,
                    run: r.opt_text(5)?,
                })
            },
        )?;
        let sizes: HashMap<String, Vec<f64>> = self.recent_by_key(
            "SELECT name, output_bytes FROM builds WHERE output_bytes IS NOT NULL
             ORDER BY rowid DESC LIMIT ?1",
            RECENT_PER_CELL,
            |r| Ok(r.int(1)?.max(0) as f64),
        )?;
        let per_machine: HashMap<String, Vec<Transfer>> = self.recent_by_key(
            "SELECT machine, bytes, seconds, concurrent FROM transfers
             ORDER BY rowid DESC LIMIT ?1",
            RECENT_TRANSFERS,
            |r| {
                Ok(Transfer {
                    bytes: r.int(1)?.max(0) as u64,
                    seconds: r.real(2)?,
                    concurrent: r.int(3)?.max(1) as u32,
                })
            },
        )?;
        // What a build costs besides itself and its inputs' copies (the links' to
        // learn): the task's time over the build's own.
        let extra: HashMap<String, Vec<f64>> = self.recent_by_key(
            "SELECT machine, task_seconds - seconds FROM builds
             WHERE task_seconds IS NOT NULL ORDER BY rowid DESC LIMIT ?1",
            RECENT_TRANSFERS,
            |r| Ok(r.real(1)?.max(0.0)),
        )?;
        Ok(Knowledge::from_builds(&rows, local_system)
            .with_output_sizes(sizes)
            .with_transfers(per_machine)
            .with_costs_per_build(extra))
    }

    /// Runs `sql` (newest rows first, `?1` the row limit; column 0 a key) and keeps, per
    /// key, the values `value` reads from its `per_key` newest rows.
    fn recent_by_key<T>(
        &self,
        sql: &str,
        per_key: usize,
        value: impl Fn(&Row) -> Result<T, DbError>,
    ) -> Result<HashMap<String, Vec<T>>, StateError> {
        let rows = self.query(
            "reading what was learned",
            sql,
            args![ROWS_READ as i64],
            |r| Ok((r.text(0)?, value(r)?)),
        )?;
        let mut by_key: HashMap<String, Vec<T>> = HashMap::new();
        for (key, v) in rows {
            let cell = by_key.entry(key).or_default();
            if cell.len() < per_key {
                cell.push(v);
            }
        }
        Ok(by_key)
    }

    /// Records a copy of `bytes` between this machine and `machine` (its key) that took
    /// `seconds`, `concurrent` copies sharing that link when it started.
    pub fn record_transfer(
        &self,
        machine: &str,
        to_machine: bool,
        bytes: u64,
        seconds: f64,
        concurrent: u32,
    ) -> Result<(), StateError> {
        self.execute(
            "recording a transfer",
            "INSERT INTO transfers (machine, direction, bytes, seconds, concurrent, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            args![
                machine,
                if to_machine { "to" } else { "from" },
                bytes as i64,
                seconds,
                concurrent.max(1),
                crate::state::unix_now()
            ],
        )
    }

    /// The CPU cores of `machine` (its key), when learned.
    pub fn cores(&self, machine: &str) -> Result<Option<u32>, StateError> {
        let cores = self.query(
            "reading a machine's cores",
            "SELECT cores FROM machine_cores WHERE machine = ?1",
            args![machine],
            |r| Ok(r.int(0)?.clamp(0, u32::MAX.into()) as u32),
        )?;
        Ok(cores.into_iter().next())
    }

    pub fn set_cores(&self, machine: &str, cores: u32) -> Result<(), StateError> {
        self.execute(
            "recording a machine's cores",
            "INSERT INTO machine_cores (machine, cores, learned_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (machine) DO UPDATE SET cores = ?2, learned_at = ?3",
            args![machine, cores, crate::state::unix_now()],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYS: &str = "x86_64-linux";

    #[test]
    fn what_a_build_costs_besides_itself_is_kept_per_machine() {
        let dir = tempfile::tempdir().unwrap();
        let h = StateDb::open_file(&dir.path().join("state.sqlite")).unwrap();
        // Four builds on a builder: 0.4 s around each, and once 3 s of input copies.
        for (i, extra) in [0.4, 0.45, 3.0, 0.4].iter().enumerate() {
            let name = format!("d{i}");
            h.record_build(&crate::state::BuildRecord {
                name: &name,
                system: SYS,
                machine: "ssh://b",
                seconds: 1.0,
                declared_speed: 1.0,
                output_bytes: None,
                run: None,
                task_seconds: Some(1.0 + extra),
            })
            .unwrap();
        }
        let k = h.knowledge(SYS).unwrap();
        let (seconds, samples) = k.per_build("ssh://b").unwrap();
        assert!((seconds - 0.4).abs() < 1e-9, "{seconds}");
        assert_eq!(samples, 4);
        assert_eq!(k.per_build("local"), None);
    }
}
