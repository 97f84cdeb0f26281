//! Faults of a builder's disk and of the link to it, on a real sshd fleet through the
//! real `offload` binary: a store too small for an output, and a connection cut while
//! outputs come home. Each test checks the outcome, then that the local store is sound
//! (`nix-store --verify --check-contents`) and that a second run builds nothing. See
//! docs/faults.md.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use offload_test_support::{
    assert_sound_and_nothing_rebuilt, nix_command, nix_system, require_sshd_fleet_with, run_ok,
    salt, text, HostOptions, LinkCutter, SshFleet,
};

/// A scratch directory with one derivation, `big`, whose output holds `mib` MiB made by
/// `source` (`/dev/zero`, `/dev/urandom`), salted so that no store has it.
struct Work {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Work {
    fn new(tag: &str, mib: u32, source: &str) -> Work {
        let dir = tempfile::tempdir().unwrap();
        let expr = format!(
            r#"derivation {{
                 name = "big"; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/bin:/usr/bin"; salt = "{}";
                 args = [ "-c" "echo writing {mib} MiB; mkdir $out; head -c {bytes} {source} > $out/blob" ];
               }}"#,
            salt(tag),
            bytes = u64::from(mib) << 20,
        );
        let file = dir.path().join("default.nix");
        std::fs::write(&file, expr).unwrap();
        Work { dir, file }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The output path, from an evaluation.
    fn output(&self) -> String {
        let out = run_ok(
            nix_command("nix-instantiate")
                .args(["--eval", "-E"])
                .arg(format!("(import {}).outPath", self.file.display())),
        );
        out.trim().trim_matches('"').to_string()
    }

    /// `offload build` of the file over `builders`, with the fleet's ssh config.
    fn build(&self, fleet: &SshFleet, builders: &str, extra: &[&str]) -> Output {
        let (name, opts) = fleet.ssh_opts();
        common::offload(self.path())
            .env(name, opts)
            .arg("build")
            .arg(&self.file)
            .args(["--builders", builders, "--no-out-link"])
            .args(["--option", "sandbox", "false"])
            .args(extra)
            .output()
            .unwrap()
    }

    /// The local store is sound, and a second run builds nothing.
    fn assert_sound_and_complete(&self, fleet: &SshFleet, builders: &str) {
        assert_sound_and_nothing_rebuilt(&self.build(fleet, builders, &[]));
    }
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
fn a_builder_whose_store_fills_up_is_named_and_the_build_runs_elsewhere() {
    let small = HostOptions {
        store_mib: Some(20),
        ..HostOptions::default()
    };
    let Some(fleet) = require_sshd_fleet_with(&[small]) else {
        return;
    };
    // 32 MiB into a 20 MiB store. The builder is four times as fast as this machine,
    // so the plan sends the build there first.
    let work = Work::new("disk-full", 32, "/dev/zero");
    let spec = format!("{} {} - 1 4", fleet.store_uri(0), nix_system());
    let started = Instant::now();
    let out = work.build(&fleet, &spec, &["-j1", "--retry-backoff", "60"]);
    let took = started.elapsed();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!("a full store was left behind; the run took {took:?}:\n{stderr}");
    let name = fleet.alias(0);
    let warning = stderr
        .lines()
        .find(|l| l.starts_with(&format!("warning: {name} cannot be used")))
        .unwrap_or_else(|| panic!("no warning names {name}: {stderr}"));
    assert!(warning.contains("out of space"), "{warning}");
    assert!(stderr.contains("builds per machine: local 1"), "{stderr}");
    // Nothing of it stays on the builder.
    let output = work.output();
    assert!(!fleet.is_valid(0, &output));

    // The output is what a clean build here makes.
    let clean = work.path().join("clean");
    let built = run_ok(
        nix_command("nix-build")
            .arg("--store")
            .arg(&clean)
            .args(["--no-out-link", "--option", "sandbox", "false"])
            .arg(&work.file),
    );
    assert_eq!(built.trim(), output);
    let hash = |store: Option<&Path>| {
        let mut cmd = nix_command("nix-store");
        if let Some(store) = store {
            cmd.arg("--store").arg(store);
        }
        run_ok(cmd.args(["--query", "--hash", &output]))
    };
    assert_eq!(hash(None), hash(Some(&clean)));
    work.assert_sound_and_complete(&fleet, &spec);
}

#[test]
fn a_link_cut_while_outputs_come_home_is_retried_and_leaves_no_partial_path() {
    let Some(fleet) = require_sshd_fleet_with(&[HostOptions::default()]) else {
        return;
    };
    let sshd_port = fleet.port(0);
    // Every connection that carries more than 1 MiB home is cut: the 4 MiB output never
    // arrives, and nothing of it stays here.
    let work = Work::new("link-cut", 4, "/dev/urandom");
    let always = LinkCutter::start(sshd_port, 1 << 20, usize::MAX);
    let spec = format!(
        "ssh://{} {} - 1 1",
        fleet.alias_via(0, always.port()),
        nix_system()
    );
    let out = work.build(&fleet, &spec, &["-j0"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(always.cuts() >= 2, "cut {} times: {stderr}", always.cuts());
    let via = spec.split_whitespace().next().unwrap();
    let via = via.trim_start_matches("ssh://");
    assert!(
        stderr.contains(via),
        "the error names the machine: {stderr}"
    );
    let output = work.output();
    assert!(!is_valid_here(&output), "a cut copy registered {output}");
    assert!(!Path::new(&output).exists(), "a cut copy left {output}");
    run_ok(nix_command("nix-store").args(["--verify", "--check-contents"]));
    drop(always);

    // Cut twice (the copy that starts when the build ends, then the first copy at the
    // end of the run): the next copy brings it home.
    let twice = LinkCutter::start(sshd_port, 1 << 20, 2);
    let spec = format!(
        "ssh://{} {} - 1 1",
        fleet.alias_via(0, twice.port()),
        nix_system()
    );
    let started = Instant::now();
    let out = work.build(&fleet, &spec, &["-j0"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!(
        "{} cuts; the run took {:?}: {stderr}",
        twice.cuts(),
        started.elapsed()
    );
    assert_eq!(twice.cuts(), 2, "{stderr}");
    assert!(stderr.contains("trying again"), "{stderr}");
    assert!(is_valid_here(&output));
    assert_eq!(
        std::fs::metadata(format!("{output}/blob")).unwrap().len(),
        4 << 20
    );
    work.assert_sound_and_complete(&fleet, &spec);
}
