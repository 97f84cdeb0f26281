//! One serve session: a `nix-store --serve --write` process on a machine, spoken to over
//! its stdin/stdout, with its stderr kept (the last lines for error messages, every line
//! to an optional log sink, which is how build logs arrive).
//!
//! The protocol is a strict request/reply stream with no in-band errors and no framing
//! of NARs, so a session that failed or was cancelled in the middle of a frame cannot be
//! resynchronised: it is marked broken and every later call fails. Callers drop it and
//! open a new one. None of the `async fn`s here are cancel-safe for the same reason.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use offload_nix::nar::tokio_io::copy_nar;
use offload_nix::nar::NarSummary;
use offload_nix::serve::MAX_REPLY_STRING;
use offload_nix::serve::{self, BasicDerivation, BuildResult, BuildSettings, PathInfo, Request};
use offload_nix::wire::tokio_io as wire_read;
use offload_nix::wire::{put_bytes, put_strings, put_u64, WireError};
use offload_nix::{export, nixbase32};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::DriverError;
use crate::transport::{Endpoint, Route};

/// How long ssh and the remote Nix get to answer the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a metadata query (validity, path infos, closure) may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(300);
/// Lines of the server's stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 25;
/// Pipe buffer sizes: large enough that NAR streaming moves big chunks.
const IO_BUFFER: usize = 256 * 1024;

/// The server's stderr: the last lines, and where to forward each line.
#[derive(Default)]
struct Stderr {
    tail: VecDeque<String>,
    sink: Option<mpsc::UnboundedSender<String>>,
}

/// An open serve session with one store.
pub struct ServeConn {
    machine: String,
    command: String,
    is_ssh: bool,
    child: Child,
    to: BufWriter<ChildStdin>,
    from: BufReader<ChildStdout>,
    stderr: Arc<Mutex<Stderr>>,
    stderr_task: JoinHandle<()>,
    server_version: u64,
    broken: bool,
    /// `--option cores` the server was started with, if any.
    cores: Option<u32>,
    _known_hosts: Option<tempfile::NamedTempFile>,
}

impl Drop for ServeConn {
    fn drop(&mut self) {
        self.stderr_task.abort();
        // kill_on_drop covers the child; closing stdin first lets a healthy server exit 0.
    }
}

impl ServeConn {
    /// Starts the server on `endpoint` and performs the handshake.
    pub async fn open(endpoint: &Endpoint) -> Result<ServeConn, DriverError> {
        let (mut child, known_hosts) = endpoint.spawn()?;
        let (Some(stdin), Some(stdout), Some(stderr_pipe)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(DriverError::Io {
                machine: endpoint.name.clone(),
                op: "starting the serve process",
                source: std::io::Error::other("child process has no piped stdio"),
            });
        };
        let stderr = Arc::new(Mutex::new(Stderr::default()));
        let stderr_task = tokio::spawn(pump_stderr(stderr_pipe, stderr.clone()));
        let mut conn = ServeConn {
            machine: endpoint.name.clone(),
            command: endpoint.describe(),
            is_ssh: matches!(endpoint.route, Route::Ssh { .. }),
            child,
            to: BufWriter::with_capacity(IO_BUFFER, stdin),
            from: BufReader::with_capacity(IO_BUFFER, stdout),
            stderr,
            stderr_task,
            server_version: 0,
            broken: false,
            cores: None,
            _known_hosts: known_hosts,
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.handshake()).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(DriverError::Timeout {
                    machine: conn.machine.clone(),
                    op: "the serve-protocol handshake",
                    secs: HANDSHAKE_TIMEOUT.as_secs(),
                })
            }
        }
        Ok(conn)
    }

    async fn handshake(&mut self) -> Result<(), DriverError> {
        const OP: &str = "the handshake";
        self.send(OP, &serve::handshake_request()).await?;
        let magic = match serve::read_handshake(&mut self.from).await {
            Ok(word) => word,
            Err(e) => return Err(self.fail(OP, e).await),
        };
        if magic != serve::SERVE_MAGIC_2 {
            self.broken = true;
            // Whatever a login script printed: show a little more of it.
            let mut more = vec![0u8; 200];
            let n = tokio::time::timeout(Duration::from_millis(200), self.from.read(&mut more))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let mut got = magic.to_le_bytes().to_vec();
            got.extend_from_slice(&more[..n]);
            return Err(DriverError::NotServeProtocol {
                machine: self.machine.clone(),
                got: String::from_utf8_lossy(&got).into_owned(),
                word: magic,
            });
        }
        let version = match serve::read_handshake(&mut self.from).await {
            Ok(v) => v,
            Err(e) => return Err(self.fail(OP, e).await),
        };
        if serve::major(version) != 0x200 || serve::minor(version) < 4 {
            self.broken = true;
            return Err(DriverError::IncompatibleVersion {
                machine: self.machine.clone(),
                version,
            });
        }
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

    /// The store this session talks to, as the user named it.
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// The protocol version the server announced.
    pub fn server_version(&self) -> u64 {
        self.server_version
    }

    /// Whether an earlier failure left the session unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Sends every later line of the server's stderr (build logs) to `sink`.
    pub fn set_log_sink(&self, sink: Option<mpsc::UnboundedSender<String>>) {
        if let Ok(mut s) = self.stderr.lock() {
            s.sink = sink;
        }
    }

    /// The last lines the server wrote to stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr
            .lock()
            .map(|s| s.tail.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn check_usable(&self, op: &'static str) -> Result<(), DriverError> {
        if self.broken {
            return Err(DriverError::Exited {
                machine: self.machine.clone(),
                command: self.command.clone(),
                op,
                status: "session already failed".into(),
                stderr: String::new(),
            });
        }
        Ok(())
    }

    async fn send(&mut self, op: &'static str, frame: &[u8]) -> Result<(), DriverError> {
        self.check_usable(op)?;
        let result = async {
            self.to.write_all(frame).await?;
            self.to.flush().await
        }
        .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) => Err(self
                .fail(
                    op,
                    WireError::Io {
                        what: op,
                        source: e,
                    },
                )
                .await),
        }
    }

    /// Marks the session broken and turns a read/write failure into the most useful
    /// error: if the server went away, its exit status and stderr say why.
    async fn fail(&mut self, op: &'static str, err: WireError) -> DriverError {
        self.broken = true;
        let gone = matches!(err, WireError::Eof { .. })
            || matches!(&err, WireError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe);
        if !gone {
            return DriverError::Protocol {
                machine: self.machine.clone(),
                op,
                source: err,
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
        if self.is_ssh && code == Some(255) {
            return classify_ssh_failure(&self.machine, tail);
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
    }

    /// The subset of `paths` that is valid in the store. With `substitute`, the machine
    /// first tries its own substituters; with `lock`, the paths get temporary GC roots.
    pub async fn query_valid_paths(
        &mut self,
        paths: &[String],
        lock: bool,
        substitute: bool,
    ) -> Result<Vec<String>, DriverError> {
        const OP: &str = "QueryValidPaths";
        let frame = Request::QueryValidPaths {
            lock,
            substitute,
            paths,
        }
        .encode();
        self.send(OP, &frame).await?;
        let reply = timed(serve::read_path_list(&mut self.from)).await;
        self.finish(OP, reply).await
    }

    /// Metadata of the valid ones among `paths`.
    pub async fn query_path_infos(
        &mut self,
        paths: &[String],
    ) -> Result<Vec<PathInfo>, DriverError> {
        const OP: &str = "QueryPathInfos";
        self.send(OP, &Request::QueryPathInfos { paths }.encode())
            .await?;
        let version = self.server_version;
        let reply = timed(serve::read_path_infos(&mut self.from, version)).await;
        self.finish(OP, reply).await
    }

    /// The closure of `paths` (with `include_outputs`, also the outputs of derivations).
    pub async fn query_closure(
        &mut self,
        paths: &[String],
        include_outputs: bool,
    ) -> Result<Vec<String>, DriverError> {
        const OP: &str = "QueryClosure";
        let frame = Request::QueryClosure {
            include_outputs,
            paths,
        }
        .encode();
        self.send(OP, &frame).await?;
        let reply = timed(serve::read_path_list(&mut self.from)).await;
        self.finish(OP, reply).await
    }

    async fn finish<T>(
        &mut self,
        op: &'static str,
        reply: Result<Result<T, WireError>, ()>,
    ) -> Result<T, DriverError> {
        match reply {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.fail(op, e).await),
            Err(()) => {
                self.broken = true;
                Err(DriverError::Timeout {
                    machine: self.machine.clone(),
                    op,
                    secs: QUERY_TIMEOUT.as_secs(),
                })
            }
        }
    }

    /// Streams the NAR of `path` into `sink`, returning its size and hash.
    pub async fn dump_store_path<W: AsyncWrite + Unpin>(
        &mut self,
        path: &str,
        sink: &mut W,
    ) -> Result<NarSummary, DriverError> {
        const OP: &str = "DumpStorePath";
        self.send(OP, &Request::DumpStorePath { path }.encode())
            .await?;
        match copy_nar(&mut self.from, sink).await {
            Ok(summary) => Ok(summary),
            Err(e) => {
                self.broken = true;
                Err(self.nar_failure(OP, path, e).await)
            }
        }
    }

    /// Streams the export format (`nix-store --export`) of `paths` into `sink`, checking
    /// every NAR as it passes; returns the paths' metadata in stream order.
    pub async fn export_paths<W: AsyncWrite + Unpin>(
        &mut self,
        paths: &[String],
        sink: &mut W,
    ) -> Result<Vec<export::ExportedPath>, DriverError> {
        const OP: &str = "ExportPaths";
        self.send(OP, &Request::ExportPaths { paths }.encode())
            .await?;
        let mut exported = Vec::new();
        loop {
            let marker = match serve::read_ack(&mut self.from).await {
                Ok(m) => m,
                Err(e) => return Err(self.fail(OP, e).await),
            };
            sink.write_all(&marker.to_le_bytes())
                .await
                .map_err(|source| self.io_error(OP, source))?;
            match marker {
                0 => return Ok(exported),
                1 => {}
                other => {
                    self.broken = true;
                    return Err(DriverError::Refused {
                        machine: self.machine.clone(),
                        op: OP,
                        reply: other,
                    });
                }
            }
            let nar = match copy_nar(&mut self.from, sink).await {
                Ok(n) => n,
                Err(e) => return Err(self.nar_failure(OP, "an exported path", e).await),
            };
            // The trailer: magic, path, references, deriver, signature flag.
            let mut trailer = Vec::new();
            let read = async {
                let magic = wire_read::read_u64(&mut self.from, "export magic").await?;
                let path =
                    wire_read::read_string(&mut self.from, "exported path", MAX_REPLY_STRING)
                        .await?;
                let references = wire_read::read_strings(
                    &mut self.from,
                    "exported references",
                    MAX_REPLY_STRING,
                )
                .await?;
                let deriver =
                    wire_read::read_string(&mut self.from, "exported deriver", MAX_REPLY_STRING)
                        .await?;
                let signed = wire_read::read_u64(&mut self.from, "signature flag").await?;
                Ok::<_, WireError>((magic, path, references, deriver, signed))
            };
            let (magic, path, references, deriver, signed) = match read.await {
                Ok(t) => t,
                Err(e) => return Err(self.fail(OP, e).await),
            };
            if magic != export::EXPORT_MAGIC || signed != 0 {
                self.broken = true;
                return Err(DriverError::Refused {
                    machine: self.machine.clone(),
                    op: OP,
                    reply: magic,
                });
            }
            let deriver = (!deriver.is_empty()).then_some(deriver);
            export::put_trailer(&mut trailer, &path, &references, deriver.as_deref());
            sink.write_all(&trailer)
                .await
                .map_err(|source| self.io_error(OP, source))?;
            exported.push(export::ExportedPath {
                path,
                references,
                deriver,
                nar,
            });
        }
    }

    fn io_error(&mut self, op: &'static str, source: std::io::Error) -> DriverError {
        self.broken = true;
        DriverError::Io {
            machine: self.machine.clone(),
            op,
            source,
        }
    }

    async fn nar_failure(
        &mut self,
        op: &'static str,
        path: &str,
        err: offload_nix::nar::NarError,
    ) -> DriverError {
        self.broken = true;
        if err.is_eof() {
            // The server died mid-NAR (e.g. "path is not valid"): its stderr says why.
            return self.fail(op, WireError::Eof { what: op }).await;
        }
        DriverError::Nar {
            machine: self.machine.clone(),
            op,
            path: path.to_string(),
            source: err,
        }
    }

    /// Adds `info.path` to this store with its NAR streamed from `source`, a session
    /// with a store that has it. Nothing lands on this machine's disk outside Nix's own
    /// import, which checks size and hash before registering the path; offload checks
    /// both as the bytes pass and breaks the session on a mismatch, so a bad NAR is
    /// never registered.
    pub async fn add_to_store_nar_from(
        &mut self,
        info: &PathInfo,
        source: &mut ServeConn,
    ) -> Result<NarSummary, DriverError> {
        const OP: &str = "AddToStoreNar";
        source.check_usable("DumpStorePath")?;
        source
            .send(
                "DumpStorePath",
                &Request::DumpStorePath { path: &info.path }.encode(),
            )
            .await?;
        let use_import = serve::minor(self.server_version) < 5;
        let header = if use_import {
            let mut f = Request::ImportPaths.encode();
            put_u64(&mut f, 1);
            f
        } else {
            Request::AddToStoreNar { info }.encode()
        };
        self.send(OP, &header).await?;
        let summary = match copy_nar(&mut source.from, &mut self.to).await {
            Ok(s) => s,
            Err(e) => {
                // The receiver holds a partial NAR: drop it, it will never register it.
                self.broken = true;
                let _ = self.child.start_kill();
                return Err(source.nar_failure("DumpStorePath", &info.path, e).await);
            }
        };
        if let Err(e) = self.check_summary(info, &summary) {
            self.broken = true;
            let _ = self.child.start_kill();
            return Err(e);
        }
        if use_import {
            let mut trailer = Vec::new();
            put_u64(&mut trailer, export::EXPORT_MAGIC);
            put_bytes(&mut trailer, info.path.as_bytes());
            put_strings(&mut trailer, info.references.iter());
            put_bytes(
                &mut trailer,
                info.deriver.as_deref().unwrap_or("").as_bytes(),
            );
            put_u64(&mut trailer, 0);
            put_u64(&mut trailer, 0);
            self.send(OP, &trailer).await?;
        } else {
            self.send(OP, &[]).await?;
        }
        let ack = timed(serve::read_ack(&mut self.from)).await;
        let ack = self.finish(OP, ack).await?;
        if ack != 1 {
            self.broken = true;
            return Err(DriverError::Refused {
                machine: self.machine.clone(),
                op: OP,
                reply: ack,
            });
        }
        Ok(summary)
    }

    fn check_summary(&self, info: &PathInfo, got: &NarSummary) -> Result<(), DriverError> {
        if got.size != info.nar_size {
            return Err(DriverError::NarMismatch {
                machine: self.machine.clone(),
                path: info.path.clone(),
                what: "size",
                expected: info.nar_size.to_string(),
                got: got.size.to_string(),
            });
        }
        let got_hash = format!("sha256:{}", nixbase32::encode(&got.sha256));
        if !info.nar_hash.is_empty() && info.nar_hash != got_hash {
            return Err(DriverError::NarMismatch {
                machine: self.machine.clone(),
                path: info.path.clone(),
                what: "hash",
                expected: info.nar_hash.clone(),
                got: got_hash,
            });
        }
        Ok(())
    }

    /// Builds `drv` (whose inputs must all be valid here) and returns Nix's result. The
    /// build log arrives on the log sink while it runs.
    pub async fn build_derivation(
        &mut self,
        drv_path: &str,
        drv: &BasicDerivation,
        settings: &BuildSettings,
    ) -> Result<BuildResult, DriverError> {
        const OP: &str = "BuildDerivation";
        let frame = Request::BuildDerivation {
            drv_path,
            drv,
            settings,
        }
        .encode();
        self.send(OP, &frame).await?;
        let version = self.server_version;
        match serve::read_build_result(&mut self.from, version).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.fail(OP, e).await),
        }
    }

    /// Builds derivations already in that store (`drv!out` or plain paths).
    pub async fn build_paths(
        &mut self,
        paths: &[String],
        settings: &BuildSettings,
    ) -> Result<Result<(), (u64, String)>, DriverError> {
        const OP: &str = "BuildPaths";
        self.send(OP, &Request::BuildPaths { paths, settings }.encode())
            .await?;
        match serve::read_build_paths_result(&mut self.from).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.fail(OP, e).await),
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

async fn pump_stderr(pipe: tokio::process::ChildStderr, state: Arc<Mutex<Stderr>>) {
    let mut lines = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match lines.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf)
            .trim_end_matches(['\n', '\r'])
            .to_string();
        let Ok(mut s) = state.lock() else { return };
        if let Some(sink) = &s.sink {
            let _ = sink.send(line.clone());
        }
        let mut kept = line;
        truncate_at_char(&mut kept, 1000);
        s.tail.push_back(kept);
        if s.tail.len() > STDERR_TAIL_LINES {
            s.tail.pop_front();
        }
    }
}

fn classify_ssh_failure(machine: &str, stderr: String) -> DriverError {
    let machine = machine.to_string();
    if stderr.contains("Permission denied") {
        DriverError::SshAuth { machine, stderr }
    } else if stderr.contains("Host key verification failed")
        || stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("No ED25519 host key is known")
        || stderr.contains("host key for")
    {
        DriverError::SshHostKey { machine, stderr }
    } else if stderr.contains("Connection refused")
        || stderr.contains("Could not resolve hostname")
        || stderr.contains("No route to host")
        || stderr.contains("Connection timed out")
    {
        DriverError::SshUnreachable { machine, stderr }
    } else {
        DriverError::Ssh { machine, stderr }
    }
}

/// Bounds a metadata query by [`QUERY_TIMEOUT`]; `Err(())` when it ran out.
async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, WireError>>,
) -> Result<Result<T, WireError>, ()> {
    tokio::time::timeout(QUERY_TIMEOUT, fut)
        .await
        .map_err(|_| ())
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
