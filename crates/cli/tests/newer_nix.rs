//! A builder on a newer Nix: Debian 13's Nix 2.26 (in a root `scripts/setup.sh` makes
//! once, reached through `chroot` by its `remote-program`), beside a builder and this
//! machine on Nix 2.8, through the real `offload` binary. Inputs go to it, its outputs
//! come home and stream to the other builder, its logs reach `nix-store -l` here, and a
//! failure there is reported with its log. See docs/nix-protocols.md §6.

mod common;

use std::path::Path;
use std::process::Output;

use offload_test_support::{
    nix_command, nix_system, require_newer_nix, require_sshd_fleet_with, run_ok, salt, text,
    HostOptions, SshFleet,
};

/// The graph, by attribute: `a` only the newer builder can build (feature `newer`), from
/// a source file here; `b` only the older one (`older`), from `a` alone, so `a` streams
/// between the builders; `c` here (`preferLocalBuild`), from `b`; `top` on the newer
/// builder again, from `c`, and it is what comes home. Each build logs a line naming its
/// Debian release, which says where it ran. `bad` fails on the newer builder.
const GRAPH: &str = r#"
let
  mk = { name, deps ? "", features ? [], local ? false, fail ? false }: derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/bin:/usr/bin"; salt = "@SALT@";
    requiredSystemFeatures = features; preferLocalBuild = local;
    args = [ "-c" ''
      echo "log of $name on Debian $(cat /etc/debian_version)"
      ${if fail then "echo 'about to fail'; exit 3" else ""}
      mkdir $out
      cat /etc/debian_version > $out/debian
      for d in $deps; do if [ -d $d ]; then cat $d/chain; else cat $d; fi >> $out/chain; done
      echo $name >> $out/chain
    '' ];
  };
  src = ./source.txt;
in rec {
  a = mk { name = "newer-a"; deps = "${src}"; features = [ "newer" ]; };
  b = mk { name = "older-b"; deps = "${a}"; features = [ "older" ]; };
  c = mk { name = "local-c"; deps = "${b}"; local = true; };
  top = mk { name = "newer-top"; deps = "${c}"; features = [ "newer" ]; };
  bad = mk { name = "newer-bad"; features = [ "newer" ]; fail = true; };
}
"#;

fn attr_path(work: &Path, attr: &str, what: &str) -> String {
    let expr = format!("(import {}/graph.nix).{attr}.{what}", work.display());
    let out = run_ok(nix_command("nix-instantiate").args(["--eval", "-E", &expr]));
    out.trim().trim_matches('"').to_string()
}

fn build(work: &Path, fleet: &SshFleet, builders: &str, args: &[&str]) -> Output {
    let (name, opts) = fleet.ssh_opts();
    common::offload(work)
        .env(name, opts)
        .arg("build")
        .arg(work.join("graph.nix"))
        .args(["--builders", builders, "--no-out-link", "-j2"])
        .args(["--option", "sandbox", "false"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_builder_on_nix_2_26_builds_copies_both_ways_and_keeps_logs_beside_nix_2_8() {
    let Some(root) = require_newer_nix() else {
        return;
    };
    // Nix on a builder checks the derivation's features against its own.
    let newer = HostOptions {
        chroot: Some(root.clone()),
        nix_conf: "system-features = newer\n".into(),
        ..HostOptions::default()
    };
    let older = HostOptions {
        nix_conf: "system-features = older\n".into(),
        ..HostOptions::default()
    };
    let Some(fleet) = require_sshd_fleet_with(&[newer, older]) else {
        return;
    };
    let version = fleet
        .ssh(0, &format!("chroot {} nix-store --version", root.display()))
        .unwrap();
    assert!(version.contains("2.26"), "{version}");

    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("source.txt"), "the source\n").unwrap();
    std::fs::write(
        w.join("graph.nix"),
        GRAPH.replace("@SALT@", &salt("newer-nix")),
    )
    .unwrap();
    let program = fleet.remote_program(0).unwrap();
    let builders = format!(
        "{}?remote-program={} {sys} - 2 1 newer newer;{} {sys} - 2 1 older older",
        fleet.store_uri(0),
        program.display(),
        fleet.store_uri(1),
        sys = nix_system()
    );
    let (newer_name, older_name) = (fleet.alias(0), fleet.alias(1));

    let out = build(w, &fleet, &builders, &["-A", "top", "--json"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();

    // Each build ran where its features sent it, and says so by its Debian release.
    let ran_on = |drv_name: &str| -> String {
        events
            .iter()
            .find(|e| {
                e["type"] == "build_finished" && e["drv"].as_str().unwrap().ends_with(drv_name)
            })
            .unwrap_or_else(|| panic!("no build_finished for {drv_name}: {stderr}"))["machine"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(ran_on("newer-a.drv").contains(newer_name), "{stderr}");
    assert!(ran_on("older-b.drv").contains(older_name), "{stderr}");
    assert_eq!(ran_on("local-c.drv"), "local", "{stderr}");
    assert!(ran_on("newer-top.drv").contains(newer_name), "{stderr}");
    let top = attr_path(w, "top", "outPath");
    assert_eq!(
        std::fs::read_to_string(format!("{top}/chain")).unwrap(),
        "the source\nnewer-a\nolder-b\nlocal-c\nnewer-top\n"
    );
    assert!(
        std::fs::read_to_string(format!("{top}/debian"))
            .unwrap()
            .starts_with("13"),
        "top was built on Debian 13"
    );

    // Copies: a source to the newer builder, its output to the other builder, the
    // requested output home from it; every one taken.
    let copied = |from: &dyn Fn(&str) -> bool, to: &dyn Fn(&str) -> bool, path: &str| {
        events.iter().any(|e| {
            e["type"] == "transfer_finished"
                && e["ok"] == true
                && from(e["from"].as_str().unwrap())
                && to(e["to"].as_str().unwrap())
                && e["path"].as_str().unwrap().ends_with(path)
        })
    };
    let is_newer = |m: &str| m.contains(newer_name);
    let is_older = |m: &str| m.contains(older_name);
    let is_local = |m: &str| m == "local";
    assert!(
        copied(&is_local, &is_newer, "-source.txt"),
        "input to it: {stderr}"
    );
    assert!(
        copied(&is_newer, &is_older, "-newer-a"),
        "builder to builder: {stderr}"
    );
    assert!(
        copied(&is_local, &is_newer, "-local-c"),
        "an output of here to it: {stderr}"
    );
    assert!(
        copied(&is_newer, &is_local, "-newer-top"),
        "output home: {stderr}"
    );

    // Its build logs are where `nix-store -l` finds them here, and in the run's output.
    for attr in ["a", "top"] {
        let drv = attr_path(w, attr, "drvPath");
        let log = run_ok(nix_command("nix-store").args(["-l", &drv]));
        assert!(log.contains("on Debian 13"), "{attr}: {log:?}");
    }
    assert!(stderr.contains("log of newer-a on Debian 13"), "{stderr}");

    // A failure there names the derivation, the machine and its log.
    let out = build(w, &fleet, &builders, &["-A", "bad"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("newer-bad.drv"), "{stderr}");
    assert!(stderr.contains(newer_name), "{stderr}");
    assert!(stderr.contains("about to fail"), "{stderr}");
    assert!(stderr.contains("exit code 3"), "{stderr}");

    // The local store is sound, and nothing is left to build.
    run_ok(nix_command("nix-store").args(["--verify", "--check-contents"]));
    let again = build(w, &fleet, &builders, &["-A", "top"]);
    let stderr = text(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("built 0 derivations"), "{stderr}");
}
