//! What a failed import leaves on this machine's disk. Nix writes a path it imports in
//! place and registers it only once it is whole and its hash checked
//! (`LocalStore::addToStore`): an import cut short (a link that dies mid-NAR, a NAR
//! offload stops because it does not match, an interrupt) leaves the part it wrote,
//! unregistered, until a later import of that path or a garbage collection removes it.
//! [`Imports`] sits between the transport and the reporter, notes every import into the
//! local store that started and did not end well (it failed, or was dropped), and at the
//! end of the run has Nix delete those paths that are still not valid.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::fleet::LOCAL_NAME;
use crate::process;
use crate::reporter::{Placement, Reporter};
use crate::ssh::{shell_quote, Endpoint};

/// A [`Reporter`] that passes everything on and remembers imports here that started
/// and did not succeed.
pub(super) struct Imports {
    inner: Arc<dyn Reporter>,
    failed: Mutex<BTreeSet<String>>,
}

impl Imports {
    pub(super) fn new(inner: Arc<dyn Reporter>) -> Arc<Imports> {
        Arc::new(Imports {
            inner,
            failed: Mutex::default(),
        })
    }

    /// Deletes, through `local` (the local store's endpoint), each path whose import
    /// here failed and that is still not valid. Nix refuses to delete a path another
    /// process is importing at that moment (it is one of that process's temporary
    /// roots). Failures are only logged: what is left is unregistered, and the next
    /// import of the path or a garbage collection removes it.
    pub(super) async fn remove_leftovers(&self, local: &Endpoint) {
        let failed: Vec<String> =
            std::mem::take(&mut *self.failed.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        if failed.is_empty() {
            return;
        }
        let mut nix_store = shell_quote(&local.remote_program);
        if let Some(store) = &local.remote_store {
            nix_store.push_str(&format!(" --store {}", shell_quote(store)));
        }
        let paths: Vec<String> = failed.iter().map(|p| shell_quote(p)).collect();
        let script = format!(
            "set --; for p in {}; do {nix_store} --check-validity \"$p\" >/dev/null 2>&1 || \
             set -- \"$@\" \"$p\"; done; [ $# -eq 0 ] || {nix_store} --delete \"$@\"",
            paths.join(" ")
        );
        let (mut cmd, known_hosts) = match local.command(&script) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("removing what failed imports left: {e}");
                return;
            }
        };
        let removed = tokio::task::spawn_blocking(move || {
            let _known_hosts = known_hosts;
            process::run(&mut cmd)
        })
        .await;
        match removed {
            Ok(Ok(_)) => tracing::debug!(paths = ?failed, "removed what failed imports left"),
            Ok(Err(e)) => tracing::warn!("removing what failed imports left: {e}"),
            Err(e) => tracing::warn!("removing what failed imports left: {e}"),
        }
    }
}

impl Reporter for Imports {
    fn build_started(&self, drv: &str, machine: &str) {
        self.inner.build_started(drv, machine);
    }
    fn build_placed(&self, drv: &str, machine: &str, placement: Placement) {
        self.inner.build_placed(drv, machine, placement);
    }
    fn build_log(&self, drv: &str, machine: &str, line: &str) {
        self.inner.build_log(drv, machine, line);
    }
    fn build_finished(&self, drv: &str, machine: &str, ok: bool, seconds: f64) {
        self.inner.build_finished(drv, machine, ok, seconds);
    }
    fn build_hedged(&self, drv: &str, from: &str, machine: &str) {
        self.inner.build_hedged(drv, from, machine);
    }
    fn machine_warning(&self, message: &str) {
        self.inner.machine_warning(message);
    }
    fn machine_event(&self, kind: &str, machine: &str, why: &str) {
        self.inner.machine_event(kind, machine, why);
    }
    fn transfer_started(&self, path: &str, from: &str, to: &str, bytes: u64) {
        if to == LOCAL_NAME {
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(path.to_string());
        }
        self.inner.transfer_started(path, from, to, bytes);
    }
    fn transfer_finished(
        &self,
        path: &str,
        from: &str,
        to: &str,
        bytes: u64,
        seconds: f64,
        ok: bool,
    ) {
        if ok && to == LOCAL_NAME {
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(path);
        }
        self.inner
            .transfer_finished(path, from, to, bytes, seconds, ok);
    }
    fn bytes_moved(&self, route: crate::reporter::ByteRoute, from: &str, to: &str, bytes: u64) {
        self.inner.bytes_moved(route, from, to, bytes);
    }
}
