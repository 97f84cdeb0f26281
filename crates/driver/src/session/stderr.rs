//! A session's stderr: read always, so a server that writes a lot (build logs, warnings)
//! never blocks on a full pipe; the last lines are kept for error messages and every line
//! can be forwarded to a log sink, which is how build logs arrive.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::ChildStderr;
use tokio::sync::mpsc;

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
#[derive(Clone, Default)]
pub(super) struct StderrLog(Arc<Mutex<State>>);

impl StderrLog {
    /// Sends every later line to `sink` (or stops forwarding with `None`).
    pub(super) fn set_sink(&self, sink: Option<mpsc::UnboundedSender<String>>) {
        self.lock().sink = sink;
    }

    /// The last lines read.
    pub(super) fn tail(&self) -> Vec<String> {
        self.lock().tail.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the tail inconsistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `pipe` line by line until it closes.
    pub(super) async fn pump(self, pipe: ChildStderr) {
        let mut lines = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match lines.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
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
