//! Relaying exactly one NAR from a stream: the bytes are parsed as they pass (so the
//! end is found without a length prefix and nothing past it is read), hashed, and
//! written on unchanged. [`NarRelay`] does the per-chunk work without I/O; the sync and
//! async `copy_nar` only move chunks.

use std::io::{BufRead, Write};

use sha2::{Digest, Sha256};

use super::{NarDecoder, NarError};

/// Size and SHA-256 of a relayed NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarSummary {
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Validates and hashes a NAR chunk by chunk, and says where in a chunk it ends.
#[derive(Debug, Clone)]
pub struct NarRelay {
    decoder: NarDecoder,
    hasher: Sha256,
    size: u64,
}

impl Default for NarRelay {
    fn default() -> Self {
        Self::new()
    }
}

impl NarRelay {
    pub fn new() -> Self {
        NarRelay {
            decoder: NarDecoder::new(),
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// Whether the whole NAR has passed.
    pub fn is_done(&self) -> bool {
        self.decoder.is_done()
    }

    /// Takes the next bytes of the stream and returns how many of them belong to the
    /// NAR (all, unless it ends inside `chunk`), validated and hashed. An empty chunk
    /// means the stream ended first.
    pub fn accept(&mut self, chunk: &[u8]) -> Result<usize, NarError> {
        if chunk.is_empty() && !self.is_done() {
            return Err(NarError::Eof { offset: self.size });
        }
        let mut pos = 0;
        while pos < chunk.len() && !self.decoder.is_done() {
            let (n, _) = self.decoder.feed(&chunk[pos..])?;
            pos += n;
        }
        self.hasher.update(&chunk[..pos]);
        self.size += pos as u64;
        Ok(pos)
    }

    /// Size and hash of the bytes accepted.
    pub fn summary(self) -> NarSummary {
        NarSummary {
            size: self.size,
            sha256: self.hasher.finalize().into(),
        }
    }
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> NarError {
    move |source| NarError::Io {
        path: "NAR stream".into(),
        op,
        source,
    }
}

/// Copies one NAR from `r` to `w`, validating it; `r` is left just past its end.
pub fn copy_nar<R: BufRead, W: Write>(r: &mut R, w: &mut W) -> Result<NarSummary, NarError> {
    let mut relay = NarRelay::new();
    while !relay.is_done() {
        let chunk = r.fill_buf().map_err(io_err("reading"))?;
        let n = relay.accept(chunk)?;
        w.write_all(&chunk[..n]).map_err(io_err("writing"))?;
        r.consume(n);
    }
    Ok(relay.summary())
}

/// The same over tokio.
#[cfg(feature = "async")]
pub mod tokio_io {
    use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

    use super::{io_err, NarError, NarRelay, NarSummary};

    /// Copies one NAR from `r` to `w`, validating it; `r` is left just past its end.
    /// Not cancel-safe: a cancelled copy leaves both streams mid-NAR.
    pub async fn copy_nar<R, W>(r: &mut R, w: &mut W) -> Result<NarSummary, NarError>
    where
        R: AsyncBufRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut relay = NarRelay::new();
        while !relay.is_done() {
            let chunk = r.fill_buf().await.map_err(io_err("reading"))?;
            let n = relay.accept(chunk)?;
            w.write_all(&chunk[..n]).await.map_err(io_err("writing"))?;
            r.consume(n);
        }
        Ok(relay.summary())
    }
}
