//! Stopping a run on SIGINT or SIGTERM: one handler for both, for the whole process, so
//! that a signal sent to offload alone (not to its process group) stops it too. The
//! first signal cancels a [`CancellationToken`] that the runner, every transfer and the
//! copy-back watch; dropping their sessions kills the serve processes, which stops the
//! builds on every machine. The exit status is the shell's for that signal.

use std::sync::{Arc, Mutex};

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The signal that stopped a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl StopSignal {
    /// The status shells give a process killed by the signal: 128 + its number.
    pub fn exit_code(self) -> u8 {
        match self {
            StopSignal::Interrupt => 130,
            StopSignal::Terminate => 143,
        }
    }
}

/// Watches SIGINT and SIGTERM while it lives; the first cancels its token.
pub struct Shutdown {
    token: CancellationToken,
    signal: Arc<Mutex<Option<StopSignal>>>,
    watcher: JoinHandle<()>,
}

impl Drop for Shutdown {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Shutdown {
    /// Installs the handler. From then on the signals no longer end the process at
    /// once: they cancel [`Shutdown::token`]. Call it inside the runtime.
    pub fn on_signals() -> std::io::Result<Shutdown> {
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let token = CancellationToken::new();
        let signal: Arc<Mutex<Option<StopSignal>>> = Arc::default();
        let (cancel, received) = (token.clone(), signal.clone());
        let watcher = tokio::spawn(async move {
            let which = tokio::select! {
                _ = interrupt.recv() => StopSignal::Interrupt,
                _ = terminate.recv() => StopSignal::Terminate,
            };
            *received.lock().unwrap_or_else(|p| p.into_inner()) = Some(which);
            cancel.cancel();
        });
        Ok(Shutdown {
            token,
            signal,
            watcher,
        })
    }

    /// Cancelled by the first signal.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The signal received, if any.
    pub fn signal(&self) -> Option<StopSignal> {
        *self.signal.lock().unwrap_or_else(|p| p.into_inner())
    }
}
