//! The session's NAR operations: streaming a path out (DumpStorePath), a closure in the
//! export format (ExportPaths), and a path in from another session (AddToStoreNar, or
//! ImportPaths for servers older than protocol 2.5). Every NAR is parsed, sized and
//! hashed as it passes, so a bad stream is caught before the receiving Nix registers it.

use offload_nix::nar::tokio_io::copy_nar;
use offload_nix::nar::{NarError, NarSummary};
use offload_nix::serve::{self, PathInfo, Request};
use offload_nix::wire::{put_bytes, put_strings, put_u64, WireError};
use offload_nix::{export, nixbase32, worker};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{send, within, ReplyError, ServeConn};
use crate::env::QUERY_TIMEOUT;
use crate::error::DriverError;

/// Relays one NAR, blaming a failed write on `sink` and anything else on the NAR.
pub(super) async fn relay_nar<R, W>(
    from: &mut R,
    sink: &mut W,
    path: &str,
) -> Result<NarSummary, ReplyError>
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

/// How a chain of imports ([`ServeConn::add_to_store_nars_from`]) goes, by the path's
/// index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainProgress {
    /// Its NAR starts out.
    Sending(usize),
    /// The server registered it.
    Registered(usize),
}

/// Streams the NAR of `path` from `source` into `to`, another session's stdin: from one
/// server's stdout straight into the other's. The source's own failures come back as
/// its errors; a write into `to` that breaks is `to`'s server going away. A source that
/// speaks the daemon's protocol is asked with NarFromPath.
async fn relay_from<W: AsyncWrite + Unpin>(
    source: &mut ServeConn,
    to: &mut W,
    path: &str,
) -> Result<NarSummary, ReplyError> {
    let version = source.worker_version();
    let (op, dump) = match version {
        Some(_) => (
            "NarFromPath",
            worker::path_request(worker::OP_NAR_FROM_PATH, path),
        ),
        None => ("DumpStorePath", Request::DumpStorePath { path }.encode()),
    };
    let log = source.stderr.clone();
    source
        .exchange(op, async |source_to, source_from| {
            send(source_to, op, &dump).await?;
            if let Some(version) = version {
                super::daemon::messages(source_from, version, &log).await?;
            }
            relay_nar(source_from, to, path).await
        })
        .await
        .map_err(|e| match e {
            DriverError::Io { source: io, .. } if io.kind() == std::io::ErrorKind::BrokenPipe => {
                ReplyError::Wire(WireError::Io {
                    what: "the NAR",
                    source: io,
                })
            }
            e => ReplyError::Driver(e),
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
        if self.is_daemon() {
            return self.daemon_dump_store_path(path, sink).await;
        }
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
        if self.is_daemon() {
            return Err(self.not_over_daemon(OP));
        }
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
        if self.is_daemon() {
            return self
                .daemon_import(info, async |to| relay_from(source, to, &info.path).await)
                .await;
        }
        self.import(info, async |to| relay_from(source, to, &info.path).await)
            .await
    }

    /// Adds each of `infos`, in order, to this store with its NAR streamed from
    /// `source`, without waiting for one to be registered before the next is sent: the
    /// server takes them one after another, so a path may refer to those before it.
    /// This hides the round trip per path that a chain of paths would cost one by one.
    /// `progress` hears of each path as it starts out and as the server acknowledges it
    /// (the paths acknowledged before a failure are registered there).
    pub async fn add_to_store_nars_from(
        &mut self,
        infos: &[PathInfo],
        source: &mut ServeConn,
        progress: &(dyn Fn(ChainProgress) + Send + Sync),
    ) -> Result<(), DriverError> {
        const OP: &str = "AddToStoreNar";
        if self.is_daemon() || !serve::takes_add_to_store_nar(self.server_version) {
            // ImportPaths, the only import of older servers, has one path per call here;
            // so has the daemon's AddToStoreNar, each waited for.
            for (i, info) in infos.iter().enumerate() {
                progress(ChainProgress::Sending(i));
                self.add_to_store_nar_from(info, source).await?;
                progress(ChainProgress::Registered(i));
            }
            return Ok(());
        }
        let machine = self.machine.clone();
        let all_sent = std::sync::atomic::AtomicBool::new(false);
        let registered = std::sync::Mutex::new(Vec::new());
        let sent = self
            .exchange(OP, async |to, from| {
                let send_all = async {
                    for (i, info) in infos.iter().enumerate() {
                        progress(ChainProgress::Sending(i));
                        send(to, OP, &Request::AddToStoreNar { info }.encode()).await?;
                        let summary = relay_from(source, to, &info.path).await?;
                        check_summary(&machine, info, &summary).map_err(ReplyError::Driver)?;
                        to.flush().await.map_err(|source| {
                            ReplyError::Wire(WireError::Io {
                                what: "the NAR",
                                source,
                            })
                        })?;
                    }
                    all_sent.store(true, std::sync::atomic::Ordering::Relaxed);
                    Ok::<(), ReplyError>(())
                };
                let read_acks = async {
                    for i in 0..infos.len() {
                        // A path's acknowledgement may take as long as its NAR takes to
                        // arrive; once all are sent, each of the rest is bounded.
                        let ack = if all_sent.load(std::sync::atomic::Ordering::Relaxed) {
                            within(QUERY_TIMEOUT, serve::read_ack(from)).await?
                        } else {
                            serve::read_ack(from).await?
                        };
                        match ack {
                            1 => {
                                registered.lock().unwrap_or_else(|p| p.into_inner()).push(i);
                                progress(ChainProgress::Registered(i))
                            }
                            other => return Err(ReplyError::Refused(other)),
                        }
                    }
                    Ok(())
                };
                tokio::try_join!(send_all, read_acks).map(|_| ())
            })
            .await;
        // The server roots what it adds for as long as it runs, a failed chain's
        // registered part too.
        let registered = registered.into_inner().unwrap_or_else(|p| p.into_inner());
        self.held
            .extend(registered.into_iter().map(|i| infos[i].path.clone()));
        sent
    }

    /// Adds `info.path` to this store with `nar` as its contents, checked as it passes.
    pub async fn add_to_store_nar(
        &mut self,
        info: &PathInfo,
        nar: &[u8],
    ) -> Result<NarSummary, DriverError> {
        if self.is_daemon() {
            return self
                .daemon_import(info, async |to| {
                    relay_nar(&mut std::io::Cursor::new(nar), to, &info.path).await
                })
                .await;
        }
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
        let use_import = !serve::takes_add_to_store_nar(self.server_version);
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
        .inspect(|_| {
            // The server roots what it adds for as long as it runs.
            self.held.insert(info.path.clone());
        })
    }
}

/// The relayed NAR has the size and hash the source's store recorded.
pub(super) fn check_summary(
    machine: &str,
    info: &PathInfo,
    got: &NarSummary,
) -> Result<(), DriverError> {
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
