//! Nix's export format (`nix-store --export`, the serve protocol's ExportPaths and
//! ImportPaths): per path `1`, the NAR, [`EXPORT_MAGIC`], the path, its references, its
//! deriver and `0` (no signature); `0` after the last path.

use std::io::BufRead;

use crate::nar::{copy_nar, NarError, NarSummary};
use crate::wire::{
    put_bytes, put_strings, put_u64, read_string, read_strings, read_u64, WireError, MAX_STRING_LEN,
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
    #[error(
        "bad export stream: expected the magic 0x4558494e after the NAR of a path, found {0:#x}"
    )]
    BadMagic(u64),
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
        let magic = read_u64(r, "export magic")?;
        if magic != EXPORT_MAGIC {
            return Err(ExportError::BadMagic(magic));
        }
        let path = read_string(r, "exported path", MAX_STRING_LEN)?;
        let references = read_strings(r, "exported references", MAX_STRING_LEN)?;
        let deriver = read_string(r, "exported deriver", MAX_STRING_LEN)?;
        if read_u64(r, "signature flag")? != 0 {
            // A legacy signature: read and ignored, as Nix does.
            read_string(r, "legacy signature", MAX_STRING_LEN)?;
        }
        paths.push(ExportedPath {
            path,
            references,
            deriver: (!deriver.is_empty()).then_some(deriver),
            nar,
        });
    }
}
