//! The output locks Nix holds while its build hook runs.
//!
//! Nix locks each output it asks the hook to build (`flock` on `<output>.lock` in the
//! store directory) and keeps the lock until the hook is done. Up to Nix 2.28 the Nix a
//! hook starts to import the outputs skipped the locks named in `NIX_HELD_LOCKS`. From
//! Nix 2.29 on no Nix reads that variable (Nix's own hook skips the locks inside its own
//! process), so a separate import waits for a lock its own parent holds: for ever.
//!
//! Nix's lock protocol tolerates a lock file removed by name: whoever opens the name next
//! makes a new file, and whoever waits on the removed one finds it marked stale when
//! Nix's holder releases it, and opens the name again. So, on such a Nix, offload
//! removes the name of an output's lock file that is held. The import then locks a
//! fresh file, which still keeps any other Nix from writing the same path at once; the
//! holder's own release later removes a name that is gone already, which Nix ignores.

use std::fs::File;
use std::path::Path;

use crate::ssh::Endpoint;

/// How long `nix-store --version` may take to answer.
const VERSION_QUESTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The first Nix whose store ignores `NIX_HELD_LOCKS`.
const FIRST_NIX_IGNORING_HELD_LOCKS: (u32, u32) = (2, 29);

/// Whether the Nix that prints `version` (`nix-store --version`) still honours
/// `NIX_HELD_LOCKS`. Lix's `LocalStore` still reads it; an answer offload cannot read
/// counts as not honouring it, since then removing a held lock's name is what lets the
/// import go on.
pub(crate) fn honours_held_locks(version: &str) -> bool {
    let version = version.trim();
    if version.contains("Lix") {
        return true;
    }
    let Some(number) = version.rsplit(' ').next() else {
        return false;
    };
    let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < FIRST_NIX_IGNORING_HELD_LOCKS,
        _ => false,
    }
}

/// Before `outputs` are imported into the store behind `local`: on a Nix that ignores
/// `NIX_HELD_LOCKS`, removes the name of each output's lock file some process holds (the
/// Nix that waits for this hook). Returns the lock files removed. What cannot be done
/// (a store not on this machine's disk, no right to remove) is left as it is: the import
/// then waits as it would have.
pub(crate) async fn release_held_output_locks(local: &Endpoint, outputs: &[String]) -> Vec<String> {
    if outputs.is_empty() {
        return Vec::new();
    }
    // An answer it cannot read counts as a Nix that ignores the variable.
    let version = local
        .ask(
            &format!("{} --version", local.remote_program),
            VERSION_QUESTION_TIMEOUT,
        )
        .await
        .unwrap_or_default();
    if honours_held_locks(&version) {
        return Vec::new();
    }
    let Some(dir) =
        crate::transfer::directory_on_disk(local, offload_nix::store_path::store_dir().as_str())
    else {
        return Vec::new();
    };
    outputs
        .iter()
        .filter_map(|output| {
            let name = output.rsplit('/').next()?;
            let lock = format!("{dir}/{name}.lock");
            remove_if_held(Path::new(&lock)).then_some(lock)
        })
        .collect()
}

/// Removes the lock file at `path` when another open file holds its lock.
fn remove_if_held(path: &Path) -> bool {
    use rustix::fs::{flock, FlockOperation};
    let Ok(file) = File::open(path) else {
        return false;
    };
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        // Nobody holds it: the import takes it without waiting (closing `file` unlocks).
        Ok(()) => false,
        Err(rustix::io::Errno::WOULDBLOCK) => match std::fs::remove_file(path) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot remove the held lock {}: {e}", path.display());
                false
            }
        },
        Err(e) => {
            tracing::warn!("cannot test the lock {}: {e}", path.display());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_that_honour_held_locks() {
        assert!(honours_held_locks("nix-store (Nix) 2.8.0\n"));
        assert!(honours_held_locks("nix-store (Nix) 2.28.5"));
        assert!(!honours_held_locks("nix-store (Nix) 2.29.0"));
        assert!(!honours_held_locks("nix-store (Nix) 2.34.8"));
        assert!(!honours_held_locks("nix-store (Nix) 3.0.1"));
        assert!(honours_held_locks("nix-store (Lix, like Nix) 2.91.1"));
        assert!(!honours_held_locks(""));
        assert!(!honours_held_locks("garbage"));
    }

    #[test]
    fn only_a_held_lock_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let free = dir.path().join("free.lock");
        let held = dir.path().join("held.lock");
        std::fs::write(&free, "").unwrap();
        std::fs::write(&held, "").unwrap();
        let holder = File::open(&held).unwrap();
        rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();
        assert!(!remove_if_held(&free));
        assert!(free.exists());
        assert!(remove_if_held(&held));
        assert!(!held.exists());
        assert!(!remove_if_held(&dir.path().join("absent.lock")));
    }
}
