//! The policies a simulation can run.

mod offload;
mod queue;

pub use offload::OffloadPolicy;
pub use queue::{QueueKind, QueuePolicy};
