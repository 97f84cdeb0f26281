//! Nix's formats and the framing of its serve protocol, in plain synchronous Rust.
//!
//! One module per format, each checked byte for byte against the real Nix 2.8 binaries:
//!
//! | module | what |
//! |---|---|
//! | [`wire`] | u64 / padded string / list primitives with size limits |
//! | [`nixbase32`], [`hash`] | Nix's base-32 alphabet, hash text forms (base16, base32, SRI) |
//! | [`store_path`] | store path parsing, validation and computation |
//! | [`derivation`] | `.drv` ATerm parser and serializer, hash modulo, output paths |
//! | [`nar`] | NAR writer (from a tree) and streaming decoder (to a tree or a stream) |
//! | [`export`] | `nix-store --export` / ImportPaths framing |
//! | [`machines`] | machines files and the `builders` setting |
//! | [`store_uri`] | store URIs (`ssh://user@host?remote-store=…`, `local`, paths) |
//! | [`serve`] | serve-protocol (`nix-store --serve`) messages |
//! | [`hook`] | the build-hook protocol: settings, `try` requests, replies |
//! | [`worker`] | the nix-daemon's worker protocol: the constants of AddBuildLog |
//!
//! Parsers take `&[u8]` or `std::io::Read` and return errors, never panic, on bad input.
//! Async framing over tokio sits behind the `async` feature. This crate knows nothing of
//! scheduling, machines' state or processes.

pub mod derivation;
pub mod export;
pub mod hash;
pub mod hook;
pub mod machines;
pub mod nar;
pub mod nixbase32;
pub mod serve;
pub mod store_path;
pub mod store_uri;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod testing;
