//! One ssh connection per builder, shared by its builds, queries and slot broker (copies
//! keep connections of their own, see [`crate::Pool`]): OpenSSH's connection
//! multiplexing, a master started with `-M` and sessions that reach the builder through
//! its control socket (`-S`). A new session then costs a channel over the open
//! connection, a few milliseconds, where it cost an ssh handshake (key exchange and
//! authentication: 0.2–0.4 s on an idle machine, over a second while builds and copies
//! load it). A run opens such sessions often: a build whose cores setting no idle
//! session has, the slot broker. Nix's
//! own ssh stores share one connection the same way when they keep several.
//!
//! The master is a child of this process and ends with it; its socket lives in a private
//! temporary directory. It only ever saves time: a builder that refuses a multiplexed
//! session (sshd's `MaxSessions`), or a master that did not start, leaves each session
//! to connect on its own, as ssh itself does when the socket does not answer. A master
//! that ended (the connection died) is started again by the next session that needs it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Child;

use super::{classify_ssh_failure, Endpoint};
use crate::env::HANDSHAKE_TIMEOUT;
use crate::env::MASTER_RETRY_AFTER;
use crate::error::DriverError;

/// How often a starting master's socket is looked for.
const SOCKET_POLL: Duration = Duration::from_millis(5);
/// Lines of the master's stderr that go into a message.
const STDERR_KEPT: usize = 5;
/// The master's stderr, beside its socket: it says why the connection ended (keepalives
/// unanswered, say), which its sessions then cannot say themselves.
const LOG: &str = "log";

/// The shared connection to one machine, started on first need.
pub struct SshMaster {
    endpoint: Endpoint,
    /// Whether this machine gets one: reached over ssh, and the user's `NIX_SSHOPTS`
    /// does not choose its own multiplexing.
    wanted: bool,
    state: tokio::sync::Mutex<State>,
}

enum State {
    NotStarted,
    Up(Box<Running>),
    /// It could not start at that time.
    Failed(Instant),
}

/// A master started; killed when dropped (`kill_on_drop`).
struct Running {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    _known_hosts: Option<tempfile::NamedTempFile>,
}

impl SshMaster {
    pub fn new(endpoint: &Endpoint) -> SshMaster {
        let own_choice = crate::env::nix_sshopts().is_some_and(|opts| user_multiplexes(&opts));
        SshMaster {
            wanted: endpoint.is_ssh() && !own_choice,
            endpoint: endpoint.clone(),
            state: tokio::sync::Mutex::new(State::NotStarted),
        }
    }

    /// The control socket for a new session, the master started (or started again)
    /// when there is none. `Ok(None)`: the session connects on its own. An error is a
    /// failure every session would meet (the machine is unreachable, refuses the key,
    /// or shows another host key), said once rather than after a second attempt.
    pub async fn socket(&self) -> Result<Option<PathBuf>, DriverError> {
        if !self.wanted {
            return Ok(None);
        }
        let mut state = self.state.lock().await;
        match &mut *state {
            State::Up(running) => match running.child.try_wait() {
                Ok(None) => return Ok(Some(running.socket.clone())),
                _ => {
                    tracing::debug!(machine = %self.endpoint.name, "its shared ssh connection ended; starting another")
                }
            },
            State::Failed(at) if at.elapsed() < MASTER_RETRY_AFTER => return Ok(None),
            State::Failed(_) | State::NotStarted => {}
        }
        match self.start().await {
            Ok(running) => {
                let socket = running.socket.clone();
                *state = State::Up(Box::new(running));
                Ok(Some(socket))
            }
            Err(e) => {
                *state = State::Failed(Instant::now());
                tracing::debug!(machine = %self.endpoint.name, "no shared ssh connection: {e}");
                match e {
                    DriverError::SshAuth { .. }
                    | DriverError::SshHostKey { .. }
                    | DriverError::SshUnreachable { .. } => Err(e),
                    _ => Ok(None),
                }
            }
        }
    }

    /// Ends the master, and with it every session still using it.
    pub async fn stop(&self) {
        let mut state = self.state.lock().await;
        if let State::Up(running) = &mut *state {
            let _ = running.child.start_kill();
            let _ = running.child.wait().await;
        }
        *state = State::NotStarted;
    }

    /// Starts the master and waits until its socket is there (the connection is up and
    /// authenticated) or it has exited.
    async fn start(&self) -> Result<Running, DriverError> {
        let machine = &self.endpoint.name;
        let io_err = |op, source| DriverError::Io {
            machine: machine.clone(),
            op,
            source,
        };
        let dir = tempfile::Builder::new()
            .prefix("offload-ssh")
            .tempdir()
            .map_err(|e| io_err("making the directory of its ssh control socket", e))?;
        let socket = dir.path().join("s");
        let (cmd, known_hosts) = self.endpoint.master_command(&socket)?;
        let log = std::fs::File::create(dir.path().join(LOG))
            .map_err(|e| io_err("making the log of its shared ssh connection", e))?;
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| DriverError::Spawn {
            machine: machine.clone(),
            program: "ssh".into(),
            source,
        })?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            if socket.exists() {
                return Ok(Running {
                    child,
                    socket,
                    _dir: dir,
                    _known_hosts: known_hosts,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let text = last_words(&socket);
                return Err(if status.code() == Some(255) {
                    classify_ssh_failure(machine, text)
                } else {
                    DriverError::Ssh {
                        machine: machine.clone(),
                        stderr: format!("its shared connection ended ({status}): {text}"),
                    }
                });
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    machine: machine.clone(),
                    op: "starting its shared ssh connection",
                    secs: HANDSHAKE_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(SOCKET_POLL).await;
        }
    }
}

/// The last lines the master of control socket `socket` wrote on stderr: why its
/// connection ended, for a session over it that ssh gave up on.
pub(crate) fn last_words(socket: &Path) -> String {
    let text = std::fs::read_to_string(socket.with_file_name(LOG)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(STDERR_KEPT)..].join("\n")
}

/// Whether ssh options choose their own connection sharing, which then stays theirs.
fn user_multiplexes(opts: &str) -> bool {
    opts.split_whitespace().any(|w| {
        let lower = w.to_ascii_lowercase();
        w.starts_with("-S") || lower.contains("controlmaster") || lower.contains("controlpath")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_own_sharing_is_left_alone() {
        assert!(user_multiplexes(
            "-o ControlMaster=auto -o ControlPath=/tmp/%h"
        ));
        assert!(user_multiplexes("-S /tmp/sock"));
        assert!(user_multiplexes("-oControlPath=/tmp/x"));
        assert!(!user_multiplexes("-F /etc/ssh/fleet_config -p 2222 -s"));
        assert!(!user_multiplexes(""));
    }

    #[tokio::test]
    async fn a_local_process_has_no_master() {
        let master = SshMaster::new(&Endpoint::local("local", None));
        assert_eq!(master.socket().await.unwrap(), None);
    }
}
