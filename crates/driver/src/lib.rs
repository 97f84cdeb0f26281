//! The driver: everything that talks to machines. It runs Nix's serve protocol
//! (`nix-store --serve --write`) over OpenSSH or a local process, moves store paths
//! between machines, and executes the scheduler's plan.
//!
//! Main types:
//! - [`Endpoint`] — how to reach a store (ssh host, local process, chroot store);
//! - [`ServeConn`] — one serve session: queries, NAR streaming, imports, builds;
//! - [`copy_closure`] — copies a closure between two stores, several transfers at once;
//! - [`build::run`] — builds a graph of derivations over a fleet, as the scheduler plans;
//! - [`job::run`] — one `offload build` from request to outcome: evaluation, trust,
//!   the build, the run's record, result links;
//! - [`StateDb`] — the state database, in SQLite or a PostgreSQL database a team's
//!   clients share: build durations for estimates, and machines that keep failing;
//! - [`hook::run`] — Nix's build hook with offload's machine choice and transport;
//! - [`slots::SlotLedger`] — builders' slots, shared with Nix's own build hook;
//! - [`slots::remote::RemoteSlots`] — builders' slots locked on the builders themselves,
//!   so clients on different machines do not overbook a shared builder;
//! - [`DriverError`] — what went wrong, naming the machine and the next step.
//!
//! This crate depends on `offload-nix` for formats and framing and on `offload-sched`
//! for decisions; it makes none of its own.
//!
//! # Layout
//!
//! One job per top-level module (a file or a folder); no module imports one that
//! imports it back.
//!
//! - `env.rs` — every environment variable the driver reads, the default paths, the
//!   timeouts and the reliability defaults;
//! - `error.rs` — [`DriverError`]: what went wrong, naming the machine and the next step;
//! - `process.rs` — the one way to run Nix's local tools and report their failures;
//! - `ssh/` — reaching a store: `nix-store --serve` over OpenSSH or as a local process,
//!   ssh failures told apart, and the master connection a builder's sessions share;
//! - `session/` — a serve session (queries, NAR streaming, imports, builds, stderr) and
//!   the pool of idle sessions per machine;
//! - `daemon.rs` — the nix-daemon's worker protocol, for handing it a build log;
//! - `transfer/` — the transfer engine (dependency order, sending), `offload copy`, and
//!   the registry of which store holds which path;
//! - `slots/` — builders' slots: the local ledger shared with Nix's own hook, and locks
//!   on the builders themselves (`slots/remote/`);
//! - `state/` — the state database ([`StateDb`]): SQLite or PostgreSQL, one schema and
//!   one SQL for both, the fall-back to the local file; builds, machines, runs, and
//!   what the builds and copies teach, read for `offload-learn`'s fit; the run report
//!   kept for `offload report` (`state/report.rs`);
//! - `html.rs` — the run report as one self-contained HTML file;
//! - `overview.rs` — each machine as offload knows it now: load, what was learned, health;
//! - `config.rs` — offload's own config file: machine groups, build defaults, the state
//!   directory;
//! - `fleet/` — the machines a run uses, from Nix's settings (`fleet/nixconf.rs`) and
//!   the user's choice of hosts, with what was learned of them and their cores
//!   (`fleet/learned.rs`);
//! - `plan/` — from `.drv` files to build nodes, and what Nix's dry run would build;
//! - `reporter.rs` — [`reporter::Reporter`], the progress the CLI draws;
//! - `build/` — the build runner: its event loop, machines' health, learning and copy
//!   back (`build/runner/`), its transport over real machines (`build/serve/`), build
//!   logs, and its tests on a fake transport (`build/tests/`);
//! - `trust/` — the trust check, signing (`trust/signing.rs`) and `offload doctor`
//!   (`trust/doctor.rs`);
//! - `order/` — carrying out one build order on a builder, for the hook and the agent;
//! - `drv.rs` — the `.drv` Nix offers the hook, read through the store Nix names;
//! - `hook/` — `offload hook`: Nix's build hook, the choice per `try`, the accepted build;
//! - `agent.rs` — `offload agent`: warm sessions for the hook over a Unix socket;
//! - `metrics/` — Prometheus metrics for operators (`--metrics ADDR`): the registry,
//!   the HTTP endpoint (`metrics/http.rs`); a run's events are counted in `job/metrics.rs`;
//! - `shutdown.rs` — SIGINT and SIGTERM: the cancellation token and the exit status;
//! - `job/` — one `offload build` from request to outcome: evaluation, the trust check's
//!   builders, the build, the run's record, result links.

pub mod agent;
pub mod build;
pub mod config;
pub mod daemon;
mod drv;
pub mod env;
mod error;
pub mod fleet;
pub mod hook;
pub mod html;
pub mod job;
pub mod metrics;
pub mod order;
pub mod overview;
pub mod plan;
pub mod process;
mod realise;
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
pub use transfer::{copy_closure, human_bytes, CopyFailure, CopyOptions, CopyStats};
