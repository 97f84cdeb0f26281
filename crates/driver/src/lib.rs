//! The driver: everything that talks to machines. It runs Nix's serve protocol
//! (`nix-store --serve --write`) over OpenSSH or a local process, moves store paths
//! between machines, and executes the scheduler's plan.
//!
//! Main types:
//! - [`Endpoint`] — how to reach a store (ssh host, local process, chroot store);
//! - [`ServeConn`] — one serve session: queries, NAR streaming, imports, builds;
//! - [`copy_closure`] — copies a closure between two stores, several transfers at once;
//! - [`build::run`] — builds a graph of derivations over a fleet, as the scheduler plans;
//! - [`StateDb`] — the state database in SQLite: build durations for estimates, and
//!   machines that keep failing;
//! - [`hook::run`] — Nix's build hook with offload's machine choice and transport;
//! - [`slots::SlotLedger`] — builders' slots, shared with Nix's own build hook;
//! - [`slots::remote::RemoteSlots`] — builders' slots locked on the builders themselves,
//!   so clients on different machines do not overbook a shared builder;
//! - [`DriverError`] — what went wrong, naming the machine and the next step.
//!
//! This crate depends on `offload-nix` for formats and framing and on `offload-sched`
//! for decisions; it makes none of its own.

pub mod agent;
pub mod build;
pub mod daemon;
pub mod env;
mod error;
pub mod fleet;
pub mod hook;
pub mod learn;
pub mod order;
pub mod plan;
pub mod process;
pub mod reporter;
mod session;
pub mod shutdown;
pub mod slots;
pub mod ssh;
pub mod state;
pub mod transfer;
pub mod trust;

pub use error::DriverError;
pub use session::ServeConn;
pub use session::{Pool, Traffic};
pub use ssh::{shell_quote, Endpoint, Route};
pub use state::{
    format_utc, package_name, BuildRecord, EstimateSource, MachineRecord, RunRecord, StateDb,
    StateError, DEFAULT_SECONDS,
};
pub use transfer::PathRegistry;
pub use transfer::{copy_closure, CopyFailure, CopyOptions, CopyStats};
