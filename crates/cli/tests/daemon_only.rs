//! Builders that answer only the daemon protocol (`command="nix-daemon --stdio",restrict`
//! in `authorized_keys`), through the real `offload` binary over real sshd hosts: an
//! 8-derivation graph built there with `-j0` over `ssh-ng://` on Nix 2.8 and on Nix
//! 2.26, outputs valid and verifying here and their logs where `nix log` looks; a
//! failure there reported with its log; and the `ssh://` form of such a host named,
//! with its fix, at the first answer. See docs/nix-protocols.md §11.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use offload_test_support::{
    nix_command, nix_system, require_newer_nix, require_sshd_fleet_with, run_ok, salt, text,
    DaemonOnly, HostOptions, SshFleet,
};

/// Eight derivations: four leaves from a source file here, two pairs, their join and a
/// top. Each logs a line naming itself and the Debian release it ran on. `bad` fails.
const GRAPH: &str = r#"
let
  mk = { name, deps ? [], fail ? false }: derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/bin:/usr/bin"; salt = "@SALT@";
    args = [ "-c" ''
      echo "log of $name on Debian $(cat /etc/debian_version 2>/dev/null)"
      ${if fail then "echo 'about to fail'; exit 3" else ""}
      mkdir $out
      for d in $deps; do if [ -d $d ]; then cat $d/chain; else cat $d; fi >> $out/chain; done
      echo $name >> $out/chain
    '' ];
  };
  src = ./source.txt;
  leaf = i: mk { name = "leaf${toString i}"; deps = [ src ]; };
  left = mk { name = "left"; deps = [ (leaf 0) (leaf 1) ]; };
  right = mk { name = "right"; deps = [ (leaf 2) (leaf 3) ]; };
  join = mk { name = "join"; deps = [ left right ]; };
in {
  top = mk { name = "top"; deps = [ join ]; };
  bad = mk { name = "bad"; fail = true; };
}
"#;

fn write_graph(work: &Path, tag: &str) {
    std::fs::write(work.join("source.txt"), "the source\n").unwrap();
    std::fs::write(work.join("graph.nix"), GRAPH.replace("@SALT@", &salt(tag))).unwrap();
}

fn build(work: &Path, fleet: &SshFleet, builders: &str, attr: &str) -> Output {
    let (name, opts) = fleet.ssh_opts();
    common::offload(work)
        .env(name, opts)
        .arg("build")
        .arg(work.join("graph.nix"))
        .args(["-A", attr, "--builders", builders, "--no-out-link", "-j0"])
        .args(["--option", "sandbox", "false"])
        .output()
        .unwrap()
}

fn drv_of(work: &Path, attr: &str) -> String {
    let out = run_ok(
        nix_command("nix-instantiate")
            .arg(work.join("graph.nix"))
            .args(["-A", attr]),
    );
    out.trim().to_string()
}

/// Builds the graph on a daemon-only host reached as `builders` and checks what came
/// home: valid, verifying, every build there, and `nix log` showing the top's log
/// (with the Debian release of the Nix it ran under, where its builds see it).
fn builds_the_graph_there(fleet: &SshFleet, builders: &str, tag: &str, debian: Option<&str>) {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    write_graph(w, tag);
    let out = build(w, fleet, builders, "top");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("built 8 derivations"), "{stderr}");
    // Nothing else runs there: no 30-s wait for a slot broker that cannot start.
    assert!(!stderr.contains("did not answer in"), "{stderr}");
    let top = text(&out.stdout).trim().to_string();
    assert!(top.starts_with("/nix/store/"), "{top:?}");
    let chain = std::fs::read_to_string(Path::new(&top).join("chain")).unwrap();
    assert!(
        chain.contains("the source") && chain.ends_with("join\ntop\n"),
        "{chain}"
    );
    // Valid here, with its whole closure, and verifying.
    let closure = run_ok(nix_command("nix-store").args(["-qR", &top]));
    for path in closure.lines() {
        run_ok(nix_command("nix-store").args(["--verify-path", path]));
    }
    // `nix log` here shows the log of the build done there.
    let drv = drv_of(w, "top");
    let log = run_ok(nix_command("nix").args([
        "--extra-experimental-features",
        "nix-command",
        "log",
        &drv,
    ]));
    let line = format!("log of top on Debian {}", debian.unwrap_or(""));
    assert!(log.contains(&line), "{log}");
}

/// The Debian release of the root host 0 of `fleet` runs its Nix from.
fn debian_version(fleet: &SshFleet, root: &Path) -> String {
    let file = root.join("etc/debian_version");
    fleet
        .ssh(0, &format!("cat {}", file.display()))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_daemon_only_builder_on_nix_2_8_builds_the_graph_over_ssh_ng() {
    let Some(fleet) = require_sshd_fleet_with(&[HostOptions::default()]) else {
        return;
    };
    let alias = DaemonOnly::default().alias(&fleet, 0);
    // The forced command answers every login with the daemon.
    let said = fleet.ssh(0, "true");
    assert!(
        said.is_ok(),
        "the fleet's own key still runs commands: {said:?}"
    );
    let builders = format!("ssh-ng://{alias} {} - 2 1", nix_system());
    // Its builds run in Nix's sandbox, which has no /etc/debian_version.
    builds_the_graph_there(&fleet, &builders, "daemon-only-2.8", None);
    // `offload doctor` says which protocol the session speaks, and its version.
    let work = tempfile::tempdir().unwrap();
    let (name, opts) = fleet.ssh_opts();
    let out = common::offload(work.path())
        .env(name, opts)
        .args(["doctor", "--builders", &builders])
        .output()
        .unwrap();
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(said.contains("daemon protocol 1."), "{said}");
}

#[test]
fn a_daemon_only_builder_on_nix_2_26_builds_the_graph_over_ssh_ng() {
    let Some(root) = require_newer_nix() else {
        return;
    };
    let host = HostOptions {
        chroot: Some(root.clone()),
        ..HostOptions::default()
    };
    let Some(fleet) = require_sshd_fleet_with(&[host]) else {
        return;
    };
    let alias = DaemonOnly::in_root(&root).alias(&fleet, 0);
    let builders = format!("ssh-ng://{alias} {} - 2 1", nix_system());
    let debian = debian_version(&fleet, &root);
    assert!(debian.starts_with("13"), "{debian}");
    builds_the_graph_there(&fleet, &builders, "daemon-only-2.26", Some(&debian));
}

#[test]
fn a_failure_on_a_daemon_only_builder_is_reported_with_its_log() {
    let Some(fleet) = require_sshd_fleet_with(&[HostOptions::default()]) else {
        return;
    };
    let alias = DaemonOnly::default().alias(&fleet, 0);
    let work = tempfile::tempdir().unwrap();
    write_graph(work.path(), "daemon-only-bad");
    let builders = format!("ssh-ng://{alias} {} - 2 1", nix_system());
    let out = build(work.path(), &fleet, &builders, "bad");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("about to fail"),
        "the build's log: {stderr}"
    );
    assert!(
        stderr.contains("exit code 3"),
        "Nix's own message: {stderr}"
    );
}

#[test]
fn a_daemon_only_host_written_as_ssh_is_named_with_its_fix_at_once() {
    let Some(fleet) = require_sshd_fleet_with(&[HostOptions::default()]) else {
        return;
    };
    let alias = DaemonOnly::default().alias(&fleet, 0);
    let work = tempfile::tempdir().unwrap();
    write_graph(work.path(), "daemon-only-ssh");
    let builders = format!("ssh://{alias} {} - 2 1", nix_system());
    let started = Instant::now();
    let out = build(work.path(), &fleet, &builders, "top");
    let took = started.elapsed();
    eprintln!("named in {took:?}");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("answers only the daemon protocol")
            && stderr.contains(&format!("ssh-ng://{alias}")),
        "{stderr}"
    );
    // At the first answer: no retries, no 30-s waits.
    // (The whole run, evaluation included, on a machine shared with other tests.)
    assert!(took < Duration::from_secs(10), "took {took:?}: {stderr}");
}

/// Benchmark, not a check (`-- --ignored --nocapture`): the graph's wall time on one
/// Nix 2.8 host over the daemon path (a daemon-only alias), over the serve path (the
/// host's plain alias), with Nix's own `nix-build -j0 --builders ssh-ng://…`, and, when
/// `OFFLOAD_BENCH_BEFORE` names an `offload` binary built before the daemon path
/// existed, over the serve path with that binary. Each a fresh graph, `ROUNDS` times.
#[test]
#[ignore = "a benchmark: prints times and ratios"]
fn bench_daemon_path_serve_path_and_nix() {
    let Some(fleet) = require_sshd_fleet_with(&[HostOptions::default()]) else {
        return;
    };
    let daemon_alias = DaemonOnly::default().alias(&fleet, 0);
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let before = std::env::var_os("OFFLOAD_BENCH_BEFORE").map(std::path::PathBuf::from);
    let (opts_name, opts) = fleet.ssh_opts();
    let mut times: Vec<(&str, Vec<f64>)> = vec![
        ("offload ssh-ng, daemon path", Vec::new()),
        ("offload ssh-ng, serve path", Vec::new()),
        ("nix-build -j0 --builders ssh-ng", Vec::new()),
        ("offload ssh-ng, serve path, before", Vec::new()),
    ];
    for round in 0..rounds {
        for (k, (what, list)) in times.iter_mut().enumerate() {
            let work = tempfile::tempdir().unwrap();
            let w = work.path();
            write_graph(w, &format!("bench-{round}-{k}"));
            let alias = if k == 0 {
                &daemon_alias
            } else {
                fleet.alias(0)
            };
            let builders = format!("ssh-ng://{alias} {} - 2 1", nix_system());
            let mut cmd = match k {
                2 => {
                    let mut c = nix_command("nix-build");
                    c.arg(w.join("graph.nix"))
                        .args(["-A", "top", "--no-out-link", "-j0"])
                        .args(["--builders", &builders]);
                    c
                }
                3 => match &before {
                    Some(bin) => {
                        // The same environment as the binary under test gets.
                        let env = common::offload(w);
                        let mut c = std::process::Command::new(bin);
                        c.current_dir(w)
                            .envs(env.get_envs().filter_map(|(k, v)| Some((k, v?))))
                            .arg("build")
                            .arg(w.join("graph.nix"))
                            .args(["-A", "top", "--builders", &builders, "--no-out-link", "-j0"]);
                        c
                    }
                    None => continue,
                },
                _ => {
                    let mut c = common::offload(w);
                    c.arg("build").arg(w.join("graph.nix")).args([
                        "-A",
                        "top",
                        "--builders",
                        &builders,
                        "--no-out-link",
                        "-j0",
                    ]);
                    c
                }
            };
            cmd.env(opts_name, &opts);
            let started = Instant::now();
            let out = cmd.output().unwrap();
            let secs = started.elapsed().as_secs_f64();
            assert!(out.status.success(), "{what}: {}", text(&out.stderr));
            list.push(secs);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let base = median(&times[1].1);
    for (what, list) in &times {
        if let (Some(m), Some(b)) = (median(list), base) {
            println!(
                "{what:40} median {m:6.2} s of {list:.2?}  ratio to the serve path {:.2}",
                m / b
            );
        }
    }
}
