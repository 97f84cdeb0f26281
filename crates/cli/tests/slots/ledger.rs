//! The slot ledger shared with Nix's build hook, end to end: `offload build` runs on a
//! loopback fleet of chroot stores, and a poller counts the builds running on each
//! machine by their marker process (`sleep 1.37`, attributed to the machine whose
//! `nix-store --serve` it descends from).

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use offload_test_support::{nix_system, require_nix};
use offload_test_support::{salt, text};

use common::{marker_graph as graph, MARKER};

/// Loopback builders `m1`, `m2`, … of one slot each, under `dir`.
struct Fleet {
    dir: tempfile::TempDir,
    program: PathBuf,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let program = offload_test_support::loopback_serve_program(dir.path());
        Fleet { dir, program }
    }

    fn store(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}"))
    }

    fn uri(&self, i: usize) -> String {
        format!(
            "ssh://localhost?remote-store={}&remote-program={}",
            self.store(i).display(),
            self.program.display()
        )
    }

    fn spec(&self, machines: &[usize]) -> String {
        let lines: Vec<String> = machines
            .iter()
            .map(|&i| format!("{} {} - 1 1", self.uri(i), nix_system()))
            .collect();
        lines.join(";")
    }
}

/// Per store, the most markers seen at once and when the first was seen; and the most
/// markers seen at once in all.
type Seen = (HashMap<PathBuf, usize>, HashMap<PathBuf, Instant>, usize);

/// Counts marker processes per store directory, every 20 ms, until finished.
struct Poller {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(stores: Vec<PathBuf>) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let (s, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut now: HashMap<PathBuf, usize> = HashMap::new();
                let mut total = 0;
                for pid in markers() {
                    total += 1;
                    if let Some(store) = owning_store(pid, &stores) {
                        *now.entry(store).or_default() += 1;
                    }
                }
                let mut g = seen2.lock().unwrap();
                g.2 = g.2.max(total);
                for (store, n) in now {
                    g.1.entry(store.clone()).or_insert_with(Instant::now);
                    let most = g.0.entry(store).or_default();
                    *most = (*most).max(n);
                }
                drop(g);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Poller {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(") ")?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn markers() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| cmdline(pid) == MARKER)
        .collect()
}

/// The store whose serve process `pid` descends from.
fn owning_store(pid: u32, stores: &[PathBuf]) -> Option<PathBuf> {
    let mut at = pid;
    for _ in 0..64 {
        let args = cmdline(at);
        if let Some(s) = stores
            .iter()
            .find(|s| args.iter().any(|a| Path::new(a) == s.as_path()))
        {
            return Some(s.clone());
        }
        at = parent(at).filter(|&p| p > 1)?;
    }
    None
}

/// `offload build FILE -A top -j0` on `machines` of `fleet`, with the ledger in `slots`.
fn spawn_offload_build(
    work: &Path,
    file: &Path,
    fleet: &Fleet,
    machines: &[usize],
    slots: &Path,
) -> std::process::Child {
    common::offload(work)
        .arg("build")
        .arg(file)
        .args(["-A", "top", "--no-out-link", "-j0"])
        .args(["--builders", &fleet.spec(machines)])
        .env("OFFLOAD_SLOTS_DIR", slots)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for every run to succeed, then checks that machines 1 and 2 never ran two
/// builds at once, and that two builds did run at once somewhere (the runs overlapped).
fn assert_never_overbooked(runs: Vec<std::process::Child>, poller: Poller, fleet: &Fleet) {
    for run in runs {
        let out = run.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let (most, _, total) = poller.finish();
    for i in [1, 2] {
        let n = most.get(&fleet.store(i)).copied().unwrap_or(0);
        assert_eq!(n, 1, "m{i}: most builds at once {n}; all: {most:?}");
    }
    assert!(total >= 2, "never two builds at once: {most:?}");
}

#[test]
fn two_concurrent_runs_never_run_two_builds_on_a_one_slot_machine() {
    if !require_nix() {
        return;
    }
    let fleet = Fleet::new();
    let work = tempfile::tempdir().unwrap();
    let slots = work.path().join("slots");
    let salt = salt("slots");
    let poller = Poller::start(vec![fleet.store(1), fleet.store(2)]);
    let runs: Vec<_> = ["a", "b"]
        .iter()
        .map(|run| {
            let file = work.path().join(format!("{run}.nix"));
            std::fs::write(&file, graph(&format!("{salt}-{run}"))).unwrap();
            spawn_offload_build(work.path(), &file, &fleet, &[1, 2], &slots)
        })
        .collect();
    assert_never_overbooked(runs, poller, &fleet);
}

#[test]
fn a_slot_held_by_a_nix_hook_makes_offload_wait() {
    if !require_nix() {
        return;
    }
    let fleet = Fleet::new();
    let work = tempfile::tempdir().unwrap();
    let slots = work.path().join("slots");
    std::fs::create_dir_all(&slots).unwrap();
    // The lock file Nix's build-remote takes for slot 0 of this machine, held by another
    // process (util-linux flock) for 4 s.
    let lock = slots.join(format!("{}-0", fleet.uri(1).replace('/', "_")));
    let mut holder = std::process::Command::new("flock")
        .arg("-x")
        .arg(&lock)
        .args(["sleep", "4"])
        .spawn()
        .expect("flock(1) from util-linux");
    std::thread::sleep(Duration::from_millis(300));
    let poller = Poller::start(vec![fleet.store(1)]);
    let file = work.path().join("g.nix");
    std::fs::write(&file, graph(&salt("held"))).unwrap();
    let build = spawn_offload_build(work.path(), &file, &fleet, &[1], &slots);
    assert!(holder.wait().unwrap().success());
    let released = Instant::now();
    let out = build.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (most, first, _) = poller.finish();
    let started = first[&fleet.store(1)];
    assert!(
        started >= released,
        "a build started on m1 {:?} before the held slot was freed",
        released - started
    );
    assert_eq!(most[&fleet.store(1)], 1);
}

#[test]
fn a_nix_build_through_the_hook_beside_an_offload_build_never_overbooks() {
    if !require_nix() {
        return;
    }
    let fleet = Fleet::new();
    let work = tempfile::tempdir().unwrap();
    let slots = work.path().join("slots");
    // Nix runs the hook with its own environment: the script gives it this test's ledger
    // (and no agent).
    let hook = work.path().join("hook");
    offload_test_support::write_executable(
        &hook,
        &format!(
            "#!/bin/sh\nexport OFFLOAD_SLOTS_DIR={} OFFLOAD_HISTORY={}/hook-history.sqlite \
             OFFLOAD_AGENT_SOCKET={}/no-agent.sock\nexec {} hook \"$@\"\n",
            slots.display(),
            work.path().display(),
            work.path().display(),
            env!("CARGO_BIN_EXE_offload")
        ),
    );
    let salt = salt("slots");
    let file = |run: &str| {
        let file = work.path().join(format!("{run}.nix"));
        std::fs::write(&file, graph(&format!("{salt}-{run}"))).unwrap();
        file
    };
    let (nix_file, offload_file) = (file("nix"), file("offload"));
    let poller = Poller::start(vec![fleet.store(1), fleet.store(2)]);
    let nix_build = offload_test_support::nix_command("nix-build")
        .arg(&nix_file)
        .args(["-A", "top", "--no-out-link", "-j0", "--builders"])
        .arg(fleet.spec(&[1, 2]))
        .arg("--option")
        .arg("build-hook")
        .arg(&hook)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let offload = spawn_offload_build(work.path(), &offload_file, &fleet, &[1, 2], &slots);
    assert_never_overbooked(vec![nix_build, offload], poller, &fleet);
}

#[test]
fn twenty_concurrent_runs_never_exceed_any_machines_slots() {
    if !require_nix() {
        return;
    }
    // Four builders of one slot each; twenty runs of one marker build each.
    let fleet = Fleet::new();
    let work = tempfile::tempdir().unwrap();
    let slots = work.path().join("slots");
    let salt = salt("slots");
    let machines = [1, 2, 3, 4];
    let poller = Poller::start(machines.iter().map(|&i| fleet.store(i)).collect());
    let started = Instant::now();
    let runs: Vec<_> = (0..20)
        .map(|run| {
            let file = work.path().join(format!("r{run}.nix"));
            std::fs::write(&file, one_marker(&format!("{salt}-{run}"))).unwrap();
            spawn_offload_build(work.path(), &file, &fleet, &machines, &slots)
        })
        .collect();
    for run in runs {
        let out = run.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let (most, _, total) = poller.finish();
    eprintln!(
        "20 runs on 4 one-slot machines: {:.1} s, most builds at once per machine {most:?}, \
         in all {total}",
        started.elapsed().as_secs_f64()
    );
    // Never two builds at once on a machine, and the runs spread over the fleet: a run
    // that finds a machine's slot taken by another places its build elsewhere instead
    // of queueing there (before that, all twenty waited for the first machine).
    for &i in &machines {
        let n = most.get(&fleet.store(i)).copied().unwrap_or(0);
        assert_eq!(n, 1, "m{i}: {n} builds at once at most: {most:?}");
    }
    assert!(total >= 2, "never two machines busy at once: {most:?}");
}

/// One derivation that runs the marker, as `top`.
fn one_marker(salt: &str) -> String {
    format!(
        r#"{{ top = derivation {{
             name = "top"; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}";
             args = [ "-c" "sleep 1.37; mkdir $out" ];
           }}; }}"#
    )
}
