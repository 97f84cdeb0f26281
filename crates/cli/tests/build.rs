//! `offload build` end to end: the real binary, real Nix, a loopback fleet of chroot
//! stores (`ssh://localhost?remote-store=DIR`) plus the local machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use offload_test_support::{nix_available, NIX_CONFIG};

struct Fleet {
    dir: tempfile::TempDir,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        // Builds on loopback machines run without build users: they are shared by every
        // store on this machine, and Nix kills all processes of a build user around a build.
        let wrapper = dir.path().join("nix-store-fleet");
        std::fs::write(
            &wrapper,
            "#!/bin/sh\nexec nix-store --option build-users-group '' \"$@\"\n",
        )
        .unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&wrapper)
            .status()
            .unwrap();
        Fleet { dir }
    }

    fn uri(&self, i: usize) -> String {
        format!(
            "ssh://localhost?remote-store={}/m{i}&remote-program={}/nix-store-fleet",
            self.dir.path().display(),
            self.dir.path().display()
        )
    }

    /// Machines-file spec for `n` builders with `slots` each.
    fn spec(&self, n: usize, slots: u32) -> String {
        (1..=n)
            .map(|i| format!("{} x86_64-linux - {slots} 1", self.uri(i)))
            .collect::<Vec<_>>()
            .join(";")
    }

    fn store(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}"))
    }
}

fn offload(args: &[&str], cwd: &Path, history: &Path, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_offload"));
    cmd.current_dir(cwd)
        .env(NIX_CONFIG.0, NIX_CONFIG.1)
        .env("OFFLOAD_HISTORY", history)
        .args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn salt() -> String {
    format!("{:?}-{}", std::time::SystemTime::now(), std::process::id())
}

/// A small layered graph: 4 leaves, 3 middles over them, one top.
fn graph_expr(salt: &str, fail: &str) -> String {
    format!(
        r#"let mk = name: deps: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin:/usr/bin";
             salt = "{salt}";
             args = [ "-c" "if [ $name = '{fail}' ]; then for i in $(seq 1 30); do echo log line $i; done; exit 3; fi; sleep 0.2; mkdir $out; echo $deps > $out/deps; echo $name > $out/name" ];
           }};
           leaves = builtins.genList (i: mk "leaf${{toString i}}" []) 4;
           mids = builtins.genList (i: mk "mid${{toString i}}" [ (builtins.elemAt leaves i) (builtins.elemAt leaves (i + 1)) ]) 3;
           other = mk "independent" [];
         in {{ top = mk "top" mids; inherit other; }}"#
    )
}

fn instantiate(file: &Path, attr: &str) -> String {
    let out = Command::new("nix-instantiate")
        .env(NIX_CONFIG.0, NIX_CONFIG.1)
        .arg(file)
        .args(["-A", attr])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

#[test]
fn builds_what_nix_build_would_with_the_same_paths() {
    if !nix_available() {
        return;
    }
    let fleet = Fleet::new();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("graph.nix");
    std::fs::write(&file, graph_expr(&salt(), "none")).unwrap();
    let spec = fleet.spec(2, 2);
    let out = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "-A",
            "top",
            "--builders",
            &spec,
            "-j",
            "2",
            "--trace",
            "trace.json",
        ],
        work.path(),
        &work.path().join("h.sqlite"),
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The trace has one event per build (4 leaves, 3 middles, the top), each on a named
    // machine and no shorter than the builder's 0.2 s sleep.
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("trace.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let builds: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(builds.len(), 8, "{trace}");
    assert!(
        builds
            .iter()
            .all(|e| e["dur"].as_f64().unwrap() >= 200_000.0),
        "{trace}"
    );
    let machines = events.iter().filter(|e| e["ph"] == "M").count();
    assert_eq!(machines, 3, "local and two builders: {trace}");
    // stdout: the output paths, exactly those of the derivation nix-instantiate writes.
    let drv = instantiate(&file, "top");
    let expected = Command::new("nix-store")
        .args(["-q", "--outputs", &drv])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), text(&expected.stdout));
    let top = text(&out.stdout).trim().to_string();
    assert!(stderr.contains("built 8 derivations"), "{stderr}");
    // Work went to the builders and the local machine alike.
    assert!(stderr.contains("local "), "{stderr}");
    assert!(stderr.contains("/m1") || stderr.contains("/m2"), "{stderr}");
    // The closure is in the local store and verifies; ./result is a GC root.
    let verify = Command::new("nix-store")
        .arg("--verify-path")
        .args(
            text(
                &Command::new("nix-store")
                    .args(["-qR", &top])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .lines(),
        )
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify.stderr));
    assert_eq!(
        std::fs::read_link(work.path().join("result")).unwrap(),
        PathBuf::from(&top)
    );
    let roots = Command::new("nix-store")
        .args(["--gc", "--print-roots"])
        .output()
        .unwrap();
    assert!(text(&roots.stdout).contains(&work.path().join("result").display().to_string()));
    // Its log is where `nix-store -l` finds it.
    let log = Command::new("nix-store")
        .args(["-l", &drv])
        .output()
        .unwrap();
    assert!(log.status.success(), "{}", text(&log.stderr));
    // A second run has nothing to build.
    let again = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "-A",
            "top",
            "--builders",
            &spec,
            "--no-out-link",
        ],
        work.path(),
        &work.path().join("h.sqlite"),
        &[],
    );
    assert!(again.status.success());
    assert!(
        text(&again.stderr).contains("built 0 derivations"),
        "{}",
        text(&again.stderr)
    );
    // Outputs built on a builder and needed by another moved between them: every
    // builder store that holds something verifies clean.
    for i in 1..=2 {
        if fleet.store(i).exists() {
            let v = Command::new("nix-store")
                .env(NIX_CONFIG.0, NIX_CONFIG.1)
                .arg("--store")
                .arg(fleet.store(i))
                .args(["--verify", "--check-contents"])
                .output()
                .unwrap();
            assert!(
                v.status.success() && !text(&v.stderr).contains("error"),
                "{}",
                text(&v.stderr)
            );
        }
    }
}

#[test]
fn a_failure_names_the_derivation_machine_and_log_and_keep_going_goes_on() {
    if !nix_available() {
        return;
    }
    let fleet = Fleet::new();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("graph.nix");
    std::fs::write(&file, graph_expr(&salt(), "mid1")).unwrap();
    let spec = fleet.spec(1, 2);
    let hist = work.path().join("h.sqlite");
    let out = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "-A",
            "top",
            "--builders",
            &spec,
            "-j",
            "1",
            "--no-out-link",
        ],
        work.path(),
        &hist,
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("mid1.drv") && stderr.contains("exit code 3"),
        "{stderr}"
    );
    let report = stderr.split_once("error:").map(|(_, r)| r).unwrap_or("");
    assert!(
        report.contains("> log line 30") && report.contains("> log line 6\n"),
        "{stderr}"
    );
    assert!(
        !report.contains("> log line 5\n"),
        "more than 25 lines: {stderr}"
    );
    assert!(report.contains("last 25 log lines"), "{stderr}");
    assert!(stderr.contains("(on "), "{stderr}");

    // With -k everything that does not depend on mid1 is built.
    let out = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "-A",
            "top",
            "-A",
            "other",
            "--builders",
            &spec,
            "-j",
            "1",
            "-k",
            "--no-out-link",
        ],
        work.path(),
        &hist,
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("dependency") && stderr.contains("mid1.drv failed"),
        "{stderr}"
    );
    let other = instantiate(&file, "other");
    let outs = text(
        &Command::new("nix-store")
            .args(["-q", "--outputs", &other])
            .output()
            .unwrap()
            .stdout,
    );
    let valid = Command::new("nix-store")
        .arg("--check-validity")
        .arg(outs.trim())
        .status()
        .unwrap();
    assert!(
        valid.success(),
        "the independent derivation was not built with -k"
    );
}

#[test]
fn a_derivation_no_machine_can_build_fails_at_once() {
    if !nix_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("arm.nix");
    std::fs::write(&file, format!(r#"derivation {{ name = "arm-only"; system = "aarch64-linux"; builder = "/bin/sh"; salt = "{}"; }}"#, salt())).unwrap();
    let started = std::time::Instant::now();
    let out = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "--builders",
            "",
            "--no-out-link",
        ],
        work.path(),
        &work.path().join("h.sqlite"),
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no machine can build it")
            && stderr.contains("aarch64-linux")
            && stderr.contains("local"),
        "{stderr}"
    );
    assert!(started.elapsed().as_secs() < 20);
}

#[test]
fn substitutable_outputs_are_fetched_not_built() {
    if !nix_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("graph.nix");
    std::fs::write(&file, graph_expr(&salt(), "none")).unwrap();
    // Put the leaves in a file:// binary cache, then drop them from the local store.
    let cache = work.path().join("cache");
    let build = Command::new("nix-build")
        .env(NIX_CONFIG.0, NIX_CONFIG.1)
        .arg("--no-out-link")
        .arg("-E")
        .arg(format!(
            "builtins.concatMap (m: m.deps) (import {}).top.deps",
            file.display()
        ))
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", text(&build.stderr));
    let mut leaf_outs: Vec<String> = text(&build.stdout).lines().map(str::to_string).collect();
    leaf_outs.sort();
    leaf_outs.dedup();
    assert_eq!(leaf_outs.len(), 4);
    let copy = Command::new("nix")
        .env(NIX_CONFIG.0, NIX_CONFIG.1)
        .args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
        ])
        .arg(format!("file://{}", cache.display()))
        .args(&leaf_outs)
        .output()
        .unwrap();
    assert!(copy.status.success(), "{}", text(&copy.stderr));
    let del = Command::new("nix-store")
        .arg("--delete")
        .args(&leaf_outs)
        .output()
        .unwrap();
    assert!(del.status.success(), "{}", text(&del.stderr));

    let cfg = format!(
        "substituters = file://{}\nrequire-sigs = false",
        cache.display()
    );
    let out = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "-A",
            "top",
            "--builders",
            "",
            "-j",
            "2",
            "--no-out-link",
        ],
        work.path(),
        &work.path().join("h.sqlite"),
        &[("NIX_CONFIG", &cfg)],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("fetching 4 paths"), "{stderr}");
    assert!(stderr.contains("built 4 derivations"), "{stderr}");
    assert!(
        !stderr.contains("leaf0.drv' on"),
        "a cached leaf was built: {stderr}"
    );
}

#[test]
fn builds_of_a_machine_that_dies_run_elsewhere() {
    if !nix_available() {
        return;
    }
    let fleet = Fleet::new();
    // m1's sessions die half a second in, whatever they are doing.
    let dying = fleet.dir.path().join("nix-store-dying");
    std::fs::write(
        &dying,
        "#!/bin/sh\nexec timeout -s KILL 0.5 nix-store --option build-users-group '' \"$@\"\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&dying)
        .status()
        .unwrap();
    let spec = format!(
        "ssh://localhost?remote-store={}/m1&remote-program={} x86_64-linux - 4 4;{} x86_64-linux - 2 1",
        fleet.dir.path().display(),
        dying.display(),
        fleet.uri(2)
    );
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("slow.nix");
    std::fs::write(
        &file,
        format!(
            r#"map (i: derivation {{ name = "slow${{toString i}}"; system = builtins.currentSystem; builder = "/bin/sh";
                 salt = "{}"; args = [ "-c" "/bin/sleep 1; echo > $out" ]; }}) [ 1 2 3 4 ]"#,
            salt()
        ),
    )
    .unwrap();
    let out = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "--builders",
            &spec,
            "-j",
            "0",
            "--no-out-link",
        ],
        work.path(),
        &work.path().join("h.sqlite"),
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("build lost, will retry elsewhere"),
        "{stderr}"
    );
    assert!(stderr.contains("built 4 derivations"), "{stderr}");
    assert!(
        stderr.contains("/m2 4"),
        "all four should end up on m2: {stderr}"
    );
    assert_eq!(text(&out.stdout).lines().count(), 4);
}

/// An output built on one builder and needed by builds on others is kept in the local
/// store on its way, so it crosses the first builder's link once; an output needed by
/// one build only is not.
#[test]
fn an_input_needed_by_several_builds_stops_at_the_local_store() {
    if !nix_available() {
        return;
    }
    let fleet = Fleet::new();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("fanout.nix");
    let expr = format!(
        r#"let mk = name: deps: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin:/usr/bin";
             salt = "{}";
             args = [ "-c" "sleep 0.3; mkdir $out; echo built > $out/log" ];
           }};
           # Outputs do not refer to their inputs: only the top's closure comes back.
           base = mk "fanout-base" [];
           users = builtins.genList (i: mk "fanout-user${{toString i}}" [ base ]) 2;
         in {{ inherit base; top = mk "fanout-top" users; }}"#,
        salt()
    );
    std::fs::write(&file, expr).unwrap();
    // No local builds, two builders of one slot: the two users run on both builders.
    let out = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "-A",
            "top",
            "--builders",
            &fleet.spec(2, 1),
            "-j",
            "0",
            "--no-out-link",
        ],
        work.path(),
        &work.path().join("h.sqlite"),
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let base_drv = instantiate(&file, "base");
    let base_out = text(
        &Command::new("nix-store")
            .args(["-q", "--outputs", &base_drv])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_string();
    let valid_locally = Command::new("nix-store")
        .env(NIX_CONFIG.0, NIX_CONFIG.1)
        .args(["--check-validity", &base_out])
        .status()
        .unwrap()
        .success();
    assert!(stderr.contains("on 'localhost:"), "{stderr}");
    assert!(
        valid_locally,
        "{base_out} is not in the local store\n{stderr}"
    );
}
