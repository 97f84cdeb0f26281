//! Persistent serve sessions per machine, so a build does not pay an ssh handshake:
//! sessions are taken for one operation (a build with its uploads, a transfer) and put
//! back afterwards. New sessions share an ssh connection ([`crate::ssh::master`]).
//!
//! The cores a build gets (`NIX_BUILD_CORES`) are fixed per session: the serve protocol
//! carries no `cores`, so a session started with `--option cores N` builds with N. Idle
//! sessions are therefore kept per cores value; `None` is the machine's own setting.
//!
//! Idle sessions are also kept per [`Traffic`]. Builds, queries and the slot broker share
//! the machine's one ssh connection; each copy session has a connection of its own.
//! Inside one connection every session's bytes queue behind all the connection has
//! sent before: on a 20 Mbit/s link a session opened during a 16 MiB upload waited 2.1 s
//! for its first reply when the upload shared its connection, and a build's request or
//! a slot's release would wait as long. And one connection's encryption runs in one ssh
//! process over one TCP stream: four uploads over a 10-ms link took 15.7 s sharing one
//! connection against 6 s on four (`LINK=sshd scripts/bench-upload.sh`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::ServeConn;
use crate::error::DriverError;
use crate::ssh::master::SshMaster;
use crate::ssh::Endpoint;

/// How often a new session is tried before the machine counts as lost.
pub const OPEN_ATTEMPTS: u32 = 3;

/// What a session carries, which decides the connection it goes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Traffic {
    /// Builds, queries, the slot broker: few bytes, each waited for.
    Control,
    /// NARs copied to the machine.
    ToMachine,
    /// NARs copied from the machine.
    FromMachine,
}

/// Which store a machine's sessions serve: the device and inode of its database
/// directory. A store deleted and made again at the same place is another store, whose
/// sessions must be opened anew (old ones still see the deleted database).
pub type StoreId = (u64, u64);

/// How long the question behind [`Pool::store_identity`] may take over ssh.
const IDENTITY_QUESTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Idle sessions per cores setting and traffic.
type Idle = HashMap<(Option<u32>, Traffic), Vec<ServeConn>>;

/// Idle sessions with one machine.
pub struct Pool {
    endpoint: Endpoint,
    idle: Mutex<Idle>,
    /// The ssh connection new sessions for [`Traffic::Control`] share.
    master: Arc<SshMaster>,
}

impl Pool {
    pub fn new(endpoint: Endpoint) -> Pool {
        Pool::with_master(Arc::new(SshMaster::new(&endpoint)), endpoint)
    }

    /// A pool whose new sessions share `master`, a connection the run already uses.
    pub fn with_master(master: Arc<SshMaster>, endpoint: Endpoint) -> Pool {
        Pool {
            master,
            endpoint,
            idle: Mutex::new(HashMap::new()),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The identity of the store this machine's sessions serve: its database directory
    /// looked at on this machine's disk, or its inode asked over the machine's ssh
    /// connection. None when it cannot be told: a store that is not a directory, a host
    /// that runs only the daemon (no other command), no answer.
    pub async fn store_identity(&self) -> Option<StoreId> {
        let root = crate::ssh::files_root(self.endpoint.remote_store.as_deref())?;
        let db = root.join("nix/var/nix/db");
        if self.endpoint.is_local_process() {
            use std::os::unix::fs::MetadataExt as _;
            let meta = std::fs::metadata(&db).ok()?;
            return Some((meta.dev(), meta.ino()));
        }
        if self.endpoint.protocol.is_daemon_only() {
            return None;
        }
        let mut endpoint = self.endpoint.clone();
        endpoint.control_path = self.master.socket().await.ok().flatten();
        // `ls -di` is POSIX (GNU and BSD `stat` differ): the inode alone tells a
        // directory made again from the one sessions were opened on.
        let question = format!(
            "ls -di -- {}",
            crate::ssh::shell_quote(&db.to_string_lossy())
        );
        let answer = endpoint.ask(&question, IDENTITY_QUESTION_TIMEOUT).await?;
        let inode = answer.split_whitespace().next()?.parse::<u64>().ok()?;
        Some((0, inode))
    }

    /// The ssh connection of this machine's builds and queries, for other processes
    /// run there that exchange a few bytes (the slot broker).
    pub fn master(&self) -> Arc<SshMaster> {
        self.master.clone()
    }

    /// What a session for `traffic` carries on this machine: a local process has no
    /// connection to keep apart, and its idle sessions serve every use.
    fn traffic(&self, traffic: Traffic) -> Traffic {
        if self.endpoint.is_ssh() {
            traffic
        } else {
            Traffic::Control
        }
    }

    /// An idle session, or a new one with the machine's own cores setting: for queries,
    /// which the cores setting does not touch. Idle sessions with the machine's own
    /// setting go first, so those opened for builds stay for builds.
    pub async fn get(&self) -> Result<ServeConn, DriverError> {
        self.get_for(Traffic::Control).await
    }

    /// [`Pool::get`] for `traffic`: a copy takes a session over the connection of its
    /// direction.
    pub async fn get_for(&self, traffic: Traffic) -> Result<ServeConn, DriverError> {
        let traffic = self.traffic(traffic);
        let any = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            match idle.get_mut(&(None, traffic)).and_then(Vec::pop) {
                Some(conn) => Some(conn),
                None => idle
                    .iter_mut()
                    .filter(|((_, t), _)| *t == traffic)
                    .find_map(|(_, conns)| conns.pop()),
            }
        };
        match any {
            Some(conn) => Ok(conn),
            None => self.open(None, traffic).await,
        }
    }

    /// An idle session whose builds get `cores` cores, if there is one.
    pub fn take_idle(&self, cores: Option<u32>) -> Option<ServeConn> {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&(cores, Traffic::Control))
            .and_then(Vec::pop)
    }

    /// An idle session whose builds get `cores` cores, or a new one.
    pub async fn get_with_cores(&self, cores: Option<u32>) -> Result<ServeConn, DriverError> {
        match self.take_idle(cores) {
            Some(conn) => Ok(conn),
            None => self.open(cores, Traffic::Control).await,
        }
    }

    /// A new session whose builds get `cores` cores: over the shared connection for
    /// [`Traffic::Control`], over one of its own for a copy.
    /// A new session that fails for a reason that may pass (the server exited, a
    /// timeout: e.g. two first sessions racing to initialise a fresh store) is tried
    /// again, up to `OPEN_ATTEMPTS` times; authentication and host-key failures are not.
    /// Cancel-safe: a cancelled open kills its process.
    async fn open(&self, cores: Option<u32>, traffic: Traffic) -> Result<ServeConn, DriverError> {
        let mut endpoint = self.endpoint.clone();
        if let Some(n) = cores {
            endpoint.extra_args.extend([
                "--option".to_string(),
                "cores".to_string(),
                n.to_string(),
            ]);
        }
        let mut attempt = 1;
        loop {
            if traffic == Traffic::Control {
                endpoint.control_path = self.master.socket().await?;
            }
            match ServeConn::open(&endpoint).await {
                Ok(conn) => return Ok(conn.with_cores(cores).with_traffic(traffic)),
                Err(
                    e @ (DriverError::Exited { .. }
                    | DriverError::Timeout { .. }
                    | DriverError::Ssh { .. }),
                ) if attempt < OPEN_ATTEMPTS => {
                    tracing::debug!(machine = %self.endpoint.name, "opening a session failed, trying again: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt)))
                        .await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Returns a session for reuse, unless it is broken.
    pub fn put(&self, conn: ServeConn) {
        if !conn.is_broken() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((conn.cores(), conn.traffic()))
                .or_default()
                .push(conn);
        }
    }

    /// Closes every idle session, then the shared connection.
    pub async fn close(&self) {
        let conns: Vec<ServeConn> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .flatten()
                .collect();
        for conn in conns {
            let _ = conn.close().await;
        }
        self.master.stop().await;
    }
}
