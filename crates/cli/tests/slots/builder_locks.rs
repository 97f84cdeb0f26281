//! Build slots locked on the builder itself, end to end: two clients that share no
//! client-side slot ledger (each its own `OFFLOAD_SLOTS_DIR`, as two client machines
//! are) run `offload build` at once on one real sshd builder of one slot, and a poller
//! counts the builds running on it by their marker process (`sleep 1.37`; this machine
//! builds nothing, `-j0`). The second test is the negative control: with the builder's
//! lock directory unusable, the same runs overbook it, so the first can fail.

use crate::common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use offload_test_support::{nix_system, require_sshd_fleet, salt, text, SshFleet};

/// The marker every leaf build runs.
use common::{marker_graph as graph, MARKER};

/// The most marker processes seen at once, looked for every 20 ms.
struct Poller {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    seen: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Poller {
    /// Counts the markers under host 0's sshd (tests beside this one run markers too).
    fn start(fleet: &Arc<SshFleet>) -> Poller {
        let (stop, most) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let seen = Arc::new(AtomicBool::new(false));
        let (s, m, seen2, fleet) = (stop.clone(), most.clone(), seen.clone(), fleet.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let on_host = fleet.session_processes(0);
                let n = markers().iter().filter(|p| on_host.contains(p)).count();
                m.fetch_max(n, Ordering::Relaxed);
                if n > 0 {
                    seen2.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Poller {
            stop,
            most,
            seen,
            thread,
        }
    }

    /// Waits for the first build on the builder.
    fn wait_for_a_build(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.seen.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "no build started on the builder");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.most.load(Ordering::Relaxed)
    }
}

/// Marker processes running now (the builder's are this machine's processes too: its
/// sshd has a mount namespace of its own, not a pid namespace).
fn markers() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = args.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
            args == MARKER.map(str::as_bytes)
        })
        .collect()
}

/// `offload build` of `top` by a client of its own: its own work directory, so its own
/// slot ledger (`common::offload` puts it there), on the fleet's one host of one slot.
fn client(work: &Path, fleet: &SshFleet, salt: &str) -> Child {
    let file = work.join("g.nix");
    std::fs::write(&file, graph(salt)).unwrap();
    let (name, opts) = fleet.ssh_opts();
    let builders = format!("{} {} - 1 1", fleet.store_uri(0), nix_system());
    common::offload(work)
        .env(name, opts)
        .arg("build")
        .arg(&file)
        .args(["-A", "top", "--no-out-link", "-j0"])
        .args(["--builders", &builders])
        .args(["--option", "sandbox", "false"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Two clients at once; returns the most builds seen at once on the builder, the two
/// runs' stderr, and how long both took.
fn two_clients(fleet: &Arc<SshFleet>, tag: &str) -> (usize, Vec<String>, Duration) {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let salt = salt(tag);
    let poller = Poller::start(fleet);
    let started = Instant::now();
    // The second client starts while the first builds: with three of the first's
    // builds still to come, the runs overlap however slowly the second starts.
    let first = client(a.path(), fleet, &format!("{salt}-a"));
    poller.wait_for_a_build();
    let runs = [first, client(b.path(), fleet, &format!("{salt}-b"))];
    let stderr: Vec<String> = runs
        .into_iter()
        .map(|run| {
            let out = run.wait_with_output().unwrap();
            let stderr = text(&out.stderr);
            assert!(out.status.success(), "{stderr}");
            stderr
        })
        .collect();
    let took = started.elapsed();
    (poller.finish(), stderr, took)
}

#[test]
fn two_clients_never_run_two_builds_at_once_on_a_shared_one_slot_builder() {
    let Some(fleet) = require_sshd_fleet(1).map(Arc::new) else {
        return;
    };
    let (most, stderr, took) = two_clients(&fleet, "remote-slots");
    eprintln!(
        "two clients, one builder of one slot, locked there: most builds at once {most}, \
         {:.1} s for 8 builds of 1.37 s",
        took.as_secs_f64()
    );
    assert_eq!(most, 1, "the shared builder ran {most} builds at once");
    for s in &stderr {
        assert!(!s.contains("not locked on the machine"), "{s}");
    }
    // Every slot freed: the lock directory is there and nothing holds a slot now.
    let free = fleet
        .ssh(
            0,
            "flock -n /nix/var/nix/offload-slots/slot-0 true && stat -c %a /nix/var/nix/offload-slots",
        )
        .unwrap();
    assert_eq!(free.trim(), "1777");
}

#[test]
fn without_the_builder_side_lock_two_clients_overbook_a_shared_builder() {
    let Some(fleet) = require_sshd_fleet(1).map(Arc::new) else {
        return;
    };
    // A file where the lock directory goes: the builder cannot lock, and says so.
    fleet
        .ssh(
            0,
            "mkdir -p /nix/var/nix && touch /nix/var/nix/offload-slots",
        )
        .unwrap();
    let (most, stderr, took) = two_clients(&fleet, "remote-slots-unlocked");
    eprintln!(
        "two clients, one builder of one slot, not locked there: most builds at once {most}, \
         {:.1} s",
        took.as_secs_f64()
    );
    for s in &stderr {
        let warnings = s.matches("not locked on the machine itself").count();
        assert_eq!(warnings, 1, "{s}");
        assert!(
            s.contains("mkdir -m 1777 /nix/var/nix/offload-slots"),
            "{s}"
        );
    }
    assert_eq!(
        most, 2,
        "the clients' own ledgers alone kept the builder at {most}"
    );
}
