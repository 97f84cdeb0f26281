//! The session's daemon side: the same operations as the serve protocol's, spoken in
//! the worker protocol to `nix-daemon --stdio` ([`offload_nix::worker`]), for an
//! `ssh-ng://` machine where `nix-store --serve` cannot run (an `authorized_keys` entry
//! `command="nix-daemon --stdio",restrict` answers every command with the daemon).
//!
//! Every operation is its request, the daemon's messages up to `STDERR_LAST` (a
//! build's log lines among them, which go to the session's log sink as a serve
//! server's stderr does) or `STDERR_ERROR`, then its reply. Requests about many paths
//! (QueryPathInfo, AddTempRoot) go out together and their replies are read in order,
//! so a batch costs one round trip as it does over the serve protocol.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use offload_nix::nar::NarSummary;
use offload_nix::serve::{BasicDerivation, BuildResult, BuildSettings, PathInfo};
use offload_nix::worker::{self, RemoteError};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::stderr::StderrLog;
use super::{send, within, Reader, ReplyError, ServeConn, Writer};
use crate::env::QUERY_TIMEOUT;
use crate::error::DriverError;
use crate::ssh::{Endpoint, Speaks};

/// What a session with a daemon knows of it.
pub(super) struct DaemonSide {
    /// The worker-protocol version both sides speak.
    pub(super) version: u64,
    /// The settings last sent with SetOptions, if any.
    options: Option<BuildSettings>,
}

impl super::ServeConn {
    /// The protocol the session speaks and its version, for people: `serve protocol
    /// 2.7` or `daemon protocol 1.35`.
    pub fn protocol_version(&self) -> String {
        let (name, v) = match &self.daemon {
            Some(d) => ("daemon", d.version),
            None => ("serve", self.server_version),
        };
        format!("{name} protocol {}.{}", v >> 8, v & 0xff)
    }
}

/// Reads the daemon's messages up to `STDERR_LAST`, log lines to `log`.
pub(super) async fn messages(
    from: &mut Reader,
    version: u64,
    log: &StderrLog,
) -> Result<(), ReplyError> {
    worker::read_until_last(from, version, |line| log.push(&line))
        .await?
        .map_err(ReplyError::Remote)
}

impl ServeConn {
    /// Starts `remote-program --stdio` on `endpoint` and exchanges the greeting.
    pub(super) async fn open_daemon(endpoint: &Endpoint) -> Result<ServeConn, DriverError> {
        let mut conn = ServeConn::start(endpoint, &endpoint.daemon_command())?;
        let log = conn.stderr.clone();
        let machine = conn.machine.clone();
        let talk = conn.exchange("the daemon's handshake", async |to, from| {
            send(to, "the handshake", &worker::hello()).await?;
            let theirs = worker::read_hello_reply(from).await?;
            if !worker::is_supported(theirs) {
                return Err(ReplyError::Remote(RemoteError {
                    message: format!(
                        "{machine} speaks worker protocol {}.{}; offload needs 1.21 or later",
                        worker::major(theirs),
                        worker::minor(theirs)
                    ),
                    status: None,
                }));
            }
            let version = theirs.min(worker::PROTOCOL_VERSION);
            send(to, "the handshake", &worker::after_hello(version)).await?;
            if worker::exchanges_features(version) {
                worker::read_features(from).await?;
            }
            worker::read_hello_info(from, version).await?;
            messages(from, version, &log).await?;
            Ok(version)
        });
        let version = match tokio::time::timeout(crate::env::HANDSHAKE_TIMEOUT, talk).await {
            Ok(version) => version?,
            Err(_) => {
                return Err(DriverError::Timeout {
                    machine: conn.machine.clone(),
                    op: "the daemon's handshake",
                    secs: crate::env::HANDSHAKE_TIMEOUT.as_secs(),
                })
            }
        };
        conn.daemon = Some(DaemonSide {
            version,
            options: None,
        });
        Ok(conn)
    }

    /// The worker-protocol version, for a session with a daemon.
    pub(super) fn worker_version(&self) -> Option<u64> {
        self.daemon.as_ref().map(|d| d.version)
    }

    /// Sends `frame`, which holds one request per entry of `replies`, and reads each
    /// one's messages and its reply of that kind, within [`QUERY_TIMEOUT`] each.
    async fn daemon_batch(
        &mut self,
        op: &'static str,
        frame: Vec<u8>,
        replies: Vec<Expect<'_>>,
    ) -> Result<Vec<Reply>, DriverError> {
        let version = self.worker_version().unwrap_or(0);
        let log = self.stderr.clone();
        self.exchange(op, async |to, from| {
            send(to, op, &frame).await?;
            let mut got = Vec::with_capacity(replies.len());
            for expect in &replies {
                let reply = within(QUERY_TIMEOUT, read_reply(from, version, &log, expect)).await?;
                got.push(reply);
            }
            Ok(got)
        })
        .await
    }

    /// QueryValidPaths; with `lock`, every path first gets a temporary root, held
    /// while the session lives, as the serve protocol's lock does.
    pub(super) async fn daemon_query_valid_paths(
        &mut self,
        paths: &[String],
        lock: bool,
        substitute: bool,
    ) -> Result<Vec<String>, DriverError> {
        let version = self.worker_version().unwrap_or(0);
        let mut frame = Vec::new();
        let roots = if lock { paths.len() } else { 0 };
        for path in &paths[..roots] {
            frame.extend(worker::path_request(worker::OP_ADD_TEMP_ROOT, path));
        }
        frame.extend(worker::query_valid_paths(paths, substitute, version));
        let mut expect = vec![Expect::Word; roots];
        expect.push(Expect::Paths);
        let replies = self.daemon_batch("QueryValidPaths", frame, expect).await?;
        Ok(match replies.into_iter().last() {
            Some(Reply::Paths(valid)) => valid,
            _ => Vec::new(),
        })
    }

    /// QueryPathInfo for each of `paths`: the infos of the valid ones, in order.
    pub(super) async fn daemon_query_path_infos(
        &mut self,
        paths: &[String],
    ) -> Result<Vec<PathInfo>, DriverError> {
        let frame: Vec<u8> = paths
            .iter()
            .flat_map(|p| worker::path_request(worker::OP_QUERY_PATH_INFO, p))
            .collect();
        let expect = paths.iter().map(|p| Expect::Info(p)).collect();
        let replies = self.daemon_batch("QueryPathInfo", frame, expect).await?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                Reply::Info(info) => info,
                _ => None,
            })
            .collect())
    }

    /// The closure of the valid ones among `paths`, by their references: the daemon's
    /// protocol has no QueryClosure, so it takes one batch of QueryPathInfo per level.
    pub(super) async fn daemon_query_closure(
        &mut self,
        paths: &[String],
    ) -> Result<Vec<String>, DriverError> {
        let mut seen: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut valid = Vec::new();
        let mut frontier: Vec<String> = paths.to_vec();
        frontier.sort();
        frontier.dedup();
        seen.extend(frontier.iter().cloned());
        while !frontier.is_empty() {
            let infos = self.daemon_query_path_infos(&frontier).await?;
            frontier = Vec::new();
            for info in infos {
                for r in &info.references {
                    if seen.insert(r.clone()) {
                        frontier.push(r.clone());
                    }
                }
                valid.push(info.path);
            }
        }
        valid.sort();
        Ok(valid)
    }

    /// Sends SetOptions when the build settings differ from those last sent: the
    /// build's limits and the session's cores (0, all the machine has, when unset).
    async fn daemon_set_options(&mut self, settings: &BuildSettings) -> Result<(), DriverError> {
        if self
            .daemon
            .as_ref()
            .is_some_and(|d| d.options.as_ref() == Some(settings))
        {
            return Ok(());
        }
        let frame = worker::set_options(settings, self.cores.unwrap_or(0));
        self.daemon_batch("SetOptions", frame, vec![Expect::Nothing])
            .await?;
        if let Some(d) = &mut self.daemon {
            d.options = Some(settings.clone());
        }
        Ok(())
    }

    /// BuildDerivation; the build's log arrives on the log sink as it runs, and no time
    /// limit applies beyond the build's own.
    pub(super) async fn daemon_build_derivation(
        &mut self,
        drv_path: &str,
        drv: &BasicDerivation,
        settings: &BuildSettings,
    ) -> Result<BuildResult, DriverError> {
        const OP: &str = "BuildDerivation";
        self.daemon_set_options(settings).await?;
        let version = self.worker_version().unwrap_or(0);
        let frame = worker::build_derivation(drv_path, drv);
        let log = self.stderr.clone();
        self.exchange(OP, async |to, from| {
            send(to, OP, &frame).await?;
            messages(from, version, &log).await?;
            Ok(worker::read_build_result(from, version).await?)
        })
        .await
    }

    /// NarFromPath: streams the NAR of `path` into `sink`.
    pub(super) async fn daemon_dump_store_path<W: AsyncWrite + Unpin>(
        &mut self,
        path: &str,
        sink: &mut W,
    ) -> Result<NarSummary, DriverError> {
        const OP: &str = "NarFromPath";
        let version = self.worker_version().unwrap_or(0);
        let frame = worker::path_request(worker::OP_NAR_FROM_PATH, path);
        let log = self.stderr.clone();
        self.exchange(OP, async |to, from| {
            send(to, OP, &frame).await?;
            messages(from, version, &log).await?;
            super::nar::relay_nar(from, sink, path).await
        })
        .await
    }

    /// AddToStoreNar: the header, the NAR that `feed` writes (in frames), the empty
    /// frame, the daemon's messages. The daemon checks the NAR's hash and size before
    /// it registers the path; offload checks both as the bytes pass.
    pub(super) async fn daemon_import(
        &mut self,
        info: &PathInfo,
        feed: impl AsyncFnOnce(&mut Framed<'_>) -> Result<NarSummary, ReplyError>,
    ) -> Result<NarSummary, DriverError> {
        const OP: &str = "AddToStoreNar";
        let version = self.worker_version().unwrap_or(0);
        if !worker::frames_nars(version) {
            return Err(DriverError::NotOverDaemon {
                machine: self.machine.clone(),
                op: "AddToStoreNar before worker protocol 1.23",
            });
        }
        let header = worker::add_to_store_nar(info);
        let machine = self.machine.clone();
        let log = self.stderr.clone();
        self.exchange(OP, async |to, from| {
            send(to, OP, &header).await?;
            let mut framed = Framed::new(to);
            let summary = feed(&mut framed).await?;
            framed.flush().await.map_err(ReplyError::Sink)?;
            super::nar::check_summary(&machine, info, &summary).map_err(ReplyError::Driver)?;
            send(to, OP, &0u64.to_le_bytes()).await?;
            within(QUERY_TIMEOUT, messages(from, version, &log)).await?;
            Ok(summary)
        })
        .await
        .inspect(|_| {
            // The daemon roots what it adds for as long as the connection lives.
            self.held.insert(info.path.clone());
        })
    }
}

impl ServeConn {
    /// QueryRealisation of each of `ids` (`sha256:<base16>!out`), in one batch: per id,
    /// the store's realisation if it has one (Nix's JSON from 1.31, else the output's
    /// path). A session with the daemon only: the serve protocol has no realisations.
    pub async fn query_realisations(
        &mut self,
        ids: &[String],
    ) -> Result<Vec<Option<String>>, DriverError> {
        self.needs_daemon("QueryRealisation")?;
        let frame: Vec<u8> = ids
            .iter()
            .flat_map(|id| worker::query_realisation(id))
            .collect();
        let replies = self
            .daemon_batch("QueryRealisation", frame, vec![Expect::Paths; ids.len()])
            .await?;
        Ok(replies
            .into_iter()
            .map(|r| match r {
                Reply::Paths(found) => found.into_iter().next(),
                _ => None,
            })
            .collect())
    }

    /// RegisterDrvOutput of each realisation, in one batch: `(id, output's base name,
    /// Nix's JSON)`, sent in the form the daemon's version reads. The daemon needs the
    /// `ca-derivations` feature and each output valid in its store.
    pub async fn register_drv_outputs(
        &mut self,
        realisations: &[(String, String, String)],
    ) -> Result<(), DriverError> {
        self.needs_daemon("RegisterDrvOutput")?;
        let version = self.worker_version().unwrap_or(0);
        let frame: Vec<u8> = realisations
            .iter()
            .flat_map(|(id, out, json)| worker::register_drv_output(id, out, json, version))
            .collect();
        let expect = vec![Expect::Nothing; realisations.len()];
        self.daemon_batch("RegisterDrvOutput", frame, expect)
            .await?;
        Ok(())
    }

    fn needs_daemon(&self, op: &'static str) -> Result<(), DriverError> {
        match self.daemon {
            Some(_) => Ok(()),
            None => Err(DriverError::Io {
                machine: self.machine.clone(),
                op,
                source: std::io::Error::other(
                    "the serve protocol has no realisations; it takes a session with the daemon",
                ),
            }),
        }
    }
}

/// The reply a request of a batch gets after its messages.
#[derive(Clone)]
enum Expect<'a> {
    /// None (SetOptions).
    Nothing,
    /// One word (AddTempRoot).
    Word,
    /// A set of paths (QueryValidPaths).
    Paths,
    /// QueryPathInfo's, for this path.
    Info(&'a str),
}

/// A reply of a batch.
enum Reply {
    Nothing,
    Paths(Vec<String>),
    Info(Option<PathInfo>),
}

async fn read_reply(
    from: &mut Reader,
    version: u64,
    log: &StderrLog,
    expect: &Expect<'_>,
) -> Result<Reply, ReplyError> {
    messages(from, version, log).await?;
    Ok(match expect {
        Expect::Nothing => Reply::Nothing,
        Expect::Word => {
            worker::read_word(from).await?;
            Reply::Nothing
        }
        Expect::Paths => Reply::Paths(worker::read_path_set(from).await?),
        Expect::Info(path) => Reply::Info(worker::read_path_info(from, path).await?),
    })
}

/// What an `ssh-ng://` machine's failed serve session says for the next step: its
/// sessions speak the daemon's protocol when `remote-program --stdio` answers (the
/// machine remembers it for the run); else the serve failure stands. An `ssh://`
/// machine whose server answered like a daemon ("protocol mismatch") is named, with
/// the fix: it cannot be driven as written.
pub(super) async fn after_serve_failed(
    endpoint: &Endpoint,
    serve: DriverError,
) -> Result<ServeConn, DriverError> {
    if endpoint.daemon_program.is_some() {
        return match ServeConn::open_daemon(endpoint).await {
            Ok(conn) => {
                endpoint.protocol.set(Speaks::Daemon);
                tracing::info!(
                    "{}: `nix-store --serve` does not run there ({serve}); its sessions \
                     speak the daemon's protocol (`{}`)",
                    endpoint.name,
                    endpoint.daemon_command()
                );
                Ok(conn)
            }
            Err(daemon) => {
                tracing::debug!(
                    "{}: the daemon did not answer either: {daemon}",
                    endpoint.name
                );
                Err(serve)
            }
        };
    }
    if endpoint.is_ssh() && answered_like_a_daemon(&serve) {
        // Nothing else runs there either: the slot broker gives up at once.
        endpoint.protocol.set(Speaks::Daemon);
        return Err(written_as_ssh(endpoint));
    }
    Err(serve)
}

/// The refusal of a daemon-only machine written as `ssh://`, with its fix.
pub(super) fn written_as_ssh(endpoint: &Endpoint) -> DriverError {
    DriverError::DaemonOnly {
        machine: endpoint.name.clone(),
        fix: ssh_ng_form(&endpoint.name),
    }
}

/// Whether a serve session's failure is a daemon's answer to the serve protocol's
/// magic: it says "protocol mismatch" and ends, or sends the daemon's magic.
fn answered_like_a_daemon(e: &DriverError) -> bool {
    match e {
        DriverError::Exited { stderr, .. } => stderr.contains("protocol mismatch"),
        DriverError::NotServeProtocol { word, .. } => *word == worker::WORKER_MAGIC_2,
        _ => false,
    }
}

/// `ssh://…` written as `ssh-ng://…`.
fn ssh_ng_form(uri: &str) -> String {
    match uri.strip_prefix("ssh://") {
        Some(rest) => format!("ssh-ng://{rest}"),
        None => format!("ssh-ng://{uri}"),
    }
}

/// Whether a serve session failed in a way that another protocol may not: it ended
/// during the handshake, or answered with something other than the serve protocol.
pub(super) fn serve_did_not_start(e: &DriverError) -> bool {
    matches!(
        e,
        DriverError::Exited {
            op: "the handshake",
            ..
        } | DriverError::NotServeProtocol { .. }
    )
}

/// A writer that sends what is written to it as frames of up to [`worker::FRAME`]
/// bytes (length, bytes), as AddToStoreNar takes a NAR from protocol 1.23; flushing
/// sends the frame being filled. The empty frame that ends the stream is the caller's.
pub(super) struct Framed<'a> {
    inner: &'a mut Writer,
    buf: Vec<u8>,
    /// Bytes of the frame being sent (its length word, then `buf`) already written.
    sent: usize,
}

impl<'a> Framed<'a> {
    fn new(inner: &'a mut Writer) -> Self {
        Framed {
            inner,
            buf: Vec::with_capacity(worker::FRAME),
            sent: 0,
        }
    }

    /// Sends the frame in `buf`, if any.
    fn poll_emit(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let header = (self.buf.len() as u64).to_le_bytes();
        while self.sent < header.len() + self.buf.len() {
            let rest = if self.sent < header.len() {
                &header[self.sent..]
            } else {
                &self.buf[self.sent - header.len()..]
            };
            let n = ready!(Pin::new(&mut *self.inner).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Framed<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= worker::FRAME {
            ready!(this.poll_emit(cx))?;
        }
        let n = data.len().min(worker::FRAME - this.buf.len());
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_emit(cx))?;
        Pin::new(&mut *this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}
