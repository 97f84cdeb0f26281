//! Builder slots as leases in the shared state: while a build holds a slot on a builder
//! (the builder's own lock, `slots/remote/`), the client also holds it in the database,
//! by a session-level advisory lock of a connection of its own and a row in `leases`
//! saying who holds it, for which build, since when and until when the plan expects it.
//! Both belong to the client's database session: a client that dies (even by SIGKILL)
//! frees its leases the moment the server sees its connection close, and [`Leases::held`] never
//! shows the row of a session that has ended. The builders' locks stay the guard for
//! clients without the database; leases make the team's slots visible in one place.

use std::sync::Arc;

use super::pg::PgState;
use super::sql::{args, DbError, Value};
use super::{redact, unix_now};

/// The leases of one client: its own connection to the shared state.
pub struct Leases {
    pg: PgState,
    /// `user@host`, as the leases name their holder.
    who: String,
}

/// A slot held in the database; dropping it frees it.
pub struct Lease {
    leases: Arc<Leases>,
    machine: String,
    slot: u32,
}

/// A lease as the database shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRecord {
    pub machine: String,
    pub slot: u32,
    pub who: String,
    /// The build: its derivation's name.
    pub what: String,
    /// Unix seconds.
    pub since: i64,
    pub expected_end: i64,
}

impl Leases {
    /// The client's leases when a shared state is configured and answers; None
    /// otherwise (the builders' locks alone keep slots apart then).
    pub fn open() -> Option<Arc<Leases>> {
        let uri = super::shared_uri()?;
        if super::db::recently_down() {
            return None;
        }
        match PgState::connect(&uri) {
            Ok(pg) => Some(Arc::new(Leases { pg, who: holder() })),
            Err(e) => {
                super::db::note_down();
                tracing::debug!("no leases in {}: {e:?}", redact(&uri));
                None
            }
        }
    }

    /// Takes slot `slot` of `machine` for the build of `what`, expected to take
    /// `seconds`. Sent without waiting: a build never waits for the database.
    pub fn take(self: &Arc<Self>, machine: &str, slot: u32, what: &str, seconds: f64) -> Lease {
        let since = unix_now();
        // The row only with the lock: a row of a session that ended is replaced.
        self.pg.send(
            "INSERT INTO leases (machine, slot, pid, who, what, since, expected_end)
             SELECT ?1::text, ?2::bigint, pg_backend_pid(), ?3::text, ?4::text, ?5::bigint,
                    ?6::bigint
             WHERE pg_try_advisory_lock(hashtext(?1::text), ?2::int)
             ON CONFLICT (machine, slot) DO UPDATE SET pid = excluded.pid,
                 who = excluded.who, what = excluded.what, since = excluded.since,
                 expected_end = excluded.expected_end",
            args![
                machine,
                slot,
                self.who.as_str(),
                what,
                since,
                since + seconds.max(0.0).ceil() as i64
            ],
        );
        Lease {
            leases: self.clone(),
            machine: machine.to_string(),
            slot,
        }
    }

    /// Every lease held now, by any client, oldest first.
    pub fn held(&self) -> Result<Vec<LeaseRecord>, DbError> {
        held(&self.pg)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let key: &[Value] = args![self.machine.as_str(), self.slot];
        let pg = &self.leases.pg;
        pg.send(
            "DELETE FROM leases WHERE machine = ?1 AND slot = ?2 AND pid = pg_backend_pid()",
            key,
        );
        pg.send(
            "SELECT pg_advisory_unlock(hashtext(?1::text), ?2::int)",
            key,
        );
    }
}

/// The leases of live sessions.
fn held(pg: &PgState) -> Result<Vec<LeaseRecord>, DbError> {
    pg.query(
        "SELECT machine, slot, who, what, since, expected_end FROM leases
         WHERE pid IN (SELECT pid FROM pg_stat_activity) ORDER BY since, machine, slot",
        args![],
    )?
    .iter()
    .map(|r| {
        Ok(LeaseRecord {
            machine: r.text(0)?,
            slot: r.int(1)?.clamp(0, u32::MAX.into()) as u32,
            who: r.text(2)?,
            what: r.text(3)?,
            since: r.int(4)?,
            expected_end: r.int(5)?,
        })
    })
    .collect()
}

/// A derivation's name from its `.drv` path (`/nix/store/HASH-hello-2.12.drv` →
/// `hello-2.12`), as leases name their build.
pub fn drv_name(drv_path: &str) -> &str {
    let file = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let name = file.split_once('-').map_or(file, |(_, name)| name);
    name.strip_suffix(".drv").unwrap_or(name)
}

/// `user@host` of this process.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{}@{host}", crate::env::current_user())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lease_names_its_build_by_the_derivation_name() {
        assert_eq!(
            super::drv_name("/nix/store/00000000000000000000000000000000-hello-2.12.drv"),
            "hello-2.12"
        );
        assert_eq!(super::drv_name("odd"), "odd");
    }
}
