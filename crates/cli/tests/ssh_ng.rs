//! `ssh-ng://` machines through the real `offload` binary: one over a real sshd host
//! with its own store, one on loopback (`ssh-ng://localhost?remote-store=DIR`), and a
//! machines file whose bad URI is reported by its file and line before any work starts.

use std::path::Path;
use std::process::{Command, Output};

use offload_test_support::{require_nix, require_sshd_fleet, NIX_CONFIG};
use offload_test_support::{text, write_executable};

mod common;

fn offload(args: &[&str], cwd: &Path, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = common::offload(cwd);
    cmd.args(args).envs(extra_env.iter().copied());
    cmd.output().unwrap()
}

/// A leaf and a top that depends on it, salted so that no store has them yet.
fn chain_expr(tag: &str) -> String {
    let salt = offload_test_support::salt(tag);
    format!(
        r#"let mk = name: dep: derivation {{
             inherit name dep; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}";
             args = [ "-c" "mkdir $out; echo $dep > $out/dep; echo $name > $out/name" ];
           }};
         in mk "ng-top" (mk "ng-leaf" "")"#
    )
}

#[test]
fn an_ssh_ng_machine_over_real_sshd_builds_and_is_named_in_the_report() {
    let Some(fleet) = require_sshd_fleet(1) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let machines = work.path().join("machines");
    std::fs::write(
        &machines,
        format!(
            "# as NixOS writes protocol = \"ssh-ng\" machines\nssh-ng://{} - - 2 1\n",
            fleet.alias(0)
        ),
    )
    .unwrap();
    let file = work.path().join("chain.nix");
    std::fs::write(&file, chain_expr("sshd")).unwrap();
    let (opts_name, opts) = fleet.ssh_opts();
    let builders = format!("@{}", machines.display());
    // -j0: every build goes to the ssh-ng machine.
    let out = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "--builders",
            &builders,
            "-j0",
        ],
        work.path(),
        &[(opts_name, &opts)],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let top = text(&out.stdout).trim().to_string();
    assert!(
        top.starts_with("/nix/store/") && top.ends_with("-ng-top"),
        "{top}"
    );
    assert!(
        fleet.is_valid(0, &top),
        "built on the host, in its own store"
    );
    assert!(
        stderr.contains(&format!("builds per machine: {} 2", fleet.alias(0))),
        "the report names the machine by its host: {stderr}"
    );
    let local = Command::new("nix-store")
        .args(["--check-validity", &top])
        .status()
        .unwrap();
    assert!(local.success(), "the output came back to the local store");
}

#[test]
fn an_ssh_ng_loopback_machine_runs_the_nix_store_beside_its_daemon() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let marker = work.path().join("nix-store-ran");
    // The daemon a `nix-build` would run (`nix-daemon --stdio`), and the nix-store
    // beside it that offload must run instead. Loopback stores build without build
    // users: those are shared by every store on this machine.
    write_executable(
        &bin.join("nix-daemon"),
        "#!/bin/sh\nexec nix-daemon \"$@\"\n",
    );
    write_executable(
        &bin.join("nix-store"),
        &format!(
            "#!/bin/sh\ntouch '{}'\nexec nix-store --option build-users-group '' \"$@\"\n",
            marker.display()
        ),
    );
    let store = work.path().join("m1");
    let spec = format!(
        "ssh-ng://localhost?remote-store={}&remote-program={}/nix-daemon - - 2 1",
        store.display(),
        bin.display()
    );
    let file = work.path().join("chain.nix");
    std::fs::write(&file, chain_expr("loopback")).unwrap();
    let out = offload(
        &[
            "build",
            file.to_str().unwrap(),
            "--builders",
            &spec,
            "-j0",
            "--no-out-link",
        ],
        work.path(),
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(marker.exists(), "the nix-store beside the daemon ran");
    let top = text(&out.stdout).trim().to_string();
    let in_store = Command::new("nix-store")
        .env(NIX_CONFIG.0, NIX_CONFIG.1)
        .arg("--store")
        .arg(&store)
        .args(["--check-validity", &top])
        .output()
        .unwrap();
    assert!(in_store.status.success(), "{}", text(&in_store.stderr));
    assert!(
        stderr.contains(&format!(
            "builds per machine: localhost:{} 2",
            store.display()
        )),
        "{stderr}"
    );
}

#[test]
fn a_bad_uri_in_a_machines_file_is_named_by_file_and_line() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let machines = work.path().join("machines");
    std::fs::write(
        &machines,
        "ssh-ng://builder1 x86_64-linux - 4 1\nssh://[bad x86_64-linux - 4 1\n",
    )
    .unwrap();
    let builders = format!("@{}", machines.display());
    let out = offload(
        &[
            "build",
            "-E",
            "throw \"not evaluated\"",
            "--builders",
            &builders,
        ],
        work.path(),
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "bad set-up: {stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:2: field 1 (store URI) is \"ssh://[bad\": host \"[bad\" opens `[` without closing it",
            machines.display()
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("not evaluated"),
        "machines are checked before evaluation: {stderr}"
    );
}
