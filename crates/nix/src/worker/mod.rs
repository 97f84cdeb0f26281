//! The nix-daemon's own protocol (the worker protocol), as `nix-daemon --stdio` speaks
//! it over ssh and the daemon's socket speaks it here: the handshake, the requests a
//! remote build needs (QueryValidPaths, AddTempRoot, QueryPathInfo, AddToStoreNar,
//! BuildDerivation, NarFromPath, SetOptions), AddBuildLog, and QueryRealisation and
//! RegisterDrvOutput for content-addressed outputs built elsewhere, and the replies. The
//! connections themselves live in the driver. Facts from Nix 2.8's `daemon.cc` and
//! `worker-protocol.hh` (1.34) and Nix 2.26's `worker-protocol*.cc` (1.38); see
//! docs/nix-protocols.md §11.
//!
//! The exchange: the client's magic and version (sent together, as Nix 2.26 does), the
//! daemon's magic and version; both speak the lower version from then on. From 1.38
//! each side lists its features (offload lists none); then the client's two obsolete
//! words (CPU affinity, reserve space), from 1.33 the daemon's Nix version, from 1.35
//! whether it trusts the client, and the daemon's startup messages up to
//! [`STDERR_LAST`]. Every operation is: the request, the daemon's messages up to
//! `STDERR_LAST` (or `STDERR_ERROR`, which ends it), then the reply.

use crate::hash::{Hash, HashAlgo};
use crate::serve::{BasicDerivation, BuildSettings, PathInfo};
use crate::wire::{put_bool, put_bytes, put_strings, put_u64};

mod read;
pub use read::*;

/// First word of the handshake, client to daemon.
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// First word of the reply, daemon to client.
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// The version this client announces: 1.38, as Nix 2.26 speaks it.
pub const PROTOCOL_VERSION: u64 = 0x126;
/// The oldest daemon version offload speaks to (1.21).
pub const OLDEST_DAEMON: u64 = 0x115;
/// From this version on the daemon sends its Nix version after the handshake (1.33).
pub const SENDS_NIX_VERSION: u64 = 0x121;

/// Operation: add a temporary GC root for a path, held while the connection lives.
pub const OP_ADD_TEMP_ROOT: u64 = 11;
/// Operation: set the client's options (cores, timeouts) for later builds.
pub const OP_SET_OPTIONS: u64 = 19;
/// Operation: a path's metadata.
pub const OP_QUERY_PATH_INFO: u64 = 26;
/// Operation: the valid subset of a set of paths.
pub const OP_QUERY_VALID_PATHS: u64 = 31;
/// Operation: build a derivation sent whole (its inputs valid there).
pub const OP_BUILD_DERIVATION: u64 = 36;
/// Operation: a path's NAR.
pub const OP_NAR_FROM_PATH: u64 = 38;
/// Operation: add a path with its NAR.
pub const OP_ADD_TO_STORE_NAR: u64 = 39;
/// Operation: record which path an output of a content-addressed derivation has (a
/// realisation; needs Nix's `ca-derivations` feature on the daemon).
pub const OP_REGISTER_DRV_OUTPUT: u64 = 42;
/// Operation: the realisation of a derivation output, if the store has one.
pub const OP_QUERY_REALISATION: u64 = 43;
/// Operation: store a build log for a derivation (`nix log` reads it).
pub const OP_ADD_BUILD_LOG: u64 = 45;

/// Daemon message: a line of log output follows.
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// Daemon message: the operation's messages end here; its result follows.
pub const STDERR_LAST: u64 = 0x616c_7473;
/// Daemon message: the operation failed; the error follows.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// Daemon message: an activity started.
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
/// Daemon message: an activity stopped.
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
/// Daemon message: an activity's result.
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Activity result type: one line of a build's log (`resBuildLogLine`).
pub const RESULT_BUILD_LOG_LINE: u64 = 101;
/// Activity result type: one line of a post-build hook's log.
pub const RESULT_POST_BUILD_LOG_LINE: u64 = 107;

/// Largest frame of a framed stream (a NAR sent with AddToStoreNar, a log).
pub const FRAME: usize = 64 * 1024;

/// Major part of a worker-protocol version (1 for every 1.x).
pub fn major(version: u64) -> u64 {
    version >> 8
}

/// Minor part of a worker-protocol version.
pub fn minor(version: u64) -> u64 {
    version & 0xff
}

/// Whether offload can speak to a daemon of `version`: 1.21 or later.
pub fn is_supported(version: u64) -> bool {
    major(version) == major(PROTOCOL_VERSION) && minor(version) >= minor(OLDEST_DAEMON)
}

/// Whether a daemon of `version` sends its Nix version after the handshake.
pub fn sends_nix_version(version: u64) -> bool {
    minor(version) >= minor(SENDS_NIX_VERSION)
}

/// Whether the daemon says, after the handshake, if it trusts the client (1.35).
pub fn sends_trust(version: u64) -> bool {
    minor(version) >= 35
}

/// Whether both sides list their features in the handshake (1.38).
pub fn exchanges_features(version: u64) -> bool {
    minor(version) >= 38
}

/// Whether errors come structured (type, level, name, message, position, traces) rather
/// than as a message and an exit status (1.26).
pub fn structured_errors(version: u64) -> bool {
    minor(version) >= 26
}

/// Whether AddToStoreNar takes its NAR in frames (1.23); before, raw.
pub fn frames_nars(version: u64) -> bool {
    minor(version) >= 23
}

/// Whether a BuildResult carries build times (1.29), CPU times (1.37) and the built
/// outputs (1.28).
pub fn result_has_times(version: u64) -> bool {
    minor(version) >= 29
}

/// See [`result_has_times`].
pub fn result_has_cpu_times(version: u64) -> bool {
    minor(version) >= 37
}

/// See [`result_has_times`].
pub fn result_has_outputs(version: u64) -> bool {
    minor(version) >= 28
}

/// The client's opening: its magic and the version it speaks.
pub fn hello() -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, WORKER_MAGIC_1);
    put_u64(&mut out, PROTOCOL_VERSION);
    out
}

/// What the client sends once the version is agreed: its features from 1.38 (none),
/// no CPU affinity, no space reservation.
pub fn after_hello(version: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if exchanges_features(version) {
        put_u64(&mut out, 0);
    }
    put_u64(&mut out, 0);
    put_u64(&mut out, 0);
    out
}

/// Verbosity `lvlError`: the daemon sends no chatter of its own, only errors (a build's
/// log lines come as activity results whatever the level).
const LVL_ERROR: u64 = 0;

/// SetOptions with what a build of offload's needs: the build settings' limits, `cores`
/// (0: all the machine has), one job, substitutes allowed as Nix's client allows them.
/// `timeout` and `max-log-size` go as overrides where set.
pub fn set_options(settings: &BuildSettings, cores: u32) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, OP_SET_OPTIONS);
    put_bool(&mut out, settings.keep_failed);
    put_bool(&mut out, false); // keep going
    put_bool(&mut out, false); // try fallback
    put_u64(&mut out, LVL_ERROR);
    put_u64(&mut out, 1); // max jobs
    put_u64(&mut out, settings.max_silent_time);
    put_bool(&mut out, true); // obsolete: use the build hook
    put_u64(&mut out, LVL_ERROR); // build verbosity
    put_u64(&mut out, 0); // obsolete: log type
    put_u64(&mut out, 0); // obsolete: print build trace
    put_u64(&mut out, u64::from(cores));
    put_bool(&mut out, true); // use substitutes
    let mut overrides = Vec::new();
    if settings.build_timeout > 0 {
        overrides.push(("timeout", settings.build_timeout));
    }
    if settings.max_log_size > 0 {
        overrides.push(("max-log-size", settings.max_log_size));
    }
    put_u64(&mut out, overrides.len() as u64);
    for (name, value) in overrides {
        put_bytes(&mut out, name.as_bytes());
        put_bytes(&mut out, value.to_string().as_bytes());
    }
    out
}

/// QueryValidPaths; `substitute` (from 1.27) lets the daemon fetch what it can.
pub fn query_valid_paths(paths: &[String], substitute: bool, version: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, OP_QUERY_VALID_PATHS);
    put_strings(&mut out, paths.iter());
    if minor(version) >= 27 {
        put_bool(&mut out, substitute);
    }
    out
}

/// A request about one path: AddTempRoot, QueryPathInfo, NarFromPath.
pub fn path_request(op: u64, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, op);
    put_bytes(&mut out, path.as_bytes());
    out
}

/// AddToStoreNar's header; the NAR follows, framed from 1.23 ([`frames_nars`]). The
/// signatures are not checked for a trusted client: the NAR's hash and size are.
pub fn add_to_store_nar(info: &PathInfo) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, OP_ADD_TO_STORE_NAR);
    put_bytes(&mut out, info.path.as_bytes());
    put_bytes(&mut out, info.deriver.as_deref().unwrap_or("").as_bytes());
    // `sha256:<nixbase32>`: the daemon parses any form of the hash.
    put_bytes(&mut out, info.nar_hash.as_bytes());
    put_strings(&mut out, info.references.iter());
    put_u64(&mut out, 0); // registration time: the daemon's clock
    put_u64(&mut out, info.nar_size);
    put_bool(&mut out, false); // ultimate: not built there
    put_strings(&mut out, info.sigs.iter());
    put_bytes(&mut out, info.ca.as_deref().unwrap_or("").as_bytes());
    put_bool(&mut out, false); // repair
    put_bool(&mut out, true); // don't check signatures (honoured for trusted users)
    out
}

/// BuildDerivation in the normal build mode.
pub fn build_derivation(drv_path: &str, drv: &BasicDerivation) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, OP_BUILD_DERIVATION);
    put_bytes(&mut out, drv_path.as_bytes());
    drv.encode(&mut out);
    put_u64(&mut out, 0); // bmNormal
    out
}

/// Whether realisations travel as Nix's JSON (1.31); before, as an id and a path.
pub fn realisations_as_json(version: u64) -> bool {
    minor(version) >= 31
}

/// RegisterDrvOutput: from 1.31 the realisation as Nix's JSON (`json`, as the builder
/// wrote it), before as its id (`sha256:<base16>!out`) and the output's base name
/// (`out_path`, no store directory). The daemon answers with messages only.
pub fn register_drv_output(id: &str, out_path: &str, json: &str, version: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, OP_REGISTER_DRV_OUTPUT);
    if realisations_as_json(version) {
        put_bytes(&mut out, json.as_bytes());
    } else {
        put_bytes(&mut out, id.as_bytes());
        put_bytes(&mut out, out_path.as_bytes());
    }
    out
}

/// QueryRealisation of one derivation output id; the reply is a list of at most one
/// entry ([`read_realisations`]).
pub fn query_realisation(id: &str) -> Vec<u8> {
    path_request(OP_QUERY_REALISATION, id)
}

/// AddBuildLog's header: the `.drv`'s base name; the log follows in frames.
pub fn add_build_log(drv_path: &str) -> Vec<u8> {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let mut out = Vec::new();
    put_u64(&mut out, OP_ADD_BUILD_LOG);
    put_bytes(&mut out, base.as_bytes());
    out
}

/// Appends `bytes` as frames (length, bytes, no padding) and the empty frame that ends
/// a framed stream.
pub fn put_frames(out: &mut Vec<u8>, bytes: &[u8]) {
    for chunk in bytes.chunks(FRAME) {
        put_u64(out, chunk.len() as u64);
        out.extend_from_slice(chunk);
    }
    put_u64(out, 0);
}

/// The daemon's NAR hash (bare base16) as offload's path infos carry it
/// (`sha256:<nixbase32>`); `None` when it is not a SHA-256 in any form Nix writes.
pub fn typed_nar_hash(daemon_form: &str) -> Option<String> {
    Hash::parse(daemon_form, Some(HashAlgo::Sha256))
        .ok()
        .map(|h| h.to_typed_nix32())
}

#[cfg(test)]
mod tests;
