//! Floating content-addressed derivations handed to `offload hook` by a real `nix-build`
//! (Nix 2.8, `ca-derivations` on, `-j0`: nothing may build here): a chain of three, each
//! built on a builder, its output brought home by the path the builder reported and
//! its realisation registered here, so that Nix resolves the next one and, once done,
//! finds every output: valid, verifying, `nix realisation info` naming it, and a second
//! `nix-build` building nothing. Without the agent and with it, over loopback builders
//! (serve protocol), over `ssh-ng://` builders that answer only the daemon protocol, on
//! Nix 2.8 and on Nix 2.26, and over the serve protocol to a Nix 2.26 builder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use offload_test_support::{
    nix_command, nix_system, require_newer_nix, require_nix, require_root, require_sshd_fleet_with,
    run_ok, salt, start_hook_agent, text, write_executable, DaemonOnly, HostOptions,
};

/// Nix's experimental features for the client and the builders.
const FEATURES: &str = "nix-command ca-derivations";

/// Three floating content-addressed derivations, each reading the one before.
const CHAIN: &str = r#"
let
  ca = name: script: extra: derivation ({
    inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/bin:/usr/bin"; salt = "@SALT@";
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    args = [ "-c" script ];
  } // extra);
  first = ca "ca-first" "echo first > $out" {};
  second = ca "ca-second" "cat $first > $out; echo second >> $out" { inherit first; };
in ca "ca-third" "cat $second > $out; echo third >> $out" { inherit second; }
"#;

/// A work directory: the chain, the hook script Nix runs (offload's state under it), a
/// builder program with `ca-derivations` on, as a builder's own `nix.conf` would say.
struct Work {
    dir: tempfile::TempDir,
    file: PathBuf,
    program: PathBuf,
}

impl Work {
    fn new(tag: &str) -> Work {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let file = d.join("chain.nix");
        std::fs::write(&file, CHAIN.replace("@SALT@", &salt(tag))).unwrap();
        let program = d.join("nix-store-ca");
        write_executable(
            &program,
            &format!(
                "#!/bin/sh\nexec nix-store --option build-users-group '' \
                 --option experimental-features '{FEATURES}' \"$@\"\n"
            ),
        );
        write_executable(
            &d.join("hook"),
            &format!(
                "#!/bin/sh\nexport OFFLOAD_HISTORY={d}/history.sqlite OFFLOAD_SLOTS_DIR={d}/slots \
                 OFFLOAD_AGENT_SOCKET={d}/agent.sock\nexec {} hook \"$@\"\n",
                env!("CARGO_BIN_EXE_offload"),
                d = d.display()
            ),
        );
        Work { dir, file, program }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Loopback builder `name` (a chroot store here) declaring `ca-derivations`, as Nix
    /// requires of a machine for such a derivation.
    fn builder(&self, name: &str) -> String {
        format!(
            "ssh://localhost?remote-store={}/{name}&remote-program={} {} - 1 4 ca-derivations",
            self.path().display(),
            self.program.display(),
            nix_system()
        )
    }

    /// `nix-build -j0` of the chain with offload's hook, `env` added.
    fn nix_build(&self, builders: &str, env: &[(&str, String)]) -> Output {
        let mut cmd = nix_command("timeout");
        cmd.args(["300", "nix-build", "--no-out-link", "-j0", "-v"])
            .arg(&self.file)
            .args(["--option", "experimental-features", FEATURES])
            .args(["--builders", builders, "--option", "build-hook"])
            .arg(self.path().join("hook"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.output().unwrap()
    }

    /// Builds the chain and checks what Nix has once it is done; the output's path.
    fn builds_the_chain_there(&self, builders: &str, env: &[(&str, String)]) -> String {
        let out = self.nix_build(builders, env);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(remote_builds(&stderr), 3, "{stderr}");
        let top = text(&out.stdout).trim().to_string();
        let contents = std::fs::read_to_string(&top).unwrap();
        assert_eq!(contents, "first\nsecond\nthird\n");
        // Valid here with its closure, and verifying.
        for path in run_ok(nix_command("nix-store").args(["-qR", &top])).lines() {
            run_ok(nix_command("nix-store").args(["--verify-path", path]));
        }
        // Nix's realisation of the output names that path.
        let info = run_ok(
            nix_command("nix")
                .args(["--option", "experimental-features", FEATURES])
                .args(["realisation", "info", "--json", "-f"])
                .arg(&self.file),
        );
        let base = top.rsplit('/').next().unwrap();
        assert!(info.contains(&format!("\"outPath\":\"{base}\"")), "{info}");
        // A second run finds every output: it builds nothing, here or there.
        let again = self.nix_build(builders, env);
        let stderr = text(&again.stderr);
        assert!(again.status.success(), "second run: {stderr}");
        assert_eq!(remote_builds(&stderr), 0, "second run: {stderr}");
        assert!(!stderr.contains("will be built"), "second run: {stderr}");
        assert_eq!(text(&again.stdout).trim(), top);
        top
    }
}

/// Derivations Nix says it built on another machine.
fn remote_builds(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.starts_with("building '") && l.contains("' on '"))
        .count()
}

#[test]
fn a_chain_of_floating_derivations_builds_remotely_without_the_agent() {
    if !require_nix() || !require_root() {
        return;
    }
    let work = Work::new("ca-plain");
    let builders = format!("{}; {}", work.builder("m1"), work.builder("m2"));
    work.builds_the_chain_there(&builders, &[]);
}

#[test]
fn a_chain_of_floating_derivations_builds_remotely_through_the_agent() {
    if !require_nix() || !require_root() {
        return;
    }
    let work = Work::new("ca-agent");
    let builders = work.builder("m1");
    let (mut agent, _) =
        start_hook_agent(Path::new(env!("CARGO_BIN_EXE_offload")), work.path(), &[]);
    work.builds_the_chain_there(&builders, &[]);
    run_ok(Command::new("kill").arg(agent.id().to_string()));
    agent.wait().unwrap();
}

#[test]
fn a_chain_of_floating_derivations_builds_on_a_daemon_only_ssh_ng_builder() {
    let host = HostOptions {
        nix_conf: format!("experimental-features = {FEATURES}\n"),
        ..HostOptions::default()
    };
    if !require_root() {
        return;
    }
    let Some(fleet) = require_sshd_fleet_with(&[host]) else {
        return;
    };
    let alias = DaemonOnly::default().alias(&fleet, 0);
    let work = Work::new("ca-daemon-only");
    let builders = format!("ssh-ng://{alias} {} - 1 4 ca-derivations", nix_system());
    let (name, opts) = fleet.ssh_opts();
    work.builds_the_chain_there(&builders, &[(name, opts)]);
}

#[test]
fn a_chain_of_floating_derivations_builds_on_nix_2_26_builders_over_both_protocols() {
    if !require_root() {
        return;
    }
    let Some(root) = require_newer_nix() else {
        return;
    };
    let host = HostOptions {
        chroot: Some(root.clone()),
        nix_conf: format!("experimental-features = {FEATURES}\n"),
        ..HostOptions::default()
    };
    let Some(fleet) = require_sshd_fleet_with(&[host]) else {
        return;
    };
    let ssh = fleet.ssh_opts();
    let env = [(ssh.0, ssh.1)];
    let sys = nix_system();
    // The serve protocol: its BuildResult's built outputs as 2.26 writes them at 2.7.
    let program = fleet.remote_program(0).unwrap();
    let serve = format!(
        "{}?remote-program={} {sys} - 1 4 ca-derivations",
        fleet.store_uri(0),
        program.display()
    );
    Work::new("ca-serve-2.26").builds_the_chain_there(&serve, &env);
    // The daemon's: its BuildResult in 1.38's layout.
    let alias = DaemonOnly::in_root(&root).alias(&fleet, 0);
    let daemon = format!("ssh-ng://{alias} {sys} - 1 4 ca-derivations");
    Work::new("ca-daemon-only-2.26").builds_the_chain_there(&daemon, &env);
}
