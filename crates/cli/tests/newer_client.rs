//! Today's Nix as the local Nix: the real `offload` binary on a client whose Nix is
//! Debian 13's Nix 2.26 (test-support's `newer_client`: the root `scripts/newer-nix.sh`
//! makes, entered with `pivot_root` so that 2.26 sandboxes its builds, with a store of
//! its own). The other files run the same paths with Nix 2.8: `offload build` over
//! loopback and sshd builders, `nix-build` with `offload hook` under a 2.26 daemon for
//! an ordinary user, flakes with 2.26's `nix`, and the trust check.
//!
//! The last test runs the newest Nix Debian has (Debian unstable's: 2.34 when its root
//! was made) under a daemon, as on NixOS: from Nix 2.29 on no Nix reads
//! `NIX_HELD_LOCKS`, so the hook's import of outputs whose locks Nix holds waited for
//! ever until offload removed the held locks' names (driver's order/held_locks.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use offload_test_support::newer_client::{require_newer_client, ClientOptions, NewerClient};
use offload_test_support::{loopback_machine, loopback_serve_program, require_sshd_fleet, salt};
use offload_test_support::{text, write_executable};

const OFFLOAD: &str = env!("CARGO_BIN_EXE_offload");

/// Eight derivations: four leaves, two over two leaves each, a top over those two, and
/// a lone one, each logging a line; and `bad`, which fails.
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
           bad = derivation {{
             name = "bad"; system = builtins.currentSystem; builder = "/bin/sh";
             salt = "{salt}"; args = [ "-c" "echo about to fail; exit 3" ];
           }};
         in {{
           top = mk "top" mids; lone = mk "lone" []; all = [ (mk "top" mids) (mk "lone" []) ];
           inherit bad;
         }}"#
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
    // A build that fails there names the derivation, the machine and its log.
    let out = offload(&client, &work)
        .args(["build", "graph.nix", "-A", "bad", "-j0", "--builders"])
        .arg(loopback_builders(&work))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for said in ["-bad.drv", "localhost:", "about to fail", "exit code 3"] {
        assert!(stderr.contains(said), "{said}: {stderr}");
    }
    let again = build();
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("built 0 derivations"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn offload_build_with_nix_2_26_over_sshd_builders() {
    let Some(fleet) = require_sshd_fleet(2) else {
        return;
    };
    // The fleet's ssh config, key and known hosts, where the client's ssh finds them.
    let fleet_dir = fleet.ssh_config().parent().unwrap().to_path_buf();
    let Some(client) = client(ClientOptions {
        visible: vec![fleet_dir],
        ..ClientOptions::default()
    }) else {
        return;
    };
    let work = client.work();
    std::fs::write(work.join("graph.nix"), graph(&salt("client-sshd"))).unwrap();
    let builders = (0..2)
        .map(|i| {
            format!(
                "{} {} - 2 4",
                fleet.store_uri(i),
                offload_test_support::nix_system()
            )
        })
        .collect::<Vec<_>>()
        .join(";");
    let (opts_name, opts) = fleet.ssh_opts();
    // -j0: every build goes to a builder.
    let out = offload(&client, &work)
        .env(opts_name, opts)
        .args([
            "build",
            "graph.nix",
            "-A",
            "all",
            "-j0",
            "--builders",
            &builders,
        ])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(remote_builds(&stderr), 8, "{stderr}");
    let outputs: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(outputs.len(), 2, "{outputs:?}");
    assert_eq!(
        std::fs::read_link(work.join("result")).unwrap(),
        Path::new(&outputs[0])
    );
    assert_eq!(
        std::fs::read_link(work.join("result-2")).unwrap(),
        Path::new(&outputs[1])
    );
    for path in &outputs {
        ok(client
            .command("nix-store", &work)
            .args(["--verify-path", path]));
        assert!(
            (0..2).any(|i| fleet.is_valid(i, path)),
            "{path} was built on a host: {stderr}"
        );
    }
    let top_drv = ok(client
        .command("nix-store", &work)
        .args(["-q", "--deriver", &outputs[0]]));
    assert_store_sound_and_log_kept(&client, &work, top_drv.trim(), "building top");
}

/// A directory of the test's, visible in the client, for what must exist before the
/// client starts: the hook script its daemon is started with, keys it trusts.
fn setup_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new("chmod").arg("755").arg(dir.path()));
    dir
}

#[test]
fn nix_build_under_a_2_26_daemon_hands_builds_to_offload_hook_for_an_ordinary_user() {
    let setup = setup_dir();
    let s = setup.path();
    let d = s.display();
    let hook = s.join("hook");
    // The hook runs in the daemon's environment: the script gives it this test's
    // history, ledger and agent socket.
    write_executable(
        &hook,
        &format!(
            "#!/bin/sh\nexport OFFLOAD_HISTORY={d}/history.sqlite OFFLOAD_SLOTS_DIR={d}/slots \
             OFFLOAD_CONFIG={d}/none.toml OFFLOAD_AGENT_SOCKET={d}/agent.sock\n\
             exec {OFFLOAD} hook \"$@\"\n"
        ),
    );
    // Two builders, whose serve program notes every session it starts.
    write_executable(
        &s.join("nix-store-counting"),
        &format!("#!/bin/sh\necho started >> {d}/sessions\nexec nix-store \"$@\"\n"),
    );
    let uri = |i: u32| {
        format!("ssh://localhost?remote-store={d}/b{i}&remote-program={d}/nix-store-counting")
    };
    let sys = offload_test_support::nix_system();
    let builders = format!("{} {sys} - 1 4;{} {sys} - 1 4", uri(1), uri(2));
    let sessions = || std::fs::read_to_string(s.join("sessions")).map_or(0, |t| t.lines().count());
    // Nix 2.25 to 2.33 ignore `build-hook` in nix.conf (nix.conf is read before the
    // `nix` binary sets its own hook as the default): the daemon gets it as an option.
    let Some(client) = client(ClientOptions {
        nix_conf: format!("builders = {builders}\ntrusted-users = root\n"),
        daemon: Some(vec![
            "--option".into(),
            "build-hook".into(),
            hook.display().to_string(),
        ]),
        visible: vec![s.to_path_buf()],
        ..ClientOptions::default()
    }) else {
        return;
    };
    let work = client.work();
    // -j0: the daemon builds nothing itself, so every build goes to the hook.
    let nix_build = |tag: &str| {
        write_user_graph(&client, tag);
        let out = client
            .user_command("nix-build", &work)
            .args(["graph.nix", "-A", "top", "--no-out-link", "-j0"])
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(
            out.status.success(),
            "{stderr}\ndaemon: {}",
            client.daemon_log()
        );
        (text(&out.stdout).trim().to_string(), stderr)
    };
    let (top, stderr) = nix_build("client-hook");
    let remote = built_remotely(&stderr);
    assert_eq!(remote.len(), 7, "{stderr}");
    // offload's hook, not Nix's own, took them: it kept its history.
    assert!(
        s.join("history.sqlite").exists(),
        "offload hook did not run:\n{stderr}"
    );
    ok(client
        .command("nix-store", &work)
        .args(["--verify-path", &top]));
    // The user sees a remote build's log with 2.26's `nix log`.
    let log = ok(client.user_command("nix", &work).args([
        "--extra-experimental-features",
        "nix-command",
        "log",
        &remote[0],
    ]));
    assert!(log.contains("building "), "{log}");

    // With `offload agent` running (root, as the daemon's hooks; the user in its
    // group), builds share its warm sessions.
    for cmd in [
        &["groupadd", "offload-test-builders"][..],
        &["usermod", "-aG", "offload-test-builders", "offload-tester"],
    ] {
        ok(client.command(cmd[0], s).args(&cmd[1..]));
    }
    let mut agent = client.command(OFFLOAD, s);
    agent
        .args(["agent", "--group", "offload-test-builders", "--socket"])
        .arg(s.join("agent.sock"))
        .env("OFFLOAD_SLOTS_DIR", s.join("slots"))
        .stderr(std::process::Stdio::piped());
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
    let before = sessions();
    assert!(
        before >= 7,
        "without the agent, a session per build: {before}"
    );
    let (top, stderr) = nix_build("client-hook-agent");
    assert_eq!(built_remotely(&stderr).len(), 7, "{stderr}");
    assert!(
        sessions() - before < 7,
        "{} sessions for 7 builds: {stderr}",
        sessions() - before
    );
    ok(client
        .command("nix-store", &work)
        .args(["--verify-path", &top]));

    // The user chooses the builder for the daemon's builds, through the agent.
    write_user_graph(&client, "client-hook-chosen");
    let mut cmd = client.user_command(OFFLOAD, &work);
    offload_env(&mut cmd, &work);
    let out = cmd
        .env("OFFLOAD_AGENT_SOCKET", s.join("agent.sock"))
        .args([
            "build",
            "graph.nix",
            "-A",
            "top",
            "--through-daemon",
            "--on",
            &uri(2),
        ])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let top = text(&out.stdout).trim().to_string();
    assert_eq!(
        std::fs::read_link(work.join("result")).unwrap(),
        Path::new(&top)
    );
    let valid_on = |i: u32| {
        let mut check = client.command("nix-store", s);
        check.arg("--store").arg(s.join(format!("b{i}")));
        check
            .args(["--check-validity", &top])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(valid_on(2), "not built on the chosen builder:\n{stderr}");
    assert!(!valid_on(1), "built on a builder not chosen:\n{stderr}");
    // Nor any other derivation of the graph.
    let drv = ok(client
        .command("nix-store", &work)
        .args(["-q", "--deriver", &top]));
    let closure = ok(client
        .command("nix-store", &work)
        .args(["-q", "--requisites", drv.trim()]));
    let drvs: Vec<&str> = closure.lines().filter(|p| p.ends_with(".drv")).collect();
    assert_eq!(drvs.len(), 7, "{closure}");
    let outputs = ok(client
        .command("nix-store", &work)
        .args(["-q", "--outputs"])
        .args(&drvs));
    let invalid_on_1 = ok(client
        .command("nix-store", s)
        .arg("--store")
        .arg(s.join("b1"))
        .args(["--check-validity", "--print-invalid"])
        .args(outputs.lines()));
    assert_eq!(
        invalid_on_1.lines().count(),
        7,
        "on b1: {outputs}\n{stderr}"
    );
    // Ending the client ends the agent inside it.
    drop(client);
    agent.wait().unwrap();
}

#[test]
fn flake_installables_build_with_nix_2_26() {
    let Some(client) = client(ClientOptions {
        nix_conf: "experimental-features = nix-command flakes\n".into(),
        ..ClientOptions::default()
    }) else {
        return;
    };
    let work = client.work();
    let flake = work.join("flake");
    std::fs::create_dir(&flake).unwrap();
    std::fs::write(
        flake.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: let
                 mk = name: derivation {{
                   inherit name; system = "{sys}"; builder = "/bin/sh"; PATH = "/bin:/usr/bin";
                   salt = "{salt}"; outputs = [ "out" "dev" ];
                   args = [ "-c" "echo $name > $out; echo $name-dev > $dev" ];
                 }};
               in {{ packages.{sys} = {{ foo = mk "foo"; bar = mk "bar"; }}; }}; }}"#,
            sys = offload_test_support::nix_system(),
            salt = salt("client-flake")
        ),
    )
    .unwrap();
    let out = offload(&client, &flake)
        .args(["build", ".#foo", ".#bar", ".#foo^dev", "-j0", "--builders"])
        .arg(loopback_builders(&work))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(remote_builds(&stderr), 2, "{stderr}");
    // `nix build` numbers the second installable `-1`, names other outputs after them.
    let read = |link: &str| {
        let target = std::fs::read_link(flake.join(link)).unwrap();
        std::fs::read_to_string(client.host_path(target.to_str().unwrap())).unwrap()
    };
    assert_eq!(read("result"), "foo\n");
    assert_eq!(read("result-1"), "bar\n");
    assert_eq!(read("result-2-dev"), "foo-dev\n");
    assert!(!flake.join("result-2").exists());

    // A flake in git (2.26 reads it with libgit2; the root has no git): what git does
    // not track is not part of it.
    let git = work.join("git-flake");
    std::fs::create_dir(&git).unwrap();
    std::fs::write(
        git.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: {{
                 packages.{sys}.default = derivation {{
                   name = if builtins.pathExists ./untracked then "saw-untracked" else "in-git";
                   system = "{sys}"; builder = "/bin/sh"; salt = "{salt}";
                   args = [ "-c" "echo $name > $out" ];
                 }}; }}; }}"#,
            sys = offload_test_support::nix_system(),
            salt = salt("client-git-flake")
        ),
    )
    .unwrap();
    for args in [
        &["init", "-q"][..],
        &["add", "flake.nix"],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "flake",
        ],
    ] {
        ok(Command::new("git").current_dir(&git).args(args));
    }
    std::fs::write(git.join("untracked"), "").unwrap();
    let installable = format!("git+file://{}", git.display());
    let out = offload(&client, &git)
        .args(["build", &installable, "-j0", "--builders"])
        .arg(loopback_builders(&work))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(remote_builds(&stderr), 1, "{stderr}");
    let target = std::fs::read_link(git.join("result")).unwrap();
    let built = std::fs::read_to_string(client.host_path(target.to_str().unwrap())).unwrap();
    assert_eq!(built, "in-git\n");
}

/// `offload build graph.nix -A top` as the client's ordinary user through its 2.26
/// daemon, over two loopback builders whose stores the user owns, served by `program`.
fn user_offload(client: &NewerClient, program: &Path, args: &[&str]) -> Output {
    let work = client.work();
    let builders = (1..=2)
        .map(|i| loopback_machine(&work, &format!("m{i}"), program, 2, 4))
        .collect::<Vec<_>>()
        .join(";");
    let mut cmd = client.user_command(OFFLOAD, &work);
    offload_env(&mut cmd, &work);
    cmd.args([
        "build",
        "graph.nix",
        "-A",
        "top",
        "-j2",
        "--builders",
        &builders,
    ])
    .args(args)
    .output()
    .unwrap()
}

/// A `remote-program` in the user's work directory: the client's `nix-store` with
/// `extra` options.
fn user_program(client: &NewerClient, name: &str, extra: &str) -> PathBuf {
    let path = client.work().join(name);
    write_executable(
        &path,
        &format!("#!/bin/sh\nexec nix-store {extra} \"$@\"\n"),
    );
    path
}

fn write_user_graph(client: &NewerClient, tag: &str) {
    let file = client.work().join("graph.nix");
    std::fs::write(&file, graph(&salt(tag))).unwrap();
    client.give_to_user(&file);
}

#[test]
fn the_trust_check_under_a_2_26_daemon_tells_an_untrusted_user_or_signs() {
    // The key must exist before the daemon starts, which trusts its public half.
    let setup = setup_dir();
    let secret = setup.path().join("user-key.sec");
    let public = setup.path().join("user-key.pub");
    ok(Command::new("nix-store")
        .args(["--generate-binary-cache-key", "offload-test-client-1"])
        .arg(&secret)
        .arg(&public));
    ok(Command::new("chmod").arg("644").arg(&secret));
    let public = std::fs::read_to_string(&public).unwrap();
    let Some(client) = client(ClientOptions {
        nix_conf: format!(
            "trusted-users = root\nrequire-sigs = true\ntrusted-public-keys = {public}\n"
        ),
        daemon: Some(Vec::new()),
        visible: vec![setup.path().to_path_buf()],
        ..ClientOptions::default()
    }) else {
        return;
    };
    let work = client.work();
    let plain = user_program(&client, "nix-store-plain", "");

    // Unsigned outputs cannot enter: said before any build, everything built here.
    write_user_graph(&client, "client-untrusted");
    let out = user_offload(&client, &plain, &[]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warning = stderr
        .find("does not trust you (offload-tester)")
        .expect(&stderr);
    let first_build = stderr.find("building '").expect(&stderr);
    assert!(warning < first_build, "said before building: {stderr}");
    assert!(
        stderr.contains("`trusted-users = offload-tester`"),
        "{stderr}"
    );
    assert_eq!(remote_builds(&stderr), 0, "{stderr}");
    // `offload doctor` says the same of the local store and of each builder.
    let mut doctor = client.user_command(OFFLOAD, &work);
    offload_env(&mut doctor, &work);
    let builder = loopback_machine(&work, "m1", &plain, 2, 4);
    let out = doctor
        .args(["doctor", "--builders", &builder])
        .output()
        .unwrap();
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(said.contains("the nix-daemon does not trust you"), "{said}");
    assert!(
        said.contains("does not trust you (offload-tester)"),
        "{said}"
    );
    // --no-local-fallback stops instead, before building anything.
    write_user_graph(&client, "client-untrusted-stop");
    let out = user_offload(&client, &plain, &["--no-local-fallback"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("could not enter the local store"),
        "{stderr}"
    );
    assert!(!stderr.contains("building '"), "{stderr}");

    // Signed by the user's key, which the daemon trusts, they do.
    write_user_graph(&client, "client-signed");
    let key = secret.to_str().unwrap();
    let out = user_offload(&client, &plain, &["--sign-key", key]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("does not trust"), "{stderr}");
    assert!(remote_builds(&stderr) > 0, "builders were used: {stderr}");
    let top = text(&out.stdout).trim().to_string();
    ok(client
        .command("nix-store", &work)
        .args(["--verify-path", &top]));
    // What came home of the remote builds (the others' outputs stay where they were
    // built) carries the user's signature.
    let home: Vec<String> = built_remotely(&stderr)
        .iter()
        .map(|drv| {
            ok(client
                .command("nix-store", &work)
                .args(["-q", "--outputs", drv]))
        })
        .map(|o| o.trim().to_string())
        .filter(|o| {
            let mut check = client.command("nix-store", &work);
            check.args(["--check-validity", o]);
            check.output().unwrap().status.success()
        })
        .collect();
    assert!(!home.is_empty(), "no remote output came home: {stderr}");
    let sigs = ok(client
        .command("nix", &work)
        .args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--sigs",
        ])
        .args(&home));
    assert_eq!(sigs.lines().count(), home.len(), "{sigs}");
    for line in sigs.lines() {
        assert!(line.contains("offload-test-client-1:"), "unsigned: {line}");
    }
}

#[test]
fn a_trusted_user_of_a_2_26_daemon_builds_remotely_and_nix_log_shows_it() {
    let Some(client) = client(ClientOptions {
        nix_conf: "trusted-users = root offload-tester\n".into(),
        daemon: Some(Vec::new()),
        ..ClientOptions::default()
    }) else {
        return;
    };
    let work = client.work();
    write_user_graph(&client, "client-trusted");
    let plain = user_program(&client, "nix-store-plain", "");
    let out = user_offload(&client, &plain, &[]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("does not trust"), "{stderr}");
    assert!(remote_builds(&stderr) > 0, "builders were used: {stderr}");
    let top = text(&out.stdout).trim().to_string();
    assert_eq!(
        std::fs::read_link(work.join("result")).unwrap(),
        Path::new(&top)
    );
    ok(client
        .command("nix-store", &work)
        .args(["--verify-path", &top]));
    // The daemon took the remote builds' logs: `nix log` shows one as the user.
    let remote = built_remotely(&stderr);
    let log = ok(client.user_command("nix", &work).args([
        "--extra-experimental-features",
        "nix-command",
        "log",
        &remote[0],
    ]));
    assert!(log.contains("building "), "{}: {log}", remote[0]);
}

#[test]
fn nix_build_under_the_newest_nix_daemon_gets_every_output_back_from_offload_hook() {
    let setup = setup_dir();
    let s = setup.path();
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
    let sys = offload_test_support::nix_system();
    let builders = format!(
        "ssh://localhost?remote-store={d}/b1 {sys} - 1 4;ssh://localhost?remote-store={d}/b2 {sys} - 1 4"
    );
    let Some(client) = client(ClientOptions {
        nix_conf: format!("builders = {builders}\ntrusted-users = root\n"),
        daemon: Some(vec![
            "--option".into(),
            "build-hook".into(),
            hook.display().to_string(),
        ]),
        visible: vec![s.to_path_buf()],
        newest: true,
        ..ClientOptions::default()
    }) else {
        return;
    };
    let version = ok(client.command("nix-store", s).arg("--version"));
    eprintln!("client: {}", version.trim());
    let work = client.work();
    // -j0, under `timeout`: a build whose outputs never come back hangs nix-build.
    let nix_build = |tag: &str| {
        write_user_graph(&client, tag);
        let out = client
            .user_command("timeout", &work)
            .args([
                "120",
                "nix-build",
                "graph.nix",
                "-A",
                "top",
                "--no-out-link",
                "-j0",
            ])
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(
            out.status.success(),
            "nix-build ended with {:?} (124: it hung):\n{stderr}\ndaemon: {}",
            out.status.code(),
            client.daemon_log()
        );
        assert_eq!(built_remotely(&stderr).len(), 7, "{stderr}");
        let top = text(&out.stdout).trim().to_string();
        ok(client
            .command("nix-store", &work)
            .args(["--verify-path", &top]));
    };
    nix_build("newest-hook");
    assert!(
        s.join("history.sqlite").exists(),
        "offload hook did not run"
    );
    // Through the agent (root, as the daemon's hooks are), whose sessions import.
    let mut agent = client.command(OFFLOAD, s);
    agent
        .args(["agent", "--socket"])
        .arg(s.join("agent.sock"))
        .env("OFFLOAD_SLOTS_DIR", s.join("slots"))
        .stderr(std::process::Stdio::piped());
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
    nix_build("newest-hook-agent");
    drop(client);
    let _ = agent.wait();
}
