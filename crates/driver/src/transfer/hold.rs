//! Keeping a builder's store fit for the builds sent to it.
//!
//! - **Its garbage collector** (`min-free`, a nightly `nix-collect-garbage`) may delete
//!   an input between the moment the builder said it has it and the build. A build's
//!   session therefore holds every input of the build as a temporary GC root
//!   ([`ServeConn::hold_valid`]: the serve protocol's QueryValidPaths with `lock`), from
//!   before the build until the session ends; what went in the meantime is sent again.
//! - **Its free space**: asked once per run (`df` on its store directory and its
//!   `min-free`, the same way its sessions run), the builder is not chosen for inputs
//!   that do not fit, rather than failing after the upload.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use offload_sched::MachineId;
use tokio::sync::OnceCell;

use super::TransferEngine;
use crate::error::DriverError;
use crate::session::ServeConn;
use crate::ssh::Endpoint;

/// How often a build's inputs are sent again when they keep vanishing from the builder
/// before its session holds them.
const HOLD_ATTEMPTS: usize = 3;

/// How long a builder gets to say how much room its store has.
const SPACE_QUESTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Room in a builder's store, as it said at the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSpace {
    /// Bytes free on the file system of its store directory.
    pub free: u64,
    /// Its `min-free` setting: below this, Nix collects garbage during builds.
    pub min_free: u64,
}

/// What each machine's store has room for in this run: asked once, then what this run
/// has sent there is taken off.
pub(super) struct SpaceLedger {
    asked: Vec<OnceCell<Option<StoreSpace>>>,
    committed: Vec<AtomicU64>,
}

impl SpaceLedger {
    pub(super) fn new(machines: usize) -> SpaceLedger {
        SpaceLedger {
            asked: (0..machines).map(|_| OnceCell::new()).collect(),
            committed: (0..machines).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl TransferEngine {
    /// Makes the closure of `paths` valid on `machine` and held there by `conn` until it
    /// ends, sending again what the builder's garbage collector took in between. An
    /// error when the inputs keep vanishing.
    pub async fn hold_inputs(
        self: &Arc<Self>,
        machine: MachineId,
        paths: &[String],
        conn: &mut ServeConn,
        substitute: bool,
    ) -> Result<(), DriverError> {
        for _ in 0..HOLD_ATTEMPTS {
            let closure = self.registry().closure(paths);
            let valid = conn.hold_valid(&closure, substitute).await?;
            let gone: Vec<String> = closure.into_iter().filter(|p| !valid.contains(p)).collect();
            let Some(first) = gone.first() else {
                return Ok(());
            };
            tracing::info!(
                machine = %self.pools[machine].endpoint().name,
                paths = gone.len(),
                first = %first,
                "inputs went from the builder's store before the build held them (its \
                 garbage collector?): sending them again"
            );
            {
                let mut registry = self.registry();
                for p in &gone {
                    registry.remove_holder(p, machine);
                }
            }
            self.ensure_on(machine, paths, None, substitute).await?;
        }
        Err(DriverError::InputsCollected {
            machine: self.pools[machine].endpoint().name.clone(),
            attempts: HOLD_ATTEMPTS,
        })
    }

    /// Asks `machine` once how much room its store has; later calls wait for that
    /// answer. None for this machine, and for a builder that cannot say.
    pub async fn learn_space(&self, machine: MachineId) -> Option<StoreSpace> {
        if Some(machine) == self.client {
            return None;
        }
        let endpoint = self.pools[machine].endpoint();
        let store_dir = self.store_dir();
        *self.space.asked[machine]
            .get_or_init(|| ask_space(endpoint, store_dir))
            .await
    }

    /// Takes `paths` (about to be sent to `machine`) off the room its store has; an
    /// error naming its free space when they do not fit beside its `min-free`.
    pub(super) async fn make_room(
        &self,
        machine: MachineId,
        paths: &[String],
    ) -> Result<(), DriverError> {
        let Some(space) = self.learn_space(machine).await else {
            return Ok(());
        };
        let needed: u64 = {
            let registry = self.registry();
            let unique: HashSet<&String> = paths.iter().collect();
            unique
                .into_iter()
                .filter_map(|p| registry.info(p).map(|i| i.nar_size))
                .sum()
        };
        let committed = &self.space.committed[machine];
        let before = committed.fetch_add(needed, Ordering::Relaxed);
        let free = space.free.saturating_sub(before);
        if needed.saturating_add(space.min_free) > free {
            committed.fetch_sub(needed, Ordering::Relaxed);
            return Err(DriverError::NoRoom {
                machine: self.pools[machine].endpoint().name.clone(),
                free,
                needed,
                min_free: space.min_free,
            });
        }
        Ok(())
    }
}

/// Where the store of `endpoint` keeps `store_dir` on its machine's file system: inside
/// the root of a chroot store. None for a store given by a URI whose files offload does
/// not know (`daemon` reaches `/nix/store` too).
pub(crate) fn directory_on_disk(endpoint: &Endpoint, store_dir: &str) -> Option<String> {
    let Some(store) = &endpoint.remote_store else {
        return Some(store_dir.to_string());
    };
    let root = if store.starts_with('/') {
        store.as_str()
    } else if let Some(rest) = store.strip_prefix("local?") {
        rest.split('&').find_map(|kv| kv.strip_prefix("root="))?
    } else if matches!(store.as_str(), "daemon" | "auto" | "local") {
        return Some(store_dir.to_string());
    } else {
        return None;
    };
    Some(format!("{}{store_dir}", root.trim_end_matches('/')))
}

/// The shell command that prints the room a store has: `df`'s line for its directory,
/// then Nix's `min-free` line, from the `nix` beside the machine's `nix-store`.
fn space_command(endpoint: &Endpoint, dir: &str) -> String {
    let nix = match endpoint.remote_program.rsplit_once('/') {
        Some((bin, _)) => format!("{bin}/nix"),
        None => "nix".to_string(),
    };
    // A store not written to yet may have no directory: its nearest parent's room is its.
    format!(
        "d={}; while [ ! -e \"$d\" ]; do d=$(dirname \"$d\"); done; df -Pk -- \"$d\"; \
         {} --extra-experimental-features nix-command show-config 2>/dev/null | grep '^min-free ='",
        crate::ssh::shell_quote(dir),
        crate::ssh::shell_quote(&nix)
    )
}

/// Reads what [`space_command`] printed: the free KiB of `df -P`'s data line and, when
/// Nix said it, `min-free = BYTES`.
pub(crate) fn parse_space(out: &str) -> Option<StoreSpace> {
    let mut free = None;
    let mut min_free = 0;
    for line in out.lines() {
        if let Some(v) = line.strip_prefix("min-free =") {
            min_free = v.trim().parse().ok()?;
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Filesystem, 1024-blocks, Used, Available, Capacity, Mounted on.
        if fields.len() >= 6 && fields[4].ends_with('%') {
            if let Ok(kib) = fields[3].parse::<u64>() {
                free = Some(kib.saturating_mul(1024));
            }
        }
    }
    Some(StoreSpace {
        free: free?,
        min_free,
    })
}

async fn ask_space(endpoint: &Endpoint, store_dir: String) -> Option<StoreSpace> {
    let dir = directory_on_disk(endpoint, &store_dir)?;
    let question = space_command(endpoint, &dir);
    let Some(printed) = endpoint.ask(&question, SPACE_QUESTION_TIMEOUT).await else {
        tracing::debug!(machine = %endpoint.name, "its store's free space is unknown");
        return None;
    };
    let space = parse_space(&printed);
    tracing::debug!(machine = %endpoint.name, ?space, %printed, "room in its store");
    space
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_is_read_from_df_and_nix() {
        let out = "Filesystem     1024-blocks  Used Available Capacity Mounted on\n\
                   tmpfs                20480  1024     19456       5% /nix\n\
                   min-free = 1048576\n";
        assert_eq!(
            parse_space(out),
            Some(StoreSpace {
                free: 19456 * 1024,
                min_free: 1048576
            })
        );
        // A Nix that does not say: no min-free.
        let out = "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                   /dev/vda 263174212 54321 200000000 21% /\n";
        assert_eq!(parse_space(out).map(|s| s.min_free), Some(0));
        assert_eq!(parse_space("nix-daemon: protocol mismatch\n"), None);
        assert_eq!(parse_space(""), None);
    }

    #[test]
    fn a_chroot_store_keeps_its_files_under_its_root() {
        let at = |uri: &str| directory_on_disk(&Endpoint::parse(uri).unwrap(), "/nix/store");
        assert_eq!(at("ssh://b1").as_deref(), Some("/nix/store"));
        assert_eq!(
            at("ssh://localhost?remote-store=/tmp/fleet/m1").as_deref(),
            Some("/tmp/fleet/m1/nix/store")
        );
        assert_eq!(
            at("ssh://b1?remote-store=local%3Froot%3D/srv/r").as_deref(),
            Some("/srv/r/nix/store")
        );
        assert_eq!(
            at("ssh://b1?remote-store=daemon").as_deref(),
            Some("/nix/store")
        );
    }
}
