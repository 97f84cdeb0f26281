//! `offload build` as an ordinary user of a multi-user install: a real `nix-daemon` (its
//! own socket and `nix.conf`), a user created for the test, a loopback fleet of chroot
//! stores the user owns, and the local machine. Each set-up the README describes:
//! (a) the user is trusted; (b) untrusted, with outputs signed by the builders or by the
//! user's key; (c) untrusted without signatures: said up front, built locally.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use offload_test_support::daemon::TEST_USER;
use offload_test_support::{loopback_machine, require_daemon_install, DaemonConfig, DaemonInstall};
use offload_test_support::{salt, text};

const NODES: usize = 24;

/// A graph of 24 derivations: 8 leaves, 8 over two leaves each, 7 over two of those,
/// and a top over those 7.
fn graph_expr(salt: &str) -> String {
    format!(
        r#"let mk = name: deps: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}";
             args = [ "-c" "echo building $name; sleep 0.1; mkdir $out; echo $name > $out/name" ];
           }};
           at = builtins.elemAt;
           leaves = builtins.genList (i: mk "leaf${{toString i}}" []) 8;
           mids = builtins.genList (i: mk "mid${{toString i}}" [ (at leaves i) (at leaves (8 - 1 - i)) ]) 8;
           ups = builtins.genList (i: mk "up${{toString i}}" [ (at mids i) (at mids (i + 1)) ]) 7;
         in {{ top = mk "top" ups; }}"#
    )
}

/// What one test sets up: the daemon, the user's work directory with the graph, and a
/// loopback fleet of two builders whose stores the user owns.
struct Setup {
    install: DaemonInstall,
    work: PathBuf,
    file: PathBuf,
}

impl Setup {
    fn new(config: &DaemonConfig, tag: &str) -> Option<Setup> {
        let install = require_daemon_install(config)?;
        let work = install.user_dir("work");
        let file = work.join("graph.nix");
        std::fs::write(&file, graph_expr(&salt(tag))).unwrap();
        Some(Setup {
            install,
            work,
            file,
        })
    }

    /// A `remote-program` for the loopback builders: no build users (they are shared by
    /// every store here), and `extra` options.
    fn remote_program(&self, name: &str, extra: &str) -> PathBuf {
        let path = self.work.join(name);
        offload_test_support::write_executable(
            &path,
            &format!("#!/bin/sh\nexec nix-store --option build-users-group '' {extra} \"$@\"\n"),
        );
        path
    }

    /// Two builders, two slots each, faster than this machine so the plan uses them.
    fn builders(&self, remote_program: &Path) -> String {
        (1..=2)
            .map(|i| loopback_machine(&self.work, &format!("m{i}"), remote_program, 2, 2))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// `PROGRAM ARGS` as the test user through the daemon.
    fn as_user(&self, program: &str, args: &[&str]) -> Output {
        let program = which(program);
        self.install
            .command(&program, &self.work)
            .args(args)
            .output()
            .unwrap()
    }

    fn offload(&self, args: &[&str]) -> Output {
        let mut all = vec!["build", self.file.to_str().unwrap(), "-A", "top", "-j2"];
        all.extend_from_slice(args);
        self.install
            .command(Path::new(env!("CARGO_BIN_EXE_offload")), &self.work)
            .env("OFFLOAD_HISTORY", self.work.join("history.sqlite"))
            .env("OFFLOAD_SLOTS_DIR", self.work.join("slots"))
            .args(all)
            .output()
            .unwrap()
    }

    /// What `nix-build` prints for the same attribute, as the same user.
    fn nix_build_path(&self) -> String {
        let out = self.as_user(
            "nix-build",
            &[self.file.to_str().unwrap(), "-A", "top", "--no-out-link"],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    }
}

fn which(program: &str) -> PathBuf {
    let out = run(Command::new("sh").args(["-c", &format!("command -v {program}")]));
    PathBuf::from(text(&out.stdout).trim())
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
    out
}

/// The builds per machine the summary reports, e.g. `local 10, localhost:/…/m1 7`.
fn builds_per_machine(stderr: &str) -> Vec<(String, usize)> {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("builds per machine: "))
        .unwrap_or_else(|| panic!("no summary in: {stderr}"));
    line.split(", ")
        .filter_map(|entry| {
            let (name, n) = entry.rsplit_once(' ')?;
            Some((name.to_string(), n.parse().ok()?))
        })
        .collect()
}

fn remote_builds(stderr: &str) -> usize {
    builds_per_machine(stderr)
        .iter()
        .filter(|(m, _)| m != "local")
        .map(|(_, n)| n)
        .sum()
}

/// Where each derivation was built, from the `building 'DRV' on 'MACHINE'...` lines.
fn built_on(stderr: &str) -> HashMap<String, String> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("building '")?;
            let (drv, rest) = rest.split_once("' on '")?;
            let (machine, _) = rest.split_once('\'')?;
            Some((drv.to_string(), machine.to_string()))
        })
        .collect()
}

/// An output of the graph that is in the local store.
struct LocalOutput {
    deriver: String,
    sigs: Vec<String>,
}

/// The outputs of the graph under `top` that came to the local store (the requested
/// one's closure: intermediate outputs stay where they were built), each verified.
fn local_outputs(top: &str) -> Vec<LocalOutput> {
    let deriver = run(Command::new("nix-store").args(["--query", "--deriver", top]));
    let requisites = run(Command::new("nix-store")
        .args(["--query", "--requisites", "--include-outputs"])
        .arg(text(&deriver.stdout).trim()));
    let outputs: Vec<String> = text(&requisites.stdout)
        .lines()
        .filter(|p| !p.ends_with(".drv"))
        .map(str::to_string)
        .collect();
    let out = run(Command::new("nix")
        .args([
            "path-info",
            "--json",
            "--extra-experimental-features",
            "nix-command",
        ])
        .args(&outputs));
    let infos: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let valid: Vec<LocalOutput> = infos
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["valid"].as_bool() != Some(false) && i["narHash"].is_string())
        .map(|i| LocalOutput {
            deriver: i["deriver"].as_str().unwrap_or("").to_string(),
            sigs: i["signatures"]
                .as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default(),
        })
        .collect();
    let paths: Vec<&str> = infos
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["narHash"].is_string())
        .filter_map(|i| i["path"].as_str())
        .collect();
    run(Command::new("nix-store").arg("--verify-path").args(&paths));
    valid
}

/// Every local output built on a builder carries a signature by `key`; returns how
/// many there are.
fn signed_by(key: &str, top: &str, stderr: &str) -> usize {
    let machines = built_on(stderr);
    let mut remote = 0;
    for output in local_outputs(top) {
        let machine = machines
            .get(&output.deriver)
            .unwrap_or_else(|| panic!("{} was not built: {stderr}", output.deriver));
        if machine != "local" {
            remote += 1;
            assert!(
                output
                    .sigs
                    .iter()
                    .any(|s| s.starts_with(&format!("{key}:"))),
                "{} came from {machine} without a signature by {key}: {:?}",
                output.deriver,
                output.sigs
            );
        }
    }
    remote
}

#[test]
fn a_trusted_user_builds_over_the_fleet_and_nix_log_shows_remote_builds() {
    let config = DaemonConfig {
        trust_user: true,
        ..DaemonConfig::default()
    };
    let Some(setup) = Setup::new(&config, "trusted") else {
        return;
    };
    let program = setup.remote_program("nix-store-builder", "");
    let out = setup.offload(&["--builders", &setup.builders(&program)]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("does not trust"), "{stderr}");
    let built: usize = builds_per_machine(&stderr).iter().map(|(_, n)| n).sum();
    assert_eq!(built, NODES, "{stderr}");
    assert!(remote_builds(&stderr) > 0, "builders were used: {stderr}");
    let top = text(&out.stdout).trim().to_string();
    assert_eq!(top, setup.nix_build_path());
    // What came home verifies; the top was built by a builder or here.
    assert!(!local_outputs(&top).is_empty());
    // The result link is the user's.
    let link = setup.work.join("result");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new(&top));
    // Every build's log, remote ones included, is where `nix log` looks.
    let drvs = setup.as_user("nix-store", &["--query", "--deriver", &top]);
    let top_drv = text(&drvs.stdout).trim().to_string();
    let closure = setup.as_user("nix-store", &["--query", "--requisites", &top_drv]);
    let mut logs = 0;
    for drv in text(&closure.stdout)
        .lines()
        .filter(|p| p.ends_with(".drv"))
    {
        let log = setup.as_user("nix-store", &["--read-log", drv]);
        assert!(
            log.status.success(),
            "no log of {drv}: {}",
            text(&log.stderr)
        );
        assert!(
            text(&log.stdout).contains("building "),
            "{drv}: {}",
            text(&log.stdout)
        );
        logs += 1;
    }
    assert_eq!(logs, NODES);
    // `nix log` itself, for a build that ran on a builder.
    let (remote_drv, machine) = built_on(&stderr)
        .into_iter()
        .find(|(_, m)| m != "local")
        .expect("a remote build");
    let log = setup.as_user(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "log",
            &remote_drv,
        ],
    );
    assert!(log.status.success(), "{machine}: {}", text(&log.stderr));
    assert!(
        text(&log.stdout).contains("building "),
        "{}",
        text(&log.stdout)
    );
}

#[test]
fn an_untrusted_user_gets_outputs_in_signed_by_the_builders_or_by_own_key() {
    let install_keys = tempfile::tempdir().unwrap();
    // The keys must exist before the daemon starts, which trusts their public halves.
    let make_key = |name: &str| {
        let secret = install_keys.path().join(format!("{name}.sec"));
        let public = install_keys.path().join(format!("{name}.pub"));
        run(Command::new("nix-store")
            .args(["--generate-binary-cache-key", name])
            .arg(&secret)
            .arg(&public));
        (secret, std::fs::read_to_string(public).unwrap())
    };
    let (builder_secret, builder_public) = make_key("offload-test-builder-1");
    let (user_secret, user_public) = make_key("offload-test-user-1");
    let config = DaemonConfig {
        trust_user: false,
        trusted_public_keys: vec![builder_public, user_public],
        ..DaemonConfig::default()
    };
    let Some(setup) = Setup::new(&config, "signed") else {
        return;
    };
    for secret in [&builder_secret, &user_secret] {
        let to = setup.work.join(secret.file_name().unwrap());
        std::fs::copy(secret, &to).unwrap();
        run(Command::new("chown").arg(TEST_USER).arg(&to));
    }
    let builder_key = setup.work.join(builder_secret.file_name().unwrap());
    let user_key = setup.work.join(user_secret.file_name().unwrap());

    // The builders sign what they build (`secret-key-files` there).
    let signing = setup.remote_program(
        "nix-store-signing",
        &format!("--option secret-key-files {}", builder_key.display()),
    );
    let out = setup.offload(&["--builders", &setup.builders(&signing)]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(remote_builds(&stderr) > 0, "builders were used: {stderr}");
    let top = text(&out.stdout).trim().to_string();
    assert_eq!(top, setup.nix_build_path());
    assert!(signed_by("offload-test-builder-1", &top, &stderr) > 0);

    // Builders that sign nothing, and the user's own key.
    std::fs::write(&setup.file, graph_expr(&salt("own-key"))).unwrap();
    let plain = setup.remote_program("nix-store-plain", "");
    let out = setup.offload(&[
        "--builders",
        &setup.builders(&plain),
        "--sign-key",
        user_key.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(remote_builds(&stderr) > 0, "builders were used: {stderr}");
    let top = text(&out.stdout).trim().to_string();
    assert_eq!(top, setup.nix_build_path());
    assert!(signed_by("offload-test-user-1", &top, &stderr) > 0);
}

#[test]
fn an_untrusted_user_without_signatures_is_told_up_front_and_builds_locally() {
    let Some(setup) = Setup::new(&DaemonConfig::default(), "unsigned") else {
        return;
    };
    let plain = setup.remote_program("nix-store-plain", "");
    let out = setup.offload(&["--builders", &setup.builders(&plain)]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warning = stderr
        .find("does not trust you (offload-tester)")
        .expect(&stderr);
    let first_build = stderr.find("building '").expect(&stderr);
    assert!(warning < first_build, "said before building: {stderr}");
    assert!(
        stderr.contains("`trusted-users = offload-tester`"),
        "{stderr}"
    );
    assert!(stderr.contains("--sign-key"), "{stderr}");
    assert_eq!(builds_per_machine(&stderr), [("local".to_string(), NODES)]);
    let top = text(&out.stdout).trim().to_string();
    assert_eq!(top, setup.nix_build_path());

    // --no-local-fallback stops instead, before building anything.
    std::fs::write(&setup.file, graph_expr(&salt("stop"))).unwrap();
    let out = setup.offload(&["--builders", &setup.builders(&plain), "--no-local-fallback"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("could not enter the local store"),
        "{stderr}"
    );
    assert!(!stderr.contains("building '"), "{stderr}");
}

#[test]
fn an_ordinary_user_sees_and_respects_slots_root_holds() {
    let Some(setup) = Setup::new(&DaemonConfig::default(), "slots") else {
        return;
    };
    // The ledger directory as Nix makes it (mode 0777), and a slot of b1 held by a
    // root process through a lock file it created (mode 0644).
    let slots = setup.install.user_dir("slots");
    run(Command::new("chmod").arg("0777").arg(&slots));
    let lock = slots.join("ssh:__b1-0");
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !lock.exists() {
        assert!(std::time::Instant::now() < deadline, "flock did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = setup
        .install
        .command(Path::new(env!("CARGO_BIN_EXE_offload")), &setup.work)
        .env("OFFLOAD_SLOTS_DIR", &slots)
        .env("OFFLOAD_CONFIG", setup.work.join("none.toml"))
        .args(["machines", "--json", "--builders", "ssh://b1 - - 2 1"])
        .output()
        .unwrap();
    holder.kill().unwrap();
    let _ = holder.wait();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let b1: serde_json::Value = serde_json::from_str(stdout.lines().nth(1).unwrap()).unwrap();
    assert_eq!(b1["busy_slots"], 1, "{stdout}\n{}", text(&out.stderr));
}
