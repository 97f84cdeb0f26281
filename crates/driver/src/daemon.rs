//! A client of the nix-daemon's own protocol (the worker protocol, Nix 2.8's version
//! 1.34), for the one thing the serve protocol lacks: handing the daemon a build log, so
//! that `nix log` finds the log of a build that ran on another machine. The daemon takes
//! logs only from its trusted users ("you are not privileged to add logs").
//!
//! The exchange: magic `0x6e697863`, the daemon's magic `0x6478696f` and version, our
//! version, two obsolete words (CPU affinity, reserve space), the daemon's Nix version,
//! then its startup messages up to `STDERR_LAST`. AddBuildLog (45) sends the `.drv`'s
//! base name and the log as frames (length, bytes, no padding; a zero length ends),
//! then reads messages up to `STDERR_LAST` and the word 1. The protocol's constants
//! live in [`offload_nix::worker`].

use std::path::{Path, PathBuf};

use offload_nix::wire::tokio_io::{read_string, read_u64};
use offload_nix::wire::{put_bytes, put_u64, WireError};
use offload_nix::worker::{
    self, OP_ADD_BUILD_LOG, PROTOCOL_VERSION, STDERR_ERROR, STDERR_LAST, STDERR_NEXT,
    STDERR_RESULT, STDERR_START_ACTIVITY, STDERR_STOP_ACTIVITY, WORKER_MAGIC_1, WORKER_MAGIC_2,
};
use thiserror::Error;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest message read from the daemon.
const MAX_MESSAGE: usize = 1 << 20;
/// Bytes per frame of a log.
const FRAME: usize = 64 * 1024;

/// The daemon could not be told.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("cannot reach the nix-daemon at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the nix-daemon at {socket} broke the protocol")]
    Wire {
        socket: PathBuf,
        #[source]
        source: WireError,
    },
    #[error("the nix-daemon at {socket} said: {message}")]
    Refused { socket: PathBuf, message: String },
}

/// A connection to the daemon.
pub struct DaemonConn {
    socket: PathBuf,
    stream: BufReader<UnixStream>,
}

impl DaemonConn {
    /// Connects and exchanges the greeting.
    pub async fn connect(socket: &Path) -> Result<DaemonConn, DaemonError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| DaemonError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        let mut conn = DaemonConn {
            socket: socket.to_path_buf(),
            stream: BufReader::new(stream),
        };
        let mut hello = Vec::new();
        put_u64(&mut hello, WORKER_MAGIC_1);
        conn.send(&hello).await?;
        let magic = conn.read_u64("daemon magic").await?;
        if magic != WORKER_MAGIC_2 {
            return Err(conn.refused(format!(
                "it answered {magic:#x} instead of the worker protocol's magic"
            )));
        }
        let version = conn.read_u64("daemon protocol version").await?;
        if !worker::is_supported(version) {
            return Err(conn.refused(format!(
                "it speaks worker protocol {}.{}; offload needs 1.21 or later",
                worker::major(version),
                worker::minor(version)
            )));
        }
        let mut reply = Vec::new();
        put_u64(&mut reply, PROTOCOL_VERSION.min(version));
        // No CPU affinity, no space reservation.
        put_u64(&mut reply, 0);
        put_u64(&mut reply, 0);
        conn.send(&reply).await?;
        if worker::sends_nix_version(version) {
            conn.read_string("daemon Nix version").await?;
        }
        conn.read_messages().await?;
        Ok(conn)
    }

    /// Stores `log` as the build log of `drv_path`, where `nix log` finds it.
    pub async fn add_build_log(&mut self, drv_path: &str, log: &[u8]) -> Result<(), DaemonError> {
        let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
        let mut frame = Vec::with_capacity(FRAME + 64);
        put_u64(&mut frame, OP_ADD_BUILD_LOG);
        put_bytes(&mut frame, base.as_bytes());
        for chunk in log.chunks(FRAME) {
            put_u64(&mut frame, chunk.len() as u64);
            frame.extend_from_slice(chunk);
            self.send(&frame).await?;
            frame.clear();
        }
        put_u64(&mut frame, 0);
        self.send(&frame).await?;
        self.read_messages().await?;
        match self.read_u64("AddBuildLog result").await? {
            1 => Ok(()),
            other => Err(self.refused(format!("AddBuildLog answered {other}"))),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), DaemonError> {
        let stream = self.stream.get_mut();
        let io = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        io.await.map_err(|source| DaemonError::Wire {
            socket: self.socket.clone(),
            source: WireError::Io {
                what: "a request to the daemon",
                source,
            },
        })
    }

    /// Reads log and activity messages up to `STDERR_LAST`; `STDERR_ERROR` is the
    /// daemon's refusal.
    async fn read_messages(&mut self) -> Result<(), DaemonError> {
        loop {
            match self.read_u64("daemon message").await? {
                STDERR_LAST => return Ok(()),
                STDERR_NEXT => {
                    let line = self.read_string("daemon log line").await?;
                    tracing::debug!("nix-daemon: {}", line.trim_end());
                }
                STDERR_ERROR => {
                    let message = self.read_error().await?;
                    return Err(self.refused(message));
                }
                STDERR_START_ACTIVITY => {
                    // id, level, type, text, fields, parent.
                    for what in ["activity id", "activity level", "activity type"] {
                        self.read_u64(what).await?;
                    }
                    self.read_string("activity text").await?;
                    self.skip_fields().await?;
                    self.read_u64("activity parent").await?;
                }
                STDERR_STOP_ACTIVITY => {
                    self.read_u64("activity id").await?;
                }
                STDERR_RESULT => {
                    self.read_u64("activity id").await?;
                    self.read_u64("result type").await?;
                    self.skip_fields().await?;
                }
                other => {
                    return Err(self.refused(format!("unknown message {other:#x}")));
                }
            }
        }
    }

    /// An error as protocol 1.26 and later send it: type, level, name, message, a
    /// position flag, then traces; the message is what matters.
    async fn read_error(&mut self) -> Result<String, DaemonError> {
        self.read_string("error type").await?;
        self.read_u64("error level").await?;
        self.read_string("error name").await?;
        let message = self.read_string("error message").await?;
        self.read_u64("error position").await?;
        let traces = self.read_u64("error traces").await?;
        for _ in 0..traces {
            self.read_u64("trace position").await?;
            self.read_string("trace").await?;
        }
        Ok(message)
    }

    async fn skip_fields(&mut self) -> Result<(), DaemonError> {
        let n = self.read_u64("field count").await?;
        for _ in 0..n {
            match self.read_u64("field type").await? {
                0 => {
                    self.read_u64("integer field").await?;
                }
                1 => {
                    self.read_string("string field").await?;
                }
                other => return Err(self.refused(format!("unknown field type {other}"))),
            }
        }
        Ok(())
    }

    async fn read_u64(&mut self, what: &'static str) -> Result<u64, DaemonError> {
        read_u64(&mut self.stream, what)
            .await
            .map_err(|e| self.wire(e))
    }

    async fn read_string(&mut self, what: &'static str) -> Result<String, DaemonError> {
        read_string(&mut self.stream, what, MAX_MESSAGE)
            .await
            .map_err(|e| self.wire(e))
    }

    fn wire(&self, source: WireError) -> DaemonError {
        DaemonError::Wire {
            socket: self.socket.clone(),
            source,
        }
    }

    fn refused(&self, message: String) -> DaemonError {
        DaemonError::Refused {
            socket: self.socket.clone(),
            message,
        }
    }
}
