//! Routes bytes take, through the real `offload` binary on a two-view sshd fleet
//! (`offload_test_support::Peers`): builders reach each other directly by the names
//! this machine uses for them, while this machine reaches each through a proxy that
//! counts what crosses its link. A chain a → b → c is forced over two builders (a and
//! c need a feature only the first has, b one only the second has), so a goes from
//! the first to the second and b back, and the requested output is c.
//!
//! - directly: a and b cross no link of this machine and never enter its store;
//! - `--relay`: the same build, with the bytes through this machine;
//! - a pair that cannot reach each other: the run finishes and names it once;
//! - `--to ssh://target`: the closure lands there, not here, with no result link;
//! - `--to file:///DIR --sign-key`: a signed cache a fresh store accepts with the key
//!   trusted, and refuses without;
//! - `--to` a target that cannot be reached: named before the first build.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use offload_test_support::{
    nix_command, nix_system, require_sshd_fleet_with_peers, run_ok, salt, text, HostOptions,
    LinkShape, Peers, SshFleet,
};

mod common;

/// The size of a and b's outputs (random, incompressible).
const MIB: u64 = 4;
const OUTPUT_BYTES: u64 = MIB << 20;

/// The target's index in every fleet here: the third host, a plain store.
const TARGET: usize = 2;

/// Three hosts: two builders (the first with feature `route-a`, the second with
/// `route-b`) and a target, with `unreachable` pairs kept apart.
fn fleet(unreachable: Vec<(usize, usize)>) -> Option<SshFleet> {
    let target = HostOptions {
        target: true,
        ..HostOptions::default()
    };
    // This machine behind a slower link than the builders have to each other, as the
    // laptop or CI runner that offloads: 40 Mbit/s, 5 ms each way.
    let peers = Peers {
        unreachable,
        client_link: LinkShape {
            rate: Some(5_000_000),
            delay: Duration::from_millis(5),
        },
    };
    let builder = |feature: &str| HostOptions {
        nix_conf: format!("extra-system-features = {feature}\n"),
        ..HostOptions::default()
    };
    require_sshd_fleet_with_peers(&[builder("route-a"), builder("route-b"), target], &peers)
}

/// A scratch directory with the chain's expression, salted so that no store has it.
struct Chain {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Chain {
    /// With `refs`, c's output refers to b's (its closure is c and b); without, c only
    /// holds b's hash.
    fn new(tag: &str, refs: bool) -> Chain {
        let dir = tempfile::tempdir().unwrap();
        let keep = if refs { "echo $b > $out/b;" } else { "" };
        let expr = format!(
            r#"let mk = name: feature: script: extra: derivation ({{
                 inherit name; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/bin:/usr/bin"; salt = "{salt}";
                 requiredSystemFeatures = [ feature ];
                 args = [ "-c" script ];
               }} // extra);
               a = mk "route-a" "route-a" "mkdir $out; head -c {OUTPUT_BYTES} /dev/urandom > $out/blob" {{}};
               b = mk "route-b" "route-b" "mkdir $out; cp $a/blob $out/blob; echo b >> $out/blob" {{ inherit a; }};
               c = mk "route-c" "route-a" "mkdir $out; sha256sum < $b/blob > $out/sum; {keep}" {{ inherit b; }};
             in {{ inherit a b c; }}"#,
            salt = salt(tag),
        );
        let file = dir.path().join("chain.nix");
        std::fs::write(&file, expr).unwrap();
        Chain { dir, file }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The output path of `attr` (a, b or c), from an evaluation.
    fn output(&self, attr: &str) -> String {
        let out = run_ok(
            nix_command("nix-instantiate")
                .args(["--eval", "-E"])
                .arg(format!("(import {}).{attr}.outPath", self.file.display())),
        );
        out.trim().trim_matches('"').to_string()
    }

    /// `offload build -A c -j0` over the fleet's two builders, with `extra` flags.
    fn build(&self, fleet: &SshFleet, extra: &[&str]) -> Output {
        let system = nix_system();
        let builders = format!(
            "{} {system} - 1 1 route-a; {} {system} - 1 1 route-b",
            fleet.store_uri(0),
            fleet.store_uri(1)
        );
        let (name, opts) = fleet.ssh_opts();
        common::offload(self.path())
            .env(name, opts)
            .arg("build")
            .arg(&self.file)
            .args(["-A", "c", "-j0", "--builders", &builders])
            .args(["--option", "sandbox", "false"])
            .args(extra)
            .output()
            .unwrap()
    }
}

/// Bytes both ways through this machine's proxies to the two builders.
fn client_bytes(fleet: &SshFleet) -> u64 {
    (0..2)
        .map(|i| {
            let (to, from) = fleet.bytes_through(i);
            to + from
        })
        .sum()
}

fn is_valid_here(path: &str) -> bool {
    nix_command("nix-store")
        .args(["--check-validity", path])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn builders_pass_an_intermediate_output_to_each_other_and_it_never_comes_here() {
    let Some(fleet) = fleet(Vec::new()) else {
        return;
    };
    let chain = Chain::new("route-direct", false);
    let out = chain.build(&fleet, &["--no-out-link"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (a, b, c) = (chain.output("a"), chain.output("b"), chain.output("c"));
    assert_eq!(text(&out.stdout).trim(), c);
    // a went from the first builder to the second, b back, neither through here.
    assert!(fleet.is_valid(1, &a) && fleet.is_valid(0, &b), "{stderr}");
    let bytes = client_bytes(&fleet);
    assert!(
        bytes < OUTPUT_BYTES / 4,
        "{bytes} bytes crossed this machine's links for two {MIB} MiB copies between builders: {stderr}"
    );
    assert!(is_valid_here(&c), "the requested output came home");
    for intermediate in [&a, &b] {
        assert!(
            !is_valid_here(intermediate),
            "{intermediate} came here: {stderr}"
        );
    }
    let line = stderr
        .lines()
        .find(|l| l.starts_with("bytes moved:"))
        .unwrap_or_else(|| panic!("no bytes line: {stderr}"));
    assert!(
        line.contains("builder to builder") && !line.contains(" 0 B builder to builder"),
        "{line}"
    );
}

#[test]
fn relay_sends_the_same_copies_through_this_machine() {
    let Some(fleet) = fleet(Vec::new()) else {
        return;
    };
    let chain = Chain::new("route-relay", false);
    let out = chain.build(&fleet, &["--no-out-link", "--relay"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (a, b, c) = (chain.output("a"), chain.output("b"), chain.output("c"));
    assert!(fleet.is_valid(1, &a) && fleet.is_valid(0, &b), "{stderr}");
    run_ok(nix_command("nix-store").args(["--verify-path", &c]));
    // a down from the first builder and up to the second, b the same way back.
    let bytes = client_bytes(&fleet);
    assert!(
        bytes > 3 * OUTPUT_BYTES,
        "only {bytes} bytes crossed this machine's links for two relayed {MIB} MiB copies: {stderr}"
    );
}

#[test]
fn a_pair_that_cannot_reach_each_other_relays_and_is_named_once() {
    // The first builder cannot reach the second; the second reaches the first.
    let Some(fleet) = fleet(vec![(0, 1)]) else {
        return;
    };
    let chain = Chain::new("route-unreachable", false);
    let out = chain.build(&fleet, &["--no-out-link"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (a, b, c) = (chain.output("a"), chain.output("b"), chain.output("c"));
    assert!(fleet.is_valid(1, &a) && fleet.is_valid(0, &b) && is_valid_here(&c));
    let notes: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot reach"))
        .collect();
    assert_eq!(notes.len(), 1, "{stderr}");
    assert!(
        notes[0].contains(fleet.alias(0)) && notes[0].contains(fleet.alias(1)),
        "{}",
        notes[0]
    );
    // a was relayed (its bytes crossed here); b went back directly.
    let (to_second, _) = fleet.bytes_through(1);
    assert!(
        to_second > OUTPUT_BYTES,
        "a was not relayed: {to_second} bytes: {stderr}"
    );
    let (to_first, _) = fleet.bytes_through(0);
    assert!(
        to_first < OUTPUT_BYTES / 4,
        "b was relayed: {to_first} bytes: {stderr}"
    );
}

#[test]
fn to_an_ssh_store_delivers_the_closure_there_and_nothing_here() {
    let Some(fleet) = fleet(Vec::new()) else {
        return;
    };
    let chain = Chain::new("route-to-ssh", true);
    let target = fleet.store_uri(TARGET);
    let out = chain.build(&fleet, &["--to", &target, "--json"]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (a, b, c) = (chain.output("a"), chain.output("b"), chain.output("c"));
    // c's closure (c and b) is on the target, and verifies there.
    assert!(
        fleet.is_valid(TARGET, &c) && fleet.is_valid(TARGET, &b),
        "{stderr}"
    );
    assert!(!fleet.is_valid(TARGET, &a), "a is no part of c's closure");
    fleet
        .ssh(TARGET, &format!("nix-store --verify-path {c} {b}"))
        .unwrap();
    for path in [&a, &b, &c] {
        assert!(!is_valid_here(path), "{path} came here");
    }
    assert!(
        !chain.path().join("result").exists(),
        "no result link with --to"
    );
    // a, b and the delivery went between the hosts, none of it through here.
    let (to, from) = fleet.bytes_through(TARGET);
    let bytes = client_bytes(&fleet) + to + from;
    assert!(
        bytes < OUTPUT_BYTES / 4,
        "{bytes} bytes crossed this machine's links: {stderr}"
    );
    let summary: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {stdout}"));
    assert_eq!(summary["to"], target.as_str(), "{summary}");
    assert!(
        summary["outputs"].to_string().contains(&c),
        "the output path is printed: {summary}"
    );
    assert!(
        summary["bytes"]["to_target"].as_u64() > Some(OUTPUT_BYTES),
        "{summary}"
    );
}

#[test]
fn to_a_binary_cache_signs_what_a_fresh_store_then_accepts_with_the_key_trusted() {
    let Some(fleet) = fleet(Vec::new()) else {
        return;
    };
    let chain = Chain::new("route-to-cache", true);
    let d = chain.path();
    let (secret, public) = (d.join("key.sec"), d.join("key.pub"));
    run_ok(
        nix_command("nix-store")
            .args(["--generate-binary-cache-key", "offload-routes-test-1"])
            .args([&secret, &public]),
    );
    let cache = format!("file://{}", d.join("cache").display());
    let out = chain.build(
        &fleet,
        &[
            "--to",
            &format!("{cache}?compression=none"),
            "--sign-key",
            secret.to_str().unwrap(),
        ],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (b, c) = (chain.output("b"), chain.output("c"));
    assert_eq!(text(&out.stdout).trim(), c);
    assert!(!is_valid_here(&c) && !is_valid_here(&b));
    let copy_into = |store: &Path, keys: &str| {
        nix_command("nix")
            .args(["--extra-experimental-features", "nix-command", "copy"])
            .args(["--from", &cache])
            .arg("--to")
            .arg(format!("local?root={}", store.display()))
            .args(["--option", "trusted-public-keys", keys])
            .arg(&c)
            .output()
            .unwrap()
    };
    // Without the key trusted (another key is), the signatures are refused.
    let other = "offload-routes-other-1:6bOGdsuZWIzrfNb9YQn1gzD5TXeyUH0vqO3VwUHtjBY=";
    let refused = copy_into(&d.join("untrusting"), other);
    assert!(
        !refused.status.success(),
        "a fresh store took unsigned paths"
    );
    assert!(
        text(&refused.stderr).contains("signature"),
        "{}",
        text(&refused.stderr)
    );
    let public = std::fs::read_to_string(&public).unwrap();
    let fresh = d.join("fresh");
    let accepted = copy_into(&fresh, public.trim());
    assert!(accepted.status.success(), "{}", text(&accepted.stderr));
    let closure = run_ok(
        nix_command("nix-store")
            .arg("--store")
            .arg(format!("local?root={}", fresh.display()))
            .args(["-qR", &c]),
    );
    assert!(closure.contains(&b), "{closure}");
    run_ok(
        nix_command("nix-store")
            .arg("--store")
            .arg(format!("local?root={}", fresh.display()))
            .args(["--verify", "--check-contents"]),
    );
}

#[test]
fn a_target_that_cannot_be_reached_is_named_before_the_first_build() {
    let Some(fleet) = fleet(Vec::new()) else {
        return;
    };
    fleet.stop(TARGET);
    let chain = Chain::new("route-to-unreachable", false);
    let target = fleet.store_uri(TARGET);
    let out = chain.build(&fleet, &["--to", &target]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(fleet.alias(TARGET)),
        "the target is named: {stderr}"
    );
    assert!(
        !fleet.is_valid(0, &chain.output("a")),
        "a was built: {stderr}"
    );
}
