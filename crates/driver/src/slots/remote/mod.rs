//! Build slots locked on the builder itself, so that clients on different machines
//! (each with its own [`crate::slots::SlotLedger`]) do not overbook a builder they share.
//!
//! Per machine and run, one long-lived *slot broker* runs there, reached by the route of
//! the machine's serve sessions: a small `sh` script that holds `flock(1)` locks on
//! `<store root>/nix/var/nix/offload-slots/slot-<k>` through file descriptors of its own
//! shell, and takes or frees them on request (one line each way). The locks are not tied
//! to the pooled serve sessions (an idle warm session must not keep a slot from others),
//! and a build pays no extra ssh handshake: the broker starts once, on the first build.
//! A slot a build frees stays held for a moment as a spare, handed to the run's next
//! build there without a request (`broker::SPARE_LINGER`).
//! When the broker ends (its stdin closes, or the ssh connection dies) its shell exits,
//! and every lock it held goes with it: a crashed client never leaves a stale lock.
//!
//! Everyone building on that builder's store shares the directory (made mode 1777 when
//! the broker can create it); two chroot stores on one host have one directory each.
//! A builder without `flock` (macOS) or without a usable directory is warned about once
//! per run and builds go on without the builder-side lock: a missing lock is never a
//! reason to fail a build.
//!
//! The conversation with each broker (started, started again, given up) is in `broker.rs`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use offload_nix::store_uri::StoreUri;
use offload_sched::MachineId;
use tokio::sync::mpsc;

use crate::error::DriverError;
use crate::ssh::master::SshMaster;
use crate::ssh::{shell_quote, Endpoint};

/// The lock directory under the store root, beside Nix's own state.
pub const SLOTS_SUBDIR: &str = "nix/var/nix/offload-slots";
/// Most slots a broker under plain `sh` can hold: dash gives scripts fds 0–9 only.
pub const SH_SLOT_CAP: u32 = 7;

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
        # Made again when the store (and with it the directory) was deleted and re-made.
        [ -e "$f" ] || { mkdir -p "${dir%/*}"; mkdir -m 1777 "$dir"; (umask 0; : >>"$f"); } 2>/dev/null
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
    /// [`crate::slots::POLL_INTERVAL`], at most `limit`) while others hold all its slots. None when
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

mod broker;
use broker::{Broker, Request, UNKNOWN};
#[cfg(test)]
mod tests;
