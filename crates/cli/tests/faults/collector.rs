//! A builder's own housekeeping, on a real sshd fleet through the real `offload`
//! binary: its garbage collector running while builds rely on its store (an input it
//! already had, inputs sent to it, through `offload build` and through `offload hook`
//! without the agent), and a store without room for a build's inputs. See
//! docs/faults.md.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use offload_test_support::{
    assert_sound_and_nothing_rebuilt, nix_command, nix_system, require_sshd_fleet_with, run_ok,
    salt, text, write_executable, HostOptions, SshFleet,
};

/// What the late reader's build runs while its input waits, so the test knows when to
/// collect garbage on the builder.
const MARKER: &str = "sleep 3.29";

/// A scratch directory with `source/` (a directory, so a collected copy loses its file)
/// and these derivations, salted with `tag`:
/// - `late`: sleeps, then reads the source. Its environment names the source only in two
///   halves, so the collector cannot find the build's process holding it (Nix counts
///   store paths in a process's environment as roots).
/// - `graph`: eight builds in three layers, each reading the source and its inputs.
struct Work {
    dir: tempfile::TempDir,
    /// What `source/text` holds.
    salt: String,
    file: PathBuf,
    hook: PathBuf,
}

impl Work {
    fn new(tag: &str) -> Work {
        let dir = tempfile::tempdir().unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        std::fs::create_dir(dir.path().join("source")).unwrap();
        let salt = salt(tag);
        std::fs::write(dir.path().join("source/text"), &salt).unwrap();
        let expr = format!(
            r#"let
                 src = ./source; s = "${{src}}";
                 mk = name: deps: script: derivation {{
                   inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
                   PATH = "/bin:/usr/bin"; salt = "{salt}";
                   head = builtins.substring 0 20 s; tail = builtins.substring 20 200 s;
                   args = [ "-c" "${{script}}; mkdir $out; cat $head$tail/text > $out/text; for d in $deps; do cat $d/text >> $out/text; done" ];
                 }};
                 layer = n: deps: builtins.genList (i: mk "gc-${{n}}${{toString i}}" deps "true");
                 one = layer "a" [] 3; two = layer "b" one 3; three = layer "c" two 2;
               in {{
                 late = mk "late-reader" [] "{MARKER}";
                 graph = three;
               }}"#,
        );
        let file = dir.path().join("default.nix");
        std::fs::write(&file, expr).unwrap();
        let hook = dir.path().join("hook");
        // Without the agent: the hook opens its own session for the build.
        write_executable(
            &hook,
            &format!(
                "#!/bin/sh\nexport OFFLOAD_HISTORY={d}/history.sqlite OFFLOAD_SLOTS_DIR={d}/slots \
                 OFFLOAD_AGENT_SOCKET={d}/no-agent.sock\nexec {} hook \"$@\"\n",
                env!("CARGO_BIN_EXE_offload"),
                d = dir.path().display()
            ),
        );
        Work {
            dir,
            salt,
            file,
            hook,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The source, added to this machine's store (the path evaluation gives it).
    fn source(&self) -> String {
        let out = run_ok(
            nix_command("nix-store")
                .arg("--add")
                .arg(self.path().join("source")),
        );
        out.trim().to_string()
    }

    /// `offload build -A attr` on `builders` alone (`-j0`), started.
    fn offload(&self, fleet: &SshFleet, builders: &str, attr: &str) -> Child {
        let (name, opts) = fleet.ssh_opts();
        common::offload(self.path())
            .env(name, opts)
            .arg("build")
            .arg(&self.file)
            .args(["-A", attr, "-j0", "--builders", builders, "--no-out-link"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `nix-build -A attr` with offload's hook on `builders` alone (`-j0`), started.
    fn nix_build(&self, fleet: &SshFleet, builders: &str, attr: &str) -> Child {
        let (name, opts) = fleet.ssh_opts();
        nix_command("nix-build")
            .env(name, opts)
            .arg(&self.file)
            .args(["-A", attr, "-j0", "--builders", builders, "--no-out-link"])
            .arg("--option")
            .arg("build-hook")
            .arg(&self.hook)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// Copies `path` from this machine's store to host 0's, where nothing holds it (a
/// collector running there may take it at once).
fn place_on_builder(fleet: &SshFleet, path: &str) {
    let (name, opts) = fleet.ssh_opts();
    run_ok(
        nix_command("nix-copy-closure")
            .env(name, opts)
            .args(["--to", fleet.alias(0), path]),
    );
}

/// Waits until the marker process runs (the build sleeps, its input already there).
fn wait_for_marker(build: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = Command::new("pgrep")
            .args(["-fx", MARKER])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        if running {
            return;
        }
        if let Some(status) = build.try_wait().unwrap() {
            panic!("the build ended ({status}) before its input was waited on");
        }
        assert!(Instant::now() < deadline, "the marker never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the builder's garbage collector while the late reader waits on its input, and
/// checks that the collector did collect (a path nothing holds is gone) and that the
/// build still read its input.
fn collect_while_the_build_waits(fleet: &SshFleet, work: &Work, mut build: Child) -> Output {
    let garbage = work.path().join("garbage");
    std::fs::write(&garbage, salt("garbage")).unwrap();
    let garbage = run_ok(nix_command("nix-store").arg("--add").arg(&garbage));
    place_on_builder(fleet, garbage.trim());
    wait_for_marker(&mut build);
    fleet.ssh(0, "nix-store --gc").unwrap();
    assert!(
        !fleet.is_valid(0, garbage.trim()),
        "the collector did not run"
    );
    build.wait_with_output().unwrap()
}

fn spec(fleet: &SshFleet) -> String {
    format!("{} {} - 2 1", fleet.store_uri(0), nix_system())
}

#[test]
fn an_input_the_builder_already_had_is_held_while_its_build_runs() {
    let Some(fleet) = require_sshd_fleet_with(&[HostOptions::default()]) else {
        return;
    };
    let work = Work::new("gc-held");
    let source = work.source();
    place_on_builder(&fleet, &source);
    assert!(fleet.is_valid(0, &source));
    let build = work.offload(&fleet, &spec(&fleet), "late");
    let out = collect_while_the_build_waits(&fleet, &work, build);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built = text(&out.stdout);
    let read = std::fs::read_to_string(Path::new(built.trim()).join("text")).unwrap();
    assert_eq!(read, work.salt);
}

#[test]
fn a_hook_build_without_the_agent_holds_an_input_the_builder_already_had() {
    let Some(fleet) = require_sshd_fleet_with(&[HostOptions::default()]) else {
        return;
    };
    let work = Work::new("gc-hook");
    let source = work.source();
    place_on_builder(&fleet, &source);
    assert!(fleet.is_valid(0, &source));
    let build = work.nix_build(&fleet, &spec(&fleet), "late");
    let out = collect_while_the_build_waits(&fleet, &work, build);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("late-reader"), "{stderr}");
    let built = text(&out.stdout);
    let read = std::fs::read_to_string(Path::new(built.trim()).join("text")).unwrap();
    assert_eq!(read, work.salt);
}

/// A collector looping on the builder's store for whole runs fails no build, through
/// `offload build` and through the hook without the agent, three runs each, the source
/// already on the builder for half of them.
#[test]
fn a_collector_looping_on_the_builder_fails_no_build_in_three_runs() {
    let Some(fleet) = require_sshd_fleet_with(&[HostOptions::default()]) else {
        return;
    };
    // Its own ssh session, killed at the end: the loop runs in the host's namespace and
    // ends with the session that started it (sshd sends no hangup without a terminal).
    let collector = Command::new("ssh")
        .arg("-F")
        .arg(fleet.ssh_config())
        .arg(fleet.alias(0))
        .arg("while kill -0 $PPID 2>/dev/null; do nix-store --gc >/dev/null 2>&1; done")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _stop = KillOnDrop(collector);
    for run in 0..3 {
        for hook in [false, true] {
            let tag = format!("gc-loop-{run}-{hook}");
            let work = Work::new(&tag);
            if run % 2 == 1 {
                place_on_builder(&fleet, &work.source());
            }
            let build = if hook {
                work.nix_build(&fleet, &spec(&fleet), "graph")
            } else {
                work.offload(&fleet, &spec(&fleet), "graph")
            };
            let out = build.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "run {run} (hook: {hook}) failed:\n{}",
                text(&out.stderr)
            );
            for top in text(&out.stdout).lines() {
                let read = std::fs::read_to_string(Path::new(top).join("text")).unwrap();
                assert!(read.starts_with(&work.salt), "{top}: {read}");
            }
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_builder_without_room_for_the_inputs_is_passed_over_before_anything_is_sent() {
    let small = HostOptions {
        store_mib: Some(20),
        ..HostOptions::default()
    };
    let Some(fleet) = require_sshd_fleet_with(&[small]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // 24 MiB of input for a store of 20 MiB.
    let blob = dir.path().join("blob");
    run_ok(
        Command::new("head")
            .args(["-c", "25165824", "/dev/urandom"])
            .stdout(std::fs::File::create(&blob).unwrap()),
    );
    let file = dir.path().join("default.nix");
    std::fs::write(
        &file,
        format!(
            r#"derivation {{
                 name = "needs-room"; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/bin:/usr/bin"; salt = "{}"; blob = ./blob;
                 args = [ "-c" "wc -c < $blob > $out" ];
               }}"#,
            salt("no-room")
        ),
    )
    .unwrap();
    // The builder is four times as fast as this machine: the plan sends the build there.
    let builders = format!("{} {} - 1 4", fleet.store_uri(0), nix_system());
    let (name, opts) = fleet.ssh_opts();
    let started = Instant::now();
    let out = common::offload(dir.path())
        .env(name, opts)
        .arg("build")
        .arg(&file)
        .args(["-j1", "--builders", &builders, "--no-out-link"])
        .args(["--option", "sandbox", "false"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!("the run took {took:?}:\n{stderr}");
    let alias = fleet.alias(0);
    let warning = stderr
        .lines()
        .find(|l| l.starts_with(&format!("warning: {alias} cannot be used")))
        .unwrap_or_else(|| panic!("no warning names {alias}: {stderr}"));
    assert!(
        warning.contains("free, less than the 24.0 MiB of inputs"),
        "{warning}"
    );
    assert!(!stderr.contains("out of space"), "{stderr}");
    assert!(stderr.contains("builds per machine: local 1"), "{stderr}");
    let built = text(&out.stdout);
    assert_eq!(
        std::fs::read_to_string(built.trim()).unwrap().trim(),
        "25165824"
    );
    // Nothing went there: its store holds no blob, not even a partial one.
    let used = fleet.ssh(0, "du -sk /nix/store | cut -f1").unwrap();
    let used: u64 = used.trim().parse().unwrap();
    assert!(used < 4096, "{used} KiB in the builder's store");
    let again = common::offload(dir.path())
        .env(fleet.ssh_opts().0, fleet.ssh_opts().1)
        .arg("build")
        .arg(&file)
        .args(["-j1", "--builders", &builders, "--no-out-link"])
        .output()
        .unwrap();
    assert_sound_and_nothing_rebuilt(&again);
}
