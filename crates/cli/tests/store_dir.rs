//! A store directory other than `/nix/store` (`NIX_STORE_DIR`, as Nix's test suite and
//! relocated installs have it), and a binary cache as the store Nix builds into: real
//! Nix as root, loopback builders whose `nix-store` keeps the same store directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use offload_test_support::{
    require_nix, require_root, run_ok, salt, text, write_executable, OtherStore,
};

/// A chain `dep` → `top` with a source file, unique per `tag`.
fn graph(store: &OtherStore, tag: &str) -> PathBuf {
    let src = store.path().join("src.txt");
    std::fs::write(&src, "a source\n").unwrap();
    let file = store.path().join(format!("{tag}.nix"));
    let expr = format!(
        r#"let mk = name: attrs: derivation ({{
             inherit name; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}"; }} // attrs);
           dep = mk "dep" {{ args = [ "-c" "echo dep > $out" ]; }};
         in mk "top" {{ args = [ "-c" "cat ${{dep}} ${{./src.txt}} > $out; echo ${{dep}} >> $out" ]; }}"#,
        salt = salt(tag)
    );
    std::fs::write(&file, expr).unwrap();
    file
}

/// The hook script Nix runs, with offload's files under the store's scratch directory.
fn hook_script(store: &OtherStore) -> PathBuf {
    let hook = store.path().join("hook");
    write_executable(
        &hook,
        &format!(
            "#!/bin/sh\nexport OFFLOAD_HISTORY={d}/history.sqlite OFFLOAD_SLOTS_DIR={d}/slots \
             OFFLOAD_AGENT_SOCKET={d}/agent.sock\nexec {} hook \"$@\"\n",
            env!("CARGO_BIN_EXE_offload"),
            d = store.path().display()
        ),
    );
    hook
}

/// `nix-build FILE ARGS…` in the store's environment with offload's hook.
fn nix_build(store: &OtherStore, file: &Path, args: &[&str]) -> Output {
    let mut cmd = store.command("timeout");
    cmd.args(["300", "nix-build", "--no-out-link"])
        .arg(file)
        .args(args)
        .arg("--option")
        .arg("build-hook")
        .arg(hook_script(store));
    cmd.output().unwrap()
}

/// `offload agent` in the store's environment on the socket the hook script names,
/// once it listens.
fn start_agent(store: &OtherStore) -> std::process::Child {
    let log = store.path().join("agent.log");
    let mut cmd = store.command(env!("CARGO_BIN_EXE_offload"));
    let agent = cmd
        .arg("agent")
        .arg("--socket")
        .arg(store.path().join("agent.sock"))
        .env("OFFLOAD_SLOTS_DIR", store.path().join("slots"))
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no agent");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

fn stop(mut agent: std::process::Child) {
    let _ = Command::new("kill").arg(agent.id().to_string()).status();
    let _ = agent.wait();
}

/// The one output path a build printed, checked to be under the store directory, valid
/// there and verifying.
fn built_path(store: &OtherStore, out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let path = text(&out.stdout).trim().to_string();
    assert!(
        path.starts_with(&format!("{}/", store.store_dir().display())),
        "{path}: {stderr}"
    );
    assert!(store.verifies(&path), "{path} does not verify: {stderr}");
    path
}

fn ready() -> bool {
    require_nix() && require_root()
}

#[test]
fn offload_build_builds_in_another_store_directory() {
    if !ready() {
        return;
    }
    let store = OtherStore::new();
    let file = graph(&store, "offload-build-other-dir");
    let builders = store.builder("b1", None, 2, 4);
    let mut cmd = common::offload(store.path());
    store.env(&mut cmd);
    let out = cmd
        .arg("build")
        .arg(&file)
        .args(["-j0", "--no-out-link", "--builders", &builders])
        .output()
        .unwrap();
    let path = built_path(&store, &out);
    assert!(store.builder_has("b1", &path), "{}", text(&out.stderr));
    // A second run finds everything there.
    let mut again = common::offload(store.path());
    store.env(&mut again);
    let again = again
        .arg("build")
        .arg(&file)
        .args(["-j0", "--no-out-link", "--builders", &builders])
        .output()
        .unwrap();
    assert_eq!(built_path(&store, &again), path);
    assert!(
        text(&again.stderr).contains("built 0 derivations"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn nix_build_hands_builds_of_another_store_directory_to_the_hook() {
    if !ready() {
        return;
    }
    let store = OtherStore::new();
    let builders = store.builder("b1", None, 2, 4);
    for (round, with_agent) in [("hook-other-dir", false), ("hook-other-dir-agent", true)] {
        let agent = with_agent.then(|| start_agent(&store));
        let file = graph(&store, round);
        let out = nix_build(&store, &file, &["-j0", "--builders", &builders]);
        if let Some(agent) = agent {
            stop(agent);
        }
        let path = built_path(&store, &out);
        assert!(store.builder_has("b1", &path), "{round}");
        let on_builder = text(&out.stderr).matches("on 'ssh://localhost").count();
        assert_eq!(on_builder, 2, "{round}: {}", text(&out.stderr));
    }
}

#[test]
fn a_builder_with_another_store_directory_is_named_at_its_first_answer() {
    if !ready() {
        return;
    }
    let store = OtherStore::new();
    // A builder whose nix-store keeps Nix's default, /nix/store.
    let program = store.path().join("nix-store-default-dir");
    write_executable(
        &program,
        "#!/bin/sh\nunset NIX_STORE_DIR NIX_STATE_DIR NIX_LOG_DIR\n\
         exec nix-store --option build-users-group '' \"$@\"\n",
    );
    let builders = store.builder("b1", Some(&program), 1, 4);
    let file = graph(&store, "builder-other-dir");
    let mut cmd = common::offload(store.path());
    store.env(&mut cmd);
    let out = cmd
        .arg("build")
        .arg(&file)
        .args(["-j0", "--no-out-link", "--builders", &builders])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let ours = store.store_dir().display().to_string();
    let named =
        format!("keeps its store in /nix/store, not in this machine's store directory {ours}");
    assert!(
        stderr.contains(&named) && !stderr.contains("trying it again"),
        "{stderr}"
    );
}

/// A binary cache as the store Nix builds into, the local store as the one builder
/// (`auto`), as Nix's binary-cache-build-remote test does: the outputs land in the
/// cache, signed with the key its URI names, and a second build is a no-op.
#[test]
fn a_binary_cache_as_the_store_gets_the_outputs_from_the_auto_builder() {
    if !ready() {
        return;
    }
    let store = OtherStore::new();
    let key = store.path().join("key.sec");
    run_ok(
        store
            .command("nix-store")
            .arg("--generate-binary-cache-key")
            .args([
                "offload-test-1".as_ref(),
                key.as_os_str(),
                store.path().join("key.pub").as_os_str(),
            ]),
    );
    for (round, with_agent) in [("cache", false), ("cache-agent", true)] {
        let cache = store.path().join(round);
        let uri = format!("file://{}?secret-key={}", cache.display(), key.display());
        let file = graph(&store, round);
        let agent = with_agent.then(|| start_agent(&store));
        let out = nix_build(
            &store,
            &file,
            &["--store", &uri, "--builders", "auto - - 1 1", "-j0"],
        );
        if let Some(agent) = agent {
            stop(agent);
        }
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{round}: {stderr}");
        let path = text(&out.stdout).trim().to_string();
        assert_eq!(stderr.matches("on 'auto'").count(), 2, "{round}: {stderr}");
        let info = run_ok(
            store
                .command("nix")
                .args(["--extra-experimental-features", "nix-command", "path-info"])
                .args(["--sigs", "--store", &uri, &path]),
        );
        assert!(info.contains("offload-test-1:"), "{round}: {info}");
        // The closure is there too: the dependency the output refers to.
        let closure = run_ok(
            store
                .command("nix")
                .args(["--extra-experimental-features", "nix-command", "path-info"])
                .args(["-r", "--store", &uri, &path]),
        );
        assert!(closure.contains("-dep\n"), "{round}: {closure}");
        let again = store
            .command("nix-build")
            .args(["--no-out-link", "-j0", "--store", &uri])
            .arg(&file)
            .output()
            .unwrap();
        assert!(again.status.success(), "{round}: {}", text(&again.stderr));
        assert_eq!(text(&again.stdout).trim(), path);
    }
}

/// An agent started without the store directory Nix builds in (its own is Nix's
/// default) refuses the hook's order by name instead of reading other paths.
#[test]
fn an_agent_of_another_store_directory_says_so() {
    if !ready() {
        return;
    }
    let store = OtherStore::new();
    let log = store.path().join("agent.log");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_offload"))
        .arg("agent")
        .arg("--socket")
        .arg(store.path().join("agent.sock"))
        .env("OFFLOAD_SLOTS_DIR", store.path().join("slots"))
        .env_remove("NIX_STORE_DIR")
        .env_remove("NIX_STORE")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no agent");
        std::thread::sleep(Duration::from_millis(50));
    }
    let file = graph(&store, "agent-other-dir");
    let builders = store.builder("b1", None, 1, 4);
    let out = nix_build(&store, &file, &["-j0", "--builders", &builders]);
    let _ = Command::new("kill").arg(agent.id().to_string()).status();
    let _ = agent.wait();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let ours = store.store_dir().display().to_string();
    assert!(
        stderr.contains(&format!(
            "under the store directory {ours}, but this offload agent's is /nix/store"
        )),
        "{stderr}"
    );
}

/// The store directory named by the store URI Nix builds into (`?store=`), not by the
/// environment: the hook takes it from Nix's `store` setting.
#[test]
fn the_hook_takes_the_store_directory_from_the_store_nix_names() {
    if !ready() {
        return;
    }
    let store = OtherStore::new();
    let uri = format!(
        "local?store={}&state={}&log={}",
        store.store_dir().display(),
        store.path().join("state").display(),
        store.path().join("log").display()
    );
    let builders = store.builder("b1", None, 1, 4);
    let file = graph(&store, "store-uri-dir");
    let mut cmd = store.command("timeout");
    let out = cmd
        .env_remove("NIX_STORE_DIR")
        .env_remove("NIX_STATE_DIR")
        .env_remove("NIX_LOG_DIR")
        .args(["300", "nix-build", "--no-out-link", "--store", &uri])
        .arg(&file)
        .args(["-j0", "--builders", &builders, "--option", "build-hook"])
        .arg(hook_script(&store))
        .output()
        .unwrap();
    let path = built_path(&store, &out);
    assert!(store.builder_has("b1", &path), "{}", text(&out.stderr));
}
