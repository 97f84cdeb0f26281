//! `offload copy`: closures between this machine's store and two loopback machines
//! (chroot stores reached as `ssh://localhost?remote-store=DIR`), each way and from one
//! machine to the other; what arrives is whole (`nix-store -qR`) and verifies
//! (`nix-store --verify-path`), and a path that is not valid is a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use offload_test_support::{nix_command, require_nix, run_ok, salt, text};

/// Two loopback machines, `m1` and `m2`, under a scratch directory where offload runs.
struct Stores {
    dir: tempfile::TempDir,
    program: PathBuf,
}

impl Stores {
    fn new() -> Stores {
        let dir = tempfile::tempdir().unwrap();
        let program = offload_test_support::loopback_serve_program(dir.path());
        Stores { dir, program }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The store URI of machine `name`.
    fn uri(&self, name: &str) -> String {
        let spec = offload_test_support::loopback_machine(self.path(), name, &self.program, 1, 1);
        spec.split_whitespace().next().unwrap().to_string()
    }

    /// `offload copy ARGS…`.
    fn copy(&self, args: &[&str]) -> Output {
        common::offload(self.path())
            .arg("copy")
            .args(args)
            .output()
            .unwrap()
    }

    /// The closure of `path` in machine `name`'s store (`None`: this machine's), sorted;
    /// panics if it is not valid there.
    fn closure(&self, name: Option<&str>, path: &str) -> Vec<String> {
        let mut cmd = nix_command("nix-store");
        if let Some(name) = name {
            cmd.arg("--store").arg(self.path().join(name));
        }
        let mut paths: Vec<String> = run_ok(cmd.args(["-qR", path]))
            .lines()
            .map(str::to_string)
            .collect();
        paths.sort();
        paths
    }

    /// Whether every path of `paths` verifies in machine `name`'s store (`None`: here).
    fn verifies(&self, name: Option<&str>, paths: &[String]) -> bool {
        let mut cmd = nix_command("nix-store");
        if let Some(name) = name {
            cmd.arg("--store").arg(self.path().join(name));
        }
        cmd.arg("--verify-path")
            .args(paths)
            .status()
            .unwrap()
            .success()
    }
}

/// Builds here a `top` whose output refers to a `leaf`: a closure of two new paths.
fn build_closure(dir: &Path) -> String {
    let expr = format!(
        r#"let mk = name: script: derivation {{
             inherit name; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{}"; args = [ "-c" script ];
           }};
           leaf = mk "leaf" "echo leaf > $out";
         in mk "top" "mkdir $out; echo ${{leaf}} > $out/ref""#,
        salt("copy")
    );
    std::fs::write(dir.join("closure.nix"), expr).unwrap();
    run_ok(
        nix_command("nix-build")
            .arg(dir.join("closure.nix"))
            .arg("--no-out-link"),
    )
    .trim()
    .to_string()
}

fn ok(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    stderr
}

#[test]
fn closures_go_to_from_and_between_machines_and_verify() {
    if !require_nix() {
        return;
    }
    let stores = Stores::new();
    let top = build_closure(stores.path());
    let closure = stores.closure(None, &top);
    assert_eq!(closure.len(), 2, "{closure:?}");
    let (m1, m2) = (stores.uri("m1"), stores.uri("m2"));

    // --to: this machine's closure to m1.
    let stderr = ok(&stores.copy(&["--to", &m1, &top]));
    assert!(stderr.contains("copied 2 paths"), "{stderr}");
    assert_eq!(stores.closure(Some("m1"), &top), closure);
    assert!(stores.verifies(Some("m1"), &closure));
    // Only what is missing moves.
    let stderr = ok(&stores.copy(&["--to", &m1, &top]));
    assert!(stderr.contains("copied 0 paths"), "{stderr}");
    assert!(stderr.contains("2 of 2 already there"), "{stderr}");

    // --from --to: from m1 to m2, through offload.
    ok(&stores.copy(&["--from", &m1, "--to", &m2, &top]));
    assert_eq!(stores.closure(Some("m2"), &top), closure);
    assert!(stores.verifies(Some("m2"), &closure));

    // --from: gone here, it comes back from m2.
    run_ok(nix_command("nix-store").arg("--delete").args(&closure));
    let valid_here = nix_command("nix-store")
        .args(["--check-validity", &top])
        .output()
        .unwrap();
    assert!(!valid_here.status.success(), "{top} is still valid here");
    let stderr = ok(&stores.copy(&["--from", &m2, &top]));
    assert!(stderr.contains("copied 2 paths"), "{stderr}");
    assert_eq!(stores.closure(None, &top), closure);
    assert!(stores.verifies(None, &closure));
}

#[test]
fn a_path_that_is_not_valid_is_named() {
    if !require_nix() {
        return;
    }
    let stores = Stores::new();
    let m1 = stores.uri("m1");
    let missing = "/nix/store/00000000000000000000000000000000-not-there";
    let out = stores.copy(&["--to", &m1, missing]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{missing} is not valid there")),
        "{stderr}"
    );
    std::fs::write(stores.path().join("notes.txt"), "not in a store").unwrap();
    let out = stores.copy(&["--to", &m1, "notes.txt"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("notes.txt is neither a store path"),
        "{stderr}"
    );
}
