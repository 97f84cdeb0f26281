//! Build slots end to end: never more builds on a machine than its slots, whoever starts
//! them. `ledger`: the client-side ledger shared with Nix's build hook, on loopback
//! machines; `builder_locks`: the locks on the builder itself, for clients that share no
//! ledger, on a real sshd builder.

#[path = "../common/mod.rs"]
mod common;

mod builder_locks;
mod ledger;
