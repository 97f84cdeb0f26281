//! Faults on a real sshd fleet, through the real `offload` binary: hosts that are down,
//! killed, silent, corrupt, unknown or chatty, and an interrupt. Each test checks the
//! outcome, then that the local store is sound (`nix-store --verify --check-contents`)
//! and that a second run builds nothing. See docs/faults.md.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use offload_test_support::{
    assert_sound_and_nothing_rebuilt, nix_command, nix_system, require_sshd_fleet, run_ok, SshFleet,
};

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

    /// The output path of `top`, from an evaluation.
    fn top_output(&self) -> String {
        let out = run_ok(
            nix_command("nix-instantiate")
                .args(["--eval", "-E"])
                .arg(format!("(import {}).outPath", self.file.display())),
        );
        out.trim().trim_matches('"').to_string()
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes an executable `name` with `script` here; returns its path.
    fn script(&self, name: &str, script: &str) -> PathBuf {
        let path = self.path().join(name);
        offload_test_support::write_executable(&path, script);
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
        assert_sound_and_nothing_rebuilt(&self.build(fleet, builders, &[]));
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
        let child = work
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

fn cmdline(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// On host 0 or 1, the serve process running the build's `sleep`: the host and pid.
fn serve_process_building(fleet: &SshFleet) -> Option<(usize, u32)> {
    (0..2).find_map(|i| {
        let sleep = fleet
            .session_processes(i)
            .into_iter()
            .find(|&pid| cmdline(pid).starts_with("sleep"))?;
        let mut pid = parent(sleep)?;
        while !cmdline(pid).starts_with("nix-store\0--serve") {
            pid = parent(pid).filter(|&p| p > 1)?;
        }
        Some((i, pid))
    })
}

#[test]
fn a_builder_whose_nix_store_is_killed_mid_build_loses_the_build_to_another() {
    let Some(fleet) = require_sshd_fleet(2) else {
        return;
    };
    let work = Work::new("killed", "if [ -e @WORK@/slow ]; then sleep 300; fi");
    std::fs::write(work.path().join("slow"), "").unwrap();
    let spec = builders(&fleet, &[0, 1], "");
    let child = work
        .command(&fleet, &spec, &["-j0", "--retry-backoff", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut building = None;
    assert!(wait_for(Duration::from_secs(30), || {
        building = serve_process_building(&fleet);
        building.is_some()
    }));
    // That serve process only: other hosts' share this process table.
    let (host, pid) = building.unwrap();
    run_ok(Command::new("kill").arg("-KILL").arg(pid.to_string()));
    std::fs::remove_file(work.path().join("slow")).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("warning: {} cannot be used", fleet.alias(host))),
        "{stderr}"
    );
    let other = fleet.alias(1 - host);
    assert!(
        stderr.contains(&format!("builds per machine: {other} 2")),
        "{stderr}"
    );
    let top = text(&out.stdout).trim().to_string();
    assert_eq!(top, work.top_output());
    assert_eq!(
        std::fs::read_to_string(format!("{top}/name")).unwrap(),
        "fault-top\n"
    );
    work.assert_sound_and_complete(&fleet, &spec);
}

/// A `remote-program` for host `host` that runs `nix-store` behind `filter` (a Python
/// program reading `stdin` or `stdout` of the serve session, by `side`).
fn filtered_program(work: &Work, name: &str, side: &str, filter: &str) -> PathBuf {
    let py = work.path().join(format!("{name}.py"));
    std::fs::write(&py, filter).unwrap();
    let pipeline = match side {
        "stdin" => format!("python3 {} | nix-store \"$@\"", py.display()),
        _ => format!("nix-store \"$@\" | python3 {}", py.display()),
    };
    work.script(name, &format!("#!/bin/sh\n{pipeline}\n"))
}

#[test]
fn a_host_that_stops_answering_mid_transfer_is_noticed_within_the_stall_timeout() {
    let Some(fleet) = require_sshd_fleet(2) else {
        return;
    };
    // A 4 MB input: its transfer to the first host stops after 1 MB, when that host's
    // sshd sessions freeze (SIGSTOP), as a host that hangs or whose link dies.
    let work = Work::new("stall", "cat $src > /dev/null");
    let big = work.path().join("big");
    let noise: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&big, noise).unwrap();
    let expr = std::fs::read_to_string(&work.file).unwrap().replace(
        "inherit name dep;",
        &format!("inherit name dep; src = {};", big.display()),
    );
    std::fs::write(&work.file, expr).unwrap();
    let listener = fleet.listener(0).unwrap();
    let freeze = format!(
        r#"import os, signal
seen = 0
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    seen += len(chunk)
    if seen > 1 << 20:
        pid = os.getppid()
        while pid > 1 and pid != {listener}:
            stat = open(f"/proc/{{pid}}/stat").read()
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            if stat[stat.index("(") + 1:stat.rindex(")")] == "sshd":
                os.kill(pid, signal.SIGSTOP)
            pid = parent
        os.kill(os.getpid(), signal.SIGSTOP)
    while chunk:
        chunk = chunk[os.write(1, chunk):]
"#
    );
    let program = filtered_program(&work, "freeze", "stdin", &freeze);
    // The freezing host is twice as fast: the plan sends the build there first.
    let spec = format!(
        "{}?remote-program={} {} - 1 2;{}",
        fleet.store_uri(0),
        program.display(),
        nix_system(),
        builders(&fleet, &[1], "")
    );
    let started = Instant::now();
    let out = work.build(
        &fleet,
        &spec,
        &["-j0", "--stall-timeout", "3", "--retry-backoff", "60"],
    );
    let took = started.elapsed();
    fleet.signal_sessions(0, "CONT");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!("a frozen host was left behind after {took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}: {stderr}");
    assert!(
        stderr.contains(&format!("warning: {} cannot be used", fleet.alias(0))),
        "{stderr}"
    );
    // The frozen host is named with what happened, not the store the NAR came from.
    assert!(
        stderr.contains(&format!(
            "ssh to {} gave up: the host stopped answering",
            fleet.store_uri(0)
        )) || stderr.contains("the host stopped answering (no reply to keepalives)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("builds per machine: {} 2", fleet.alias(1))),
        "{stderr}"
    );
    work.assert_sound_and_complete(&fleet, &builders(&fleet, &[1], ""));
}

#[test]
fn a_corrupted_nar_stream_is_rejected_and_nothing_is_registered() {
    let Some(fleet) = require_sshd_fleet(1) else {
        return;
    };
    let work = Work::new("corrupt", "");
    // Every byte of the output's `name` file goes through the stream once: flip one.
    let flip = r#"import os
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    chunk = chunk.replace(b"fault-top\n", b"fault-tOp\n")
    while chunk:
        chunk = chunk[os.write(1, chunk):]
"#;
    let program = filtered_program(&work, "flip", "stdout", flip);
    let spec = builders(
        &fleet,
        &[0],
        &format!("?remote-program={}", program.display()),
    );
    let out = work.build(&fleet, &spec, &["-j0"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not match its recorded"), "{stderr}");
    let top = work.top_output();
    let valid = nix_command("nix-store")
        .args(["--check-validity", &top])
        .status()
        .unwrap();
    assert!(!valid.success(), "a corrupted path was registered");
    assert!(
        !Path::new(&top).exists(),
        "a corrupted path was left in the store"
    );
    run_ok(nix_command("nix-store").args(["--verify", "--check-contents"]));
    // Without the corruption the same outputs come home, and then nothing is built.
    let clean = builders(&fleet, &[0], "");
    let out = work.build(&fleet, &clean, &["-j0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    work.assert_sound_and_complete(&fleet, &clean);
}

#[test]
fn a_host_key_that_does_not_match_is_refused_before_anything_is_sent() {
    let Some(fleet) = require_sshd_fleet(1) else {
        return;
    };
    let work = Work::new("hostkey", "");
    let key = work.path().join("other");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(&key),
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let public: Vec<&str> = public.split_whitespace().take(2).collect();
    let b64 = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s' '{}' | base64 -w0", public.join(" "))),
    );
    let spec = format!("{} {} - 1 1 - - {b64}", fleet.store_uri(0), nix_system());
    let out = work.build(&fleet, &spec, &["-j0", "--quarantine-after", "1"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the host key is unknown or does not match"),
        "{stderr}"
    );
    assert!(
        stderr.contains("offload never turns host-key checking off"),
        "{stderr}"
    );
    let received = fleet
        .ssh(0, "ls /nix/store | grep -c fault- || true")
        .unwrap();
    assert_eq!(received.trim(), "0", "nothing reached the host");
    run_ok(nix_command("nix-store").args(["--verify", "--check-contents"]));
}

#[test]
fn a_login_script_that_prints_to_stdout_is_named_with_the_fix() {
    let Some(fleet) = require_sshd_fleet(1) else {
        return;
    };
    let work = Work::new("banner", "");
    let program = work.script(
        "chatty",
        "#!/bin/sh\necho 'Welcome to the build farm!'\nexec nix-store \"$@\"\n",
    );
    let spec = builders(
        &fleet,
        &[0],
        &format!("?remote-program={}", program.display()),
    );
    let started = Instant::now();
    let out = work.build(&fleet, &spec, &["-j0"]);
    let took = started.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("printed text before the Nix serve protocol started"),
        "{stderr}"
    );
    assert!(stderr.contains("Welcome to the build farm!"), "{stderr}");
    assert!(stderr.contains("[[ $- == *i* ]]"), "{stderr}");
    // The same answer would come again: the host is not retried in this run, and no
    // quarantine is kept for it (the next run asks again, and is answered at once).
    assert!(stderr.contains("not tried again in this run"), "{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}\n{stderr}");
    run_ok(nix_command("nix-store").args(["--verify", "--check-contents"]));
    // Once fixed, it builds, and then nothing is left to build.
    let clean = builders(&fleet, &[0], "");
    let out = work.build(&fleet, &clean, &["-j0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    work.assert_sound_and_complete(&fleet, &clean);
}
