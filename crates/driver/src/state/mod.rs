//! What offload keeps between runs.
//!
//! - [`overview`] — each machine as offload knows it now: load, what was learned, health;
//! - [`report`] — the run report: where and when each build ran and what each link
//!   carried, kept for `offload report` and rendered as HTML.

pub mod overview;
pub mod report;
