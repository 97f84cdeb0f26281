//! A build's log as it streams from its machine: to the reporter, to the file Nix
//! would keep (or the daemon), and its last lines for the failure message.

use offload_sched::MachineId;

use super::serve::ServeTransport;
use super::{LogDestination, LOG_TAIL_LINES};
use crate::daemon::DaemonConn;
use crate::fleet::LOCAL;

/// Where a build's log lines go: the reporter, the file Nix would keep
/// (`drvs/XX/REST` under the log directory, where `nix log` finds it), and the last
/// [`LOG_TAIL_LINES`] lines for an error message.
pub(super) struct BuildLog<'a> {
    transport: &'a ServeTransport,
    node: usize,
    machine: MachineId,
    keep: KeptLog,
    pub(super) tail: std::collections::VecDeque<String>,
    /// The build directory Nix kept after a failure (`--keep-failed`), from its note.
    kept_dir: Option<String>,
}

/// The copy of a build's log that is kept.
enum KeptLog {
    Nowhere,
    File(std::fs::File),
    /// Collected, for the daemon at this socket.
    ForDaemon(std::path::PathBuf, Vec<u8>),
}

impl<'a> BuildLog<'a> {
    pub(super) fn new(transport: &'a ServeTransport, node: usize, machine: MachineId) -> Self {
        let drv_path = &transport.nodes[node].drv_path;
        let keep = match &transport.logs {
            LogDestination::Nowhere => KeptLog::Nowhere,
            LogDestination::Dir(dir) => {
                open_log(dir, drv_path).map_or(KeptLog::Nowhere, KeptLog::File)
            }
            // A local build goes through the daemon, which keeps its log itself.
            LogDestination::Daemon(_) if machine == LOCAL => KeptLog::Nowhere,
            LogDestination::Daemon(socket) => KeptLog::ForDaemon(socket.clone(), Vec::new()),
        };
        BuildLog {
            transport,
            node,
            machine,
            keep,
            tail: std::collections::VecDeque::new(),
            kept_dir: None,
        }
    }

    /// Where Nix kept the failed build's directory (`--keep-failed`), for the failure
    /// message; the runner adds which machine "there" is.
    pub(super) fn kept_note(&self) -> String {
        match &self.kept_dir {
            Some(dir) => format!("; its build directory is kept there at '{dir}'"),
            None => String::new(),
        }
    }

    pub(super) fn push(&mut self, line: String) {
        use std::io::Write as _;
        let drv = &self.transport.nodes[self.node].drv_path;
        self.transport
            .reporter
            .build_log(drv, &self.transport.names[self.machine], &line);
        if let Some(dir) = line
            .split_once("keeping build directory '")
            .and_then(|(_, rest)| rest.split_once('\''))
        {
            self.kept_dir = Some(dir.0.to_string());
        }
        match &mut self.keep {
            KeptLog::Nowhere => {}
            KeptLog::File(f) => {
                if writeln!(f, "{line}").is_err() {
                    self.keep = KeptLog::Nowhere;
                }
            }
            KeptLog::ForDaemon(_, text) => {
                text.extend_from_slice(line.as_bytes());
                text.push(b'\n');
            }
        }
        self.tail.push_back(line);
        if self.tail.len() > LOG_TAIL_LINES {
            self.tail.pop_front();
        }
    }

    /// Hands a collected log to the daemon. A log that cannot be kept is not worth
    /// failing a build over: it is reported.
    pub(super) async fn finish(&mut self) {
        let KeptLog::ForDaemon(socket, text) = std::mem::replace(&mut self.keep, KeptLog::Nowhere)
        else {
            return;
        };
        let drv = &self.transport.nodes[self.node].drv_path;
        let sent = async {
            DaemonConn::connect(&socket)
                .await?
                .add_build_log(drv, &text)
                .await
        };
        if let Err(e) = sent.await {
            tracing::warn!("cannot keep the build log of {drv}: {e}");
        }
    }
}

/// Opens the log file for `drv_path`. A log that cannot be written is not worth
/// failing a build over: it is reported and skipped.
fn open_log(dir: &std::path::Path, drv_path: &str) -> Option<std::fs::File> {
    let base = drv_path.rsplit('/').next()?;
    let (head, rest) = (base.get(..2)?, base.get(2..)?);
    let sub = dir.join("drvs").join(head);
    if let Err(e) = std::fs::create_dir_all(&sub) {
        tracing::warn!(
            "cannot keep the build log of {drv_path} in {}: {e}",
            sub.display()
        );
        return None;
    }
    std::fs::File::create(sub.join(rest))
        .map_err(|e| tracing::warn!("cannot keep the build log of {drv_path}: {e}"))
        .ok()
}
