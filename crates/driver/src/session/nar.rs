//! The session's NAR operations: streaming a path out (DumpStorePath), a closure in the
//! export format (ExportPaths), and a path in from another session (AddToStoreNar, or
//! ImportPaths for servers older than protocol 2.5). Every NAR is parsed, sized and
//! hashed as it passes, so a bad stream is caught before the receiving Nix registers it.

use offload_nix::nar::tokio_io::copy_nar;
use offload_nix::nar::{NarError, NarSummary};
use offload_nix::serve::{self, PathInfo, Request};
use offload_nix::wire::{put_bytes, put_strings, put_u64, WireError};
use offload_nix::{export, nixbase32};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{send, within, ReplyError, ServeConn, QUERY_TIMEOUT};
use crate::error::DriverError;

/// Relays one NAR, blaming a failed write on `sink` and anything else on the NAR.
async fn relay_nar<R, W>(from: &mut R, sink: &mut W, path: &str) -> Result<NarSummary, ReplyError>
where
    R: tokio::io::AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    copy_nar(from, sink).await.map_err(|e| match e {
        NarError::Io {
            op: "writing",
            source,
            ..
        } => ReplyError::Sink(source),
        source => ReplyError::Nar {
            path: path.to_string(),
            source,
        },
    })
}

impl ServeConn {
    /// Streams the NAR of `path` into `sink`, returning its size and hash.
    pub async fn dump_store_path<W: AsyncWrite + Unpin>(
        &mut self,
        path: &str,
        sink: &mut W,
    ) -> Result<NarSummary, DriverError> {
        const OP: &str = "DumpStorePath";
        let frame = Request::DumpStorePath { path }.encode();
        self.exchange(OP, async |to, from| {
            send(to, OP, &frame).await?;
            relay_nar(from, sink, path).await
        })
        .await
    }

    /// Streams the export format (`nix-store --export`) of `paths` into `sink`, checking
    /// every NAR as it passes; returns the paths' metadata in stream order.
    pub async fn export_paths<W: AsyncWrite + Unpin>(
        &mut self,
        paths: &[String],
        sink: &mut W,
    ) -> Result<Vec<export::ExportedPath>, DriverError> {
        const OP: &str = "ExportPaths";
        let frame = Request::ExportPaths { paths }.encode();
        self.exchange(OP, async |to, from| {
            send(to, OP, &frame).await?;
            let mut exported = Vec::new();
            loop {
                let marker = serve::read_ack(from).await?;
                sink.write_all(&marker.to_le_bytes())
                    .await
                    .map_err(ReplyError::Sink)?;
                match marker {
                    0 => return Ok(exported),
                    1 => {}
                    other => return Err(ReplyError::Refused(other)),
                }
                let nar = relay_nar(from, sink, "an exported path").await?;
                let export::Trailer {
                    path,
                    references,
                    deriver,
                } = export::tokio_io::read_trailer(from).await?;
                let mut trailer = Vec::new();
                export::put_trailer(&mut trailer, &path, &references, deriver.as_deref());
                sink.write_all(&trailer).await.map_err(ReplyError::Sink)?;
                exported.push(export::ExportedPath {
                    path,
                    references,
                    deriver,
                    nar,
                });
            }
        })
        .await
    }

    /// Adds `info.path` to this store with its NAR streamed from `source`, a session
    /// with a store that has it. Nothing lands on this machine's disk outside Nix's own
    /// import, which checks size and hash before registering the path; offload checks
    /// both as the bytes pass and stops the receiving server on a mismatch, so a bad NAR
    /// is never registered.
    pub async fn add_to_store_nar_from(
        &mut self,
        info: &PathInfo,
        source: &mut ServeConn,
    ) -> Result<NarSummary, DriverError> {
        let dump = Request::DumpStorePath { path: &info.path }.encode();
        self.import(info, async |to| {
            // The NAR goes from one server's stdout straight into the other's stdin; the
            // source's own failures come back as its errors.
            source
                .exchange("DumpStorePath", async |source_to, source_from| {
                    send(source_to, "DumpStorePath", &dump).await?;
                    relay_nar(source_from, to, &info.path).await
                })
                .await
                .map_err(|e| match e {
                    // The source failed to write into this session: this session's pipe
                    // broke, so it is this server that went away.
                    DriverError::Io { source: io, .. }
                        if io.kind() == std::io::ErrorKind::BrokenPipe =>
                    {
                        ReplyError::Wire(WireError::Io {
                            what: "the NAR",
                            source: io,
                        })
                    }
                    e => ReplyError::Driver(e),
                })
        })
        .await
    }

    /// Adds `info.path` to this store with `nar` as its contents, checked as it passes.
    pub async fn add_to_store_nar(
        &mut self,
        info: &PathInfo,
        nar: &[u8],
    ) -> Result<NarSummary, DriverError> {
        self.import(info, async |to| {
            relay_nar(&mut std::io::Cursor::new(nar), to, &info.path).await
        })
        .await
    }

    /// One import: the header, the NAR that `feed` writes, the trailer, the server's
    /// acknowledgement. AddToStoreNar keeps the path's signatures; servers older than
    /// protocol 2.5 only have ImportPaths, which carries none.
    async fn import(
        &mut self,
        info: &PathInfo,
        feed: impl AsyncFnOnce(&mut super::Writer) -> Result<NarSummary, ReplyError>,
    ) -> Result<NarSummary, DriverError> {
        const OP: &str = "AddToStoreNar";
        let use_import = serve::minor(self.server_version) < 5;
        let header = if use_import {
            let mut f = Request::ImportPaths.encode();
            put_u64(&mut f, 1);
            f
        } else {
            Request::AddToStoreNar { info }.encode()
        };
        let machine = self.machine.clone();
        self.exchange(OP, async |to, from| {
            send(to, OP, &header).await?;
            let summary = feed(to).await?;
            check_summary(&machine, info, &summary).map_err(ReplyError::Driver)?;
            let mut trailer = Vec::new();
            if use_import {
                put_u64(&mut trailer, export::EXPORT_MAGIC);
                put_bytes(&mut trailer, info.path.as_bytes());
                put_strings(&mut trailer, info.references.iter());
                put_bytes(
                    &mut trailer,
                    info.deriver.as_deref().unwrap_or("").as_bytes(),
                );
                // No signature, then the end of the import stream.
                put_u64(&mut trailer, 0);
                put_u64(&mut trailer, 0);
            }
            send(to, OP, &trailer).await?;
            match within(QUERY_TIMEOUT, serve::read_ack(from)).await? {
                1 => Ok(summary),
                other => Err(ReplyError::Refused(other)),
            }
        })
        .await
    }
}

/// The relayed NAR has the size and hash the source's store recorded.
fn check_summary(machine: &str, info: &PathInfo, got: &NarSummary) -> Result<(), DriverError> {
    let mismatch = |what, expected: String, got: String| DriverError::NarMismatch {
        machine: machine.to_string(),
        path: info.path.clone(),
        what,
        expected,
        got,
    };
    if got.size != info.nar_size {
        return Err(mismatch(
            "size",
            info.nar_size.to_string(),
            got.size.to_string(),
        ));
    }
    let got_hash = format!("sha256:{}", nixbase32::encode(&got.sha256));
    if !info.nar_hash.is_empty() && info.nar_hash != got_hash {
        return Err(mismatch("hash", info.nar_hash.clone(), got_hash));
    }
    Ok(())
}
