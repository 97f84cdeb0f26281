//! What offload takes from its environment, in one place: every environment variable
//! the driver reads (and those the CLI hands to clap), every default path, and the
//! timeouts and waits a user may meet. Nothing else in the crate calls `std::env::var`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// The state database's path, instead of the default ([`state_db_path`]).
pub const OFFLOAD_HISTORY: &str = "OFFLOAD_HISTORY";
/// A PostgreSQL database (libpq-style URI) that holds the state instead of the SQLite
/// file, shared by every client that names it; wins over the config file's `state`.
pub const OFFLOAD_STATE: &str = "OFFLOAD_STATE";
/// The agent's Unix socket, instead of the default ([`agent_socket`]).
pub const OFFLOAD_AGENT_SOCKET: &str = "OFFLOAD_AGENT_SOCKET";
/// The slot-lock directory instead of Nix's ([`slots_dir`]).
pub const OFFLOAD_SLOTS_DIR: &str = "OFFLOAD_SLOTS_DIR";
/// Machines (Nix's syntax, `@file` too) that replace the `builders` setting Nix hands
/// the hook: a per-invocation choice of hosts where the hook runs in the user's
/// environment (single-user installs, not through a daemon). Read by the CLI's flags.
pub const OFFLOAD_HOOK_BUILDERS: &str = "OFFLOAD_HOOK_BUILDERS";
/// The secret key that signs what offload copies into a store that trusts keys. Read
/// by the CLI's flags and config.
pub const OFFLOAD_SIGN_KEY: &str = "OFFLOAD_SIGN_KEY";
/// offload's own config file, instead of `$XDG_CONFIG_HOME/offload/config.toml`. Read
/// by the CLI.
pub const OFFLOAD_CONFIG: &str = "OFFLOAD_CONFIG";
/// Extra ssh options, split on whitespace (as Nix does).
pub const NIX_SSHOPTS: &str = "NIX_SSHOPTS";
/// Nix's state directory, where its build hook keeps the slot locks.
pub const NIX_STATE_DIR: &str = "NIX_STATE_DIR";
/// The nix-daemon's socket.
pub const NIX_DAEMON_SOCKET_PATH: &str = "NIX_DAEMON_SOCKET_PATH";

/// Nix's state directory when `NIX_STATE_DIR` does not say otherwise.
const DEFAULT_NIX_STATE_DIR: &str = "/nix/var/nix";
/// The daemon's socket when `NIX_DAEMON_SOCKET_PATH` does not say otherwise.
const DEFAULT_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// How long an ssh connection and serve handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a query (or a small control command) may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a request to a builder's slot broker may go unanswered.
pub const SLOT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a build waits for a slot before its machine counts as unavailable for it
/// (the build then goes elsewhere): longer than most builds that could be holding it.
pub const SLOT_WAIT_LIMIT: Duration = Duration::from_secs(3 * 3600);
/// How long a builder gets to say how many cores it has (`nproc`).
pub const CORES_QUESTION_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the hook waits for a builder's upload lock before it copies anyway.
pub const UPLOAD_LOCK_LIMIT: Duration = Duration::from_secs(15 * 60);
/// How long the hook's `try` may wait for a builder's slot to free before it postpones:
/// Nix asks again only after its poll interval (5 s), far longer than most builds.
pub const HOOK_SLOT_WAIT: Duration = Duration::from_secs(2);
/// How long the agent keeps a user's choice of hosts: a build started later is another
/// one.
pub const HOST_CHOICE_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// After an ssh master failed to start, sessions connect on their own for this long
/// before a master is tried again (the builder may have come back).
pub const MASTER_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long a stderr pump that does not answer is waited for when a session's sink is
/// finished.
pub const STDERR_FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How a run treats machines that fail unless told otherwise (`offload build`'s
/// `--retry-backoff`, `--quarantine-after`, `--quarantine`, `--stall-timeout`): the
/// wait before a machine that failed once is probed again …
pub const RETRY_BACKOFF: Duration = Duration::from_secs(2);
/// … the longest that wait grows to …
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// … the consecutive failures (over runs) that quarantine a machine …
pub const QUARANTINE_AFTER: u32 = 4;
/// … how long a quarantine lasts …
pub const QUARANTINE_FOR: Duration = Duration::from_secs(600);
/// … and how long an ssh connection may go without an answer before it counts as dead.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A variable's value, None when unset or empty.
fn non_empty(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// The state database: `$OFFLOAD_HISTORY`, else `$XDG_STATE_HOME/offload/history.sqlite`,
/// else `~/.local/state/offload/…`.
pub fn state_db_path() -> PathBuf {
    if let Some(p) = std::env::var_os(OFFLOAD_HISTORY) {
        return PathBuf::from(p);
    }
    state_dir().join("history.sqlite")
}

/// Whether `$OFFLOAD_HISTORY` names the state database (it then wins over the config).
pub fn state_db_overridden() -> bool {
    std::env::var_os(OFFLOAD_HISTORY).is_some()
}

/// The state database `$OFFLOAD_HISTORY` names, if it is set.
pub fn state_db_from_env() -> Option<PathBuf> {
    std::env::var_os(OFFLOAD_HISTORY).map(PathBuf::from)
}

/// The shared state database `$OFFLOAD_STATE` names, if it is set and not empty.
pub fn state_uri_from_env() -> Option<String> {
    std::env::var(OFFLOAD_STATE)
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// The signing key `$OFFLOAD_SIGN_KEY` names, if it is set.
pub fn sign_key_from_env() -> Option<PathBuf> {
    std::env::var_os(OFFLOAD_SIGN_KEY).map(PathBuf::from)
}

/// offload's own config file: `$OFFLOAD_CONFIG`, else
/// `$XDG_CONFIG_HOME/offload/config.toml`, else `~/.config/offload/config.toml`; None
/// with neither `XDG_CONFIG_HOME` nor `HOME`.
pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(OFFLOAD_CONFIG) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("offload").join("config.toml"))
}

/// offload's state directory: `$XDG_STATE_HOME/offload`, else `~/.local/state/offload`,
/// else `offload` in the temporary directory.
fn state_dir() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    state.join("offload")
}

/// Where the agent listens unless told otherwise, and where the hook looks:
/// `$OFFLOAD_AGENT_SOCKET`, else `agent.sock` beside the state database.
pub fn agent_socket() -> PathBuf {
    if let Some(p) = std::env::var_os(OFFLOAD_AGENT_SOCKET) {
        return PathBuf::from(p);
    }
    state_db_path()
        .parent()
        .map_or_else(|| PathBuf::from("agent.sock"), |d| d.join("agent.sock"))
}

/// The slot-lock directory: `$OFFLOAD_SLOTS_DIR`, else `current-load` in Nix's state
/// directory (`$NIX_STATE_DIR`, else `/nix/var/nix`), where Nix's build hook keeps it.
pub fn slots_dir() -> PathBuf {
    if let Some(dir) = non_empty(OFFLOAD_SLOTS_DIR) {
        return PathBuf::from(dir);
    }
    non_empty(NIX_STATE_DIR)
        .map_or_else(|| PathBuf::from(DEFAULT_NIX_STATE_DIR), PathBuf::from)
        .join("current-load")
}

/// Where the daemon listens, as Nix decides it: `NIX_DAEMON_SOCKET_PATH`, else
/// `/nix/var/nix/daemon-socket/socket`.
pub fn daemon_socket() -> PathBuf {
    std::env::var_os(NIX_DAEMON_SOCKET_PATH)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DAEMON_SOCKET))
}

/// The extra ssh options of `NIX_SSHOPTS`, None when it is unset (or not Unicode).
pub fn nix_sshopts() -> Option<String> {
    std::env::var(NIX_SSHOPTS).ok()
}

/// The user offload runs as, for messages.
pub fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "your user".to_string())
}
