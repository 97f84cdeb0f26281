//! The newest Nix Debian has (Debian unstable's: 2.34 when its root was made) as the
//! local Nix, under a daemon as on NixOS: `nix-build` hands builds to `offload hook`,
//! which imports their outputs while Nix holds their locks. From Nix 2.29 on no Nix reads
//! `NIX_HELD_LOCKS`, so an import that relied on it waited for ever (driver's
//! order/held_locks.rs); here every build must come back, without and with the agent.

use std::path::PathBuf;
use std::process::Stdio;

use offload_test_support::newer_client::{require_newer_client, ClientOptions, NewerClient};
use offload_test_support::{nix_system, salt, text, write_executable};

const OFFLOAD: &str = env!("CARGO_BIN_EXE_offload");

/// Seven derivations: four leaves, two over two leaves each, a top over those two.
fn graph(salt: &str) -> String {
    format!(
        r#"let mk = name: deps: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}";
             args = [ "-c" "echo building $name; mkdir $out; echo $name > $out/name" ];
           }};
           at = builtins.elemAt;
           leaves = builtins.genList (i: mk "leaf${{toString i}}" []) 4;
           mids = builtins.genList (i: mk "mid${{toString i}}" [ (at leaves (2 * i)) (at leaves (2 * i + 1)) ]) 2;
         in mk "top" mids"#
    )
}

/// Derivations Nix says it built on another machine.
fn built_remotely(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.starts_with("building '") && l.contains("' on '"))
        .count()
}

/// `nix-build -j0` of a fresh graph as the client's ordinary user, through the daemon,
/// given at most two minutes (a build whose outputs never come back would hang it).
fn nix_build(client: &NewerClient, tag: &str) -> (String, String) {
    let work = client.work();
    let file = work.join("graph.nix");
    std::fs::write(&file, graph(&salt(tag))).unwrap();
    client.give_to_user(&file);
    let mut cmd = client.user_command("timeout", &work);
    let out = cmd
        .args(["120", "nix-build", "graph.nix", "--no-out-link", "-j0"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "nix-build ended with {:?} (124: it hung):\n{stderr}\ndaemon: {}",
        out.status.code(),
        client.daemon_log()
    );
    (text(&out.stdout).trim().to_string(), stderr)
}

fn verify(client: &NewerClient, path: &str) {
    let out = client
        .command("nix-store", &client.work())
        .args(["--verify-path", path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{path}: {}", text(&out.stderr));
}

#[test]
fn nix_build_under_the_newest_nix_daemon_gets_every_output_back_from_offload_hook() {
    let setup = tempfile::tempdir().unwrap();
    let s = setup.path();
    std::fs::set_permissions(s, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let d = s.display();
    let hook = s.join("hook");
    write_executable(
        &hook,
        &format!(
            "#!/bin/sh\nexport OFFLOAD_HISTORY={d}/history.sqlite OFFLOAD_SLOTS_DIR={d}/slots \
             OFFLOAD_CONFIG={d}/none.toml OFFLOAD_AGENT_SOCKET={d}/agent.sock\n\
             exec {OFFLOAD} hook \"$@\"\n"
        ),
    );
    let sys = nix_system();
    let builders = format!(
        "ssh://localhost?remote-store={d}/b1 {sys} - 1 4;ssh://localhost?remote-store={d}/b2 {sys} - 1 4"
    );
    // Nix 2.25 to 2.33 ignore `build-hook` in nix.conf; the daemon gets it as an option.
    let Some(client) = require_newer_client(&ClientOptions {
        offload: PathBuf::from(OFFLOAD),
        nix_conf: format!("builders = {builders}\ntrusted-users = root\n"),
        daemon: Some(vec![
            "--option".into(),
            "build-hook".into(),
            hook.display().to_string(),
        ]),
        visible: vec![s.to_path_buf()],
        newest: true,
    }) else {
        return;
    };
    let version = client
        .command("nix-store", s)
        .arg("--version")
        .output()
        .unwrap();
    eprintln!("client: {}", text(&version.stdout).trim());

    let (top, stderr) = nix_build(&client, "newest-hook");
    assert_eq!(built_remotely(&stderr), 7, "{stderr}");
    assert!(
        s.join("history.sqlite").exists(),
        "offload hook did not run:\n{stderr}"
    );
    verify(&client, &top);

    // Through the agent (root, as the daemon's hooks are), whose sessions import.
    let mut agent = client.command(OFFLOAD, s);
    agent
        .args(["agent", "--socket"])
        .arg(s.join("agent.sock"))
        .env("OFFLOAD_SLOTS_DIR", s.join("slots"))
        .stderr(Stdio::piped());
    let mut agent = agent.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(agent.stderr.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(
        line.contains("listening on"),
        "the agent did not listen: {line}"
    );
    let (top, stderr) = nix_build(&client, "newest-hook-agent");
    assert_eq!(built_remotely(&stderr), 7, "{stderr}");
    verify(&client, &top);
    drop(client);
    let _ = agent.wait();
}
