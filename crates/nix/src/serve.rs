//! Messages of the serve protocol (`nix-store --serve [--write]`), the protocol behind
//! Nix's `ssh://` stores and its build hook.
//!
//! Requests are encoded into byte frames ([`Request::encode`]) that the caller writes and
//! flushes. Replies are parsed by sans-I/O decoders ([`PathInfosDecoder`], …; see
//! [`crate::wire::Decode`]), run by [`crate::wire::read_message`] or, with the `async`
//! feature, by the `read_*` functions here over a tokio `AsyncRead`. The protocol has no in-band errors: a server that fails
//! prints to its stderr and exits, so every decoder reports a clean end of stream as
//! [`WireError::Eof`](crate::wire::WireError::Eof) and the caller turns it into a message carrying that stderr.
//!
//! Version 2.7 (0x207) is what Nix 2.8 speaks; replies are decoded according to the
//! version the *client* announced, with the 2.8 quirk that `builtOutputs` is always sent.

use crate::wire::{put_bool, put_bytes, put_strings, put_u64};

/// First word of the handshake, client to server.
pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
/// First word of the reply, server to client.
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// The version this client announces: major 2, minor 7, as Nix 2.8.
pub const PROTOCOL_VERSION: u64 = 0x207;

/// Major part of a protocol version (`0x200` for every 2.x).
pub fn major(version: u64) -> u64 {
    version & 0xff00
}

/// Minor part of a protocol version.
pub fn minor(version: u64) -> u64 {
    version & 0x00ff
}

/// The oldest server version offload speaks to: 2.4, the first whose path infos carry
/// the NAR hash, content address and signatures.
pub const OLDEST_SERVER: u64 = 0x204;
/// The first server version that takes AddToStoreNar; older servers import only with
/// ImportPaths.
pub const ADD_TO_STORE_NAR: u64 = 0x205;

/// Whether offload can speak to a server that announced `version`: 2.4 or later.
pub fn is_supported(version: u64) -> bool {
    major(version) == major(PROTOCOL_VERSION) && minor(version) >= minor(OLDEST_SERVER)
}

/// Whether a server of `version` takes AddToStoreNar (else only ImportPaths).
pub fn takes_add_to_store_nar(version: u64) -> bool {
    minor(version) >= minor(ADD_TO_STORE_NAR)
}

/// Whether a server of `version` sends a path info's NAR hash, content address and
/// signatures (2.4).
pub fn sends_nar_hash(version: u64) -> bool {
    minor(version) >= 4
}

/// Whether a server of `version` sends a build result's times built, non-determinism
/// flag and start and stop times (2.3).
pub fn sends_build_times(version: u64) -> bool {
    minor(version) >= 3
}

/// Whether a build's settings from a client of `version` carry the log size limit (2.2).
pub fn takes_max_log_size(version: u64) -> bool {
    minor(version) >= 2
}

/// Whether a build's settings from a client of `version` carry the repeat count and
/// whether to enforce determinism (2.3).
pub fn takes_build_repeats(version: u64) -> bool {
    minor(version) >= 3
}

/// Whether a build's settings from a client of `version` carry keep-failed (2.7).
pub fn takes_keep_failed(version: u64) -> bool {
    minor(version) >= 7
}

/// Longest single string accepted in a reply (paths, hashes, error messages).
pub const MAX_REPLY_STRING: usize = crate::wire::MAX_STRING_LEN;

/// The command words of the serve protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Command {
    QueryValidPaths = 1,
    QueryPathInfos = 2,
    DumpStorePath = 3,
    ImportPaths = 4,
    ExportPaths = 5,
    BuildPaths = 6,
    QueryClosure = 7,
    BuildDerivation = 8,
    AddToStoreNar = 9,
}

/// The bytes a client sends to open a session: magic and version, back to back.
pub fn handshake_request() -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    put_u64(&mut out, SERVE_MAGIC_1);
    put_u64(&mut out, PROTOCOL_VERSION);
    out
}

/// What Nix records about a valid store path, as QueryPathInfos returns it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PathInfo {
    /// Full store path.
    pub path: String,
    /// The `.drv` that produced it, if known.
    pub deriver: Option<String>,
    /// Full store paths it refers to (may include itself).
    pub references: Vec<String>,
    /// Size of its NAR serialisation in bytes.
    pub nar_size: u64,
    /// `sha256:<nixbase32>` hash of its NAR, as Nix prints it.
    pub nar_hash: String,
    /// Content address (`text:sha256:…`, `fixed:r:sha256:…`) if content-addressed.
    pub ca: Option<String>,
    /// Signatures, `keyname:base64`.
    pub sigs: Vec<String>,
}

/// Limits and options sent with BuildDerivation and BuildPaths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSettings {
    /// Seconds without output before the build is killed; 0 = no limit.
    pub max_silent_time: u64,
    /// Seconds before the build is killed; 0 = no limit.
    pub build_timeout: u64,
    /// Bytes of log before the build is killed; 0 = no limit.
    pub max_log_size: u64,
    /// Extra builds to check determinism. Keep 0: a 2.8 server in a chroot store fails
    /// every build otherwise.
    pub nr_repeats: u64,
    pub enforce_determinism: bool,
    pub keep_failed: bool,
}

impl Default for BuildSettings {
    /// What Nix 2.8's client sends by default: `[0,0,0,0,1,0]`.
    fn default() -> Self {
        BuildSettings {
            max_silent_time: 0,
            build_timeout: 0,
            max_log_size: 0,
            nr_repeats: 0,
            enforce_determinism: true,
            keep_failed: false,
        }
    }
}

impl BuildSettings {
    fn encode(&self, out: &mut Vec<u8>, client_version: u64) {
        put_u64(out, self.max_silent_time);
        put_u64(out, self.build_timeout);
        if takes_max_log_size(client_version) {
            put_u64(out, self.max_log_size);
        }
        if takes_build_repeats(client_version) {
            put_u64(out, self.nr_repeats);
            put_bool(out, self.enforce_determinism);
        }
        if takes_keep_failed(client_version) {
            put_bool(out, self.keep_failed);
        }
    }
}

/// One output of a derivation as the wire carries it: name, path, hash algorithm, hash
/// (the four ATerm columns; empty strings where a form has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireOutput {
    pub name: String,
    pub path: String,
    pub hash_algo: String,
    pub hash: String,
}

/// A derivation without its input derivations, as BuildDerivation sends it: the
/// receiver needs every input already valid and takes the name from the `.drv` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicDerivation {
    /// Sorted by name.
    pub outputs: Vec<WireOutput>,
    /// Full store paths, all valid on the receiver before the build.
    pub input_srcs: Vec<String>,
    pub platform: String,
    pub builder: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    /// Sorted by key.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
}

impl BasicDerivation {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.outputs.len() as u64);
        for o in &self.outputs {
            put_bytes(out, o.name.as_bytes());
            put_bytes(out, o.path.as_bytes());
            put_bytes(out, o.hash_algo.as_bytes());
            put_bytes(out, o.hash.as_bytes());
        }
        put_strings(out, &self.input_srcs);
        put_bytes(out, self.platform.as_bytes());
        put_bytes(out, &self.builder);
        put_strings(out, &self.args);
        put_u64(out, self.env.len() as u64);
        for (k, v) in &self.env {
            put_bytes(out, k);
            put_bytes(out, v);
        }
    }
}

/// A request frame. [`Request::encode`] gives the exact bytes to send; for
/// AddToStoreNar and ImportPaths the NAR bytes follow, streamed by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    QueryValidPaths {
        lock: bool,
        substitute: bool,
        paths: &'a [String],
    },
    QueryPathInfos {
        paths: &'a [String],
    },
    QueryClosure {
        include_outputs: bool,
        paths: &'a [String],
    },
    DumpStorePath {
        path: &'a str,
    },
    ExportPaths {
        paths: &'a [String],
    },
    /// Followed by an export stream (see [`crate::export`]).
    ImportPaths,
    /// Followed by exactly `info.nar_size` NAR bytes.
    AddToStoreNar {
        info: &'a PathInfo,
    },
    BuildDerivation {
        drv_path: &'a str,
        drv: &'a BasicDerivation,
        settings: &'a BuildSettings,
    },
    BuildPaths {
        paths: &'a [String],
        settings: &'a BuildSettings,
    },
}

impl Request<'_> {
    /// The frame for a server reached with our [`PROTOCOL_VERSION`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        match self {
            Request::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                put_u64(&mut out, Command::QueryValidPaths as u64);
                put_bool(&mut out, *lock);
                put_bool(&mut out, *substitute);
                put_strings(&mut out, paths.iter());
            }
            Request::QueryPathInfos { paths } => {
                put_u64(&mut out, Command::QueryPathInfos as u64);
                put_strings(&mut out, paths.iter());
            }
            Request::QueryClosure {
                include_outputs,
                paths,
            } => {
                put_u64(&mut out, Command::QueryClosure as u64);
                put_bool(&mut out, *include_outputs);
                put_strings(&mut out, paths.iter());
            }
            Request::DumpStorePath { path } => {
                put_u64(&mut out, Command::DumpStorePath as u64);
                put_bytes(&mut out, path.as_bytes());
            }
            Request::ExportPaths { paths } => {
                put_u64(&mut out, Command::ExportPaths as u64);
                // Obsolete "sign" flag, ignored by every server.
                put_u64(&mut out, 0);
                put_strings(&mut out, paths.iter());
            }
            Request::ImportPaths => put_u64(&mut out, Command::ImportPaths as u64),
            Request::AddToStoreNar { info } => {
                put_u64(&mut out, Command::AddToStoreNar as u64);
                put_bytes(&mut out, info.path.as_bytes());
                put_bytes(&mut out, info.deriver.as_deref().unwrap_or("").as_bytes());
                put_bytes(&mut out, info.nar_hash.as_bytes());
                put_strings(&mut out, info.references.iter());
                // Registration time: 0 lets the receiver use its own clock.
                put_u64(&mut out, 0);
                put_u64(&mut out, info.nar_size);
                // "ultimate": the receiver did not build it itself.
                put_bool(&mut out, false);
                put_strings(&mut out, info.sigs.iter());
                put_bytes(&mut out, info.ca.as_deref().unwrap_or("").as_bytes());
            }
            Request::BuildDerivation {
                drv_path,
                drv,
                settings,
            } => {
                put_u64(&mut out, Command::BuildDerivation as u64);
                put_bytes(&mut out, drv_path.as_bytes());
                drv.encode(&mut out);
                settings.encode(&mut out, PROTOCOL_VERSION);
            }
            Request::BuildPaths { paths, settings } => {
                put_u64(&mut out, Command::BuildPaths as u64);
                put_strings(&mut out, paths.iter());
                settings.encode(&mut out, PROTOCOL_VERSION);
            }
        }
        out
    }
}

/// Outcome of a build, Nix's `BuildResult::Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    Built,
    Substituted,
    AlreadyValid,
    PermanentFailure,
    InputRejected,
    OutputRejected,
    TransientFailure,
    CachedFailure,
    TimedOut,
    MiscFailure,
    DependencyFailed,
    LogLimitExceeded,
    NotDeterministic,
    ResolvesToAlreadyValid,
    NoSubstituters,
    /// A code this client does not know; treated as a failure.
    Unknown(u64),
}

impl BuildStatus {
    pub fn from_code(code: u64) -> Self {
        use BuildStatus::*;
        match code {
            0 => Built,
            1 => Substituted,
            2 => AlreadyValid,
            3 => PermanentFailure,
            4 => InputRejected,
            5 => OutputRejected,
            6 => TransientFailure,
            7 => CachedFailure,
            8 => TimedOut,
            9 => MiscFailure,
            10 => DependencyFailed,
            11 => LogLimitExceeded,
            12 => NotDeterministic,
            13 => ResolvesToAlreadyValid,
            14 => NoSubstituters,
            other => Unknown(other),
        }
    }

    /// The code on the wire; the inverse of [`BuildStatus::from_code`].
    pub fn code(self) -> u64 {
        use BuildStatus::*;
        match self {
            Built => 0,
            Substituted => 1,
            AlreadyValid => 2,
            PermanentFailure => 3,
            InputRejected => 4,
            OutputRejected => 5,
            TransientFailure => 6,
            CachedFailure => 7,
            TimedOut => 8,
            MiscFailure => 9,
            DependencyFailed => 10,
            LogLimitExceeded => 11,
            NotDeterministic => 12,
            ResolvesToAlreadyValid => 13,
            NoSubstituters => 14,
            Unknown(code) => code,
        }
    }

    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// Reply to BuildDerivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    /// Nix's message, ANSI escapes removed.
    pub error_msg: String,
    pub times_built: u64,
    pub is_non_deterministic: bool,
    /// Unix seconds; 0 when unknown.
    pub start_time: u64,
    pub stop_time: u64,
    /// `(DrvOutput id, Realisation JSON)` pairs.
    pub built_outputs: Vec<(String, String)>,
}

/// Removes ANSI escape sequences (`ESC [ … letter`), which Nix puts in error messages.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

mod decode;
pub use decode::*;

#[cfg(test)]
mod tests;
