//! Faults through the real `offload` binary on a real sshd fleet, each checked for its
//! outcome, then for a sound local store and a second run that builds nothing (see
//! docs/faults.md). `hosts`: hosts down, killed, silent, corrupt, unknown or chatty, and
//! an interrupt; `disk_and_link`: a builder's store too small, a link cut mid-copy;
//! `routes`: a pair of builders that stops reaching each other; `collector`: a builder's
//! garbage collector running during builds, and a store without room for the inputs.

#[path = "../common/mod.rs"]
mod common;

mod collector;
mod disk_and_link;
mod hosts;
mod routes;
