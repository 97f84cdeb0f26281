//! Persistent serve sessions per machine, so a build does not pay an ssh handshake:
//! sessions are taken for one operation (a build with its uploads, a transfer) and put
//! back afterwards. A session that failed or was cancelled mid-frame is dropped, never
//! put back, since the protocol cannot resynchronise.
//!
//! The cores a build gets (`NIX_BUILD_CORES`) are fixed per session: the serve protocol
//! carries no `cores`, so a session started with `--option cores N` builds with N. Idle
//! sessions are therefore kept per cores value; `None` is the machine's own setting.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::DriverError;
use crate::session::ServeConn;
use crate::transport::Endpoint;

/// How often a new session is tried before the machine counts as lost.
pub const OPEN_ATTEMPTS: u32 = 3;

/// Idle sessions with one machine.
pub struct Pool {
    endpoint: Endpoint,
    idle: Mutex<HashMap<Option<u32>, Vec<ServeConn>>>,
}

impl Pool {
    pub fn new(endpoint: Endpoint) -> Pool {
        Pool {
            endpoint,
            idle: Mutex::new(HashMap::new()),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// An idle session, or a new one with the machine's own cores setting: for copies
    /// and queries, which the cores setting does not touch. Idle sessions with the
    /// machine's own setting go first, so those opened for builds stay for builds.
    pub async fn get(&self) -> Result<ServeConn, DriverError> {
        let any = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            match idle.get_mut(&None).and_then(Vec::pop) {
                Some(conn) => Some(conn),
                None => idle.values_mut().find_map(Vec::pop),
            }
        };
        match any {
            Some(conn) => Ok(conn),
            None => self.get_with_cores(None).await,
        }
    }

    /// An idle session whose builds get `cores` cores, if there is one.
    pub fn take_idle(&self, cores: Option<u32>) -> Option<ServeConn> {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&cores)
            .and_then(Vec::pop)
    }

    /// An idle session whose builds get `cores` cores, or a new one. A new session that
    /// fails for a reason that may pass (the server exited, a timeout: e.g. two first
    /// sessions racing to initialise a fresh store) is tried again, up to
    /// `OPEN_ATTEMPTS` times; authentication and host-key failures are not.
    /// Cancel-safe: a cancelled open kills its process.
    pub async fn get_with_cores(&self, cores: Option<u32>) -> Result<ServeConn, DriverError> {
        if let Some(conn) = self.take_idle(cores) {
            return Ok(conn);
        }
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
            match ServeConn::open(&endpoint).await {
                Ok(conn) => return Ok(conn.with_cores(cores)),
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
                .entry(conn.cores())
                .or_default()
                .push(conn);
        }
    }

    /// Closes every idle session.
    pub async fn close(&self) {
        let conns: Vec<ServeConn> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .flatten()
                .collect();
        for conn in conns {
            let _ = conn.close().await;
        }
    }
}
