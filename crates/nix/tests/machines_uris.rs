//! Store URIs in machines files: offload refuses, when it reads the machines, the URIs
//! that Nix 2.8 itself cannot open, and accepts the `ssh-ng://` ones it can.

use std::process::Command;

use offload_nix::machines::parse_builders;
use offload_test_support::{require_nix, NIX_CONFIG};

/// What `nix-store --store URI` says about `uri`; none of these reach a network.
fn nix_opens(uri: &str) -> Result<(), String> {
    let out = Command::new("nix-store")
        .env(NIX_CONFIG.0, NIX_CONFIG.1)
        .args(["--store", uri, "--check-validity"])
        .arg("/nix/store/00000000000000000000000000000000-none")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // The store opened: it only says the made-up path is not valid there.
    if stderr.contains("is not valid") {
        Ok(())
    } else {
        Err(stderr)
    }
}

#[test]
fn uris_nix_cannot_open_are_refused_with_their_place() {
    if !require_nix() {
        return;
    }
    for (uri, nix_says) in [
        ("ssh://[bad", "don't know how to open"),
        ("ssh-ng://h?compress=maybe", "invalid value 'maybe'"),
        ("ssh://h?max-connections=many", "invalid value 'many'"),
        ("ssh://-oProxyCommand=x", "invalid SSH host name"),
        ("gopher://h", "don't know how to open"),
    ] {
        let nix = nix_opens(uri).expect_err(uri);
        assert!(nix.contains(nix_says), "{uri}: Nix says {nix}");
        let ours = parse_builders(&format!("{uri} x86_64-linux"), "machines", "x86_64-linux")
            .expect_err(uri)
            .to_string();
        assert!(
            ours.starts_with(&format!("machines:1: field 1 (store URI) is {uri:?}: ")),
            "{ours}"
        );
    }
}

#[test]
fn an_ssh_ng_loopback_store_opens_for_nix_and_for_offload() {
    if !require_nix() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uri = format!(
        "ssh-ng://localhost?remote-store={}/m1",
        dir.path().display()
    );
    nix_opens(&uri).unwrap();
    let m = parse_builders(&format!("{uri} - - 2"), "machines", "x86_64-linux").unwrap();
    assert_eq!((m[0].uri.as_str(), m[0].max_jobs), (uri.as_str(), 2));
}
