//! What offload keeps between runs.
//!
//! - [`report`] — the run report: where and when each build ran and what each link
//!   carried, kept for `offload report`.

pub mod report;
