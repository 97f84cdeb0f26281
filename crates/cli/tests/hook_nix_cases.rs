//! `offload hook` held to what Nix's own hook does, one test per fault that Nix's
//! remote-build tests (scripts/nix-remote-tests.sh) found: real `nix-build` as root with
//! loopback builders (chroot stores reached as `ssh://localhost`), and, where the
//! comparison is the point, Nix's own hook run side by side.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use offload_test_support::{
    loopback_serve_program, nix_command, nix_system, require_nix, require_root, run_ok, salt, text,
    write_executable,
};

/// A work directory with the hook script Nix runs (offload's history, slot ledger and
/// agent socket under it) and loopback builders' stores.
struct Work {
    dir: tempfile::TempDir,
    program: PathBuf,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::tempdir().unwrap();
        let program = loopback_serve_program(dir.path());
        let work = Work { dir, program };
        write_executable(
            &work.hook(),
            &format!(
                "#!/bin/sh\nexport OFFLOAD_HISTORY={d}/history.sqlite OFFLOAD_SLOTS_DIR={d}/slots \
                 OFFLOAD_AGENT_SOCKET={d}/agent.sock\nexec {} hook \"$@\"\n",
                env!("CARGO_BIN_EXE_offload"),
                d = work.path().display()
            ),
        );
        work
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn hook(&self) -> PathBuf {
        self.path().join("hook")
    }

    /// Builder `name`: a chroot store under the work directory, one slot, four times as
    /// fast as this machine (so offload's choice sends builds there).
    fn builder(&self, name: &str) -> String {
        format!(
            "ssh://localhost?remote-store={}/{name}&remote-program={} {} - 1 4",
            self.path().display(),
            self.program.display(),
            nix_system()
        )
    }

    fn write(&self, name: &str, expr: &str) -> PathBuf {
        let file = self.path().join(name);
        std::fs::write(&file, expr).unwrap();
        file
    }

    /// `nix-build FILE ARGS…` with offload's hook, or Nix's own with `own_hook`; under
    /// `timeout` so that a hook that hangs fails the test instead of stalling it.
    fn nix_build(&self, file: &Path, own_hook: bool, args: &[&str]) -> Output {
        let mut cmd = nix_command("timeout");
        cmd.args(["300", "nix-build", "--no-out-link"])
            .arg(file)
            .args(args);
        if !own_hook {
            cmd.arg("--option").arg("build-hook").arg(self.hook());
        }
        cmd.output().unwrap()
    }

    /// `offload agent` on the socket the hook script names, its stderr in a file, once
    /// it listens.
    fn start_agent(&self) -> (std::process::Child, PathBuf) {
        let offload = Path::new(env!("CARGO_BIN_EXE_offload"));
        offload_test_support::start_hook_agent(offload, self.path(), &[])
    }
}

/// A derivation named `name` whose build runs `script`, unique per `tag`.
fn derivation(name: &str, tag: &str, script: &str, extra: &str) -> String {
    format!(
        r#"derivation {{
             name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}"; {extra}
             args = [ "-c" "{script}" ];
           }}"#,
        salt = salt(tag)
    )
}

/// Derivations Nix says it built on another machine.
fn remote_builds(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.starts_with("building '") && l.contains("' on '"))
        .count()
}

fn stop(mut agent: std::process::Child) {
    run_ok(Command::new("kill").arg(agent.id().to_string()));
    agent.wait().unwrap();
}

#[test]
fn nix_builds_exit_status_after_a_failed_remote_build_equals_nixs() {
    if !require_nix() || !require_root() {
        return;
    }
    let work = Work::new();
    let builders = work.builder("m1");
    let failing = |tag: &str| {
        let expr = derivation("fails", tag, "echo about to fail; exit 3", "");
        work.write(&format!("{tag}.nix"), &expr)
    };
    let args = ["-j0", "-v", "--builders", &builders];
    let nix = work.nix_build(&failing("nix-own"), true, &args);
    let plain = work.nix_build(&failing("offload-plain"), false, &args);
    let (agent, _) = work.start_agent();
    let with_agent = work.nix_build(&failing("offload-agent"), false, &args);
    stop(agent);
    let nix_stderr = text(&nix.stderr);
    assert!(!nix.status.success(), "{nix_stderr}");
    assert!(nix_stderr.contains("about to fail"), "{nix_stderr}");
    for (how, out) in [
        ("without the agent", &plain),
        ("with the agent", &with_agent),
    ] {
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            nix.status.code(),
            "{how}: nix-build's status differs from Nix's own hook's ({nix_stderr}):\n{stderr}"
        );
        // Nix's hook's lines at -v, and its failure as an `error:` line.
        for said in [
            "connecting to 'ssh://localhost",
            "copying dependencies to '",
        ] {
            assert!(stderr.contains(said), "{how}: no {said:?}:\n{stderr}");
        }
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("error: build of '") && l.contains("failed")),
            "{how}: no `error: build of … failed` line:\n{stderr}"
        );
    }
}

#[test]
fn a_floating_content_addressed_derivation_is_declined_before_accepting() {
    if !require_nix() || !require_root() {
        return;
    }
    let work = Work::new();
    let ca =
        r#"__contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";"#;
    let file = work.write(
        "ca.nix",
        &derivation("floating", "ca", "echo ca > $out", ca),
    );
    let builders = work.builder("m1");
    let args = [
        "-j1",
        "--extra-experimental-features",
        "ca-derivations",
        "--builders",
        &builders,
    ];
    let out = work.nix_build(&file, false, &args);
    let stderr = text(&out.stderr);
    // The builder would finish first, but it does not declare `ca-derivations`, which Nix
    // requires of a machine for such a derivation: Nix builds it here, after a decline,
    // not after an accept that fails.
    assert!(out.status.success(), "{stderr}");
    assert_eq!(remote_builds(&stderr), 0, "{stderr}");
    assert!(!stderr.contains("has no path"), "{stderr}");
    let path = text(&out.stdout);
    assert_eq!(std::fs::read_to_string(path.trim()).unwrap(), "ca\n");
}

#[test]
fn the_drv_is_read_through_the_store_nix_builds_into() {
    if !require_nix() || !require_root() {
        return;
    }
    let work = Work::new();
    let root = work.path().join("client-root");
    let store = format!("local?root={}", root.display());
    let file = work.write(
        "chroot.nix",
        &derivation("in-a-chroot", "chroot", "echo built > $out", ""),
    );
    let builders = work.builder("m1");
    // The .drv lives under the client's root, not at its /nix/store path here.
    let out = work.nix_build(
        &file,
        false,
        &["-j0", "--store", &store, "--builders", &builders],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(remote_builds(&stderr), 1, "{stderr}");
    let path = text(&out.stdout);
    let output = root.join(path.trim().trim_start_matches('/'));
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "built\n");
}

#[test]
fn a_machine_offload_cannot_use_is_skipped_and_the_others_build() {
    if !require_nix() || !require_root() {
        return;
    }
    let work = Work::new();
    // As Nix's hook does: a machine that cannot be reached (here its daemon program is
    // not there) is tried, passed over with a warning, and the others build.
    let builders = format!(
        "ssh-ng://localhost?remote-program=/opt/elsewhere/bin/daemon-wrapper {} - 1 8; {}",
        nix_system(),
        work.builder("m1")
    );
    let file = work.write(
        "skip.nix",
        &derivation("skipped-one", "skip", "echo built > $out", ""),
    );
    let out = work.nix_build(&file, false, &["-j0", "--builders", &builders]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(remote_builds(&stderr), 1, "{stderr}");
    assert!(
        stderr.contains("warning: offload hook: cannot use localhost")
            && stderr.contains("/opt/elsewhere/bin/daemon-wrapper"),
        "{stderr}"
    );
}

#[test]
fn the_agent_opens_new_sessions_to_a_builder_store_made_again_between_two_rounds() {
    if !require_nix() || !require_root() {
        return;
    }
    let work = Work::new();
    let builders = work.builder("m1");
    let store = work.path().join("m1");
    let (agent, log) = work.start_agent();
    let graph = |tag: &str| {
        let leaf = derivation("leaf", tag, "echo leaf > $out", "");
        let top = derivation("top", tag, "cat $leaf > $out", &format!("leaf = {leaf};"));
        work.write(&format!("{tag}.nix"), &top)
    };
    for round in ["first", "second"] {
        let out = work.nix_build(&graph(round), false, &["-j0", "--builders", &builders]);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{round} round:\n{stderr}");
        assert_eq!(remote_builds(&stderr), 2, "{round} round:\n{stderr}");
        let path = text(&out.stdout);
        assert_eq!(std::fs::read_to_string(path.trim()).unwrap(), "leaf\n");
        // Valid in the builder's store as it is now.
        run_ok(
            nix_command("nix-store")
                .arg("--store")
                .arg(&store)
                .args(["--verify-path", path.trim()]),
        );
        // The builder's store goes away, and the next round makes it again.
        run_ok(Command::new("chmod").arg("-R").arg("u+w").arg(&store));
        std::fs::remove_dir_all(&store).unwrap();
    }
    stop(agent);
    let said = std::fs::read_to_string(&log).unwrap();
    // Each hook first checks that the agent is up, then hangs up: nothing to warn about.
    assert!(!said.contains("Broken pipe"), "{said}");
}

#[test]
fn the_agent_opens_new_sessions_to_a_store_made_again_on_an_ssh_builder() {
    let Some(fleet) = offload_test_support::require_sshd_fleet(1) else {
        return;
    };
    let work = Work::new();
    // A chroot store on the host, at a path this test sees too (the hosts share /tmp).
    let store = work.path().join("on-host");
    let builders = format!(
        "{}?remote-store={} {} - 1 4",
        fleet.store_uri(0),
        store.display(),
        nix_system()
    );
    let (name, opts) = fleet.ssh_opts();
    let offload = Path::new(env!("CARGO_BIN_EXE_offload"));
    // Its notice of a store made again is at `info`.
    let (agent, log) = offload_test_support::start_hook_agent(
        offload,
        work.path(),
        &[(name, &opts), ("RUST_LOG", "offload_driver=info")],
    );
    for round in ["first", "second"] {
        let leaf = derivation("leaf", round, "echo leaf > $out", "");
        let top = derivation("top", round, "cat $leaf > $out", &format!("leaf = {leaf};"));
        let file = work.write(&format!("ssh-{round}.nix"), &top);
        let out = nix_command("timeout")
            .env(name, &opts)
            .args([
                "300",
                "nix-build",
                "--no-out-link",
                "-j0",
                "--builders",
                &builders,
            ])
            .arg(&file)
            .arg("--option")
            .arg("build-hook")
            .arg(work.hook())
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(
            out.status.success(),
            "{round} round:\n{stderr}\nagent: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_eq!(remote_builds(&stderr), 2, "{round} round:\n{stderr}");
        let path = text(&out.stdout);
        run_ok(
            nix_command("nix-store")
                .arg("--store")
                .arg(&store)
                .args(["--verify-path", path.trim()]),
        );
        // The builder's store goes away; the next round, after the agent's sessions sat
        // idle long enough for it to look again, makes it anew.
        run_ok(Command::new("chmod").arg("-R").arg("u+w").arg(&store));
        std::fs::remove_dir_all(&store).unwrap();
        std::thread::sleep(Duration::from_secs(11));
    }
    stop(agent);
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("made again"), "{said}");
}
