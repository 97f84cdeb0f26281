//! One serve session: a `nix-store --serve --write` process on a machine, spoken to over
//! its stdin/stdout, with its stderr always drained (the last lines for error messages,
//! every line to an optional log sink, which is how build logs arrive).
//!
//! The protocol is a strict request/reply stream with no in-band errors and no framing
//! of NARs, so a session that failed or was cancelled in the middle of a frame cannot be
//! resynchronised. Every operation therefore runs through [`ServeConn::exchange`], which
//! counts the session as broken from the first byte sent until the whole reply has been
//! read: an error, a timeout or a dropped future in between leaves it broken, and every
//! later call fails. Callers drop a broken session and open a new one.
//!
//! Sessions are kept open between operations in a [`Pool`] per run ([`pool`]).
//!
//! A session with an `ssh-ng://` machine where `nix-store --serve` cannot run speaks the
//! daemon's protocol to `nix-daemon --stdio` instead ([`daemon`]): the same operations,
//! the same exchanges, the build log on the same sink. [`ServeConn::open`] finds out at
//! the first session and the machine's endpoint remembers it for the run.

mod daemon;
mod nar;
pub use nar::ChainProgress;
mod pool;
pub use pool::{Pool, StoreId, Traffic};
mod stderr;

use std::collections::HashSet;
use std::time::Duration;

use offload_nix::nar::NarError;
use offload_nix::serve::{self, BasicDerivation, BuildResult, BuildSettings, PathInfo, Request};
use offload_nix::wire::WireError;
use offload_nix::worker::RemoteError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::env::{HANDSHAKE_TIMEOUT, QUERY_TIMEOUT};
use crate::error::DriverError;
use crate::ssh::{classify_ssh_failure, Endpoint, Speaks};
use stderr::StderrLog;

/// Pipe buffer sizes: large enough that NAR streaming moves big chunks.
const IO_BUFFER: usize = 256 * 1024;

pub(super) type Writer = BufWriter<ChildStdin>;
type Reader = BufReader<ChildStdout>;

/// Why an exchange stopped before its reply was read in full.
enum ReplyError {
    /// Writing the request or reading a framed reply failed.
    Wire(WireError),
    /// A NAR in the reply was malformed or ended early.
    Nar { path: String, source: NarError },
    /// The server answered with a word that means no.
    Refused(u64),
    /// Where the reply was being streamed to failed.
    Sink(std::io::Error),
    /// The reply did not come within this many seconds.
    Timeout(u64),
    /// Already a full error (another session's, or a check of the reply).
    Driver(DriverError),
    /// The daemon reported the operation's failure (`STDERR_ERROR`).
    Remote(RemoteError),
}

impl From<WireError> for ReplyError {
    fn from(e: WireError) -> Self {
        ReplyError::Wire(e)
    }
}

/// Writes `frame` and flushes it.
async fn send(to: &mut Writer, what: &'static str, frame: &[u8]) -> Result<(), ReplyError> {
    let io = async {
        to.write_all(frame).await?;
        to.flush().await
    };
    io.await
        .map_err(|source| ReplyError::Wire(WireError::Io { what, source }))
}

/// Bounds a read by `limit`.
async fn within<T, E: Into<ReplyError>>(
    limit: Duration,
    read: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ReplyError> {
    match tokio::time::timeout(limit, read).await {
        Ok(reply) => reply.map_err(Into::into),
        Err(_) => Err(ReplyError::Timeout(limit.as_secs())),
    }
}

/// An open serve session with one store.
pub struct ServeConn {
    machine: String,
    command: String,
    /// The server's stdin and stdout. Declared before `child`, so they close first when
    /// the session drops and a healthy server sees end-of-input before it is killed.
    to: Writer,
    from: Reader,
    child: Child,
    stderr: StderrLog,
    stderr_task: JoinHandle<()>,
    server_version: u64,
    broken: bool,
    /// `--option cores` the server was started with, if any.
    cores: Option<u32>,
    /// The control socket of the shared ssh connection it went over, if any.
    control_path: Option<std::path::PathBuf>,
    traffic: Traffic,
    /// For a session with `nix-daemon --stdio`: what it knows of the daemon.
    daemon: Option<daemon::DaemonSide>,
    /// Paths the server holds temporary GC roots for, so its store's garbage collector
    /// leaves them alone while the session lives: those it found valid when asked with
    /// `lock`, added through it, or built by it (Nix roots a build's outputs).
    held: HashSet<String>,
    _known_hosts: Option<tempfile::NamedTempFile>,
    endpoint: Endpoint,
}

impl Drop for ServeConn {
    fn drop(&mut self) {
        // The child itself is killed on drop (`kill_on_drop`); its stderr pump would
        // otherwise outlive it on a pipe another process may still hold.
        self.stderr_task.abort();
    }
}

impl ServeConn {
    /// Starts the server on `endpoint` and performs the handshake: `nix-store --serve
    /// --write`, or on an `ssh-ng://` machine where that does not start, the daemon
    /// (`nix-daemon --stdio`), which the endpoint then remembers for its later sessions.
    pub async fn open(endpoint: &Endpoint) -> Result<ServeConn, DriverError> {
        if endpoint.protocol.is_daemon_only() {
            return match endpoint.daemon_program {
                Some(_) => ServeConn::open_daemon(endpoint).await,
                None => Err(daemon::written_as_ssh(endpoint)),
            };
        }
        match ServeConn::open_serve(endpoint).await {
            Ok(conn) => {
                if endpoint.protocol.get() == Speaks::Unknown {
                    endpoint.protocol.set(Speaks::Serve);
                }
                Ok(conn)
            }
            Err(e) if daemon::serve_did_not_start(&e) => {
                daemon::after_serve_failed(endpoint, e).await
            }
            Err(e) => Err(e),
        }
    }

    /// Opens a serve-protocol session.
    async fn open_serve(endpoint: &Endpoint) -> Result<ServeConn, DriverError> {
        let mut conn = ServeConn::start(endpoint, &endpoint.server_command())?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.handshake()).await {
            Ok(result) => result?,
            Err(_) => {
                conn.broken = true;
                return Err(DriverError::Timeout {
                    machine: conn.machine.clone(),
                    op: "the serve-protocol handshake",
                    secs: HANDSHAKE_TIMEOUT.as_secs(),
                });
            }
        }
        Ok(conn)
    }

    /// Starts `remote` on the machine, its stderr pumped, before any handshake.
    fn start(endpoint: &Endpoint, remote: &str) -> Result<ServeConn, DriverError> {
        let (mut child, known_hosts) = endpoint.spawn_command(remote)?;
        let (Some(stdin), Some(stdout), Some(stderr_pipe)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(DriverError::Io {
                machine: endpoint.name.clone(),
                op: "starting the serve process",
                source: std::io::Error::other("child process has no piped stdio"),
            });
        };
        let (stderr, finish_requests) = StderrLog::new();
        let stderr_task = tokio::spawn(stderr.clone().pump(stderr_pipe, finish_requests));
        Ok(ServeConn {
            machine: endpoint.name.clone(),
            command: endpoint.describe_command(remote),
            to: BufWriter::with_capacity(IO_BUFFER, stdin),
            from: BufReader::with_capacity(IO_BUFFER, stdout),
            child,
            stderr,
            stderr_task,
            server_version: 0,
            broken: false,
            cores: None,
            control_path: endpoint.control_path.clone(),
            traffic: Traffic::Control,
            daemon: None,
            held: HashSet::new(),
            _known_hosts: known_hosts,
            endpoint: endpoint.clone(),
        })
    }

    async fn handshake(&mut self) -> Result<(), DriverError> {
        let machine = self.machine.clone();
        let version = self
            .exchange("the handshake", async |to, from| {
                send(to, "the handshake", &serve::handshake_request()).await?;
                let magic = serve::read_handshake(from).await?;
                if magic != serve::SERVE_MAGIC_2 {
                    // Whatever a login script printed: show a little more of it.
                    let mut more = vec![0u8; 200];
                    let n = tokio::time::timeout(Duration::from_millis(200), from.read(&mut more))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0);
                    let mut got = magic.to_le_bytes().to_vec();
                    got.extend_from_slice(&more[..n]);
                    return Err(ReplyError::Driver(DriverError::NotServeProtocol {
                        machine,
                        got: String::from_utf8_lossy(&got).into_owned(),
                        word: magic,
                    }));
                }
                let version = serve::read_handshake(from).await?;
                if !serve::is_supported(version) {
                    return Err(ReplyError::Driver(DriverError::IncompatibleVersion {
                        machine,
                        version,
                    }));
                }
                Ok(version)
            })
            .await?;
        self.server_version = version;
        Ok(())
    }

    /// Records the `--option cores` the session was started with.
    pub fn with_cores(mut self, cores: Option<u32>) -> Self {
        self.cores = cores;
        self
    }

    /// The cores its builds get, when set for the session.
    pub fn cores(&self) -> Option<u32> {
        self.cores
    }

    /// Marks what the session carries (its pool keeps sessions apart by it).
    pub fn with_traffic(mut self, traffic: Traffic) -> Self {
        self.traffic = traffic;
        self
    }

    /// What the session carries.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// The store this session talks to, as the user named it.
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// The protocol version the server announced.
    pub fn server_version(&self) -> u64 {
        self.server_version
    }

    /// Whether the session speaks the daemon's protocol (`nix-daemon --stdio`) rather
    /// than the serve protocol.
    pub fn is_daemon(&self) -> bool {
        self.daemon.is_some()
    }

    /// Whether an earlier failure left the session unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Sends every later line of the server's stderr (build logs) to `sink`.
    pub fn set_log_sink(&self, sink: Option<mpsc::UnboundedSender<String>>) {
        self.stderr.set_sink(sink);
    }

    /// Forwards what the server wrote to stderr so far to the log sink, then closes the
    /// sink: its receiver reads every line of the operation's log, then `None`. Call it
    /// after the reply of the operation whose log the sink took. Cancel-safe.
    pub async fn finish_log_sink(&self) {
        self.stderr.finish_sink().await;
    }

    /// The last lines the server wrote to stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr.tail()
    }

    /// Runs one operation: `talk` writes the request and reads the whole reply. The
    /// session counts as broken until `talk` completes, so a failure, a timeout or a
    /// cancelled future leaves it broken; a failure also stops the server and becomes the
    /// most useful error (see [`ServeConn::failure`]).
    async fn exchange<T>(
        &mut self,
        op: &'static str,
        talk: impl AsyncFnOnce(&mut Writer, &mut Reader) -> Result<T, ReplyError>,
    ) -> Result<T, DriverError> {
        if self.broken {
            return Err(DriverError::Exited {
                machine: self.machine.clone(),
                command: self.command.clone(),
                op,
                status: "session already failed".into(),
                stderr: String::new(),
            });
        }
        self.broken = true;
        match talk(&mut self.to, &mut self.from).await {
            Ok(value) => {
                self.broken = false;
                Ok(value)
            }
            Err(e) => Err(self.failure(op, e).await),
        }
    }

    /// The error for a failed exchange. When the server went away, its exit status and
    /// the last lines of its stderr say why (and an ssh exit of 255 is classified);
    /// otherwise the server, left mid-frame, is stopped.
    async fn failure(&mut self, op: &'static str, err: ReplyError) -> DriverError {
        let gone = match &err {
            ReplyError::Wire(WireError::Eof { .. }) => true,
            ReplyError::Wire(WireError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::BrokenPipe
            }
            ReplyError::Nar { source, .. } => source.is_eof(),
            _ => false,
        };
        if !gone {
            let _ = self.child.start_kill();
            let machine = self.machine.clone();
            return match err {
                ReplyError::Wire(source) => DriverError::Protocol {
                    machine,
                    op,
                    source,
                },
                ReplyError::Nar { path, source } => DriverError::Nar {
                    machine,
                    op,
                    path,
                    source,
                },
                ReplyError::Refused(reply) => DriverError::Refused { machine, op, reply },
                ReplyError::Sink(source) => DriverError::Io {
                    machine,
                    op,
                    source,
                },
                ReplyError::Timeout(secs) => DriverError::Timeout { machine, op, secs },
                ReplyError::Driver(e) => e,
                ReplyError::Remote(e) => {
                    DriverError::DaemonRefused {
                        machine,
                        op,
                        message: e.message,
                    }
                    .or_other_store_dir(async || None)
                    .await
                }
            };
        }
        let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        // Let the stderr pump catch the last lines the process wrote.
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut self.stderr_task).await;
        let tail = self.stderr_tail().join("\n");
        let code = match &status {
            Ok(Ok(s)) => s.code(),
            _ => None,
        };
        if self.endpoint.is_ssh() && code == Some(255) {
            // Over a shared connection, what ended it is in its master's words.
            let master = self
                .control_path
                .as_deref()
                .map(crate::ssh::master::last_words)
                .unwrap_or_default();
            let words = [tail.as_str(), master.as_str()]
                .iter()
                .filter(|w| !w.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("\n");
            return classify_ssh_failure(&self.machine, words);
        }
        DriverError::Exited {
            machine: self.machine.clone(),
            command: self.command.clone(),
            op,
            status: match status {
                Ok(Ok(s)) => s.to_string(),
                Ok(Err(e)) => format!("cannot get its exit status: {e}"),
                Err(_) => "still running, but it closed its output".to_string(),
            },
            stderr: if tail.is_empty() {
                String::new()
            } else {
                format!("; its last output:\n{tail}")
            },
        }
        .or_other_store_dir(async || self.endpoint.store_dir().await)
        .await
    }

    /// Sends `frame` and reads the reply with `read`, within [`QUERY_TIMEOUT`].
    async fn query<T>(
        &mut self,
        op: &'static str,
        frame: Vec<u8>,
        read: impl AsyncFnOnce(&mut Reader) -> Result<T, WireError>,
    ) -> Result<T, DriverError> {
        self.exchange(op, async |to, from| {
            send(to, op, &frame).await?;
            within(QUERY_TIMEOUT, read(from)).await
        })
        .await
    }

    /// The subset of `paths` that is valid in the store. With `substitute`, the machine
    /// first tries its own substituters; with `lock`, the paths get temporary GC roots.
    pub async fn query_valid_paths(
        &mut self,
        paths: &[String],
        lock: bool,
        substitute: bool,
    ) -> Result<Vec<String>, DriverError> {
        if self.is_daemon() {
            return self.daemon_query_valid_paths(paths, lock, substitute).await;
        }
        let frame = Request::QueryValidPaths {
            lock,
            substitute,
            paths,
        }
        .encode();
        self.query("QueryValidPaths", frame, async |from| {
            serve::read_path_list(from).await
        })
        .await
    }

    /// The valid ones among `paths`, each held from then on by this session (a temporary
    /// GC root for as long as it runs): a build relying on them is safe from the store's
    /// garbage collector between this answer and its end. Only the paths the session
    /// does not hold yet are asked about, so a warm session often asks nothing. With
    /// `substitute`, the machine first tries its own substituters for them.
    pub async fn hold_valid(
        &mut self,
        paths: &[String],
        substitute: bool,
    ) -> Result<HashSet<String>, DriverError> {
        let ask: Vec<String> = paths
            .iter()
            .filter(|p| !self.held.contains(*p))
            .cloned()
            .collect();
        let mut valid: HashSet<String> = paths
            .iter()
            .filter(|p| self.held.contains(*p))
            .cloned()
            .collect();
        if !ask.is_empty() {
            let found = self.query_valid_paths(&ask, true, substitute).await?;
            self.held.extend(found.iter().cloned());
            valid.extend(found);
        }
        Ok(valid)
    }

    /// Whether this session holds `path` against the store's garbage collector.
    pub fn holds(&self, path: &str) -> bool {
        self.held.contains(path)
    }

    /// Metadata of the valid ones among `paths`.
    pub async fn query_path_infos(
        &mut self,
        paths: &[String],
    ) -> Result<Vec<PathInfo>, DriverError> {
        if self.is_daemon() {
            return self.daemon_query_path_infos(paths).await;
        }
        let version = self.server_version;
        let frame = Request::QueryPathInfos { paths }.encode();
        self.query("QueryPathInfos", frame, async |from| {
            serve::read_path_infos(from, version).await
        })
        .await
    }

    /// The closure of `paths` (with `include_outputs`, also the outputs of derivations).
    pub async fn query_closure(
        &mut self,
        paths: &[String],
        include_outputs: bool,
    ) -> Result<Vec<String>, DriverError> {
        if self.is_daemon() {
            if include_outputs {
                return Err(self.not_over_daemon("QueryClosure with outputs"));
            }
            return self.daemon_query_closure(paths).await;
        }
        let frame = Request::QueryClosure {
            include_outputs,
            paths,
        }
        .encode();
        self.query("QueryClosure", frame, async |from| {
            serve::read_path_list(from).await
        })
        .await
    }

    /// Builds `drv` (whose inputs must all be valid here) and returns Nix's result. The
    /// build log arrives on the log sink while it runs; no time limit applies beyond the
    /// build's own (`settings`).
    pub async fn build_derivation(
        &mut self,
        drv_path: &str,
        drv: &BasicDerivation,
        settings: &BuildSettings,
    ) -> Result<BuildResult, DriverError> {
        const OP: &str = "BuildDerivation";
        let result = if self.is_daemon() {
            self.daemon_build_derivation(drv_path, drv, settings)
                .await?
        } else {
            let frame = Request::BuildDerivation {
                drv_path,
                drv,
                settings,
            }
            .encode();
            let version = self.server_version;
            self.exchange(OP, async |to, from| {
                send(to, OP, &frame).await?;
                Ok(serve::read_build_result(from, version).await?)
            })
            .await?
        };
        if result.status.is_success() {
            // Nix roots a build's outputs for as long as the process that built them.
            self.held.extend(drv.outputs.iter().map(|o| o.path.clone()));
        }
        Ok(result)
    }

    /// Builds derivations already in that store (`drv!out` or plain paths).
    pub async fn build_paths(
        &mut self,
        paths: &[String],
        settings: &BuildSettings,
    ) -> Result<Result<(), (u64, String)>, DriverError> {
        const OP: &str = "BuildPaths";
        if self.is_daemon() {
            return Err(self.not_over_daemon(OP));
        }
        let frame = Request::BuildPaths { paths, settings }.encode();
        self.exchange(OP, async |to, from| {
            send(to, OP, &frame).await?;
            Ok(serve::read_build_paths_result(from).await?)
        })
        .await
    }

    fn not_over_daemon(&self, op: &'static str) -> DriverError {
        DriverError::NotOverDaemon {
            machine: self.machine.clone(),
            op,
        }
    }

    /// Ends the session. The server sits at a command boundary, so stopping it loses
    /// nothing; the child is killed when the session drops.
    pub async fn close(mut self) -> Result<(), DriverError> {
        let _ = self.to.flush().await;
        Ok(())
    }

    /// Reads raw bytes from the server, for tests of what a remote printed.
    #[doc(hidden)]
    pub fn reader(&mut self) -> &mut (impl AsyncRead + Unpin) {
        &mut self.from
    }
}
