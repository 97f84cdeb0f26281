//! `offload hook` as Nix's build hook: real `nix-build` (root, local store), a real
//! nix-daemon whose `nix.conf` sets `build-hook` and `builders` with an ordinary user,
//! and the hook's decisions spoken to directly in Nix's protocol.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use offload_nix::hook::{encode_settings, TryRequest};
use offload_test_support::daemon::TEST_USER;
use offload_test_support::{
    nix_command, nix_system, require_daemon_install, require_nix, require_root, run_ok,
    DaemonConfig,
};
use offload_test_support::{salt, text};

/// Four leaves under a top, unique per `salt`.
fn graph(salt: &str) -> String {
    format!(
        r#"let mk = name: deps: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}";
             args = [ "-c" "echo building $name; mkdir $out; echo $name > $out/name" ];
           }};
           leaves = builtins.genList (i: mk "leaf${{toString i}}" []) 4;
         in mk "top" leaves"#
    )
}

/// A work directory (readable by the test user) with loopback builders, the hook
/// script Nix runs, and offload's history and slot ledger.
struct Setup {
    dir: tempfile::TempDir,
    program: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        let program = offload_test_support::loopback_serve_program(dir.path());
        let s = Setup { dir, program };
        // The hook runs in the environment of whoever builds (nix-build, the daemon):
        // the script gives it this test's history and ledger.
        s.script(
            "hook",
            &format!(
                "export OFFLOAD_HISTORY={d}/history.sqlite OFFLOAD_SLOTS_DIR={d}/slots \
                 OFFLOAD_AGENT_SOCKET={d}/agent.sock\nexec {} hook \"$@\"",
                env!("CARGO_BIN_EXE_offload"),
                d = s.path().display()
            ),
        );
        s
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path().join(name);
        offload_test_support::write_executable(&path, &format!("#!/bin/sh\n{body}\n"));
        path
    }

    fn uri(&self, i: usize) -> String {
        format!(
            "ssh://localhost?remote-store={}/m{i}&remote-program={}",
            self.path().display(),
            self.program.display()
        )
    }

    /// Two builders of two slots at `speed`.
    fn builders(&self, speed: u32) -> String {
        (1..=2)
            .map(|i| format!("{} {} - 2 {speed}", self.uri(i), nix_system()))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// A nix-daemon whose hook is offload's, with this setup's builders, serving an
    /// ordinary user it does not trust.
    fn daemon_with_hook(&self) -> Option<offload_test_support::DaemonInstall> {
        let config = DaemonConfig {
            trust_user: false,
            extra_conf: vec![
                format!("build-hook = {}", self.path().join("hook").display()),
                format!("builders = {}", self.builders(4)),
            ],
            ..DaemonConfig::default()
        };
        require_daemon_install(&config)
    }

    /// `offload agent` on `socket` (members of `group` admitted too), once it listens.
    fn start_agent(&self, socket: &Path, group: Option<&str>) -> std::process::Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_offload"));
        cmd.args(["agent", "--socket"]).arg(socket);
        if let Some(group) = group {
            cmd.args(["--group", group]);
        }
        let mut agent = cmd
            .env("OFFLOAD_SLOTS_DIR", self.path().join("slots"))
            .env("NIX_CONFIG", "substituters =")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // It says so once the socket is ready, its mode and group set.
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
        agent
    }

    fn write_graph(&self, tag: &str) -> PathBuf {
        let file = self.path().join("graph.nix");
        std::fs::write(&file, graph(&salt(tag))).unwrap();
        file
    }

    fn nix_build(&self, file: &Path, builders: &str, jobs: &str) -> Output {
        nix_command("nix-build")
            .arg(file)
            .args(["--no-out-link", "-j", jobs, "--builders", builders])
            .arg("--option")
            .arg("build-hook")
            .arg(self.path().join("hook"))
            .output()
            .unwrap()
    }
}

/// Derivations Nix says it built on another machine.
fn remote_builds(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("building '") && l.contains(" on 'ssh://"))
        .collect()
}

#[test]
fn nix_build_hands_builds_to_offload_hook() {
    if !require_nix() || !require_root() {
        return;
    }
    let setup = Setup::new();
    let file = setup.write_graph("nix-build");
    let drv = run_ok(nix_command("nix-instantiate").arg(&file));
    let expected = run_ok(nix_command("nix-store").args(["-q", "--outputs", drv.trim()]));
    // Builders four times as fast as this machine: with no history, each build would
    // finish there first.
    let out = setup.nix_build(&file, &setup.builders(4), "1");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout).trim(), expected.trim());
    let remote = remote_builds(&stderr);
    assert!(!remote.is_empty(), "nothing built remotely:\n{stderr}");
    let verify = run_ok(nix_command("nix-store").args(["--verify", "--check-contents"]));
    assert!(!verify.contains("error"), "{verify}");
    // The log of a remote build is where `nix-store -l` finds it.
    let remote_drv = remote[0].split('\'').nth(1).unwrap();
    let name = remote_drv
        .rsplit_once('-')
        .unwrap()
        .1
        .trim_end_matches(".drv");
    let log = run_ok(nix_command("nix-store").args(["-l", remote_drv]));
    assert!(log.contains(&format!("building {name}")), "{log}");
}

#[test]
fn with_the_agent_running_builds_reuse_its_sessions() {
    if !require_nix() || !require_root() {
        return;
    }
    let setup = Setup::new();
    let d = setup.path().display().to_string();
    // The builder's serve program notes every session it starts.
    setup.script(
        "nix-store-counting",
        &format!(
            "echo started >> {d}/sessions\nexec nix-store --option build-users-group '' \"$@\""
        ),
    );
    let builder = format!(
        "ssh://localhost?remote-store={d}/counted&remote-program={d}/nix-store-counting {} - 1 4",
        nix_system()
    );
    let sessions =
        || std::fs::read_to_string(setup.path().join("sessions")).map_or(0, |s| s.lines().count());
    let socket = setup.path().join("agent.sock");
    let mut agent = setup.start_agent(&socket, None);
    let file = setup.write_graph("agent");
    let out = setup.nix_build(&file, &builder, "0");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(remote_builds(&stderr).len(), 5, "{stderr}");
    // Five builds, one session kept warm between them.
    let with_agent = sessions();
    assert_eq!(with_agent, 1, "{stderr}");

    // A second agent on the same socket is refused while the first runs.
    let second = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["agent", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2));
    assert!(
        text(&second.stderr).contains("already listens"),
        "{}",
        text(&second.stderr)
    );

    // Stopped, it removes its socket; the hook then opens a session per build.
    run_ok(Command::new("kill").arg(agent.id().to_string()));
    agent.wait().unwrap();
    assert!(!socket.exists());
    let file = setup.write_graph("no-agent");
    let out = setup.nix_build(&file, &builder, "0");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sessions() - with_agent, 5);
}

#[test]
fn the_agent_socket_admits_a_group_or_only_its_user() {
    if !require_root() {
        return;
    }
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let setup = Setup::new();
    run_ok(Command::new("groupadd").args(["-f", "offload-test-builders"]));
    for (group, mode) in [(Some("offload-test-builders"), 0o660), (None, 0o600)] {
        let socket = setup.path().join("agent.sock");
        let mut agent = setup.start_agent(&socket, group);
        let meta = std::fs::metadata(&socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode);
        if group.is_some() {
            let gid = run_ok(Command::new("getent").args(["group", "offload-test-builders"]));
            assert_eq!(meta.gid().to_string(), gid.split(':').nth(2).unwrap());
        }
        run_ok(Command::new("kill").arg(agent.id().to_string()));
        agent.wait().unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["agent", "--group", "no-such-offload-group", "--socket"])
        .arg(setup.path().join("other.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("groupadd no-such-offload-group"));
}

#[test]
fn nix_build_keeps_quick_builds_on_an_idle_local_machine() {
    if !require_nix() || !require_root() {
        return;
    }
    let setup = Setup::new();
    let file = setup.write_graph("local-faster");
    // The history says these take 0.1 s: here at once beats a builder of the same speed
    // after a session's cost.
    let history = offload_driver::StateDb::open(&setup.path().join("history.sqlite")).unwrap();
    for name in ["leaf0", "leaf1", "leaf2", "leaf3", "top"] {
        history
            .record(name, nix_system(), "local", 0.1, 1.0, None)
            .unwrap();
    }
    let out = setup.nix_build(&file, &setup.builders(1), "8");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(remote_builds(&stderr), Vec::<&str>::new(), "{stderr}");
}

/// Runs `offload hook 3` with `stdin` (Nix's frames) and returns its stderr and status.
fn hook_says(setup: &Setup, stdin: &[u8]) -> (String, Option<i32>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["hook", "3"])
        .env("OFFLOAD_HISTORY", setup.path().join("history.sqlite"))
        .env("OFFLOAD_SLOTS_DIR", setup.path().join("slots"))
        .env_remove("OFFLOAD_HOOK_BUILDERS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (text(&out.stderr), out.status.code())
}

fn frames(builders: &str, request: &TryRequest) -> Vec<u8> {
    let mut bytes = encode_settings([
        ("builders", builders),
        ("max-jobs", "1"),
        ("system", nix_system()),
        ("system-features", ""),
    ]);
    bytes.extend(request.encode());
    bytes
}

#[test]
fn hook_answers_decline_postpone_and_decline_permanently() {
    let setup = Setup::new();
    let drv = "/nix/store/00000000000000000000000000000000-quick-1.0.drv".to_string();
    let history = offload_driver::StateDb::open(&setup.path().join("history.sqlite")).unwrap();
    history
        .record("quick-1.0", nix_system(), "local", 0.2, 1.0, None)
        .unwrap();
    let mut request = TryRequest {
        am_willing: true,
        system: nix_system().to_string(),
        drv_path: drv,
        required_features: Vec::new(),
    };
    let one = format!("{} {} - 1 1", setup.uri(1), nix_system());
    // Same speed, a 0.2 s build: this machine finishes first.
    let (said, code) = hook_says(&setup, &frames(&one, &request));
    assert_eq!((said.as_str(), code), ("# decline\n", Some(0)));
    // No machines at all.
    let (said, _) = hook_says(&setup, &frames("", &request));
    assert_eq!(said, "# decline-permanently\n");
    // Not willing, and the builder's one slot is held (as Nix's hook would hold it).
    request.am_willing = false;
    let lock = setup
        .path()
        .join("slots")
        .join(format!("{}-0", setup.uri(1).replace('/', "_")));
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    // util-linux flock(1) holds it for 3 s (its `sleep` inherits the lock).
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "3"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (said, _) = hook_says(&setup, &frames(&one, &request));
    assert!(holder.wait().unwrap().success());
    assert_eq!(said, "# postpone\n");
}

#[test]
fn a_daemon_with_offload_hook_builds_for_an_ordinary_user() {
    let setup = Setup::new();
    let Some(install) = setup.daemon_with_hook() else {
        return;
    };
    let work = install.user_dir("work");
    let file = work.join("graph.nix");
    std::fs::write(&file, graph(&salt("daemon"))).unwrap();
    run_ok(Command::new("chown").arg(TEST_USER).arg(&file));
    let nix_build = which("nix-build");
    let out = install
        .command(&nix_build, &work)
        .arg(&file)
        .arg("--no-out-link")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let remote = remote_builds(&stderr);
    assert!(!remote.is_empty(), "nothing built remotely:\n{stderr}");
    // The outputs are in the daemon's store.
    let path = text(&out.stdout).trim().to_string();
    run_ok(nix_command("nix-store").args(["--verify-path", &path]));
    // `nix log` as the user shows a remote build's log.
    let remote_drv = remote[0].split('\'').nth(1).unwrap().to_string();
    let nix = which("nix");
    let log = install
        .command(&nix, &work)
        .args([
            "--extra-experimental-features",
            "nix-command",
            "log",
            &remote_drv,
        ])
        .output()
        .unwrap();
    assert!(log.status.success(), "{}", text(&log.stderr));
    assert!(
        text(&log.stdout).contains("building "),
        "{}",
        text(&log.stdout)
    );
}

fn which(program: &str) -> PathBuf {
    let out = run_ok(Command::new("sh").args(["-c", &format!("command -v {program}")]));
    PathBuf::from(out.trim())
}

#[test]
fn an_ordinary_user_chooses_hosts_for_a_daemon_build_through_the_agent() {
    let setup = Setup::new();
    let Some(install) = setup.daemon_with_hook() else {
        return;
    };
    // The agent runs as root, as the daemon's hooks do; the user may talk to it.
    run_ok(Command::new("groupadd").args(["-f", "offload-test-builders"]));
    run_ok(Command::new("usermod").args(["-aG", "offload-test-builders", TEST_USER]));
    let socket = setup.path().join("agent.sock");
    let mut agent = setup.start_agent(&socket, Some("offload-test-builders"));

    let work = install.user_dir("work");
    let file = work.join("graph.nix");
    std::fs::write(&file, graph(&salt("chosen"))).unwrap();
    run_ok(Command::new("chown").arg(TEST_USER).arg(&file));
    let out = install
        .command(Path::new(env!("CARGO_BIN_EXE_offload")), &work)
        .env("OFFLOAD_AGENT_SOCKET", &socket)
        .env("OFFLOAD_CONFIG", work.join("none.toml"))
        .env("OFFLOAD_HISTORY", work.join("history.sqlite"))
        .arg("build")
        .arg(&file)
        .args(["--through-daemon", "--on"])
        .arg(setup.uri(2))
        .output()
        .unwrap();
    run_ok(Command::new("kill").arg(agent.id().to_string()));
    agent.wait().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Every build went to the chosen machine, none to the other.
    let top = text(&out.stdout).trim().to_string();
    assert!(top.ends_with("-top"), "{top}");
    let valid_on = |i: usize| {
        nix_command("nix-store")
            .args(["--store"])
            .arg(setup.path().join(format!("m{i}")))
            .args(["--check-validity", &top])
            .status()
            .unwrap()
            .success()
    };
    assert!(valid_on(2), "not built on the chosen machine:\n{stderr}");
    assert!(!valid_on(1), "built on a machine not chosen:\n{stderr}");
    // Nor any of the leaves: the other machine's store holds none of the graph.
    let other = std::fs::read_dir(setup.path().join("m1/nix/store"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().contains("-leaf"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(other, 0, "leaves built on a machine not chosen:\n{stderr}");
    // The result link is the user's, the output in the daemon's store.
    assert_eq!(
        std::fs::read_link(work.join("result")).unwrap(),
        Path::new(&top)
    );
    run_ok(nix_command("nix-store").args(["--verify-path", &top]));
}

#[test]
fn an_unreachable_builder_is_passed_over_and_the_build_stays_here() {
    if !require_nix() || !require_root() {
        return;
    }
    let setup = Setup::new();
    let file = setup.write_graph("unreachable");
    // Four times faster than this machine, so chosen first, but nothing answers there.
    let builders = format!("ssh://offload-no-such-host.invalid {} - 2 4", nix_system());
    let out = setup.nix_build(&file, &builders, "2");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(remote_builds(&stderr).is_empty(), "{stderr}");
    assert!(
        stderr.contains("cannot use offload-no-such-host.invalid"),
        "the warning names the machine:\n{stderr}"
    );
    assert!(
        stderr.contains("hint:"),
        "and says what to check:\n{stderr}"
    );

    // The same with the agent running: it readies the session, and says why not.
    let socket = setup.path().join("agent.sock");
    let mut agent = setup.start_agent(&socket, None);
    let file = setup.write_graph("unreachable-agent");
    let out = setup.nix_build(&file, &builders, "2");
    run_ok(Command::new("kill").arg(agent.id().to_string()));
    agent.wait().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(remote_builds(&stderr).is_empty(), "{stderr}");
    assert!(
        stderr.contains("cannot use offload-no-such-host.invalid"),
        "with the agent:\n{stderr}"
    );
}

#[test]
fn a_stale_agent_socket_is_replaced() {
    let setup = Setup::new();
    let socket = setup.path().join("agent.sock");
    // A socket whose agent is gone: the file stays, nobody listens.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut agent = setup.start_agent(&socket, None);
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    run_ok(Command::new("kill").arg(agent.id().to_string()));
    agent.wait().unwrap();
    assert!(
        !socket.exists(),
        "the agent removes its socket when it stops"
    );
}
