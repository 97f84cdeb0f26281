//! Build slots locked on the builder itself, so that clients on different machines
//! (each with its own [`crate::slots::SlotLedger`]) do not overbook a builder they share.
//!
//! Per machine and run, one long-lived *slot broker* runs there, reached by the route of
//! the machine's serve sessions: a small `sh` script that holds `flock(1)` locks on
//! `<store root>/nix/var/nix/offload-slots/slot-<k>` through file descriptors of its own
//! shell, and takes or frees them on request (one line each way). The locks are not tied
//! to the pooled serve sessions (an idle warm session must not keep a slot from others),
//! and a build pays no extra ssh handshake: the broker starts once, on the first build.
//! When the broker ends (its stdin closes, or the ssh connection dies) its shell exits,
//! and every lock it held goes with it: a crashed client never leaves a stale lock.
//!
//! Everyone building on that builder's store shares the directory (made mode 1777 when
//! the broker can create it); two chroot stores on one host have one directory each.
//! A builder without `flock` (macOS) or without a usable directory is warned about once
//! per run and builds go on without the builder-side lock: a missing lock is never a
//! reason to fail a build.

use std::collections::{HashSet, VecDeque};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use offload_nix::store_uri::StoreUri;
use offload_sched::MachineId;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::{mpsc, oneshot};

use crate::env::{HANDSHAKE_TIMEOUT, SLOT_REQUEST_TIMEOUT};
use crate::error::DriverError;
use crate::slots::POLL_INTERVAL;
use crate::ssh::master::SshMaster;
use crate::ssh::{shell_quote, Endpoint};

/// The lock directory under the store root, beside Nix's own state.
pub const SLOTS_SUBDIR: &str = "nix/var/nix/offload-slots";
/// Most slots a broker under plain `sh` can hold: dash gives scripts fds 0–9 only.
pub const SH_SLOT_CAP: u32 = 7;
/// How many of the broker's last stderr lines go into messages.
const STDERR_KEPT: usize = 5;

/// The broker, run as `sh -c BROKER offload-slots DIR N`. Lines in: `take`,
/// `release K`, `others`; lines out: `slot K`, `busy` (others hold every slot it could
/// take), `full` (it holds as many as its shell allows), `ok`, `others N`. Under bash a
/// held slot may use fds 20–249; under plain sh only 3–9. No single quote appears in it,
/// so that its quoted form stays readable.
const BROKER: &str = r#"set -f
dir=$1; n=$2
if [ -n "${BASH_VERSION:-}" ]; then lo=20; hi=249; else lo=3; hi=9; fi
command -v flock >/dev/null 2>&1 || { echo no-flock; exit 0; }
if [ ! -d "$dir" ]; then
  mkdir -p "${dir%/*}" 2>/dev/null
  mkdir -m 1777 "$dir" 2>/dev/null
fi
k=0
while [ "$k" -lt "$n" ]; do
  f="$dir/slot-$k"
  [ -e "$f" ] || (umask 0; : >>"$f") 2>/dev/null
  [ -r "$f" ] || { echo "no-dir $dir"; exit 0; }
  k=$((k+1))
done
echo "ready $((hi-lo+1))"
while IFS= read -r line; do
  set -- $line
  case "${1:-}" in
  take)
    got=; full=
    k=0
    while [ "$k" -lt "$n" ]; do
      eval "h=\${h_$k:-}"
      if [ -z "$h" ]; then
        fd=$lo
        while [ "$fd" -le "$hi" ]; do
          eval "u=\${u_$fd:-}"
          [ -z "$u" ] && break
          fd=$((fd+1))
        done
        if [ "$fd" -gt "$hi" ]; then full=1; break; fi
        f="$dir/slot-$k"
        # No redirection on this line: bash would save stderr to a free fd >= 10,
        # and undo the exec when it restores it.
        if [ -r "$f" ] && command eval "exec $fd<\"\$f\""; then
          if flock -n "$fd" 2>/dev/null; then
            eval "h_$k=$fd; u_$fd=1"
            got=$k
            break
          fi
          eval "exec $fd<&-"
        fi
      fi
      k=$((k+1))
    done
    if [ -n "$got" ]; then echo "slot $got"; elif [ -n "$full" ]; then echo full; else echo busy; fi
    ;;
  release)
    k=${2:-x}
    case "$k" in *[!0-9]*|"") ;; *)
      eval "h=\${h_$k:-}"
      if [ -n "$h" ]; then eval "exec $h<&-; h_$k=; u_$h="; fi
    esac
    echo ok
    ;;
  others)
    c=0; k=0
    while [ "$k" -lt "$n" ]; do
      eval "h=\${h_$k:-}"
      if [ -z "$h" ] && ! flock -n "$dir/slot-$k" true 2>/dev/null; then c=$((c+1)); fi
      k=$((k+1))
    done
    echo "others $c"
    ;;
  *) echo "unknown ${1:-}" ;;
  esac
done
"#;

/// The directory of the builder-side locks of the store an endpoint serves: under `/`
/// for the machine's own store, under the directory of a chroot store
/// (`remote-store=/dir`), or under `root=` of `remote-store=local?root=/x`.
pub fn lock_dir(endpoint: &Endpoint) -> String {
    let store = endpoint
        .remote_store
        .as_deref()
        .and_then(|s| StoreUri::parse(s).ok());
    let root = store
        .as_ref()
        .and_then(|s| {
            s.param("root")
                .filter(|r| r.starts_with('/'))
                .or_else(|| (s.scheme == "path").then_some(s.authority.as_str()))
        })
        .unwrap_or("/");
    format!("{}/{SLOTS_SUBDIR}", root.trim_end_matches('/'))
}

/// The shell command that starts the broker on the machine: under bash when the
/// machine has it (any number of slots), else under `sh`. Every value is quoted.
pub fn broker_command(dir: &str, slots: u32) -> String {
    let script = shell_quote(BROKER);
    let start = format!(
        "s={script}; if command -v bash >/dev/null 2>&1; then exec bash -c \"$s\" \
         offload-slots \"$@\"; fi; exec sh -c \"$s\" offload-slots \"$@\""
    );
    format!(
        "sh -c {} offload-slots {} {slots}",
        shell_quote(&start),
        shell_quote(dir)
    )
}

/// The builder-side slots of every machine of a run.
pub struct RemoteSlots {
    brokers: Vec<Option<Arc<Broker>>>,
}

/// A slot held on a builder; dropping it frees the slot.
#[derive(Debug)]
pub struct RemoteSlot {
    slot: u32,
    to_broker: mpsc::UnboundedSender<Request>,
}

impl RemoteSlot {
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

impl Drop for RemoteSlot {
    fn drop(&mut self) {
        // A broker that has gone took its locks with it: nothing left to free then.
        let _ = self.to_broker.send(Request::Release(self.slot));
    }
}

impl RemoteSlots {
    /// One broker (started on first need) per machine with slots; `None` or 0 slots: the
    /// local machine, or one never to be locked.
    pub fn new(machines: impl IntoIterator<Item = (Endpoint, u32)>) -> RemoteSlots {
        RemoteSlots {
            brokers: machines
                .into_iter()
                .map(|(endpoint, slots)| {
                    (slots > 0).then(|| Arc::new(Broker::new(endpoint, slots)))
                })
                .collect(),
        }
    }

    /// Starts each machine's broker over the ssh connection its serve sessions share
    /// (`masters` in the order of the machines), so that it costs no handshake of its
    /// own. Called before any broker is shared.
    pub fn with_masters(mut self, masters: impl IntoIterator<Item = Arc<SshMaster>>) -> Self {
        for (broker, master) in self.brokers.iter_mut().zip(masters) {
            if let Some(broker) = broker.as_mut().and_then(Arc::get_mut) {
                broker.master = Some(master);
            }
        }
        self
    }

    /// A slot of the machine, held on the machine itself, waiting (polling every
    /// [`POLL_INTERVAL`], at most `limit`) while others hold all its slots. None when
    /// the machine cannot lock (it has no broker, no `flock`, no lock directory, or its
    /// broker failed): said once per machine and run, and the build goes ahead.
    pub async fn take(
        &self,
        machine: MachineId,
        limit: Duration,
    ) -> Result<Option<RemoteSlot>, DriverError> {
        match self.brokers.get(machine).and_then(Option::as_ref) {
            Some(broker) => broker.take(limit).await,
            None => Ok(None),
        }
    }

    /// Starts the machine's broker now, so that its first build does not wait for it.
    /// A broker that cannot start is said at the first take, as without this.
    pub async fn warm(&self, machine: MachineId) {
        if let Some(broker) = self.brokers.get(machine).and_then(Option::as_ref) {
            if !broker.disabled.load(Ordering::Relaxed) {
                let _ = broker.running().await;
            }
        }
    }

    /// How many of the machine's slots others held when last looked (on a take that
    /// had to wait, or [`Self::refresh_others`]); None when not known. Never blocks.
    pub fn held_elsewhere(&self, machine: MachineId) -> Option<u32> {
        let broker = self.brokers.get(machine)?.as_ref()?;
        match broker.others.load(Ordering::Relaxed) {
            UNKNOWN => None,
            n => Some(n),
        }
    }

    /// Asks every running broker how many slots others hold now. Starts none: a
    /// machine not built on yet in this run stays unknown.
    pub async fn refresh_others(&self) {
        for broker in self.brokers.iter().flatten() {
            broker.refresh_others().await;
        }
    }
}

const UNKNOWN: u32 = u32::MAX;

/// One machine's broker: started lazily, started again after it died.
struct Broker {
    endpoint: Endpoint,
    /// The ssh connection shared with the machine's serve sessions, if given.
    master: Option<Arc<SshMaster>>,
    slots: u32,
    dir: String,
    live: tokio::sync::Mutex<Option<mpsc::UnboundedSender<Request>>>,
    /// Slots others held when last seen; [`UNKNOWN`] before that.
    others: Arc<AtomicU32>,
    /// It cannot lock for the rest of the run (no flock, no directory, nonsense).
    disabled: AtomicBool,
    warned: AtomicBool,
}

#[derive(Debug)]
enum Request {
    Take(oneshot::Sender<Result<Reply, String>>),
    Others(oneshot::Sender<Result<Reply, String>>),
    Release(u32),
}

#[derive(Debug, PartialEq)]
enum Reply {
    Slot(u32),
    Busy,
    Full,
    Released,
    Others(u32),
}

/// Why a broker gives no locks.
enum Failure {
    /// For the whole run: it will not change.
    Lasting(String),
    /// It died or hung: the next take starts another.
    Passing(String),
}

impl Broker {
    fn new(endpoint: Endpoint, slots: u32) -> Broker {
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

    async fn take(&self, limit: Duration) -> Result<Option<RemoteSlot>, DriverError> {
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
                    return Ok(self.failed(Failure::Lasting(why)));
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
                    return Ok(self.failed(Failure::Passing(why)));
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

    async fn refresh_others(&self) {
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
    async fn running(&self) -> Result<(mpsc::UnboundedSender<Request>, bool), Failure> {
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
    fn failed(&self, failure: Failure) -> Option<RemoteSlot> {
        let (why, lasting) = match failure {
            Failure::Lasting(why) => (why, true),
            Failure::Passing(why) => (why, false),
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
    async fn start(&self) -> Result<mpsc::UnboundedSender<Request>, Failure> {
        let machine = &self.endpoint.name;
        let command = broker_command(&self.dir, self.slots);
        let mut endpoint = self.endpoint.clone();
        if let Some(master) = &self.master {
            // A machine the master cannot reach fails the broker's own ssh below, which
            // says why as before.
            endpoint.control_path = master.socket().await.ok().flatten();
        }
        let (cmd, known_hosts) = endpoint
            .command(&command)
            .map_err(|e| Failure::Passing(e.to_string()))?;
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| Failure::Passing(format!("cannot start its slot broker: {e}")))?;
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
        let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None) | Err(_)) => {
                // Let stderr's last lines arrive: they say why (ssh's own message).
                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(Failure::Passing(format!(
                    "its slot broker exited before it was ready{}",
                    said(&kept)
                )));
            }
            Err(_) => {
                return Err(Failure::Passing(format!(
                    "its slot broker did not answer in {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                )))
            }
        };
        let first = first.trim();
        let cap = match first.split_once(' ') {
            Some(("ready", cap)) => cap.parse::<u32>().ok(),
            _ if first == "no-flock" => {
                return Err(Failure::Lasting(
                    "it has no `flock` (util-linux) on its PATH; install util-linux there".into(),
                ))
            }
            Some(("no-dir", dir)) => {
                return Err(Failure::Lasting(format!(
                    "it cannot create or write the lock directory {dir}; create it as root: \
                     mkdir -m 1777 {}",
                    shell_quote(dir)
                )))
            }
            _ => None,
        };
        let Some(cap) = cap else {
            return Err(Failure::Lasting(format!(
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

/// Carries requests to the broker one at a time, until it dies or every sender (the
/// run's and every held slot's) has gone; then its stdin closes and it frees its locks.
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
    // A slot taken for a take whose caller has gone (cancelled): freed at once.
    let mut orphaned: Option<u32> = None;
    loop {
        let request = match orphaned.take() {
            Some(k) => Request::Release(k),
            None => match rx.recv().await {
                Some(request) => request,
                None => break,
            },
        };
        let (line, reply_to) = match request {
            Request::Take(r) => ("take".to_string(), Some(r)),
            Request::Others(r) => ("others".to_string(), Some(r)),
            Request::Release(k) => (format!("release {k}"), None),
        };
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
        let reply = answer.and_then(|a| parse_reply(&a, slots));
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
            if let Err(Ok(Reply::Slot(k))) = r.send(reply) {
                orphaned = Some(k);
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

/// One line from the broker, checked: a slot it names must be one of the machine's.
fn parse_reply(line: &str, slots: u32) -> Result<Reply, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::SlotLedger;

    const NOW: Duration = Duration::ZERO;

    /// A broker run as a local process on a chroot store under `root`.
    fn slots_at(root: &std::path::Path, slots: u32) -> RemoteSlots {
        let endpoint = Endpoint::local("m1", Some(root.display().to_string()));
        RemoteSlots::new([(endpoint, slots)])
    }

    async fn take_now(slots: &RemoteSlots) -> Result<Option<RemoteSlot>, DriverError> {
        slots.take(0, NOW).await
    }

    #[test]
    fn locks_live_under_the_store_root() {
        let at = |store: Option<&str>| lock_dir(&Endpoint::local("m", store.map(String::from)));
        assert_eq!(at(None), "/nix/var/nix/offload-slots");
        assert_eq!(at(Some("/tmp/m1")), "/tmp/m1/nix/var/nix/offload-slots");
        assert_eq!(at(Some("/tmp/m1/")), "/tmp/m1/nix/var/nix/offload-slots");
        assert_eq!(
            at(Some("local?root=/x&foo=1")),
            "/x/nix/var/nix/offload-slots"
        );
        assert_eq!(at(Some("daemon")), "/nix/var/nix/offload-slots");
        // Parameters read as Nix reads them: %-escapes decoded.
        assert_eq!(
            at(Some("local?root=%2Fsrv%2Fs")),
            "/srv/s/nix/var/nix/offload-slots"
        );
        let e = Endpoint::parse("ssh://b1?remote-store=/srv/s").unwrap();
        assert_eq!(lock_dir(&e), "/srv/s/nix/var/nix/offload-slots");
    }

    #[test]
    fn replies_are_checked() {
        assert_eq!(parse_reply("slot 1", 2), Ok(Reply::Slot(1)));
        assert!(parse_reply("slot 2", 2).is_err());
        assert!(parse_reply("slot -1", 2).is_err());
        assert_eq!(parse_reply("others 2", 2), Ok(Reply::Others(2)));
        assert!(parse_reply("others 3", 2).is_err());
        assert!(parse_reply("busy now", 2).is_err());
        assert!(parse_reply("", 2).is_err());
        assert!(parse_reply("\u{1b}[31mWelcome!", 2).is_err());
    }

    #[tokio::test]
    async fn takes_until_busy_and_a_release_frees() {
        let root = tempfile::tempdir().unwrap();
        let slots = slots_at(root.path(), 2);
        let a = take_now(&slots).await.unwrap().expect("slot 0");
        let b = take_now(&slots).await.unwrap().expect("slot 1");
        assert_eq!((a.slot(), b.slot()), (0, 1));
        let err = take_now(&slots).await.unwrap_err();
        assert!(
            matches!(err, DriverError::SlotsBusy { slots: 2, .. }),
            "{err}"
        );
        // This run holds both: nobody else does.
        assert_eq!(slots.held_elsewhere(0), Some(0));
        drop(a);
        let c = take_now(&slots).await.unwrap().expect("slot 0 freed");
        assert_eq!(c.slot(), 0);
        let dir = root.path().join(SLOTS_SUBDIR);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o1777, "{}", dir.display());
    }

    #[tokio::test]
    async fn a_second_client_sees_and_respects_the_first() {
        let root = tempfile::tempdir().unwrap();
        let (one, two) = (slots_at(root.path(), 2), slots_at(root.path(), 2));
        let _held = take_now(&one).await.unwrap().expect("slot");
        assert_eq!(two.held_elsewhere(0), None, "not looked yet");
        let other = take_now(&two).await.unwrap().expect("the other slot");
        two.refresh_others().await;
        assert_eq!(two.held_elsewhere(0), Some(1));
        assert!(take_now(&two).await.is_err());
        assert_eq!(two.held_elsewhere(0), Some(1));
        // A take waits for the other client's slot, and gets it when freed.
        let waiting = tokio::spawn(async move {
            let got = one.take(0, Duration::from_secs(10)).await;
            (got.map(|s| s.map(|s| s.slot())), one)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished());
        drop(other);
        let (got, _one) = waiting.await.unwrap();
        assert_eq!(got.unwrap(), Some(1));
    }

    /// The negative control of `crates/cli/tests/remote_slots.rs`: two clients with their
    /// own ledgers both get the builder's only slot; the builder-side lock refuses one.
    #[tokio::test]
    async fn client_ledgers_alone_overbook_a_shared_builder() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let uri = "ssh://shared-builder";
        let _one = SlotLedger::new(a.path()).try_take(uri, 1).unwrap().unwrap();
        assert!(SlotLedger::new(b.path())
            .try_take(uri, 1)
            .unwrap()
            .is_some());
        let root = tempfile::tempdir().unwrap();
        let (one, two) = (slots_at(root.path(), 1), slots_at(root.path(), 1));
        let _held = take_now(&one).await.unwrap().expect("slot");
        assert!(take_now(&two).await.is_err());
    }

    #[tokio::test]
    async fn a_broker_whose_stdin_closes_frees_everything() {
        use std::io::{BufRead as _, Write as _};
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(SLOTS_SUBDIR).display().to_string();
        // The broker itself, as a crashed client leaves it: slots held, stdin at EOF.
        let mut broker = std::process::Command::new("sh")
            .arg("-c")
            .arg(broker_command(&dir, 3))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = broker.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(broker.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready "), "{line}");
        stdin.write_all(b"take\ntake\ntake\ntake\n").unwrap();
        let replies: Vec<String> = (0..4)
            .map(|_| {
                let mut l = String::new();
                stdout.read_line(&mut l).unwrap();
                l.trim().to_string()
            })
            .collect();
        assert_eq!(replies, ["slot 0", "slot 1", "slot 2", "busy"]);
        let two = slots_at(root.path(), 3);
        assert!(take_now(&two).await.is_err());
        two.refresh_others().await;
        assert_eq!(two.held_elsewhere(0), Some(3));
        drop(stdin);
        assert!(broker.wait().unwrap().success());
        for _ in 0..3 {
            assert!(take_now(&two).await.unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn a_cancelled_take_holds_nothing() {
        let root = tempfile::tempdir().unwrap();
        let slots = slots_at(root.path(), 1);
        drop(take_now(&slots).await.unwrap().unwrap());
        // Cancelled while the broker answers: the slot it took is freed again.
        let cancelled = tokio::select! {
            biased;
            _ = take_now(&slots) => false,
            () = std::future::ready(()) => true,
        };
        assert!(cancelled, "the take finished at once");
        // Its broker has no other slot: the next take gets slot 0 only once it is freed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let again = slots.take(0, Duration::from_secs(5)).await.unwrap();
        assert!(again.is_some());
    }

    #[tokio::test]
    async fn a_killed_broker_is_started_again() {
        let root = tempfile::tempdir().unwrap();
        let slots = slots_at(root.path(), 1);
        drop(take_now(&slots).await.unwrap().unwrap());
        let dir = root.path().join(SLOTS_SUBDIR).display().to_string();
        // The broker's shell: its arguments end with this directory and the slot count.
        let pid = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = args.split(|&b| b == 0).collect();
                args.len() >= 3 && args[args.len() - 3] == dir.as_bytes()
            })
            .expect("the broker's process");
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(take_now(&slots).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn hostile_directory_names_stay_text() {
        let base = tempfile::tempdir().unwrap();
        let pwned = base.path().join("pwned");
        let name = format!(
            "it's a \"store\" $(touch {0}) `touch {0}` ;touch {0}",
            pwned.display()
        );
        let root = base.path().join(name);
        let slots = slots_at(&root, 1);
        let held = take_now(&slots).await.unwrap().expect("slot");
        assert!(root.join(SLOTS_SUBDIR).join("slot-0").exists());
        assert!(!pwned.exists(), "a directory name ran as a command");
        drop(held);
    }

    /// A PATH of only these programs, for a local broker.
    fn bare_path(programs: &[&str]) -> tempfile::TempDir {
        let bin = tempfile::tempdir().unwrap();
        for p in programs {
            let found = which(p);
            std::os::unix::fs::symlink(found, bin.path().join(p)).unwrap();
        }
        bin
    }

    fn which(program: &str) -> std::path::PathBuf {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(program))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{program} not on PATH"))
    }

    fn with_path(root: &std::path::Path, bin: &std::path::Path, slots: u32) -> RemoteSlots {
        let mut endpoint = Endpoint::local("m1", Some(root.display().to_string()));
        endpoint
            .env
            .push(("PATH".into(), bin.display().to_string()));
        RemoteSlots::new([(endpoint, slots)])
    }

    #[tokio::test]
    async fn without_flock_builds_go_on_unlocked() {
        let root = tempfile::tempdir().unwrap();
        let bin = bare_path(&["sh", "mkdir"]);
        let slots = with_path(root.path(), bin.path(), 1);
        assert!(take_now(&slots).await.unwrap().is_none());
        // Said once, then not tried again.
        assert!(slots.brokers[0]
            .as_ref()
            .unwrap()
            .disabled
            .load(Ordering::Relaxed));
        assert!(take_now(&slots).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn without_bash_a_broker_holds_seven() {
        let root = tempfile::tempdir().unwrap();
        let bin = bare_path(&["sh", "mkdir", "flock"]);
        let slots = with_path(root.path(), bin.path(), 9);
        let mut held = Vec::new();
        for _ in 0..SH_SLOT_CAP {
            held.push(take_now(&slots).await.unwrap().expect("a slot"));
        }
        assert!(matches!(
            take_now(&slots).await,
            Err(DriverError::SlotsBusy { .. })
        ));
        held.pop();
        assert!(take_now(&slots).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn an_unusable_directory_is_no_reason_to_fail() {
        let base = tempfile::tempdir().unwrap();
        // A file where the store root's directories would go: nothing can be created.
        let root = base.path().join("file");
        std::fs::write(&root, "").unwrap();
        let slots = slots_at(&root, 1);
        assert!(take_now(&slots).await.unwrap().is_none());
        assert!(slots.brokers[0]
            .as_ref()
            .unwrap()
            .disabled
            .load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_broker_that_prints_garbage_is_no_reason_to_fail() {
        let root = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        // A login banner, where `ready` was due.
        let sh = bin.path().join("sh");
        std::fs::write(&sh, "#!/bin/sh\necho Welcome to b1\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&sh, std::fs::Permissions::from_mode(0o755)).unwrap();
        let slots = with_path(root.path(), bin.path(), 1);
        assert!(take_now(&slots).await.unwrap().is_none());
        assert!(slots.brokers[0]
            .as_ref()
            .unwrap()
            .disabled
            .load(Ordering::Relaxed));
    }
}
