//! Nix's export format (`nix-store --export`, the serve protocol's ExportPaths and
//! ImportPaths): per path `1`, the NAR, [`EXPORT_MAGIC`], the path, its references, its
//! deriver and `0` (no signature); `0` after the last path (docs/nix-protocols.md §7,
//! checked against `fixtures/export/`).
//!
//! The trailer after each NAR is decoded by [`TrailerDecoder`], which the sync
//! [`read_export`] and the async `tokio_io::read_trailer` both run.

use std::io::BufRead;

use crate::nar::{copy_nar, NarError, NarSummary};
use crate::wire::{
    put_bytes, put_strings, put_u64, read_message, read_u64, run, Decode, Stages, Step, StringList,
    WireError, MAX_STRING_LEN,
};

/// "NIXE", little-endian, between a NAR and its metadata.
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Appends the trailer that follows a path's NAR in an export stream.
pub fn put_trailer(out: &mut Vec<u8>, path: &str, references: &[String], deriver: Option<&str>) {
    put_u64(out, EXPORT_MAGIC);
    put_bytes(out, path.as_bytes());
    put_strings(out, references.iter());
    put_bytes(out, deriver.unwrap_or("").as_bytes());
    put_u64(out, 0);
}

/// The metadata that follows a path's NAR in an export stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    pub path: String,
    pub references: Vec<String>,
    pub deriver: Option<String>,
}

/// Decodes a [`Trailer`]: the magic (a wrong one is [`WireError::BadValue`]), path,
/// references, deriver and signature flag. A legacy signature (flag 1) is read and
/// dropped, as Nix does.
#[derive(Debug, Default)]
pub struct TrailerDecoder {
    stage: usize,
    magic: u64,
    path: String,
    references: StringList,
    deriver: String,
    signed: bool,
    signature: String,
}

impl TrailerDecoder {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Decode for TrailerDecoder {
    type Output = Trailer;

    fn decode(&mut self, input: &[u8]) -> Result<Step<Trailer>, WireError> {
        const MAX: usize = MAX_STRING_LEN;
        let t = self;
        run(input, |cur| {
            let mut s = Stages::new(&mut t.stage);
            s.field(cur, &mut t.magic, |c| c.u64("export magic"))?;
            if t.magic != EXPORT_MAGIC {
                let found = t.magic;
                return Err(WireError::BadValue {
                    what: "export magic",
                    found,
                }
                .into());
            }
            s.field(cur, &mut t.path, |c| c.string("exported path", MAX))?;
            s.strings(cur, &mut t.references, "exported references", MAX)?;
            s.field(cur, &mut t.deriver, |c| c.string("exported deriver", MAX))?;
            s.field(cur, &mut t.signed, |c| c.bool("signature flag"))?;
            if t.signed {
                s.field(cur, &mut t.signature, |c| c.string("legacy signature", MAX))?;
            }
            let deriver = std::mem::take(&mut t.deriver);
            Ok(Trailer {
                path: std::mem::take(&mut t.path),
                references: std::mem::take(&mut t.references.items),
                deriver: (!deriver.is_empty()).then_some(deriver),
            })
        })
    }
}

/// One path read from an export stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedPath {
    pub path: String,
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub nar: NarSummary,
}

/// An export stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("bad export stream: {0}")]
    Wire(#[from] WireError),
    #[error("bad NAR in export stream")]
    Nar(#[from] NarError),
    #[error("bad export stream: expected 0 or 1 before a path, found {0}")]
    BadMarker(u64),
}

/// Reads an export stream, writing the paths' NARs one after the other to `nars` (each
/// entry's `nar.size` says where one ends) and returning their metadata in stream order.
pub fn read_export<R: BufRead, W: std::io::Write>(
    r: &mut R,
    nars: &mut W,
) -> Result<Vec<ExportedPath>, ExportError> {
    let mut paths = Vec::new();
    loop {
        match read_u64(r, "export marker")? {
            0 => return Ok(paths),
            1 => {}
            other => return Err(ExportError::BadMarker(other)),
        }
        let nar = copy_nar(r, nars)?;
        let trailer = read_message(r, TrailerDecoder::new())?;
        paths.push(ExportedPath {
            path: trailer.path,
            references: trailer.references,
            deriver: trailer.deriver,
            nar,
        });
    }
}

/// Export-stream readers over tokio.
#[cfg(feature = "async")]
pub mod tokio_io {
    use tokio::io::AsyncRead;

    use super::{Trailer, TrailerDecoder};
    use crate::wire::WireError;

    /// Reads the trailer that follows a path's NAR. Not cancel-safe.
    pub async fn read_trailer<R: AsyncRead + Unpin>(r: &mut R) -> Result<Trailer, WireError> {
        crate::wire::tokio_io::read_message(r, TrailerDecoder::new()).await
    }
}
