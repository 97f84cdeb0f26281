//! The broker itself: the `sh` script's conversation (one line each way), started
//! lazily on the machine, started again after it died, and given up for the run when
//! the machine cannot lock.

use std::collections::{HashSet, VecDeque};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::{broker_command, lock_dir, RemoteSlot};
use crate::env::{HANDSHAKE_TIMEOUT, SLOT_REQUEST_TIMEOUT};
use crate::error::DriverError;
use crate::slots::POLL_INTERVAL;
use crate::ssh::master::SshMaster;
use crate::ssh::{shell_quote, Endpoint};

/// Slots others hold, before the broker said.
pub(super) const UNKNOWN: u32 = u32::MAX;
/// How many of the broker's last stderr lines go into messages.
const STDERR_KEPT: usize = 5;

/// One machine's broker: started lazily, started again after it died.
pub(super) struct Broker {
    endpoint: Endpoint,
    /// The ssh connection shared with the machine's serve sessions, if given.
    pub(super) master: Option<Arc<SshMaster>>,
    slots: u32,
    dir: String,
    live: tokio::sync::Mutex<Option<mpsc::UnboundedSender<Request>>>,
    /// Slots others held when last seen; [`UNKNOWN`] before that.
    pub(super) others: Arc<AtomicU32>,
    /// It cannot lock for the rest of the run (no flock, no directory, nonsense).
    pub(super) disabled: AtomicBool,
    warned: AtomicBool,
}

#[derive(Debug)]
pub(super) enum Request {
    Take(oneshot::Sender<Result<Reply, String>>),
    Others(oneshot::Sender<Result<Reply, String>>),
    Release(u32),
}

#[derive(Debug, PartialEq)]
pub(super) enum Reply {
    Slot(u32),
    Busy,
    Full,
    Released,
    Others(u32),
}

/// Why a broker gives no locks.
pub(super) enum BrokerFailure {
    /// For the whole run: it will not change.
    Lasting(String),
    /// It died or hung: the next take starts another.
    Passing(String),
}

impl Broker {
    pub(super) fn new(endpoint: Endpoint, slots: u32) -> Broker {
        Broker {
            dir: lock_dir(&endpoint),
            endpoint,
            master: None,
            slots,
            live: tokio::sync::Mutex::new(None),
            others: Arc::new(AtomicU32::new(UNKNOWN)),
            disabled: AtomicBool::new(false),
            warned: AtomicBool::new(false),
        }
    }

    pub(super) async fn take(&self, limit: Duration) -> Result<Option<RemoteSlot>, DriverError> {
        let started = Instant::now();
        // A broker that died since the last request is found dead only now: one more.
        let mut restarts = 1;
        loop {
            if self.disabled.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let (tx, fresh) = match self.running().await {
                Ok(running) => running,
                Err(f) => return Ok(self.failed(f)),
            };
            let (reply_tx, reply_rx) = oneshot::channel();
            let reply = match tx.send(Request::Take(reply_tx)) {
                Ok(()) => ask(reply_rx).await,
                Err(_) => Err("it has exited".to_string()),
            };
            match reply {
                Ok(Reply::Slot(slot)) => {
                    return Ok(Some(RemoteSlot {
                        slot,
                        to_broker: tx,
                    }))
                }
                Ok(Reply::Busy | Reply::Full) => {}
                Ok(other) => {
                    let why = format!("its broker answered {other:?} to a take");
                    return Ok(self.failed(BrokerFailure::Lasting(why)));
                }
                Err(why) => {
                    self.forget(&tx).await;
                    if !fresh && restarts > 0 {
                        tracing::debug!(
                            "{}: slot broker gone, starting another: {why}",
                            self.endpoint.name
                        );
                        restarts -= 1;
                        continue;
                    }
                    return Ok(self.failed(BrokerFailure::Passing(why)));
                }
            }
            if started.elapsed() >= limit {
                return Err(DriverError::SlotsBusy {
                    machine: self.endpoint.name.clone(),
                    slots: self.slots,
                    dir: format!("on the machine, {}", self.dir),
                    secs: limit.as_secs(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub(super) async fn refresh_others(&self) {
        // A broker being started now (its ssh may take seconds) is left for next time.
        let Some(tx) = self.live.try_lock().ok().and_then(|l| l.clone()) else {
            return;
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        // The broker's task records the count.
        if tx.send(Request::Others(reply_tx)).is_ok() {
            let _ = ask(reply_rx).await;
        }
    }

    /// The running broker's requests, starting it when none runs (then `true`).
    pub(super) async fn running(
        &self,
    ) -> Result<(mpsc::UnboundedSender<Request>, bool), BrokerFailure> {
        let mut live = self.live.lock().await;
        if let Some(tx) = live.as_ref().filter(|tx| !tx.is_closed()) {
            return Ok((tx.clone(), false));
        }
        *live = None;
        let tx = self.start().await?;
        *live = Some(tx.clone());
        Ok((tx, true))
    }

    /// Drops the broker behind `tx` (it failed), unless another has replaced it.
    async fn forget(&self, tx: &mpsc::UnboundedSender<Request>) {
        let mut live = self.live.lock().await;
        if live.as_ref().is_some_and(|l| l.same_channel(tx)) {
            *live = None;
        }
    }

    /// Says once why this machine's builds go on without the builder-side lock.
    fn failed(&self, failure: BrokerFailure) -> Option<RemoteSlot> {
        let (why, lasting) = match failure {
            BrokerFailure::Lasting(why) => (why, true),
            BrokerFailure::Passing(why) => (why, false),
        };
        if lasting {
            self.disabled.store(true, Ordering::Relaxed);
        }
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "{}: its build slots are not locked on the machine itself, so clients on \
                 other machines may overbook it; builds go on without that lock: {why}",
                self.endpoint.name
            );
        } else {
            tracing::debug!("{}: no builder-side slot lock: {why}", self.endpoint.name);
        }
        None
    }

    /// Starts the broker and waits for its first line.
    async fn start(&self) -> Result<mpsc::UnboundedSender<Request>, BrokerFailure> {
        let machine = &self.endpoint.name;
        if self.endpoint.protocol.is_daemon_only() {
            return Err(daemon_only());
        }
        let command = broker_command(&self.dir, self.slots);
        let mut endpoint = self.endpoint.clone();
        if let Some(master) = &self.master {
            // A machine the master cannot reach fails the broker's own ssh below, which
            // says why as before.
            endpoint.control_path = master.socket().await.ok().flatten();
        }
        let (cmd, known_hosts) = endpoint
            .command(&command)
            .map_err(|e| BrokerFailure::Passing(e.to_string()))?;
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| BrokerFailure::Passing(format!("cannot start its slot broker: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        let stderr = child.stderr.take().expect("piped");
        // Always drained: a full stderr pipe would stop the broker mid-reply.
        let kept: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let kept2 = kept.clone();
        let name = machine.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(machine = %name, "slot broker: {line}");
                let mut k = kept2.lock().unwrap_or_else(|p| p.into_inner());
                if k.len() == STDERR_KEPT {
                    k.pop_front();
                }
                k.push_back(line);
            }
        });
        let said = |kept: &Mutex<VecDeque<String>>| {
            let k = kept.lock().unwrap_or_else(|p| p.into_inner());
            if k.is_empty() {
                String::new()
            } else {
                format!(" ({})", k.iter().cloned().collect::<Vec<_>>().join("; "))
            }
        };
        // A machine found to run only the daemon meanwhile (its first session) never
        // answers: its daemon waits for the worker protocol's magic.
        let first_line = tokio::time::timeout(HANDSHAKE_TIMEOUT, stdout.next_line());
        let first = match tokio::select! {
            line = first_line => line,
            () = self.endpoint.protocol.daemon_only() => return Err(daemon_only()),
        } {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None) | Err(_)) => {
                // Let stderr's last lines arrive: they say why (ssh's own message).
                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(BrokerFailure::Passing(format!(
                    "its slot broker exited before it was ready{}",
                    said(&kept)
                )));
            }
            Err(_) => {
                return Err(BrokerFailure::Passing(format!(
                    "its slot broker did not answer in {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                )))
            }
        };
        let first = first.trim();
        let cap = match first.split_once(' ') {
            Some(("ready", cap)) => cap.parse::<u32>().ok(),
            _ if first == "no-flock" => {
                return Err(BrokerFailure::Lasting(
                    "it has no `flock` (util-linux) on its PATH; install util-linux there".into(),
                ))
            }
            Some(("no-dir", dir)) => {
                return Err(BrokerFailure::Lasting(format!(
                    "it cannot create or write the lock directory {dir}; create it as root: \
                     mkdir -m 1777 {}",
                    shell_quote(dir)
                )))
            }
            _ => None,
        };
        let Some(cap) = cap else {
            return Err(BrokerFailure::Lasting(format!(
                "its slot broker said {first:?} where `ready` was due{}",
                said(&kept)
            )));
        };
        if cap < self.slots {
            tracing::warn!(
                "{machine}: it has no bash, so its slot broker holds at most {cap} of its {} \
                 slots at once from this run",
                self.slots
            );
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(
            Conversation {
                child,
                stdin,
                stdout,
                _known_hosts: known_hosts,
            },
            rx,
            self.slots,
            self.others.clone(),
            machine.clone(),
        ));
        Ok(tx)
    }
}

/// Why a machine that runs only `nix-daemon --stdio` has no broker: nothing else runs
/// there, so its builds rely on this client's own slot ledger.
fn daemon_only() -> BrokerFailure {
    BrokerFailure::Lasting(
        "it runs only `nix-daemon --stdio` for offload's key (an ssh-ng:// builder whose \
         authorized_keys forces that command), so the slot broker cannot run there"
            .into(),
    )
}

/// The broker process and its pipes.
struct Conversation {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// A private known_hosts file, kept while ssh runs.
    _known_hosts: Option<tempfile::NamedTempFile>,
}

/// A reply, or why none came.
async fn ask(rx: oneshot::Receiver<Result<Reply, String>>) -> Result<Reply, String> {
    rx.await
        .unwrap_or_else(|_| Err("its slot broker has exited".into()))
}

/// How long a slot freed by a build stays held for the run's next build on the machine.
/// A busy run places that build within milliseconds of the last one's end: handing it
/// the same slot spares two requests to the broker (each a round trip, and a `flock`
/// forked there), which cost a tiny build more than its own time. Others wait at most
/// this long for a slot the run has no more use for.
pub(super) const SPARE_LINGER: Duration = Duration::from_millis(250);

/// Carries requests to the broker one at a time, until it dies or every sender (the
/// run's and every held slot's) has gone; then its stdin closes and it frees its locks.
/// A released slot stays locked as a spare for [`SPARE_LINGER`], for the next take.
async fn serve(
    conversation: Conversation,
    mut rx: mpsc::UnboundedReceiver<Request>,
    slots: u32,
    others: Arc<AtomicU32>,
    machine: String,
) {
    let Conversation {
        mut child,
        mut stdin,
        mut stdout,
        _known_hosts,
    } = conversation;
    let mut held: HashSet<u32> = HashSet::new();
    // Slots released (or taken for a take whose caller has gone), still locked there,
    // with when each goes back to the broker.
    let mut spare: Vec<(u32, Instant)> = Vec::new();
    let linger = || Instant::now() + SPARE_LINGER;
    loop {
        let due = spare.iter().map(|&(_, at)| at).min();
        let request = tokio::select! {
            biased;
            // Between requests the broker says nothing: a line or its end now means it
            // died (killed, its ssh connection gone), and the spares with it.
            said = stdout.next_line() => {
                tracing::debug!(machine = %machine, "slot broker ended: {said:?}");
                break;
            }
            request = rx.recv() => match request {
                None => break,
                Some(Request::Release(k)) if held.contains(&k) => {
                    spare.push((k, linger()));
                    continue;
                }
                Some(Request::Take(reply_to)) if !spare.is_empty() => {
                    let (k, _) = spare.pop().expect("a spare");
                    if reply_to.send(Ok(Reply::Slot(k))).is_err() {
                        spare.push((k, linger()));
                    }
                    continue;
                }
                Some(request) => request,
            },
            () = sleep_until(due) => {
                let now = Instant::now();
                let Some(i) = spare.iter().position(|&(_, at)| at <= now) else {
                    continue;
                };
                Request::Release(spare.swap_remove(i).0)
            }
        };
        let (line, reply_to) = match request {
            Request::Take(r) => ("take".to_string(), Some(r)),
            Request::Others(r) => ("others".to_string(), Some(r)),
            Request::Release(k) => (format!("release {k}"), None),
        };
        let reply = exchange(&mut stdin, &mut stdout, &line, slots).await;
        match &reply {
            Ok(Reply::Slot(k)) => {
                held.insert(*k);
            }
            Ok(Reply::Released) => {
                if let Some(k) = line.strip_prefix("release ") {
                    held.remove(&k.parse().unwrap_or(u32::MAX));
                }
            }
            // Every slot it does not hold is someone else's.
            Ok(Reply::Busy) => {
                others.store(slots.saturating_sub(held.len() as u32), Ordering::Relaxed)
            }
            Ok(Reply::Others(n)) => others.store(*n, Ordering::Relaxed),
            Ok(Reply::Full) | Err(_) => {}
        }
        let failed = reply.is_err();
        if let Err(why) = &reply {
            if !held.is_empty() {
                tracing::warn!(
                    "{machine}: {why}; the {} slots it held there are free for others now",
                    held.len()
                );
            }
        }
        if let Some(r) = reply_to {
            // A slot taken for a take whose caller has gone (cancelled) is a spare.
            if let Err(Ok(Reply::Slot(k))) = r.send(reply) {
                spare.push((k, linger()));
            }
        }
        if failed {
            break;
        }
    }
    // EOF on its stdin: the broker exits and its shell's fds (the locks) close.
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}

/// One request line to the broker and its reply, read.
async fn exchange(
    stdin: &mut tokio::process::ChildStdin,
    stdout: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    line: &str,
    slots: u32,
) -> Result<Reply, String> {
    let answer = async {
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        match stdout.next_line().await? {
            Some(answer) => Ok(answer),
            None => Err(std::io::Error::other("it exited")),
        }
    };
    let answer = match tokio::time::timeout(SLOT_REQUEST_TIMEOUT, answer).await {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => Err(format!("its slot broker failed: {e}")),
        Err(_) => Err(format!(
            "its slot broker did not answer `{line}` in {} s",
            SLOT_REQUEST_TIMEOUT.as_secs()
        )),
    };
    answer.and_then(|a| parse_reply(&a, slots))
}

/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// One line from the broker, checked: a slot it names must be one of the machine's.
pub(super) fn parse_reply(line: &str, slots: u32) -> Result<Reply, String> {
    let mut words = line.split_whitespace();
    let reply = match (words.next(), words.next(), words.next()) {
        (Some("slot"), Some(k), None) => k.parse().ok().filter(|k| *k < slots).map(Reply::Slot),
        (Some("others"), Some(n), None) => {
            n.parse().ok().filter(|n| *n <= slots).map(Reply::Others)
        }
        (Some("busy"), None, None) => Some(Reply::Busy),
        (Some("full"), None, None) => Some(Reply::Full),
        (Some("ok"), None, None) => Some(Reply::Released),
        _ => None,
    };
    reply.ok_or_else(|| format!("its slot broker said {line:?}, which offload cannot read"))
}
