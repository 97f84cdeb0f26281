//! A session's stderr: read always, so a server that writes a lot (build logs, warnings)
//! never blocks on a full pipe; the last lines are kept for error messages and every line
//! can be forwarded to a log sink, which is how build logs arrive.
//!
//! A build's log and its result come on two pipes, so the result can be read before the
//! log's last lines. [`StderrLog::finish_sink`] therefore has the pump read whatever the
//! pipe holds at that moment (Nix wrote the whole log before it wrote the result) and
//! then close the sink, so its receiver reads to the end and sees `None`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::env::STDERR_FINISH_TIMEOUT;
use tokio::net::unix::pipe;
use tokio::process::ChildStderr;
use tokio::sync::{mpsc, oneshot};

/// Lines of the server's stderr kept for error messages.
const TAIL_LINES: usize = 25;
/// A kept line is cut to this many bytes: a runaway line must not hold megabytes.
const MAX_KEPT_LINE: usize = 1000;

/// The server's stderr as far as it has been read.
#[derive(Default)]
struct State {
    tail: VecDeque<String>,
    sink: Option<mpsc::UnboundedSender<String>>,
}

/// Shared view of a server's stderr, filled by [`StderrLog::pump`].
#[derive(Clone)]
pub(super) struct StderrLog {
    state: Arc<Mutex<State>>,
    /// Asks the pump to read what the pipe holds, close the sink and answer.
    finish: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

/// The pump's end of [`StderrLog::finish_sink`] requests.
pub(super) struct FinishRequests(mpsc::UnboundedReceiver<oneshot::Sender<()>>);

impl StderrLog {
    pub(super) fn new() -> (StderrLog, FinishRequests) {
        let (finish, requests) = mpsc::unbounded_channel();
        let log = StderrLog {
            state: Arc::default(),
            finish,
        };
        (log, FinishRequests(requests))
    }

    /// Sends every later line to `sink` (or stops forwarding with `None`).
    pub(super) fn set_sink(&self, sink: Option<mpsc::UnboundedSender<String>>) {
        self.lock().sink = sink;
    }

    /// Forwards what the server wrote so far, then closes the sink: its receiver gets
    /// every line and then `None`. Cancel-safe.
    pub(super) async fn finish_sink(&self) {
        let (done, answered) = oneshot::channel();
        if self.finish.send(done).is_ok() {
            // A pump that ended (the pipe closed) has forwarded everything already.
            let _ = tokio::time::timeout(STDERR_FINISH_TIMEOUT, answered).await;
        }
        self.set_sink(None);
    }

    /// Takes `line` as if the server had written it to stderr: a line of a build's log
    /// that came inside the protocol's own stream (the daemon's messages).
    pub(super) fn push(&self, line: &str) {
        self.line(line.as_bytes());
    }

    /// The last lines read.
    pub(super) fn tail(&self) -> Vec<String> {
        self.lock().tail.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the tail inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `pipe` until it closes, and answers finish requests on the way.
    pub(super) async fn pump(self, pipe: ChildStderr, requests: FinishRequests) {
        let mut requests = requests.0;
        // A pipe receiver of our own is non-blocking and can be read "as far as it holds".
        let Ok(pipe) = pipe.into_owned_fd().and_then(pipe::Receiver::from_owned_fd) else {
            self.set_sink(None);
            return;
        };
        let mut partial = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                ready = pipe.readable() => {
                    if ready.is_err() {
                        break;
                    }
                    match pipe.try_read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => self.take(&chunk[..n], &mut partial),
                        // Not readable after all: wait again.
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                Some(answer) = requests.recv() => {
                    // The pipe is non-blocking: this reads what it holds now, no more.
                    let mut closed = false;
                    loop {
                        match pipe.try_read(&mut chunk) {
                            Ok(0) => {
                                closed = true;
                                break;
                            }
                            Ok(n) => self.take(&chunk[..n], &mut partial),
                            Err(_) => break,
                        }
                    }
                    self.set_sink(None);
                    let _ = answer.send(());
                    if closed {
                        break;
                    }
                }
            }
        }
        if !partial.is_empty() {
            self.line(&partial);
        }
        self.set_sink(None);
    }

    /// Splits `bytes` into lines, keeping an unfinished one in `partial`.
    fn take(&self, bytes: &[u8], partial: &mut Vec<u8>) {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            partial.extend_from_slice(&rest[..end]);
            self.line(partial);
            partial.clear();
            rest = &rest[end + 1..];
        }
        partial.extend_from_slice(rest);
    }

    fn line(&self, bytes: &[u8]) {
        let line = String::from_utf8_lossy(bytes)
            .trim_end_matches('\r')
            .to_string();
        let mut state = self.lock();
        if let Some(sink) = &state.sink {
            let _ = sink.send(line.clone());
        }
        let mut kept = line;
        truncate_at_char(&mut kept, MAX_KEPT_LINE);
        state.tail.push_back(kept);
        if state.tail.len() > TAIL_LINES {
            state.tail.pop_front();
        }
    }
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::truncate_at_char;

    #[test]
    fn truncation_keeps_whole_characters() {
        let mut s = "ab€".to_string();
        truncate_at_char(&mut s, 3);
        assert_eq!(s, "ab");
        let mut s = "short".to_string();
        truncate_at_char(&mut s, 10);
        assert_eq!(s, "short");
    }
}
