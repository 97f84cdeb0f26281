//! Relaying exactly one NAR from a stream: the bytes are parsed as they pass (so the
//! end is found without a length prefix and nothing past it is read), hashed, and
//! written on unchanged.

use std::io::{BufRead, Write};

use sha2::{Digest, Sha256};

use super::{NarDecoder, NarError};

/// Size and SHA-256 of a relayed NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarSummary {
    pub size: u64,
    pub sha256: [u8; 32],
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> NarError {
    move |source| NarError::Io {
        path: "NAR stream".into(),
        op,
        source,
    }
}

/// Parses through `buf`, stopping at the NAR's end; returns the bytes that belong to it.
fn advance(decoder: &mut NarDecoder, buf: &[u8]) -> Result<usize, NarError> {
    let mut pos = 0;
    while pos < buf.len() && !decoder.is_done() {
        let (n, _) = decoder.feed(&buf[pos..])?;
        pos += n;
    }
    Ok(pos)
}

/// Copies one NAR from `r` to `w`, validating it; `r` is left just past its end.
pub fn copy_nar<R: BufRead, W: Write>(r: &mut R, w: &mut W) -> Result<NarSummary, NarError> {
    let mut decoder = NarDecoder::new();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while !decoder.is_done() {
        let buf = r.fill_buf().map_err(io_err("reading"))?;
        if buf.is_empty() {
            return Err(NarError::Eof { offset: size });
        }
        let n = advance(&mut decoder, buf)?;
        w.write_all(&buf[..n]).map_err(io_err("writing"))?;
        hasher.update(&buf[..n]);
        size += n as u64;
        r.consume(n);
    }
    Ok(NarSummary {
        size,
        sha256: hasher.finalize().into(),
    })
}

/// The same over tokio.
#[cfg(feature = "async")]
pub mod tokio_io {
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

    use super::{advance, io_err, NarDecoder, NarError, NarSummary};

    /// Copies one NAR from `r` to `w`, validating it; `r` is left just past its end.
    /// Not cancel-safe: a cancelled copy leaves both streams mid-NAR.
    pub async fn copy_nar<R, W>(r: &mut R, w: &mut W) -> Result<NarSummary, NarError>
    where
        R: AsyncBufRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut decoder = NarDecoder::new();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while !decoder.is_done() {
            let buf = r.fill_buf().await.map_err(io_err("reading"))?;
            if buf.is_empty() {
                return Err(NarError::Eof { offset: size });
            }
            let n = advance(&mut decoder, buf)?;
            w.write_all(&buf[..n]).await.map_err(io_err("writing"))?;
            hasher.update(&buf[..n]);
            size += n as u64;
            r.consume(n);
        }
        Ok(NarSummary {
            size,
            sha256: hasher.finalize().into(),
        })
    }
}
