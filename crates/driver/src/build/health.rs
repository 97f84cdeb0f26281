//! Which machines the run may use, as Hydra's queue runner decides it: a machine whose
//! connection fails is down for a while and probed again after an exponential backoff;
//! one that keeps failing (over runs: the count is kept in the state database) is
//! quarantined, and later runs skip it until its quarantine ends. A successful build
//! there clears its record. The scheduler only hears the outcome: a machine down, back,
//! or lost for the run.

use std::time::Duration;

use offload_sched::MachineId;

use crate::env;
use crate::state::format_utc;
use crate::state::{unix_now, StateDb};

/// How a run treats machines that fail.
#[derive(Debug, Clone, PartialEq)]
pub struct Reliability {
    /// The wait before a machine that failed once is probed again; it doubles with each
    /// further failure, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Consecutive failures (counted over runs) after which a machine is quarantined.
    pub quarantine_after: u32,
    /// How long a quarantine lasts.
    pub quarantine_for: Duration,
    /// How long an ssh connection may go without an answer before it counts as dead
    /// (ssh's `ServerAliveInterval` × `ServerAliveCountMax`, and its `ConnectTimeout`).
    pub stall_timeout: Duration,
    /// How long a run with nothing of its own running waits for slots others hold
    /// before it gives up on what is left.
    pub slot_wait: Duration,
}

impl Default for Reliability {
    fn default() -> Self {
        Reliability {
            backoff: env::RETRY_BACKOFF,
            max_backoff: env::MAX_BACKOFF,
            quarantine_after: env::QUARANTINE_AFTER,
            quarantine_for: env::QUARANTINE_FOR,
            stall_timeout: env::STALL_TIMEOUT,
            slot_wait: env::SLOT_WAIT_LIMIT,
        }
    }
}

impl Reliability {
    /// The ssh options that notice a dead or silent host within `stall_timeout`.
    pub fn ssh_options(&self) -> Vec<String> {
        let total = self.stall_timeout.as_secs().max(1);
        // Three unanswered keepalives, the first after a third of the time.
        let interval = (total / 3).max(1);
        let count = total.div_ceil(interval);
        vec![
            format!("-oServerAliveInterval={interval}"),
            format!("-oServerAliveCountMax={count}"),
            format!("-oConnectTimeout={total}"),
        ]
    }
}

/// What follows a machine's failure.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AfterFailure {
    /// Down for now: probe it again after this long.
    RetryIn(Duration),
    /// Quarantined until then (Unix seconds): lost for the run.
    Quarantined(i64),
}

/// Each machine's failures in this run and before.
pub(crate) struct Health<'h> {
    policy: Reliability,
    history: Option<&'h StateDb>,
    names: Vec<String>,
    /// Consecutive failures, earlier runs included.
    failures: Vec<u32>,
    /// The last failure of each machine that failed in this run.
    last_failure: Vec<Option<String>>,
}

impl<'h> Health<'h> {
    pub(crate) fn new(
        policy: Reliability,
        history: Option<&'h StateDb>,
        names: Vec<String>,
    ) -> Self {
        let n = names.len();
        Health {
            policy,
            history,
            names,
            failures: vec![0; n],
            last_failure: vec![None; n],
        }
    }

    /// Reads `machine`'s record; says why it is skipped when it is quarantined.
    pub(crate) fn quarantined(&mut self, machine: MachineId) -> Option<String> {
        let history = self.history?;
        let record = match history.machine(&self.names[machine]) {
            Ok(record) => record?,
            Err(e) => {
                tracing::warn!("{e}");
                return None;
            }
        };
        self.failures[machine] = record.failures;
        if record.quarantined_until <= unix_now() {
            // Its quarantine is over: it is probed like any other machine.
            return None;
        }
        let why = format!(
            "quarantined until {}, last failure: {}",
            format_utc(record.quarantined_until),
            record.last_failure
        );
        self.last_failure[machine] = Some(why.clone());
        Some(why)
    }

    /// Counts a connection failure of `machine` and says what follows.
    pub(crate) fn failed(&mut self, machine: MachineId, reason: &str) -> AfterFailure {
        let now = unix_now();
        let name = &self.names[machine];
        self.last_failure[machine] = Some(reason.to_string());
        let recorded = self
            .history
            .map(|h| h.machine_failed(name, reason, now))
            .transpose();
        self.failures[machine] = match recorded {
            Ok(Some(n)) => n,
            Ok(None) => self.failures[machine] + 1,
            Err(e) => {
                tracing::warn!("{e}");
                self.failures[machine] + 1
            }
        };
        let failures = self.failures[machine];
        if failures >= self.policy.quarantine_after {
            let until = now.saturating_add(self.policy.quarantine_for.as_secs() as i64);
            if let Some(Err(e)) = self.history.map(|h| h.quarantine(name, until)) {
                tracing::warn!("{e}");
            }
            return AfterFailure::Quarantined(until);
        }
        let doublings = (failures - 1).min(16);
        AfterFailure::RetryIn(
            self.policy
                .backoff
                .saturating_mul(1 << doublings)
                .min(self.policy.max_backoff),
        )
    }

    /// A build succeeded on `machine`: its failures are forgotten.
    pub(crate) fn built_on(&mut self, machine: MachineId) {
        if self.failures[machine] == 0 {
            return;
        }
        self.failures[machine] = 0;
        if let Some(Err(e)) = self.history.map(|h| h.machine_ok(&self.names[machine])) {
            tracing::warn!("{e}");
        }
    }

    /// How long a probe may take: twice the stall timeout (connecting, then the
    /// handshake).
    pub(crate) fn probe_timeout(&self) -> Duration {
        self.policy.stall_timeout.max(Duration::from_secs(1)) * 2
    }

    /// The first wait after a failure (`--retry-backoff`), for a copy tried again.
    pub(crate) fn backoff(&self) -> Duration {
        self.policy.backoff
    }

    /// Why each machine failed in this run, for a build no machine remains for.
    pub(crate) fn failures(&self) -> Vec<(&str, &str)> {
        self.names
            .iter()
            .zip(&self.last_failure)
            .filter_map(|(n, f)| Some((n.as_str(), f.as_deref()?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_then_quarantine_and_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let history = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
        let policy = Reliability {
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(3),
            quarantine_after: 4,
            ..Reliability::default()
        };
        let names = vec!["local".to_string(), "b1".to_string()];
        let mut health = Health::new(policy.clone(), Some(&history), names.clone());
        assert_eq!(health.quarantined(1), None);
        let waits: Vec<AfterFailure> = (0..3).map(|_| health.failed(1, "refused")).collect();
        assert_eq!(
            waits,
            [1, 2, 3].map(|s| AfterFailure::RetryIn(Duration::from_secs(s)))
        );
        // The next run goes on counting: the fourth failure quarantines.
        let mut next = Health::new(policy.clone(), Some(&history), names.clone());
        assert_eq!(next.quarantined(1), None);
        assert!(matches!(
            next.failed(1, "timed out"),
            AfterFailure::Quarantined(_)
        ));
        assert_eq!(next.failures(), [("b1", "timed out")]);
        let mut later = Health::new(policy.clone(), Some(&history), names.clone());
        let why = later.quarantined(1).expect("still quarantined");
        assert!(why.starts_with("quarantined until "), "{why}");
        assert!(why.ends_with(", last failure: timed out"), "{why}");
        // A build there clears it all.
        later.built_on(1);
        let mut cleared = Health::new(policy, Some(&history), names);
        assert_eq!(cleared.quarantined(1), None);
        assert_eq!(
            cleared.failed(1, "refused"),
            AfterFailure::RetryIn(Duration::from_secs(1))
        );
    }

    #[test]
    fn ssh_notices_a_silent_host_within_the_stall_timeout() {
        let policy = Reliability {
            stall_timeout: Duration::from_secs(3),
            ..Reliability::default()
        };
        assert_eq!(
            policy.ssh_options(),
            [
                "-oServerAliveInterval=1",
                "-oServerAliveCountMax=3",
                "-oConnectTimeout=3"
            ]
        );
    }
}
