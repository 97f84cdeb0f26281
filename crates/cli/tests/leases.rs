//! Builder slots leased in the shared state (a private PostgreSQL server) by clients
//! building on one real sshd builder: the leases follow the builder's slots (never more
//! builds on it than its slots, counted by their marker processes, and never more
//! leases), each lease names who holds it for which build, and a client killed with
//! SIGKILL frees its leases at once: a client launched at the kill holds every slot
//! within 2 s; Nix's build hook leases the slots it builds on too.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use offload_test_support::{
    nix_command, require_postgres, require_sshd_fleet_with, run_ok, salt, start_hook_agent, text,
    write_executable, HostOptions, PgServer, SshFleet,
};

/// The builder's slots.
const SLOTS: usize = 2;
/// Each build's marker process: counting them counts the builds running.
const MARKER: &str = "sleep 1.43";

struct Work {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        let expr = r#"{ salt, prefix, n, sleep }:
            builtins.genList (i: derivation {
              name = "${prefix}-${toString i}"; system = builtins.currentSystem;
              builder = "/bin/sh"; PATH = "/bin:/usr/bin"; inherit salt;
              args = [ "-c" "sleep ${sleep}; mkdir $out" ];
            }) n"#;
        let file = dir.path().join("default.nix");
        std::fs::write(&file, expr).unwrap();
        Work { dir, file }
    }

    /// The schema made, as the first client would, so the test reads leases at once.
    fn schema(&self, pg: &PgServer) {
        let local = self.home("schema").join("state.sqlite");
        drop(offload_driver::StateDb::open_shared(&pg.uri(), &local).unwrap());
    }

    fn home(&self, name: &str) -> PathBuf {
        let home = self.dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        home
    }

    /// `offload build -j0` of `n` builds named `prefix-i` that sleep `sleep` seconds, on
    /// the builder alone, with the shared state at `uri`.
    fn build(&self, fleet: &SshFleet, name: &str, uri: &str, n: usize, sleep: &str) -> Child {
        let (var, opts) = fleet.ssh_opts();
        common::offload(&self.home(name))
            .env(var, opts)
            .env("OFFLOAD_STATE", uri)
            .arg("build")
            .arg(&self.file)
            .args(["-j0", "--no-out-link", "--quiet"])
            .args(["--argstr", "salt", &salt("leases")])
            .args(["--argstr", "prefix", name])
            .args(["--arg", "n", &n.to_string()])
            .args(["--argstr", "sleep", sleep])
            .args([
                "--builders",
                &format!("ssh://{} - - {SLOTS} 1", fleet.alias(0)),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// The leases of live sessions: `pid|who|what` each.
fn leases(pg: &PgServer) -> Vec<String> {
    pg.psql(
        "SELECT pid || '|' || who || '|' || what FROM leases
         WHERE pid IN (SELECT pid FROM pg_stat_activity)",
    )
    .unwrap()
    .lines()
    .map(str::to_string)
    .collect()
}

fn markers() -> usize {
    let out = Command::new("pgrep")
        .args(["-fxc", MARKER])
        .output()
        .unwrap();
    text(&out.stdout).trim().parse().unwrap_or(0)
}

fn fleet() -> Option<SshFleet> {
    require_sshd_fleet_with(&[HostOptions::default()])
}

fn succeeded(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn leases_follow_the_builder_slots_across_clients() {
    let Some(pg) = require_postgres() else { return };
    let Some(fleet) = fleet() else { return };
    let work = Work::new();
    work.schema(&pg);
    let sleep = MARKER.trim_start_matches("sleep ");
    let mut clients = vec![
        work.build(&fleet, "ann", &pg.uri(), 4, sleep),
        work.build(&fleet, "bob", &pg.uri(), 4, sleep),
    ];
    let (mut most_markers, mut most_leases) = (0, 0);
    let mut holders: Vec<String> = Vec::new();
    while clients.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        let held = leases(&pg);
        most_markers = most_markers.max(markers());
        most_leases = most_leases.max(held.len());
        for lease in held {
            let (pid, rest) = lease.split_once('|').unwrap();
            let (who, what) = rest.split_once('|').unwrap();
            assert!(who.contains('@'), "{lease}");
            assert!(
                what.starts_with("ann-") || what.starts_with("bob-"),
                "{lease}"
            );
            if !holders.iter().any(|h| h == pid) {
                holders.push(pid.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in clients {
        succeeded(c);
    }
    assert!(most_markers <= SLOTS, "{most_markers} builds at once");
    assert!(most_leases <= SLOTS, "{most_leases} leases at once");
    assert_eq!(most_leases, SLOTS, "the slots were never all leased");
    assert_eq!(holders.len(), 2, "both clients held leases: {holders:?}");
    assert!(leases(&pg).is_empty(), "leases left: {:?}", leases(&pg));
}

#[test]
fn a_killed_client_frees_its_leases_at_once() {
    let Some(pg) = require_postgres() else { return };
    let Some(fleet) = fleet() else { return };
    let work = Work::new();
    work.schema(&pg);
    let mut dying = work.build(&fleet, "dying", &pg.uri(), SLOTS, "60");
    let deadline = Instant::now() + Duration::from_secs(60);
    while leases(&pg).len() < SLOTS {
        assert!(Instant::now() < deadline, "the slots were never leased");
        assert!(dying.try_wait().unwrap().is_none(), "the client ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    dying.kill().unwrap();
    let killed = Instant::now();
    let taker = work.build(&fleet, "taker", &pg.uri(), SLOTS, "3");
    let _ = dying.wait();
    let taken = loop {
        let held = leases(&pg);
        if held
            .iter()
            .filter(|l| l.ends_with("|taker-0") || l.ends_with("|taker-1"))
            .count()
            == SLOTS
        {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the new client never held every slot: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("a client launched at the kill held every slot after {taken:?}");
    assert!(taken < Duration::from_secs(2), "{taken:?}");
    succeeded(taker);
}

#[test]
fn nix_build_hook_leases_the_slots_it_builds_on() {
    let Some(pg) = require_postgres() else { return };
    let Some(fleet) = fleet() else { return };
    let work = Work::new();
    work.schema(&pg);
    // The hook building itself, then through the agent.
    for with_agent in [false, true] {
        let home = work.home(if with_agent { "agent" } else { "hook" });
        let agent = with_agent.then(|| {
            let (var, opts) = fleet.ssh_opts();
            let env = [("OFFLOAD_STATE", pg.uri()), (var, opts)];
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            start_hook_agent(Path::new(env!("CARGO_BIN_EXE_offload")), &home, &env).0
        });
        let most = hook_build(&work, &fleet, &pg, &home);
        if let Some(mut agent) = agent {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        assert_eq!(most, SLOTS, "not both builds leased (agent: {with_agent})");
        assert!(leases(&pg).is_empty());
    }
}

/// `nix-build -j0` of two builds through the hook (and the agent at `home`'s socket when
/// it runs); the most leases seen at once, each checked to name a build of it.
fn hook_build(work: &Work, fleet: &SshFleet, pg: &PgServer, home: &Path) -> usize {
    // The hook runs in nix-build's environment: the script gives it the shared state,
    // a local file and ledger of its own, and the agent's socket.
    let hook = home.join("hook");
    write_executable(
        &hook,
        &format!(
            "#!/bin/sh\nexport OFFLOAD_STATE='{}' OFFLOAD_HISTORY={d}/history.sqlite \
             OFFLOAD_SLOTS_DIR={d}/slots OFFLOAD_AGENT_SOCKET={d}/agent.sock\n\
             exec {} hook \"$@\"\n",
            pg.uri(),
            env!("CARGO_BIN_EXE_offload"),
            d = home.display()
        ),
    );
    let (var, opts) = fleet.ssh_opts();
    let mut nix_build = nix_command("nix-build")
        .env(var, opts)
        .arg(&work.file)
        .args(["--no-out-link", "-j0"])
        .args(["--argstr", "salt", &salt("hook-leases")])
        .args([
            "--argstr", "prefix", "hook", "--arg", "n", "2", "--argstr", "sleep", "3",
        ])
        .args([
            "--builders",
            &format!("ssh://{} - - {SLOTS} 1", fleet.alias(0)),
        ])
        .arg("--option")
        .arg("build-hook")
        .arg(&hook)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut most = 0;
    while nix_build.try_wait().unwrap().is_none() {
        let held = leases(pg);
        assert!(held.iter().all(|l| l.contains("|hook-")), "{held:?}");
        most = most.max(held.len());
        std::thread::sleep(Duration::from_millis(50));
    }
    succeeded(nix_build);
    most
}
