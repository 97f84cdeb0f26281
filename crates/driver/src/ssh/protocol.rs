//! Which protocol a machine's sessions speak: the serve protocol (`nix-store --serve
//! --write`) where it runs, else the daemon's (`nix-daemon --stdio`, an `ssh-ng://`
//! builder whose `authorized_keys` forces that command). Learned at the first session
//! and shared by every copy of the machine's [`super::Endpoint`] for the run, so that
//! later sessions go straight to the right one, and so that what else runs there (the
//! slot broker, the `nproc` probe) is skipped on a daemon-only machine.

use std::sync::Arc;

use tokio::sync::watch;

/// What a machine's sessions speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Speaks {
    /// No session has been opened yet.
    #[default]
    Unknown,
    /// `nix-store --serve --write`.
    Serve,
    /// Only `nix-daemon --stdio`: nothing else runs there.
    Daemon,
}

/// The shared cell: copies of one endpoint see one value.
#[derive(Debug, Clone)]
pub struct Protocol(Arc<watch::Sender<Speaks>>);

impl Default for Protocol {
    fn default() -> Self {
        Protocol(Arc::new(watch::Sender::new(Speaks::Unknown)))
    }
}

/// Every endpoint compares equal by its protocol: it is learned, not configured.
impl PartialEq for Protocol {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Protocol {}

impl Protocol {
    /// What is known so far.
    pub fn get(&self) -> Speaks {
        *self.0.borrow()
    }

    /// Records what the machine speaks.
    pub fn set(&self, speaks: Speaks) {
        self.0.send_replace(speaks);
    }

    /// Whether the machine is known to run nothing but the daemon.
    pub fn is_daemon_only(&self) -> bool {
        self.get() == Speaks::Daemon
    }

    /// Waits until the machine is known to run nothing but the daemon (for ever on one
    /// that runs more): for a command there that waits for an answer, to give up on it.
    pub async fn daemon_only(&self) {
        let mut seen = self.0.subscribe();
        let _ = seen.wait_for(|s| *s == Speaks::Daemon).await;
    }
}
