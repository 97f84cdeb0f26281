//! A pair of builders that reached each other when it was learned and no longer does:
//! the direct copy fails, the pair is named once, what did not land goes through this
//! machine, and the builders' stores hold nothing half-imported.

use std::path::Path;
use std::time::Duration;

use offload_test_support::{
    nix_system, require_sshd_fleet_with_peers, salt, text, HostOptions, LinkShape, Peers, SshFleet,
};

use super::common;

/// The chain's intermediate output: big enough that a relay shows on the counters.
const OUTPUT_BYTES: u64 = 2 << 20;

/// a (feature `pair-a`, only the first host has it) → b (`pair-b`, the second).
fn chain(dir: &Path, tag: &str) -> std::path::PathBuf {
    let expr = format!(
        r#"let mk = name: feature: script: extra: derivation ({{
             inherit name; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}";
             requiredSystemFeatures = [ feature ];
             args = [ "-c" script ];
           }} // extra);
           a = mk "pair-a" "pair-a" "mkdir $out; head -c {OUTPUT_BYTES} /dev/urandom > $out/blob" {{}};
         in mk "pair-b" "pair-b" "mkdir $out; sha256sum < $a/blob > $out/sum" {{ inherit a; }}"#,
        salt = salt(tag),
    );
    let file = dir.join(format!("{tag}.nix"));
    std::fs::write(&file, expr).unwrap();
    file
}

fn build(fleet: &SshFleet, work: &Path, file: &Path) -> std::process::Output {
    let system = nix_system();
    let builders = format!(
        "{} {system} - 1 1 pair-a; {} {system} - 1 1 pair-b",
        fleet.store_uri(0),
        fleet.store_uri(1)
    );
    let (name, opts) = fleet.ssh_opts();
    common::offload(work)
        .env(name, opts)
        .arg("build")
        .arg(file)
        .args(["-j0", "--no-out-link", "--builders", &builders])
        .args(["--option", "sandbox", "false"])
        .output()
        .unwrap()
}

#[test]
fn a_pair_that_stops_reaching_each_other_relays_and_is_named_once() {
    // This machine's links are slow, so copies between the builders go direct.
    let peers = Peers {
        client_link: LinkShape {
            rate: Some(2_500_000),
            delay: Duration::from_millis(10),
        },
        ..Peers::default()
    };
    let hosts = [HostOptions::default(), HostOptions::default()].map(|mut h| {
        h.nix_conf = "system-features = pair-a pair-b\n".into();
        h
    });
    let Some(fleet) = require_sshd_fleet_with_peers(&hosts, &peers) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let first = build(&fleet, work.path(), &chain(work.path(), "pair-first"));
    let err = text(&first.stderr);
    assert!(first.status.success(), "{err}");
    assert!(
        err.contains("builder to builder") && !err.contains("0 B builder to builder"),
        "the first run copies between the builders directly:\n{err}"
    );

    // The first host's own ssh no longer reaches the second: its alias points at a
    // closed port, and the connection the last copy left open is gone.
    let port = fleet.port(1);
    fleet
        .ssh(
            0,
            &format!("sed -i 's/^  Port {port}$/  Port 9/' /root/.ssh/config"),
        )
        .unwrap();
    let _ = std::process::Command::new("pkill")
        .args(["-f", "offload-ssh-"])
        .status();
    let before = (fleet.bytes_through(0).1, fleet.bytes_through(1).0);
    let second = build(&fleet, work.path(), &chain(work.path(), "pair-second"));
    let err = text(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert_eq!(
        err.matches("cannot reach").count(),
        1,
        "the pair is named once:\n{err}"
    );
    assert!(
        err.contains("Connection refused"),
        "with ssh's reason:\n{err}"
    );
    // a went through this machine: out of the first host, into the second.
    let after = (fleet.bytes_through(0).1, fleet.bytes_through(1).0);
    assert!(
        after.0 - before.0 > OUTPUT_BYTES && after.1 - before.1 > OUTPUT_BYTES,
        "the intermediate output crossed this machine's links: {before:?} → {after:?}"
    );
    for host in 0..2 {
        let verified = fleet.ssh(
            host,
            "nix-store --verify --check-contents 2>&1 && echo clean",
        );
        assert!(
            verified.as_deref().is_ok_and(|v| v.contains("clean")),
            "host {host}'s store: {verified:?}"
        );
    }
    // The state keeps the answer: the next run relays at once and says so at its start.
    let third = build(&fleet, work.path(), &chain(work.path(), "pair-third"));
    let err = text(&third.stderr);
    assert!(third.status.success(), "{err}");
    assert_eq!(err.matches("cannot reach").count(), 1, "{err}");
}
