//! NAR, the Nix ARchive: the canonical serialisation of a store path's file tree that
//! store path hashes, `narHash` and every transfer are made of.
//!
//! - [`dump_path`] writes the NAR of a tree, streaming (bounded memory whatever the size);
//! - [`NarDecoder`] is a sans-I/O parser: feed it bytes, get [`NarEvent`]s, with file
//!   contents as slices of the input, so nothing is buffered but small tokens. Sync and
//!   async callers share it;
//! - [`restore()`] unpacks a NAR into a tree; [`copy_nar`] (and `tokio_io::copy_nar` with the `async` feature)
//!   forward exactly one NAR from a stream, hashing it, and never read past its end, so
//!   a NAR embedded in a protocol stream can be relayed without a length prefix.
//!
//! The grammar (strings are Nix wire strings, see [`crate::wire`]):
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <bytes>
//! symlink   = "symlink" "target" <target>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//! The decoder is strict where Nix's own reader is lax: directory entries must be
//! sorted and unique (the hash of any other NAR never matches a canonical dump).

mod copy;
mod decoder;
mod restore;
mod writer;

use thiserror::Error;

#[cfg(feature = "async")]
pub use copy::tokio_io;
pub use copy::{copy_nar, NarRelay, NarSummary};
pub use decoder::{NarDecoder, NarEvent};
pub use restore::restore;
pub use writer::{dump_path, dump_path_hashed, regular_file_nar};

/// The first token of every NAR.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Longest name, symlink target or keyword accepted in a NAR.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Deepest directory nesting accepted (Nix's own limit is the OS's path length).
pub const MAX_DEPTH: usize = 512;

/// A NAR could not be read or written.
#[derive(Debug, Error)]
pub enum NarError {
    #[error("NAR ended early (at byte {offset})")]
    Eof { offset: u64 },
    #[error("bad NAR at byte {offset}: expected {expected}, found {found:?}")]
    Unexpected {
        offset: u64,
        expected: &'static str,
        found: String,
    },
    #[error("bad NAR at byte {offset}: a {what} of {len} bytes is longer than {max}")]
    TooLong {
        offset: u64,
        what: &'static str,
        len: u64,
        max: usize,
    },
    #[error("bad NAR at byte {offset}: non-zero padding")]
    BadPadding { offset: u64 },
    #[error("bad NAR at byte {offset}: invalid entry name {name:?}")]
    BadName { offset: u64, name: String },
    #[error("bad NAR at byte {offset}: entry {name:?} is not after {previous:?} (entries must be sorted and unique)")]
    Unsorted {
        offset: u64,
        name: String,
        previous: String,
    },
    #[error("bad NAR at byte {offset}: directories nested deeper than {MAX_DEPTH}")]
    TooDeep { offset: u64 },
    #[error("{path}: {op}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: unsupported file type (only regular files, directories and symlinks go in a NAR)"
    )]
    UnsupportedFile { path: String },
}

impl NarError {
    /// Whether the stream ended before the NAR did.
    pub fn is_eof(&self) -> bool {
        matches!(self, NarError::Eof { .. })
            || matches!(self, NarError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof)
    }
}
