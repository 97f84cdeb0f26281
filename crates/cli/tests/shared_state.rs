//! Clients that share one state in a real PostgreSQL server (a private one) and build on
//! real sshd builders: a fresh client plans its first run on builders slower than
//! declared from what another client learned, `offload report` reads the runs of every
//! client from the database, a database of a newer offload or a URI that does not parse
//! is refused with the fix, Nix's build hook and `offload simulate` plan with what the
//! database holds, `offload machines` shows what it remembers, and clients that lose the database mid-run finish, say so
//! once, and keep what is left of the run in their local state.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use std::io::Write as _;

use offload_nix::hook::{encode_settings, TryRequest};
use offload_test_support::{
    loopback_serve_program, nix_command, nix_system, require_postgres, require_sshd_fleet_with,
    run_ok, salt, text, write_executable, HostOptions, PgServer, SshFleet,
};
use serde_json::Value;

/// Builds of the learning graph: this many derivations of 2 s at speed 1 …
const BUILDS: usize = 20;
/// … on builders this many times slower than declared.
const SLOW: u32 = 3;
/// The graph's lower bound by the true speeds: no chain longer than one build, and the
/// work (20 × 2 s) over this machine's 2 slots at speed 1 and the builders' 4 at 1/3.
const BOUND: f64 = (BUILDS as f64 * 2.0) / (2.0 + 4.0 / SLOW as f64);

/// The graph, the builders' `remote-program` (which gives their sandboxes `/speed`),
/// and a home of its own per client, outside `/tmp` (the hosts have their own).
struct Work {
    dir: tempfile::TempDir,
    file: PathBuf,
    program: PathBuf,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        // Each build sleeps 2 s times the number in /speed (the builders' sandboxes have
        // one; this machine has none: 1).
        let expr = r#"{ salt, n, seconds ? 2 }:
            builtins.genList (i: derivation {
              name = "w-${toString i}"; system = builtins.currentSystem;
              builder = "/bin/sh"; PATH = "/bin:/usr/bin"; inherit salt;
              args = [ "-c" "f=1; if [ -r /speed ]; then read f < /speed; fi; k=$((f * ${toString seconds} * 2)); while [ $k -gt 0 ]; do sleep 0.5; k=$((k - 1)); done; mkdir $out" ];
            }) n"#;
        let file = dir.path().join("default.nix");
        std::fs::write(&file, expr).unwrap();
        let speed = dir.path().join("speed");
        std::fs::write(&speed, format!("{SLOW}\n")).unwrap();
        let program = dir.path().join("nix-store-speed");
        write_executable(
            &program,
            &format!(
                "#!/bin/sh\nexec nix-store --option extra-sandbox-paths /speed={} \"$@\"\n",
                speed.display()
            ),
        );
        Work { dir, file, program }
    }

    /// A client's home: its local state and slot ledger.
    fn home(&self, name: &str) -> PathBuf {
        let home = self.dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        home
    }

    /// Two builders of 2 slots each, declared as fast as this machine.
    fn builders(&self, fleet: &SshFleet) -> String {
        (0..2)
            .map(|i| {
                format!(
                    "ssh://{}?remote-program={} - - 2 1",
                    fleet.alias(i),
                    self.program.display()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// `offload build --json` of `n` builds of `seconds` by the client at `home`, with
    /// the shared state at `uri` (none: its local file alone) and `local_jobs` slots on
    /// this machine.
    fn build(
        &self,
        fleet: &SshFleet,
        home: &Path,
        uri: Option<&str>,
        n: usize,
        seconds: u32,
        local_jobs: u32,
    ) -> Child {
        let (name, opts) = fleet.ssh_opts();
        let mut cmd = common::offload(home);
        cmd.env(name, opts)
            .env_remove("OFFLOAD_STATE")
            .arg("build")
            .arg(&self.file)
            .args(["-j", &local_jobs.to_string(), "--json", "--no-out-link"])
            .args(["--argstr", "salt", &salt("shared-state")])
            .args(["--arg", "n", &n.to_string()])
            .args(["--arg", "seconds", &seconds.to_string()])
            .args(["--builders", &self.builders(fleet)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(uri) = uri {
            cmd.env("OFFLOAD_STATE", uri);
        }
        cmd.spawn().unwrap()
    }
}

/// The run's summary event, after checking it succeeded and its outputs verify.
fn finished(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "offload build failed: {}",
        text(&out.stderr)
    );
    let summary = event(out, "summary");
    assert_eq!(summary["ok"], true, "{summary}");
    for path in summary["outputs"].as_array().unwrap() {
        run_ok(nix_command("nix-store").args(["--verify-path", path.as_str().unwrap()]));
    }
    summary
}

/// The run's first event of `kind`.
fn event(out: &Output, kind: &str) -> Value {
    text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} event: {}", text(&out.stdout)))
}

/// The work a run estimated its builds at, as it planned them.
fn estimated_work(out: &Output) -> f64 {
    event(out, "planned")["estimated_work_s"].as_f64().unwrap()
}

fn fleet() -> Option<SshFleet> {
    require_sshd_fleet_with(&[HostOptions::default(), HostOptions::default()])
}

/// `offload report` by the client at `home` with the shared state at `uri`.
fn report(home: &Path, uri: &str, args: &[&str]) -> Output {
    common::offload(home)
        .env("OFFLOAD_STATE", uri)
        .arg("report")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_fresh_client_plans_from_what_another_client_learned() {
    let Some(pg) = require_postgres() else { return };
    let Some(fleet) = fleet() else { return };
    let work = Work::new();
    let teacher = work.home("teacher");
    // The first client learns the builders are 3× slower than declared, over two runs.
    for _ in 0..2 {
        let run = work.build(&fleet, &teacher, Some(&pg.uri()), BUILDS, 2, 2);
        finished(&run.wait_with_output().unwrap());
    }
    // A fresh client, same database: its first run is planned as well as the
    // teacher's next.
    let fresh = work.home("fresh");
    let out = work.build(&fleet, &fresh, Some(&pg.uri()), BUILDS, 2, 2);
    let out = out.wait_with_output().unwrap();
    let wall = finished(&out)["wall_s"].as_f64().unwrap();
    // It planned with the builds' times as the other client measured them (2 s each at
    // this machine's speed, and a little around each).
    let work_s = estimated_work(&out);
    assert!(
        (work_s - BUILDS as f64 * 2.0).abs() < 8.0,
        "estimated work {work_s} s"
    );
    // The same client without the database knows nothing of them (5 s each by default);
    // its time is for the record.
    let alone = work.home("alone");
    let out = work.build(&fleet, &alone, None, BUILDS, 2, 2);
    let out = out.wait_with_output().unwrap();
    let alone_wall = finished(&out)["wall_s"].as_f64().unwrap();
    assert_eq!(estimated_work(&out), BUILDS as f64 * 5.0);
    eprintln!(
        "bound {BOUND:.2} s; fresh client with the shared state {wall:.2} s ({:.2}×), \
         with a state of its own {alone_wall:.2} s ({:.2}×)",
        wall / BOUND,
        alone_wall / BOUND
    );
    assert!(
        wall <= 1.2 * BOUND,
        "the fresh client took {wall:.2} s, over 1.2× the bound {BOUND:.2} s"
    );
    // Nothing of it went to the clients' own files.
    for home in [&teacher, &fresh] {
        assert!(!home.join("history.sqlite").exists(), "{}", home.display());
    }

    // `offload report` reads every client's runs from the database, from a third home.
    let reader = work.home("reader");
    let list = report(&reader, &pg.uri(), &["--list"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    assert_eq!(
        text(&list.stdout).lines().count(),
        3,
        "{}",
        text(&list.stdout)
    );
    let last = report(&reader, &pg.uri(), &[]);
    let said = text(&last.stdout);
    assert!(last.status.success(), "{}", text(&last.stderr));
    assert!(
        said.starts_with("run 3 at") && said.contains(&format!("{BUILDS} builds in")),
        "{said}"
    );
}

#[test]
fn a_newer_database_or_a_bad_uri_is_refused_with_the_fix() {
    let Some(pg) = require_postgres() else { return };
    let work = Work::new();
    let home = work.home("client");
    // The schema as this offload makes it, then one step newer.
    let first = report(&home, &pg.uri(), &["--list"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let config = common::offload(&home)
        .env("OFFLOAD_STATE", pg.uri())
        .arg("config")
        .output()
        .unwrap();
    let shown = text(&config.stdout);
    assert!(
        shown.contains(&format!("state = {} (OFFLOAD_STATE)", pg.uri())),
        "{shown}"
    );
    pg.psql("UPDATE offload_schema SET version = version + 1")
        .unwrap();
    let refused = report(&home, &pg.uri(), &["--list"]);
    let said = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains(&pg.uri()), "names the database: {said}");
    assert!(said.contains("upgrade offload"), "{said}");
    let build = common::offload(&home)
        .env("OFFLOAD_STATE", pg.uri())
        .arg("build")
        .arg(&work.file)
        .args([
            "--arg",
            "n",
            "1",
            "--argstr",
            "salt",
            &salt("refused"),
            "-j1",
        ])
        .output()
        .unwrap();
    assert!(!build.status.success());
    assert!(
        text(&build.stderr).contains("upgrade offload"),
        "{}",
        text(&build.stderr)
    );

    // A URI in the config file that does not parse.
    std::fs::write(
        home.join("offload-config.toml"),
        "state = \"postgresql://ann:pw@db:notaport/offload\"\n",
    )
    .unwrap();
    let bad = common::offload(&home)
        .args(["report", "--list"])
        .output()
        .unwrap();
    let said = text(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{said}");
    assert!(
        said.contains("postgresql://ann:***@db:notaport/offload"),
        "{said}"
    );
    assert!(said.contains("fix `state`"), "{said}");
    // Something else than a PostgreSQL URI is named in the file.
    std::fs::write(home.join("offload-config.toml"), "state = \"/srv/state\"\n").unwrap();
    let bad = common::offload(&home)
        .args(["report", "--list"])
        .output()
        .unwrap();
    let said = text(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{said}");
    assert!(
        said.contains("offload-config.toml") && said.contains("PostgreSQL URI"),
        "{said}"
    );
}

#[test]
fn clients_that_lose_the_database_finish_and_say_so() {
    let Some(mut pg) = require_postgres() else {
        return;
    };
    let Some(fleet) = fleet() else { return };
    let work = Work::new();
    let homes = [work.home("a"), work.home("b")];
    let started = Instant::now();
    // Eight builds of 2 s each on the builders alone: four rounds of 2 s on their four
    // slots at speed 3 ... enough time to lose the database in the middle.
    let runs: Vec<Child> = homes
        .iter()
        .map(|h| work.build(&fleet, h, Some(&pg.uri()), 8, 1, 0))
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    pg.stop_immediate().unwrap();
    let stopped_at = started.elapsed();
    for (run, home) in runs.into_iter().zip(&homes) {
        let out = run.wait_with_output().unwrap();
        let summary = finished(&out);
        assert_eq!(summary["built"], 8, "{summary}");
        let said = text(&out.stderr);
        assert_eq!(
            said.matches("lost the shared state").count(),
            1,
            "said once, after {stopped_at:?}: {said}"
        );
        assert!(said.contains(&pg.uri()), "{said}");
        // What came after the loss is in the local state: the run, and builds.
        let local = offload_driver::StateDb::open_file(&home.join("history.sqlite")).unwrap();
        assert_eq!(local.runs(10).unwrap().len(), 1, "{}", home.display());
        let k = local.knowledge(nix_system()).unwrap();
        let kept = (0..8)
            .filter(|i| k.estimate(&format!("w-{i}")).1 == offload_driver::EstimateSource::Exact)
            .count();
        assert!(
            kept > 0,
            "no build of the run's end kept in {}",
            home.display()
        );
    }
    // A client that cannot reach it at the start says so and uses its own.
    let late = work.home("late");
    let out = work
        .build(&fleet, &late, Some(&pg.uri()), 1, 1, 1)
        .wait_with_output()
        .unwrap();
    finished(&out);
    let said = text(&out.stderr);
    assert!(
        said.contains("cannot be reached") && said.contains(&pg.uri()),
        "{said}"
    );
    assert!(late.join("history.sqlite").exists());
    drop::<PgServer>(pg);
}

/// What `offload hook 3` answers Nix's first request for a build of `quick-1.0`, one
/// builder of speed 2 in reach; with the shared state at `uri` when given, and a fresh
/// file of its own either way.
fn hook_answer(work: &Work, home: &Path, uri: Option<&str>, drv: &str) -> String {
    let builder = format!(
        "ssh://localhost?remote-store={}/m1&remote-program={} {} - 1 2",
        work.dir.path().display(),
        loopback_serve_program(work.dir.path()).display(),
        nix_system()
    );
    let mut frames = encode_settings([
        ("builders", builder.as_str()),
        ("max-jobs", "1"),
        ("system", nix_system()),
        ("system-features", ""),
    ]);
    frames.extend(
        TryRequest {
            am_willing: true,
            system: nix_system().to_string(),
            drv_path: drv.into(),
            required_features: Vec::new(),
        }
        .encode(),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_offload"));
    cmd.args(["hook", "3"])
        .env("OFFLOAD_HISTORY", home.join("history.sqlite"))
        .env("OFFLOAD_SLOTS_DIR", home.join("slots"))
        .env("OFFLOAD_CONFIG", home.join("offload-config.toml"))
        .env_remove("OFFLOAD_HOOK_BUILDERS")
        .env_remove("OFFLOAD_STATE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uri) = uri {
        cmd.env("OFFLOAD_STATE", uri);
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(&frames).unwrap();
    let out = child.wait_with_output().unwrap();
    // Its answer, among what it tells Nix's log.
    let said = text(&out.stderr);
    said.lines()
        .find(|l| l.starts_with("# "))
        .unwrap_or_else(|| panic!("no answer: {said}"))
        .to_string()
}

#[test]
fn nix_build_hook_plans_with_what_the_shared_state_holds() {
    let Some(pg) = require_postgres() else { return };
    let work = Work::new();
    // Another client learned the build takes 0.2 s here: done before a builder twice
    // as fast would have its session.
    let other = work.home("other").join("history.sqlite");
    let shared = offload_driver::StateDb::open_shared(&pg.uri(), &other).unwrap();
    shared
        .record("quick-1.0", nix_system(), "local", 0.2, 1.0, None)
        .unwrap();
    let expr = format!(
        "derivation {{ name = \"quick-1.0\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [ \"-c\" \"mkdir $out\" ]; salt = \"{}\"; }}",
        salt("hook")
    );
    let drv = run_ok(nix_command("nix-instantiate").args(["-E", &expr]));
    let drv = drv.trim();
    let hook = work.home("hook");
    assert_eq!(hook_answer(&work, &hook, Some(&pg.uri()), drv), "# decline");
    // Without it, the build is a stranger (5 s by default): the faster builder takes it.
    let alone = work.home("alone");
    assert_eq!(hook_answer(&work, &alone, None, drv), "# accept");
}

#[test]
fn offload_simulate_reads_its_history_from_the_shared_state() {
    let Some(pg) = require_postgres() else { return };
    let work = Work::new();
    let expr = format!(
        "derivation {{ name = \"sim-shared-1\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [ \"-c\" \"mkdir $out\" ]; salt = \"{}\"; }}",
        salt("simulate")
    );
    let drv = run_ok(nix_command("nix-instantiate").args(["-E", &expr]));
    let other = work.home("other").join("history.sqlite");
    offload_driver::StateDb::open_shared(&pg.uri(), &other)
        .unwrap()
        .record("sim-shared-1", nix_system(), "local", 30.0, 1.0, None)
        .unwrap();
    let bound = |uri: Option<&str>| {
        let home = work.home("simulating");
        let mut cmd = common::offload(&home);
        cmd.env_remove("OFFLOAD_STATE")
            .args(["simulate", "--from-drv", drv.trim(), "--local-slots", "1"])
            .args(["--policy", "offload", "--json"]);
        if let Some(uri) = uri {
            cmd.env("OFFLOAD_STATE", uri);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["lower_bound_s"].as_f64().unwrap()
    };
    // 30 s as the other client measured it; without the database, the default.
    assert_eq!(bound(Some(&pg.uri())), 30.0);
    assert_eq!(bound(None), offload_driver::DEFAULT_SECONDS);
}

#[test]
fn offload_machines_shows_what_the_shared_state_remembers() {
    let Some(pg) = require_postgres() else { return };
    let work = Work::new();
    let other = work.home("other").join("history.sqlite");
    let shared = offload_driver::StateDb::open_shared(&pg.uri(), &other).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    shared
        .machine_failed("b2", "connection refused", now)
        .unwrap();
    shared.quarantine("b2", now + 3600).unwrap();
    shared.set_cores("ssh://b1", 12).unwrap();
    let home = work.home("looking");
    let out = common::offload(&home)
        .env("OFFLOAD_STATE", pg.uri())
        .args([
            "machines",
            "--json",
            "--builders",
            "ssh://b1 - - 2; ssh://b2 - - 2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[1]["cores"], 12, "{rows:?}");
    assert_eq!(rows[1]["state"], "up", "{rows:?}");
    assert!(
        rows[2]["state"]
            .as_str()
            .unwrap()
            .starts_with("quarantined"),
        "{rows:?}"
    );
}
