//! A client of this machine's nix-daemon over its socket, for the one thing the serve
//! protocol lacks: handing the daemon a build log, so that `nix log` finds the log of a
//! build that ran on another machine. The daemon takes logs only from its trusted users
//! ("you are not privileged to add logs").
//!
//! The handshake and the daemon's messages are the worker protocol's
//! ([`offload_nix::worker`]), read by the same code as a builder's daemon sessions
//! (`crate::session`). AddBuildLog (45) sends the `.drv`'s base name and the log as
//! frames (length, bytes, no padding; a zero length ends), then reads messages up to
//! `STDERR_LAST` and the word 1.

use std::path::{Path, PathBuf};

use offload_nix::wire::WireError;
use offload_nix::worker;
use thiserror::Error;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

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
    version: u64,
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
            version: 0,
        };
        conn.send(&worker::hello()).await?;
        let theirs = worker::read_hello_reply(&mut conn.stream)
            .await
            .map_err(|e| conn.wire(e))?;
        if !worker::is_supported(theirs) {
            return Err(conn.refused(format!(
                "it speaks worker protocol {}.{}; offload needs 1.21 or later",
                worker::major(theirs),
                worker::minor(theirs)
            )));
        }
        conn.version = theirs.min(worker::PROTOCOL_VERSION);
        conn.send(&worker::after_hello(conn.version)).await?;
        if worker::exchanges_features(conn.version) {
            worker::read_features(&mut conn.stream)
                .await
                .map_err(|e| conn.wire(e))?;
        }
        worker::read_hello_info(&mut conn.stream, conn.version)
            .await
            .map_err(|e| conn.wire(e))?;
        conn.read_messages().await?;
        Ok(conn)
    }

    /// Stores `log` as the build log of `drv_path`, where `nix log` finds it.
    pub async fn add_build_log(&mut self, drv_path: &str, log: &[u8]) -> Result<(), DaemonError> {
        let mut frame = worker::add_build_log(drv_path);
        worker::put_frames(&mut frame, log);
        self.send(&frame).await?;
        self.read_messages().await?;
        match worker::read_word(&mut self.stream)
            .await
            .map_err(|e| self.wire(e))?
        {
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

    /// Reads the daemon's messages up to `STDERR_LAST`; `STDERR_ERROR` is its refusal.
    async fn read_messages(&mut self) -> Result<(), DaemonError> {
        let said = worker::read_until_last(&mut self.stream, self.version, |line| {
            tracing::debug!("nix-daemon: {line}");
        })
        .await
        .map_err(|e| self.wire(e))?;
        said.map_err(|e| self.refused(e.message))
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
