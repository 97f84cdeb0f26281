//! The policies a simulation can run.

mod hydra;
mod nix;
mod offload;

pub use hydra::HydraPolicy;
pub use nix::NixPolicy;
pub use offload::OffloadPolicy;
