//! Persistent serve sessions per machine, so a build does not pay an ssh handshake:
//! sessions are taken for one operation (a build with its uploads, a transfer) and put
//! back afterwards. A session that failed or was cancelled mid-frame is dropped, never
//! put back, since the protocol cannot resynchronise.

use std::sync::Mutex;

use crate::conn::ServeConn;
use crate::error::DriverError;
use crate::transport::Endpoint;

/// Idle sessions with one machine.
pub struct Pool {
    endpoint: Endpoint,
    idle: Mutex<Vec<ServeConn>>,
}

impl Pool {
    pub fn new(endpoint: Endpoint) -> Pool {
        Pool {
            endpoint,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// An idle session, or a new one. Cancel-safe: a cancelled open kills its process.
    pub async fn get(&self) -> Result<ServeConn, DriverError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => ServeConn::open(&self.endpoint).await,
        }
    }

    /// Returns a session for reuse, unless it is broken.
    pub fn put(&self, conn: ServeConn) {
        if !conn.is_broken() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        }
    }

    /// Closes every idle session cleanly.
    pub async fn close(&self) {
        let conns: Vec<ServeConn> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for conn in conns {
            let _ = conn.close().await;
        }
    }
}
