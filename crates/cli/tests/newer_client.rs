//! Today's Nix as the local Nix: the real `offload` binary on a client whose Nix is
//! Debian 13's Nix 2.26 (test-support's `newer_client`: the root `scripts/newer-nix.sh`
//! makes, entered with `pivot_root` so that 2.26 sandboxes its builds, with a store of
//! its own). The other files run the same paths with Nix 2.8: `offload build` over
//! loopback and sshd builders, `nix-build` with `offload hook` under a 2.26 daemon for
//! an ordinary user, flakes with 2.26's `nix`, and the trust check.

use std::path::{Path, PathBuf};
use std::process::Command;

use offload_test_support::newer_client::{require_newer_client, ClientOptions, NewerClient};
use offload_test_support::{loopback_machine, loopback_serve_program, salt, text};

const OFFLOAD: &str = env!("CARGO_BIN_EXE_offload");

/// Eight derivations: four leaves, two over two leaves each, a top over those two, and
/// a lone one; each logs a line and writes its Debian release (13 where 2.26 built it).
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
         in {{ top = mk "top" mids; lone = mk "lone" []; all = [ (mk "top" mids) (mk "lone" []) ]; }}"#
    )
}

fn client(options: ClientOptions) -> Option<NewerClient> {
    require_newer_client(&ClientOptions {
        offload: PathBuf::from(OFFLOAD),
        ..options
    })
}

/// `offload ARGS` as root in the client, in `cwd`, its history, ledger and (absent)
/// config file kept in `cwd`.
fn offload(client: &NewerClient, cwd: &Path) -> Command {
    let mut cmd = client.command(OFFLOAD, cwd);
    offload_env(&mut cmd, cwd);
    cmd
}

fn offload_env(cmd: &mut Command, cwd: &Path) {
    cmd.env("OFFLOAD_HISTORY", cwd.join("history.sqlite"))
        .env("OFFLOAD_CONFIG", cwd.join("offload-config.toml"))
        .env("OFFLOAD_SLOTS_DIR", cwd.join("slots"));
}

/// Runs `cmd` and returns its stdout; panics with its stderr if it fails.
fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Two loopback builders (chroot stores in `dir`, served by the client's own
/// `nix-store`), faster than the client so that the plan uses them.
fn loopback_builders(dir: &Path) -> String {
    let program = loopback_serve_program(dir);
    (1..=2)
        .map(|i| loopback_machine(dir, &format!("m{i}"), &program, 2, 4))
        .collect::<Vec<_>>()
        .join(";")
}

/// The builds per machine the summary reports, remote ones summed.
fn remote_builds(stderr: &str) -> usize {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("builds per machine: "))
        .unwrap_or_else(|| panic!("no summary in: {stderr}"));
    line.split(", ")
        .filter_map(|entry| entry.rsplit_once(' '))
        .filter(|(m, _)| *m != "local")
        .map(|(_, n)| n.parse::<usize>().unwrap())
        .sum()
}

/// Derivations the run or Nix says it built on another machine.
fn built_remotely(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("building '") && !l.contains(" on 'local'"))
        .filter(|l| l.contains("' on '"))
        .filter_map(|l| l.split('\'').nth(1))
        .map(str::to_string)
        .collect()
}

/// What the client's 2.26 says of its own store and of `drv`'s log: the store verifies
/// (contents included), and both `nix-store -l` and `nix log` show the build's line.
fn assert_store_sound_and_log_kept(client: &NewerClient, cwd: &Path, drv: &str, line: &str) {
    let verify = client
        .command("nix-store", cwd)
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify.stderr));
    let log = ok(client.command("nix-store", cwd).args(["-l", drv]));
    assert!(log.contains(line), "{drv}: {log:?}");
    let log = ok(client.command("nix", cwd).args([
        "--extra-experimental-features",
        "nix-command",
        "log",
        drv,
    ]));
    assert!(log.contains(line), "{drv}: {log:?}");
}

#[test]
fn offload_build_with_nix_2_26_over_loopback_builders() {
    let Some(client) = client(ClientOptions::default()) else {
        return;
    };
    let work = client.work();
    let version = ok(client.command("nix-store", &work).arg("--version"));
    assert!(version.contains("2.26"), "{version}");
    std::fs::write(work.join("graph.nix"), graph(&salt("client-loopback"))).unwrap();
    let build = || {
        offload(&client, &work)
            .args(["build", "graph.nix", "-A", "top", "-j2", "--builders"])
            .arg(loopback_builders(&work))
            .output()
            .unwrap()
    };
    let out = build();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(remote_builds(&stderr) > 0, "builders were used: {stderr}");
    let top = text(&out.stdout).trim().to_string();
    assert!(top.ends_with("-top"), "{top}");
    // The result link, a GC root of the 2.26 store, and the output valid there.
    assert_eq!(
        std::fs::read_link(work.join("result")).unwrap(),
        Path::new(&top)
    );
    let roots = ok(client
        .command("nix-store", &work)
        .args(["-q", "--roots", &top]));
    assert!(
        roots.contains(&format!("{}/result", work.display())),
        "{roots}"
    );
    ok(client
        .command("nix-store", &work)
        .args(["--verify-path", &top]));
    let name = std::fs::read_to_string(client.host_path(&format!("{top}/name"))).unwrap();
    assert_eq!(name, "top\n");
    let remote = built_remotely(&stderr);
    let drv = remote.first().expect("a remote build");
    let drv_name = drv.rsplit_once('-').unwrap().1.trim_end_matches(".drv");
    assert_store_sound_and_log_kept(&client, &work, drv, &format!("building {drv_name}"));
    let again = build();
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("built 0 derivations"),
        "{}",
        text(&again.stderr)
    );
}
