//! Constants of the nix-daemon's own protocol (the worker protocol), for the one
//! operation offload uses it for: handing the daemon a build log (AddBuildLog). The
//! connection itself lives in the driver (`offload_driver::daemon`).
//!
//! The exchange: the client's magic, the daemon's magic and version, the client's
//! version, two obsolete words (CPU affinity, reserve space), from 1.33 the daemon's Nix
//! version, then the daemon's messages up to [`STDERR_LAST`]. Facts from Nix 2.8's
//! `worker-protocol.hh`.

/// First word of the handshake, client to daemon.
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// First word of the reply, daemon to client.
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// The version this client announces: 1.34, as Nix 2.8 speaks it.
pub const PROTOCOL_VERSION: u64 = 0x122;
/// The oldest daemon version offload speaks to (1.21).
pub const OLDEST_DAEMON: u64 = 0x115;
/// From this version on the daemon sends its Nix version after the handshake (1.33).
pub const SENDS_NIX_VERSION: u64 = 0x121;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_nix_writes_them() {
        assert_eq!((major(PROTOCOL_VERSION), minor(PROTOCOL_VERSION)), (1, 34));
        assert!(is_supported(0x115) && is_supported(0x122) && is_supported(0x125));
        assert!(!is_supported(0x114) && !is_supported(0x215));
        assert!(!sends_nix_version(0x120) && sends_nix_version(0x121));
    }
}
