//! Builder to builder: whether one machine reaches another by its own ssh (probed once
//! per pair and kept), and the copies it made straight to it, from which the pair's
//! link is learned as the client's links are ([`offload_learn::PairLinks`]).

use super::sql::args;
use super::StateDb;
use crate::state::{unix_now, StateError};
use offload_learn::{LinkFigures, PairLinks, RECENT_TRANSFERS};

/// How long a probe's answer stands before the pair is probed again.
pub const PROBE_STANDS_FOR: u64 = 24 * 3600;

/// What the state knows of one ordered pair of machines (their keys).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerReach {
    pub from: String,
    pub to: String,
    pub reachable: bool,
    /// Why not, when it is not: the end of the probe's stderr.
    pub reason: String,
    /// Unix seconds.
    pub probed_at: u64,
    /// The pair's link, from the copies it made.
    pub link: Option<LinkFigures>,
}

impl PeerReach {
    /// Whether the probe is recent enough to go by.
    pub fn is_fresh(&self) -> bool {
        (unix_now().max(0) as u64).saturating_sub(self.probed_at) < PROBE_STANDS_FOR
    }
}

impl StateDb {
    /// Records whether `from` reaches `to` (machine keys), and why not.
    pub fn record_peer_probe(
        &self,
        from: &str,
        to: &str,
        reachable: bool,
        reason: &str,
    ) -> Result<(), StateError> {
        self.execute(
            "recording a probe between machines",
            "INSERT INTO peer_reach (from_machine, to_machine, reachable, reason, probed_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (from_machine, to_machine) DO UPDATE SET
                 reachable = excluded.reachable, reason = excluded.reason,
                 probed_at = excluded.probed_at",
            args![from, to, reachable, reason, unix_now()],
        )
    }

    /// Records a copy straight from `from` to `to` of `bytes` that took `seconds`.
    pub fn record_peer_transfer(
        &self,
        from: &str,
        to: &str,
        bytes: u64,
        seconds: f64,
        concurrent: u32,
    ) -> Result<(), StateError> {
        self.execute(
            "recording a copy between machines",
            "INSERT INTO peer_transfers (from_machine, to_machine, bytes, seconds, concurrent, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            args![
                from,
                to,
                bytes as i64,
                seconds,
                concurrent.max(1),
                unix_now()
            ],
        )
    }

    /// Every pair probed, with its learned link.
    pub fn peer_reach(&self) -> Result<Vec<PeerReach>, StateError> {
        const OP: &str = "reading the probes between machines";
        let pairs: Vec<PeerReach> = self.query(
            OP,
            "SELECT from_machine, to_machine, reachable, reason, probed_at FROM peer_reach
             ORDER BY from_machine, to_machine",
            args![],
            |r| {
                Ok(PeerReach {
                    from: r.text(0)?,
                    to: r.text(1)?,
                    reachable: r.int(2)? != 0,
                    reason: r.text(3)?,
                    probed_at: r.int(4)?.max(0) as u64,
                    link: None,
                })
            },
        )?;
        pairs
            .into_iter()
            .map(|mut p| {
                let rows = self.query(
                    OP,
                    "SELECT bytes, seconds, concurrent FROM peer_transfers
                     WHERE from_machine = ?1 AND to_machine = ?2 ORDER BY rowid DESC LIMIT ?3",
                    args![&p.from, &p.to, RECENT_TRANSFERS as i64],
                    |r| Ok((r.int(0)?.max(0) as u64, r.real(1)?, r.int(2)?.max(1) as u32)),
                )?;
                let mut learned: PairLinks<()> = PairLinks::default();
                // Oldest first, as they happened.
                for (bytes, seconds, concurrent) in rows.into_iter().rev() {
                    learned.record((), (), bytes, seconds, concurrent);
                }
                p.link = learned.figures(&(), &());
                Ok(p)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_is_kept_per_pair_and_copies_teach_its_link() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open_file(&dir.path().join("state.sqlite")).unwrap();
        db.record_peer_probe("ssh://a", "ssh://b", false, "Connection refused")
            .unwrap();
        db.record_peer_probe("ssh://a", "ssh://b", true, "")
            .unwrap();
        db.record_peer_probe("ssh://b", "ssh://a", false, "Permission denied")
            .unwrap();
        for _ in 0..3 {
            db.record_peer_transfer("ssh://a", "ssh://b", 8 << 20, 0.1 + 0.005, 1)
                .unwrap();
        }
        let pairs = db.peer_reach().unwrap();
        assert_eq!(pairs.len(), 2);
        let ab = &pairs[0];
        assert_eq!(
            (ab.from.as_str(), ab.to.as_str(), ab.reachable),
            ("ssh://a", "ssh://b", true)
        );
        assert!(ab.is_fresh());
        let link = ab.link.expect("learned from the copies");
        assert!((link.bandwidth - 83.9e6).abs() < 1e6, "{link:?}");
        assert!(!pairs[1].reachable);
        assert_eq!(pairs[1].reason, "Permission denied");
        assert_eq!(pairs[1].link, None);
    }
}
