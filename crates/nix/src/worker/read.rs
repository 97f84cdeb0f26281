//! The daemon's side of the worker protocol, read over tokio's `AsyncRead`: its
//! handshake reply, its messages ([`read_message`]: one loop for every operation, which
//! is where a build's log arrives) and the replies of the operations offload sends.
//! None of them is cancel-safe: a read cut short leaves the stream mid-message.

/// Longest string read from the daemon (a log line, an error, a path).
pub const MAX_STRING: usize = crate::wire::MAX_STRING_LEN;

/// What the daemon said after the versions were agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonHello {
    /// The version both sides speak: the lower of the two.
    pub version: u64,
    /// Its Nix version (`2.26.3`), from 1.33.
    pub nix_version: Option<String>,
    /// Whether it trusts this client, from 1.35 (`None`: it does not say).
    pub trusted: Option<bool>,
}

/// An operation's failure as the daemon reports it (`STDERR_ERROR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// Nix's message, ANSI escapes removed.
    pub message: String,
    /// The exit status it names, in the pre-1.26 form.
    pub status: Option<u64>,
}

/// One message of the daemon's while an operation runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A line for the operation's log: a build's output (activity result 101 or 107)
    /// or one of the daemon's own messages (`STDERR_NEXT`).
    Log(String),
    /// An activity started, stopped or reported something other than a log line.
    Activity,
    /// The operation's messages end; its reply follows.
    Last,
    /// The operation failed; no reply follows.
    Error(RemoteError),
}

#[cfg(feature = "async")]
pub use self::tokio_io::*;

#[cfg(feature = "async")]
mod tokio_io {
    use tokio::io::AsyncRead;

    use super::super::*;
    use super::*;
    use crate::serve::{strip_ansi, BuildResult, BuildStatus};
    use crate::wire::tokio_io::{read_bool, read_string, read_strings, read_u64};
    use crate::wire::WireError;

    /// Reads the daemon's magic and version; a wrong magic is `BadValue` of "daemon
    /// magic" (a serve server, a login banner).
    pub async fn read_hello_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, WireError> {
        let magic = read_u64(r, "daemon magic").await?;
        if magic != WORKER_MAGIC_2 {
            return Err(WireError::BadValue {
                what: "daemon magic",
                found: magic,
            });
        }
        read_u64(r, "daemon protocol version").await
    }

    /// Reads the daemon's features (1.38 on; offload uses none of them).
    pub async fn read_features<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<String>, WireError> {
        read_strings(r, "daemon features", MAX_STRING).await
    }

    /// Reads what follows the client's [`after_hello`] up to the startup messages.
    pub async fn read_hello_info<R: AsyncRead + Unpin>(
        r: &mut R,
        version: u64,
    ) -> Result<DaemonHello, WireError> {
        let nix_version = match sends_nix_version(version) {
            true => Some(read_string(r, "daemon Nix version", MAX_STRING).await?),
            false => None,
        };
        let trusted = match sends_trust(version) {
            true => match read_u64(r, "daemon trust").await? {
                0 => None,
                1 => Some(true),
                2 => Some(false),
                found => {
                    return Err(WireError::BadValue {
                        what: "daemon trust",
                        found,
                    })
                }
            },
            false => None,
        };
        Ok(DaemonHello {
            version,
            nix_version,
            trusted,
        })
    }

    /// Reads one message of the daemon's.
    pub async fn read_message<R: AsyncRead + Unpin>(
        r: &mut R,
        version: u64,
    ) -> Result<Message, WireError> {
        Ok(match read_u64(r, "daemon message").await? {
            STDERR_LAST => Message::Last,
            STDERR_NEXT => {
                let line = read_string(r, "daemon log line", MAX_STRING).await?;
                Message::Log(line.trim_end_matches('\n').to_string())
            }
            STDERR_ERROR => Message::Error(read_error(r, version).await?),
            STDERR_START_ACTIVITY => {
                for what in ["activity id", "activity level", "activity type"] {
                    read_u64(r, what).await?;
                }
                read_string(r, "activity text", MAX_STRING).await?;
                read_fields(r).await?;
                read_u64(r, "activity parent").await?;
                Message::Activity
            }
            STDERR_STOP_ACTIVITY => {
                read_u64(r, "activity id").await?;
                Message::Activity
            }
            STDERR_RESULT => {
                read_u64(r, "activity id").await?;
                let kind = read_u64(r, "result type").await?;
                let fields = read_fields(r).await?;
                match (kind, fields.as_slice()) {
                    (RESULT_BUILD_LOG_LINE | RESULT_POST_BUILD_LOG_LINE, [Field::String(line)]) => {
                        Message::Log(line.clone())
                    }
                    _ => Message::Activity,
                }
            }
            found => {
                return Err(WireError::BadValue {
                    what: "daemon message",
                    found,
                })
            }
        })
    }

    /// Reads the daemon's messages up to `STDERR_LAST`, giving each log line to
    /// `on_log`: `Ok(Err(..))` when the operation failed there (`STDERR_ERROR`). The one
    /// loop every operation's messages go through.
    pub async fn read_until_last<R: AsyncRead + Unpin>(
        r: &mut R,
        version: u64,
        mut on_log: impl FnMut(String),
    ) -> Result<Result<(), RemoteError>, WireError> {
        loop {
            match read_message(r, version).await? {
                Message::Last => return Ok(Ok(())),
                Message::Error(e) => return Ok(Err(e)),
                Message::Log(line) => on_log(line),
                Message::Activity => {}
            }
        }
    }

    /// An activity's field.
    enum Field {
        Int,
        String(String),
    }

    async fn read_fields<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<Field>, WireError> {
        let n = read_u64(r, "field count").await?;
        let mut fields = Vec::new();
        for _ in 0..n {
            fields.push(match read_u64(r, "field type").await? {
                0 => {
                    read_u64(r, "integer field").await?;
                    Field::Int
                }
                1 => Field::String(read_string(r, "string field", MAX_STRING).await?),
                found => {
                    return Err(WireError::BadValue {
                        what: "field type",
                        found,
                    })
                }
            });
        }
        Ok(fields)
    }

    /// An error: from 1.26 type, level, name, message, a position flag and traces (the
    /// message is what matters); before, the message and an exit status.
    async fn read_error<R: AsyncRead + Unpin>(
        r: &mut R,
        version: u64,
    ) -> Result<RemoteError, WireError> {
        if !structured_errors(version) {
            let message = read_string(r, "error message", MAX_STRING).await?;
            let status = read_u64(r, "error status").await?;
            return Ok(RemoteError {
                message: strip_ansi(&message),
                status: Some(status),
            });
        }
        read_string(r, "error type", MAX_STRING).await?;
        read_u64(r, "error level").await?;
        read_string(r, "error name", MAX_STRING).await?;
        let message = read_string(r, "error message", MAX_STRING).await?;
        read_u64(r, "error position").await?;
        let traces = read_u64(r, "error traces").await?;
        for _ in 0..traces {
            read_u64(r, "trace position").await?;
            read_string(r, "trace", MAX_STRING).await?;
        }
        Ok(RemoteError {
            message: strip_ansi(&message),
            status: None,
        })
    }

    /// Reads a QueryValidPaths reply.
    pub async fn read_path_set<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<String>, WireError> {
        read_strings(r, "path list", MAX_STRING).await
    }

    /// Reads a QueryRealisation reply: at most one entry, from 1.31 the realisation as
    /// Nix's JSON, before the output's base name.
    pub async fn read_realisations<R: AsyncRead + Unpin>(
        r: &mut R,
    ) -> Result<Vec<String>, WireError> {
        read_strings(r, "realisations", MAX_STRING).await
    }

    /// Reads the one-word reply of AddTempRoot, SetOptions-less operations and
    /// AddBuildLog (1).
    pub async fn read_word<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, WireError> {
        read_u64(r, "reply word").await
    }

    /// Reads a QueryPathInfo reply for `path` (from 1.17: a validity flag first).
    pub async fn read_path_info<R: AsyncRead + Unpin>(
        r: &mut R,
        path: &str,
    ) -> Result<Option<PathInfo>, WireError> {
        if !read_bool(r, "path validity").await? {
            return Ok(None);
        }
        let deriver = read_string(r, "deriver", MAX_STRING).await?;
        let hash = read_string(r, "NAR hash", MAX_STRING).await?;
        let nar_hash = typed_nar_hash(&hash).ok_or(WireError::BadValue {
            what: "NAR hash (not a SHA-256), of this length",
            found: hash.len() as u64,
        })?;
        let references = read_strings(r, "references", MAX_STRING).await?;
        read_u64(r, "registration time").await?;
        let nar_size = read_u64(r, "NAR size").await?;
        read_bool(r, "ultimate").await?;
        let sigs = read_strings(r, "signatures", MAX_STRING).await?;
        let ca = read_string(r, "content address", MAX_STRING).await?;
        Ok(Some(PathInfo {
            path: path.to_string(),
            deriver: (!deriver.is_empty()).then_some(deriver),
            references,
            nar_size,
            nar_hash,
            ca: (!ca.is_empty()).then_some(ca),
            sigs,
        }))
    }

    /// Reads a BuildDerivation reply in the layout of `version`.
    pub async fn read_build_result<R: AsyncRead + Unpin>(
        r: &mut R,
        version: u64,
    ) -> Result<BuildResult, WireError> {
        let status = BuildStatus::from_code(read_u64(r, "build status").await?);
        let error_msg = strip_ansi(&read_string(r, "build error message", MAX_STRING).await?);
        let mut result = BuildResult {
            status,
            error_msg,
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: Vec::new(),
        };
        if result_has_times(version) {
            result.times_built = read_u64(r, "build times built").await?;
            result.is_non_deterministic = read_bool(r, "build non-determinism flag").await?;
            result.start_time = read_u64(r, "build start time").await?;
            result.stop_time = read_u64(r, "build stop time").await?;
        }
        if result_has_cpu_times(version) {
            for what in ["build user CPU time", "build system CPU time"] {
                // An optional duration: a tag, then microseconds when present.
                if read_u64(r, what).await? == 1 {
                    read_u64(r, what).await?;
                }
            }
        }
        if result_has_outputs(version) {
            let n = read_u64(r, "built outputs count").await?;
            for _ in 0..n {
                let id = read_string(r, "built output id", MAX_STRING).await?;
                let realisation = read_string(r, "built output realisation", MAX_STRING).await?;
                result.built_outputs.push((id, realisation));
            }
        }
        Ok(result)
    }
}
