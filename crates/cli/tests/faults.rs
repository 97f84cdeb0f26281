//! Faults on a real sshd fleet, through the real `offload` binary: hosts that are down,
//! killed, silent, corrupt, unknown or chatty, and an interrupt. Each test checks the
//! outcome, then that the local store is sound (`nix-store --verify --check-contents`)
//! and that a second run builds nothing. See docs/faults.md.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use offload_test_support::{nix_command, nix_system, require_sshd_fleet, run_ok, SshFleet};

/// A scratch directory with one Nix file of fresh derivations, where offload runs.
struct Work {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Work {
    /// `leaf` and `top` (which needs the leaf), salted so that no store has them; each
    /// builder runs `script` first, with `@WORK@` there this directory (builds run
    /// without a sandbox, so they see it).
    fn new(tag: &str, script: &str) -> Work {
        let dir = tempfile::tempdir().unwrap();
        let script = script.replace("@WORK@", &dir.path().display().to_string());
        let salt = format!(
            "{tag}-{:?}-{}",
            std::time::SystemTime::now(),
            std::process::id()
        );
        let expr = format!(
            r#"let mk = name: dep: derivation {{
                 inherit name dep; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/bin:/usr/bin"; salt = "{salt}";
                 args = [ "-c" ''{script}
                   mkdir $out; echo $dep > $out/dep; echo $name > $out/name'' ];
               }};
             in mk "fault-top" (mk "fault-leaf" "")"#
        );
        let file = dir.path().join("default.nix");
        std::fs::write(&file, expr).unwrap();
        Work { dir, file }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes an executable `name` with `script` here; returns its path.
    fn script(&self, name: &str, script: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, script).unwrap();
        run_ok(Command::new("chmod").arg("+x").arg(&path));
        path
    }

    /// `offload build` of the file over `builders`, with the fleet's ssh config.
    fn build(&self, fleet: &SshFleet, builders: &str, extra: &[&str]) -> Output {
        self.command(fleet, builders, extra).output().unwrap()
    }

    fn command(&self, fleet: &SshFleet, builders: &str, extra: &[&str]) -> Command {
        let (name, opts) = fleet.ssh_opts();
        let mut cmd = common::offload(self.path());
        cmd.env(name, opts)
            .arg("build")
            .arg(&self.file)
            .args(["--builders", builders, "--no-out-link"])
            .args(["--option", "sandbox", "false"])
            .args(extra);
        cmd
    }

    /// The local store is sound, and a second run builds nothing: every output is here.
    fn assert_sound_and_complete(&self, fleet: &SshFleet, builders: &str) {
        run_ok(nix_command("nix-store").args(["--verify", "--check-contents"]));
        let again = self.build(fleet, builders, &[]);
        let stderr = text(&again.stderr);
        assert!(again.status.success(), "second run: {stderr}");
        assert!(
            stderr.contains("built 0 derivations"),
            "the second run builds nothing: {stderr}"
        );
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Machines-file entries for hosts `hosts` of the fleet, one slot each.
fn builders(fleet: &SshFleet, hosts: &[usize], query: &str) -> String {
    hosts
        .iter()
        .map(|&i| format!("{}{query} {} - 1 1", fleet.store_uri(i), nix_system()))
        .collect::<Vec<_>>()
        .join(";")
}

#[test]
fn a_host_down_at_start_is_named_once_and_skipped_and_with_all_down_this_machine_builds() {
    let Some(fleet) = require_sshd_fleet(2) else {
        return;
    };
    fleet.stop(0);
    let work = Work::new("down-at-start", "");
    let spec = builders(&fleet, &[0, 1], "");
    // -j0: the live host builds everything.
    let out = work.build(&fleet, &spec, &["-j0"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let down = fleet.alias(0);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(&format!("warning: {down} cannot be used")))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("connection refused"), "{stderr}");
    assert!(
        stderr.contains(&format!("builds per machine: {} 2", fleet.alias(1))),
        "{stderr}"
    );
    work.assert_sound_and_complete(&fleet, &spec);

    // Every builder down: this machine builds everything.
    fleet.stop(1);
    let work = Work::new("all-down", "");
    let started = Instant::now();
    let out = work.build(&fleet, &spec, &[]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("builds per machine: local 2"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "{stderr}");
    work.assert_sound_and_complete(&fleet, &spec);
}

/// Processes on this machine that a run in `work` started (they inherit its
/// `OFFLOAD_HISTORY`), by pid and command line.
fn processes_of(work: &Work) -> Vec<String> {
    let mark = format!(
        "OFFLOAD_HISTORY={}",
        work.path().join("history.sqlite").display()
    );
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|&b| b == 0).any(|v| v == mark.as_bytes()) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{} {}",
                entry.file_name().to_string_lossy(),
                text(&cmdline).replace('\0', " ")
            ));
        }
    }
    found
}

/// Waits up to `limit` for `ready`; says whether it came.
fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ready()
}

#[test]
fn sigint_or_sigterm_mid_build_stops_everything_exits_as_the_shell_would_and_leaves_no_orphans() {
    let Some(fleet) = require_sshd_fleet(1) else {
        return;
    };
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        // The leaf builds for a long time on the host; the signal comes while it does.
        let work = Work::new(
            &format!("signal-{signal}"),
            "if [ -e @WORK@/slow ]; then sleep 300; fi",
        );
        std::fs::write(work.path().join("slow"), "").unwrap();
        let spec = builders(&fleet, &[0], "");
        let mut child = work
            .command(&fleet, &spec, &["-j0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let building = wait_for(Duration::from_secs(30), || {
            fleet.session_processes(0).iter().any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.starts_with("sleep"))
            })
        });
        assert!(building, "the build never started on the host");
        // To offload's process alone, not its process group.
        let sent = Instant::now();
        run_ok(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string()),
        );
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert!(sent.elapsed() < Duration::from_secs(10), "{stderr}");
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        // Nothing of the run is left: no session here, no session or build there.
        let here = processes_of(&work);
        assert!(here.is_empty(), "{here:?}");
        let left = wait_for(Duration::from_secs(5), || {
            fleet.session_processes(0).is_empty()
        });
        assert!(left, "left on the host: {:?}", fleet.session_processes(0));
        // The next run builds what is missing: here, the whole graph.
        std::fs::remove_file(work.path().join("slow")).unwrap();
        let again = work.build(&fleet, &spec, &["-j0"]);
        assert!(again.status.success(), "{}", text(&again.stderr));
        work.assert_sound_and_complete(&fleet, &spec);
    }
}
