//! `offload build` end to end: the real binary, real Nix, a loopback fleet of chroot
//! stores (`ssh://localhost?remote-store=DIR`) plus the local machine.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use offload_test_support::{nix_command, nix_system, require_nix, run_ok};
use offload_test_support::{salt, text};

struct Fleet {
    dir: tempfile::TempDir,
}

impl Fleet {
    fn new() -> Fleet {
        let fleet = Fleet {
            dir: tempfile::tempdir().unwrap(),
        };
        // Builds on loopback machines run without build users: they are shared by every
        // store on this machine, and Nix kills all processes of a build user around a build.
        fleet.remote_program("nix-store-fleet", "");
        fleet
    }

    /// Writes a `remote-program` that runs `nix-store` without build users, behind
    /// `prefix` (a command that wraps it); returns its path.
    fn remote_program(&self, name: &str, prefix: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        offload_test_support::write_executable(
            &path,
            &format!("#!/bin/sh\nexec {prefix}nix-store --option build-users-group '' \"$@\"\n"),
        );
        path
    }

    /// The store URI of machine `i`, whose sessions run `program`.
    fn uri_with(&self, i: usize, program: &Path) -> String {
        format!(
            "ssh://localhost?remote-store={}/m{i}&remote-program={}",
            self.dir.path().display(),
            program.display()
        )
    }

    fn uri(&self, i: usize) -> String {
        self.uri_with(i, &self.dir.path().join("nix-store-fleet"))
    }

    /// Machines-file spec for `n` builders with `slots` each, of this machine's system.
    fn spec(&self, n: usize, slots: u32) -> String {
        (1..=n)
            .map(|i| format!("{} {} - {slots} 1", self.uri(i), nix_system()))
            .collect::<Vec<_>>()
            .join(";")
    }

    fn store(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}"))
    }
}

/// A scratch directory holding one Nix file, where `offload build` runs.
struct Work {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Work {
    fn new(name: &str, expr: &str) -> Work {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(name);
        std::fs::write(&file, expr).unwrap();
        Work { dir, file }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `offload build FILE ARGS…`, with `env` added to its environment.
    fn build_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = common::offload(self.path());
        cmd.arg("build").arg(&self.file).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    fn build(&self, args: &[&str]) -> Output {
        self.build_with_env(args, &[])
    }

    /// The `.drv` of attribute `attr` of the file, as nix-instantiate writes it.
    fn instantiate(&self, attr: &str) -> String {
        run_ok(
            nix_command("nix-instantiate")
                .arg(&self.file)
                .args(["-A", attr]),
        )
        .trim()
        .to_string()
    }

    /// The output paths of attribute `attr`.
    fn outputs(&self, attr: &str) -> String {
        let drv = self.instantiate(attr);
        run_ok(nix_command("nix-store").args(["-q", "--outputs", &drv]))
            .trim()
            .to_string()
    }
}

fn is_valid_locally(path: &str) -> bool {
    nix_command("nix-store")
        .args(["--check-validity", path])
        .status()
        .unwrap()
        .success()
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

#[test]
fn builds_what_nix_build_would_with_the_same_paths() {
    if !require_nix() {
        return;
    }
    let fleet = Fleet::new();
    let work = Work::new("graph.nix", &graph_expr(&salt("build"), "none"));
    let spec = fleet.spec(2, 2);
    let out = work.build(&[
        "-A",
        "top",
        "--builders",
        &spec,
        "-j",
        "2",
        "--trace",
        "trace.json",
    ]);
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
    let top = work.outputs("top");
    assert_eq!(text(&out.stdout), format!("{top}\n"));
    assert!(stderr.contains("built 8 derivations"), "{stderr}");
    // Work went to the builders and the local machine alike.
    assert!(stderr.contains("local "), "{stderr}");
    assert!(stderr.contains("/m1") || stderr.contains("/m2"), "{stderr}");
    // The closure is in the local store and verifies; ./result is a GC root.
    let closure = run_ok(nix_command("nix-store").args(["-qR", &top]));
    run_ok(
        nix_command("nix-store")
            .arg("--verify-path")
            .args(closure.lines()),
    );
    assert_eq!(
        std::fs::read_link(work.path().join("result")).unwrap(),
        PathBuf::from(&top)
    );
    let roots = run_ok(nix_command("nix-store").args(["--gc", "--print-roots"]));
    assert!(roots.contains(&work.path().join("result").display().to_string()));
    // Its log is where `nix-store -l` finds it.
    run_ok(nix_command("nix-store").args(["-l", &work.instantiate("top")]));
    // A second run has nothing to build.
    let again = work.build(&["-A", "top", "--builders", &spec, "--no-out-link"]);
    let stderr = text(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("built 0 derivations"), "{stderr}");
    // Outputs built on a builder and needed by another moved between them: every
    // builder store that holds something verifies clean.
    for i in 1..=2 {
        if fleet.store(i).exists() {
            let v = nix_command("nix-store")
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
    if !require_nix() {
        return;
    }
    let fleet = Fleet::new();
    let work = Work::new("graph.nix", &graph_expr(&salt("build"), "mid1"));
    let spec = fleet.spec(1, 2);
    let out = work.build(&["-A", "top", "--builders", &spec, "-j", "1", "--no-out-link"]);
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
    let out = work.build(&[
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
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("dependency") && stderr.contains("mid1.drv failed"),
        "{stderr}"
    );
    assert!(
        is_valid_locally(&work.outputs("other")),
        "the independent derivation was not built with -k"
    );
}

#[test]
fn a_derivation_no_machine_can_build_fails_at_once() {
    if !require_nix() {
        return;
    }
    // A real Nix system, but not one this machine (or any test machine) builds for.
    let expr = format!(
        r#"derivation {{ name = "mips-only"; system = "mips64el-linux"; builder = "/bin/sh"; salt = "{}"; }}"#,
        salt("build")
    );
    let work = Work::new("mips.nix", &expr);
    let started = std::time::Instant::now();
    let out = work.build(&["--builders", "", "--no-out-link"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no machine can build it")
            && stderr.contains("mips64el-linux")
            && stderr.contains("local"),
        "{stderr}"
    );
    assert!(started.elapsed().as_secs() < 20);
}

#[test]
fn substitutable_outputs_are_fetched_not_built() {
    if !require_nix() {
        return;
    }
    let work = Work::new("graph.nix", &graph_expr(&salt("build"), "none"));
    // Put the leaves in a file:// binary cache, then drop them from the local store.
    let cache = work.path().join("cache");
    let built = run_ok(
        nix_command("nix-build")
            .arg("--no-out-link")
            .arg("-E")
            .arg(format!(
                "builtins.concatMap (m: m.deps) (import {}).top.deps",
                work.file.display()
            )),
    );
    let mut leaf_outs: Vec<&str> = built.lines().collect();
    leaf_outs.sort();
    leaf_outs.dedup();
    assert_eq!(leaf_outs.len(), 4);
    run_ok(
        nix_command("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--to",
            ])
            .arg(format!("file://{}", cache.display()))
            .args(&leaf_outs),
    );
    run_ok(nix_command("nix-store").arg("--delete").args(&leaf_outs));

    let cfg = format!(
        "substituters = file://{}\nrequire-sigs = false",
        cache.display()
    );
    let out = work.build_with_env(
        &["-A", "top", "--builders", "", "-j", "2", "--no-out-link"],
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
    if !require_nix() {
        return;
    }
    let fleet = Fleet::new();
    // m1's sessions die half a second in, whatever they are doing.
    let dying = fleet.remote_program("nix-store-dying", "timeout -s KILL 0.5 ");
    let spec = format!(
        "{} {system} - 4 4;{} {system} - 2 1",
        fleet.uri_with(1, &dying),
        fleet.uri(2),
        system = nix_system(),
    );
    let work = Work::new(
        "slow.nix",
        &format!(
            r#"map (i: derivation {{ name = "slow${{toString i}}"; system = builtins.currentSystem; builder = "/bin/sh";
                 salt = "{}"; args = [ "-c" "/bin/sleep 1; echo > $out" ]; }}) [ 1 2 3 4 ]"#,
            salt("build")
        ),
    );
    let out = work.build(&["--builders", &spec, "-j", "0", "--no-out-link"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot be used (") && stderr.contains("its builds go elsewhere"),
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
    if !require_nix() {
        return;
    }
    let fleet = Fleet::new();
    let expr = format!(
        r#"let mk = name: deps: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin:/usr/bin";
             salt = "{}";
             args = [ "-c" "sleep 0.3; mkdir $out; echo built > $out/log" ];
           }};
           # Outputs do not refer to their inputs: only the top's closure comes back.
           base = mk "fanout-base" [];
           users = builtins.genList (i: mk "fanout-user${{toString i}}" [ base ]) 2;
         in {{ inherit base users; top = mk "fanout-top" users; }}"#,
        salt("build")
    );
    let work = Work::new("fanout.nix", &expr);
    // No local builds, two builders of one slot: the two users run on both builders.
    let out = work.build(&[
        "-A",
        "top",
        "--builders",
        &fleet.spec(2, 1),
        "-j",
        "0",
        "--no-out-link",
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("on 'localhost:"), "{stderr}");
    let base_out = work.outputs("base");
    assert!(
        is_valid_locally(&base_out),
        "{base_out} is not in the local store\n{stderr}"
    );
    // Each user's output went to the top's builder alone: never into the local store.
    for i in 0..2 {
        let user = work.outputs(&format!("users.{i}"));
        assert!(!is_valid_locally(&user), "{user} stopped here\n{stderr}");
    }
}

#[test]
fn a_build_alone_on_a_builder_gets_all_its_cores_and_builds_sharing_it_split_them() {
    if !require_nix() {
        return;
    }
    let nproc: u32 = run_ok(&mut std::process::Command::new("nproc"))
        .trim()
        .parse()
        .unwrap();
    assert!(nproc >= 2, "this test needs a machine of 2 cores or more");
    let fleet = Fleet::new();
    // The builder's own configuration says one core: only offload's choice gives more.
    let program = fleet.dir.path().join("nix-store-one-core");
    offload_test_support::write_executable(
        &program,
        "#!/bin/sh\nNIX_CONFIG=\"$NIX_CONFIG\ncores = 1\"\nexport NIX_CONFIG\n\
         exec nix-store --option build-users-group '' \"$@\"\n",
    );
    let builder = format!("{} {} - 2 1", fleet.uri_with(1, &program), nix_system());
    let expr = format!(
        r#"let mk = name: derivation {{
             inherit name; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{}";
             args = [ "-c" "sleep 1; echo $NIX_BUILD_CORES > $out" ];
           }};
         in {{ lone = mk "cores-lone"; a = mk "cores-a"; b = mk "cores-b"; }}"#,
        salt("cores")
    );
    let work = Work::new("cores.nix", &expr);
    let cores_of = |attr: &str| -> u32 {
        let out = work.outputs(attr);
        std::fs::read_to_string(&out)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // Alone on the builder (no local builds): all of its cores, learned from the builder.
    let out = work.build(&[
        "-A",
        "lone",
        "--builders",
        &builder,
        "-j",
        "0",
        "--no-out-link",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(cores_of("lone"), nproc);
    // Two at once on it: they share them.
    let out = work.build(&[
        "-A",
        "a",
        "-A",
        "b",
        "--builders",
        &builder,
        "-j",
        "0",
        "--no-out-link",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for attr in ["a", "b"] {
        assert_eq!(cores_of(attr), nproc / 2, "{attr}");
    }
}

#[test]
fn an_excluded_machine_takes_no_builds() {
    if !require_nix() {
        return;
    }
    let fleet = Fleet::new();
    let work = Work::new("graph.nix", &graph_expr(&salt("exclude"), "none"));
    let spec = fleet.spec(2, 4);
    let excluded = fleet.uri(1);
    let out = work.build(&[
        "-A",
        "top",
        "--builders",
        &spec,
        "-j",
        "0",
        "--exclude",
        &excluded,
        "--no-out-link",
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let name = |i: usize| format!("localhost:{}/m{i}", fleet.dir.path().display());
    // All eight builds on m2, though m1 has slots free; m1 never reached.
    assert!(
        stderr.contains(&format!("builds per machine: {} 8", name(2))),
        "{stderr}"
    );
    assert!(!stderr.contains(&format!("on '{}'", name(1))), "{stderr}");
    let top = work.outputs("top");
    let on_m1 = nix_command("nix-store")
        .arg("--store")
        .arg(fleet.store(1))
        .args(["--check-validity", &top])
        .output()
        .unwrap();
    assert!(
        !on_m1.status.success(),
        "{top} is in the excluded m1's store"
    );
}

#[test]
fn a_bare_store_directory_builder_builds_with_the_features_its_line_gives() {
    if !require_nix() {
        return;
    }
    // As Nix opens such a builder's store: with `system-features` from its machines-file
    // line, so a derivation that requires `bar` builds there (without them that store
    // refuses it: "a 'x86_64-linux' with features {bar} is required").
    let expr = format!(
        r#"derivation {{ name = "needs-bar"; salt = "{}"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/bin:/usr/bin"; requiredSystemFeatures = [ "bar" ];
             args = [ "-c" "echo built > $out" ]; }}"#,
        salt("bare-store")
    );
    let work = Work::new("bar.nix", &expr);
    let store = work.path().join("builder");
    let builders = format!("{} {} - 1 1 bar", store.display(), nix_system());
    let out = work.build(&[
        "-j0",
        "--no-out-link",
        "--builders",
        &builders,
        "--option",
        "build-users-group",
        "",
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let path = text(&out.stdout).trim().to_string();
    assert!(is_valid_locally(&path), "{stderr}");
    let in_builder = run_ok(nix_command("nix-store").arg("--store").arg(&store).args([
        "--check-validity",
        "--print-invalid",
        &path,
    ]));
    assert!(
        in_builder.trim().is_empty(),
        "built in {}: {stderr}",
        store.display()
    );
}
