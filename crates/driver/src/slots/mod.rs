//! One ledger of the build slots of remote machines, shared by every `offload build`,
//! every `offload hook` and Nix's own build hook (`build-remote`), so that together they
//! never overbook a machine.
//!
//! The ledger is Nix 2.8's (`src/build-remote/build-remote.cc`): a directory, by default
//! `/nix/var/nix/current-load`, with one lock file per machine slot named
//! `<store URI with every '/' replaced by '_'>-<slot>`. A slot is taken by an exclusive,
//! non-blocking `flock(2)` on its file and held until the build ends; the lock goes with
//! the open file, so a process that dies frees its slots. While choosing, Nix also holds
//! `main-lock` in the same directory; offload takes it around its choice too.
//!
//! The local machine's slots are Nix's `max-jobs`, counted by Nix itself, never here.
//! [`crate::env::OFFLOAD_SLOTS_DIR`] moves the ledger (for tests, or to keep offload's own).
//!
//! Clients on other machines keep ledgers of their own: [`remote`] locks slots on the
//! builder itself, so that they do not overbook a builder they share.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use crate::error::DriverError;

pub mod remote;

/// How often a build waiting for a slot looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The slot-lock directory and the lock files in it.
#[derive(Debug, Clone)]
pub struct SlotLedger {
    dir: PathBuf,
}

/// Slots this process holds, per machine (the lock files' common prefix): a lock that
/// [`SlotLedger::held_elsewhere`] finds taken is someone else's only when this process
/// does not hold it (flock locks conflict between open files of one process too).
static HELD_HERE: Mutex<BTreeMap<PathBuf, u32>> = Mutex::new(BTreeMap::new());

fn held_here(machine: &Path) -> u32 {
    let held = HELD_HERE.lock().unwrap_or_else(|p| p.into_inner());
    held.get(machine).copied().unwrap_or(0)
}

/// A held slot of a machine; dropping it frees the slot.
#[derive(Debug)]
pub struct SlotLock {
    file: File,
    slot: u32,
    /// The machine's lock-file prefix, its key in [`HELD_HERE`].
    machine: PathBuf,
}

impl SlotLock {
    fn new(file: File, slot: u32, machine: PathBuf) -> SlotLock {
        let mut held = HELD_HERE.lock().unwrap_or_else(|p| p.into_inner());
        *held.entry(machine.clone()).or_default() += 1;
        SlotLock {
            file,
            slot,
            machine,
        }
    }

    /// Which of the machine's slots it is (0-based, as in the lock file's name).
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

impl Drop for SlotLock {
    fn drop(&mut self) {
        // Unlocked before it is uncounted: a count taken in between sees one slot
        // fewer held elsewhere, never one more.
        let _ = flock(&self.file, FlockOperation::Unlock);
        let mut held = HELD_HERE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.machine) {
            *n = n.saturating_sub(1);
        }
    }
}

/// `main-lock`, held while a machine is chosen; dropping it releases it.
#[derive(Debug)]
pub struct ChoosingLock {
    _file: File,
}

/// A machine's slots as seen now: how many others hold, and the first free one (taken).
#[derive(Debug)]
pub struct SlotProbe {
    pub busy: u32,
    pub free: Option<SlotLock>,
}

impl SlotLedger {
    pub fn new(dir: impl Into<PathBuf>) -> SlotLedger {
        SlotLedger { dir: dir.into() }
    }

    /// The directory [`crate::env::slots_dir`] names.
    pub fn from_env() -> SlotLedger {
        SlotLedger::new(crate::env::slots_dir())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lock file of slot `slot` of the machine with this store URI, named as Nix
    /// names it.
    pub fn slot_path(&self, store_uri: &str, slot: u32) -> PathBuf {
        self.dir
            .join(format!("{}-{slot}", store_uri.replace('/', "_")))
    }

    /// What the machine's lock files share: its key among the slots held here.
    fn machine_key(&self, store_uri: &str) -> PathBuf {
        self.dir.join(store_uri.replace('/', "_"))
    }

    /// Takes `main-lock`, waiting for whoever is choosing now (Nix holds it only while
    /// it looks at the slot files).
    pub fn choosing(&self, machine: &str) -> Result<ChoosingLock, DriverError> {
        let path = self.dir.join("main-lock");
        let file = self.open(machine, &path)?;
        flock(&file, FlockOperation::LockExclusive).map_err(|e| DriverError::SlotLock {
            machine: machine.to_string(),
            op: "locking",
            path,
            source: e.into(),
        })?;
        Ok(ChoosingLock { _file: file })
    }

    /// Looks at each of the machine's `slots` slots, as Nix does: counts those held by
    /// others and keeps the first free one. Call it while holding [`Self::choosing`].
    pub fn probe(&self, store_uri: &str, slots: u32) -> Result<SlotProbe, DriverError> {
        let mut probe = SlotProbe {
            busy: 0,
            free: None,
        };
        for slot in 0..slots {
            let path = self.slot_path(store_uri, slot);
            let file = self.open(store_uri, &path)?;
            if !try_lock(&file, store_uri, &path)? {
                probe.busy += 1;
            } else if probe.free.is_none() {
                probe.free = Some(SlotLock::new(file, slot, self.machine_key(store_uri)));
            }
        }
        Ok(probe)
    }

    /// How many of the machine's `slots` slots others hold now: other offload runs,
    /// Nix's own build hook, other users. Looks as [`Self::probe`] does, keeping none.
    pub fn held_elsewhere(&self, store_uri: &str, slots: u32) -> Result<u32, DriverError> {
        let _choosing = self.choosing(store_uri)?;
        let mut busy = 0u32;
        for slot in 0..slots {
            let path = self.slot_path(store_uri, slot);
            let file = self.open(store_uri, &path)?;
            if !try_lock(&file, store_uri, &path)? {
                busy += 1;
            }
        }
        Ok(busy.saturating_sub(held_here(&self.machine_key(store_uri))))
    }

    /// A free slot of the machine, taken, or None when others hold all `slots`.
    pub fn try_take(&self, store_uri: &str, slots: u32) -> Result<Option<SlotLock>, DriverError> {
        let _choosing = self.choosing(store_uri)?;
        Ok(self.probe(store_uri, slots)?.free)
    }

    /// A slot of the machine, waiting (polling every [`POLL_INTERVAL`], at most `limit`)
    /// while others hold all `slots`. Cancel-safe: a cancelled wait holds nothing.
    pub async fn take(
        &self,
        store_uri: &str,
        slots: u32,
        limit: Duration,
    ) -> Result<SlotLock, DriverError> {
        let started = Instant::now();
        loop {
            let ledger = self.clone();
            let uri = store_uri.to_string();
            // flock on main-lock may block for as long as another process chooses.
            let taken = tokio::task::spawn_blocking(move || ledger.try_take(&uri, slots))
                .await
                .map_err(|e| DriverError::SlotLock {
                    machine: store_uri.to_string(),
                    op: "waiting for the lock task on",
                    path: self.dir.clone(),
                    source: io::Error::other(e.to_string()),
                })??;
            if let Some(lock) = taken {
                return Ok(lock);
            }
            if started.elapsed() >= limit {
                return Err(DriverError::SlotsBusy {
                    machine: store_uri.to_string(),
                    slots,
                    dir: self.dir.display().to_string(),
                    secs: limit.as_secs(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// As [`Self::take`], but a machine of no slots here (the local one, whose slots Nix
    /// counts as `max-jobs`) needs none, and a ledger this process cannot use (a directory it may not
    /// write, lock files another user created 0600) is no reason to fail a build: it is
    /// reported once per process and the build goes ahead without a slot lock.
    pub async fn hold(
        &self,
        store_uri: &str,
        slots: u32,
        limit: Duration,
    ) -> Result<Option<SlotLock>, DriverError> {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if slots == 0 {
            return Ok(None);
        }
        match self.take(store_uri, slots, limit).await {
            Ok(lock) => Ok(Some(lock)),
            Err(e @ DriverError::SlotLock { .. }) => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    let hint = e.hint().unwrap_or_default();
                    tracing::warn!(
                        "builds go on without the shared slot ledger, so other Nix builds may \
                         overbook the machines: {e}: {} (hint: {hint})",
                        std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
                    );
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The machine's upload lock (`<store URI, '/' as '_'>.upload-lock`), which Nix's
    /// hook holds while it copies inputs to that machine, waiting at most `limit`; past
    /// that, as Nix does, the copy goes ahead without it (None).
    pub async fn upload_lock(
        &self,
        store_uri: &str,
        limit: Duration,
    ) -> Result<Option<File>, DriverError> {
        let path = self
            .dir
            .join(format!("{}.upload-lock", store_uri.replace('/', "_")));
        let file = self.open(store_uri, &path)?;
        let started = Instant::now();
        loop {
            if try_lock(&file, store_uri, &path)? {
                return Ok(Some(file));
            }
            if started.elapsed() >= limit {
                return Ok(None);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Opens (creating) a lock file, creating the directory first when it is missing,
    /// open to every user as Nix makes it.
    fn open(&self, machine: &str, path: &Path) -> Result<File, DriverError> {
        let err = |op, path: &Path| {
            let (machine, path) = (machine.to_string(), path.to_path_buf());
            move |source| DriverError::SlotLock {
                machine,
                op,
                path,
                source,
            }
        };
        if !self.dir.is_dir() {
            match std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o777)
                .create(&self.dir)
            {
                // The umask narrows the mode; every user's builds share this directory.
                Ok(()) => {
                    std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o777))
                        .map_err(err("opening up the slot-lock directory", &self.dir))?
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err("creating the slot-lock directory", &self.dir)(e)),
            }
        }
        // Readable by all: a flock needs only an open file, so every user's builds (a
        // root hook's and an ordinary user's `offload build`) can share the lock files
        // offload creates. Files Nix's own hook made are 0600: readable by root only.
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path);
        match created {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                OpenOptions::new().read(true).open(path)
            }
            other => other,
        }
        .map_err(err("opening the slot lock file", path))
    }
}

/// An exclusive `flock` on `file` without waiting: false when another holds it.
fn try_lock(file: &File, machine: &str, path: &Path) -> Result<bool, DriverError> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(DriverError::SlotLock {
            machine: machine.to_string(),
            op: "locking",
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_files_as_nix_does() {
        let ledger = SlotLedger::new("/x");
        assert_eq!(
            ledger.slot_path("ssh://root@b1?remote-store=/tmp/m1", 3),
            Path::new("/x/ssh:__root@b1?remote-store=_tmp_m1-3")
        );
    }

    #[test]
    fn slots_are_exclusive_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SlotLedger::new(dir.path().join("current-load"));
        let a = ledger.try_take("ssh://b", 2).unwrap().expect("slot 0 free");
        let b = ledger.try_take("ssh://b", 2).unwrap().expect("slot 1 free");
        assert_eq!((a.slot(), b.slot()), (0, 1));
        assert!(ledger.try_take("ssh://b", 2).unwrap().is_none());
        let probe = ledger.probe("ssh://b", 2).unwrap();
        assert_eq!(probe.busy, 2);
        drop(a);
        let c = ledger
            .try_take("ssh://b", 2)
            .unwrap()
            .expect("slot 0 freed");
        assert_eq!(c.slot(), 0);
        let mode = std::fs::metadata(ledger.dir())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o777);
    }

    #[test]
    fn a_lock_held_by_another_process_is_respected() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SlotLedger::new(dir.path());
        let file = ledger.slot_path("ssh://b", 0);
        // util-linux's flock(1), as an independent process holding the slot.
        let mut holder = std::process::Command::new("flock")
            .arg("-x")
            .arg(&file)
            .args(["sleep", "1"])
            .spawn()
            .expect("flock(1) from util-linux");
        let deadline = Instant::now() + Duration::from_secs(10);
        while ledger.probe("ssh://b", 1).unwrap().busy == 0 {
            assert!(Instant::now() < deadline, "flock(1) never took the lock");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ledger.try_take("ssh://b", 1).unwrap().is_none());
        // Its `sleep` holds the inherited lock too: the slot frees when both end.
        assert!(holder.wait().unwrap().success());
        assert!(ledger.try_take("ssh://b", 1).unwrap().is_some());
    }

    #[test]
    fn slots_held_elsewhere_leave_out_this_process_s_own() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SlotLedger::new(dir.path());
        let ours = ledger.try_take("ssh://c", 3).unwrap().expect("a free slot");
        assert_eq!(ledger.held_elsewhere("ssh://c", 3).unwrap(), 0);
        // Someone else takes the next slot: an open file of its own, locked outside the
        // ledger, as another process's would be.
        let theirs = File::create(ledger.slot_path("ssh://c", 1)).unwrap();
        flock(&theirs, FlockOperation::NonBlockingLockExclusive).unwrap();
        assert_eq!(ledger.held_elsewhere("ssh://c", 3).unwrap(), 1);
        // Looking took nothing: the third slot is still free for this process.
        let third = ledger.try_take("ssh://c", 3).unwrap().expect("slot 2 free");
        assert_eq!(third.slot(), 2);
        assert_eq!(ledger.held_elsewhere("ssh://c", 3).unwrap(), 1);
        drop((ours, third));
        assert_eq!(ledger.held_elsewhere("ssh://c", 3).unwrap(), 1);
        drop(theirs);
        assert_eq!(ledger.held_elsewhere("ssh://c", 3).unwrap(), 0);
    }

    #[tokio::test]
    async fn waiting_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SlotLedger::new(dir.path());
        let _held = ledger.try_take("ssh://b", 1).unwrap().unwrap();
        let err = ledger
            .take("ssh://b", 1, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            matches!(err, DriverError::SlotsBusy { slots: 1, .. }),
            "{err}"
        );
        assert!(err.hint().unwrap().contains("--exclude"));
    }
}
