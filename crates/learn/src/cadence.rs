//! When to fit again during a run, and which fitted figures replace the planned ones.

use crate::ROWS_READ;

/// Seconds between fits of the machines' speeds during a run, when a fit reads all of
/// [`ROWS_READ`] (see [`refit_interval`]).
pub const REFIT_INTERVAL: f64 = 2.0;
/// A fitted speed that moved by more than this fraction replaces the planned one.
const REFIT_CHANGE: f64 = 0.1;

/// Whether a fitted figure moved far enough from the planned one to replace it.
pub fn moved(old: f64, new: f64) -> bool {
    (new / old.max(1e-9) - 1.0).abs() > REFIT_CHANGE
}

/// Seconds to wait after a fit over `rows` build rows before the next during a run. A
/// fit's cost grows with the rows it reads, so a small state is fitted again at every
/// build's end: the plan then acts on a build that showed its machine slower than
/// planned before it places the next one. On the first run over three builders 3×
/// slower than declared, a 2-s wait let the critical derivation go to one of them
/// 0.6 s after the build that showed it (8.5 s for 2.8 s of work) had ended.
pub fn refit_interval(rows: usize) -> f64 {
    REFIT_INTERVAL * (rows as f64 / ROWS_READ as f64).min(1.0)
}

/// The cadence of a run's fits: none before the first build ends, then one at a
/// build's end once [`refit_interval`] of the last fit's rows has passed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Refits {
    /// When the last fit was (0: none yet).
    last: f64,
    /// Seconds to wait after it.
    wait: f64,
}

impl Refits {
    /// Whether a fit is due at `now`; when it is, it counts as done at `now`.
    pub fn due(&mut self, now: f64) -> bool {
        if self.last > 0.0 && now - self.last < self.wait {
            return false;
        }
        self.last = now;
        true
    }

    /// The fit that was due read `rows` build rows: the next waits [`refit_interval`].
    pub fn fitted(&mut self, rows: usize) {
        self.wait = refit_interval(rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{row, SYS};
    use crate::{BuildRow, Knowledge};

    #[test]
    fn a_small_state_is_fitted_again_at_every_builds_end() {
        // A first run's few builds: no wait at all between fits.
        let rows: Vec<BuildRow> = (0..30)
            .map(|i| row(&format!("d{i}"), SYS, "ssh://b1", 3.0))
            .collect();
        let wait = refit_interval(Knowledge::from_builds(&rows, SYS).rows());
        assert!(wait < 0.01, "{wait}");
        // A fit of everything it may read waits the whole interval.
        assert_eq!(refit_interval(ROWS_READ), REFIT_INTERVAL);
        assert_eq!(refit_interval(10 * ROWS_READ), REFIT_INTERVAL);
    }

    #[test]
    fn fits_wait_as_long_as_the_last_read_rows_say() {
        let mut refits = Refits::default();
        assert!(refits.due(1.0));
        refits.fitted(ROWS_READ);
        assert!(!refits.due(2.5));
        assert!(refits.due(3.0));
        refits.fitted(ROWS_READ / 2);
        assert!(!refits.due(3.9));
        assert!(refits.due(4.0));
        // A fit at time 0 counts as none: the next build's end fits again.
        let mut at_zero = Refits::default();
        assert!(at_zero.due(0.0));
        at_zero.fitted(ROWS_READ);
        assert!(at_zero.due(0.1));
    }

    #[test]
    fn a_figure_moves_by_more_than_a_tenth() {
        assert!(!moved(1.0, 1.09));
        assert!(moved(1.0, 1.12));
        assert!(moved(1.0, 0.89));
        assert!(moved(0.0, 1.0));
    }
}
