//! The live view of `offload build` on a real terminal: tmux runs it, `capture-pane`
//! reads the screen while builds run and after they end.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use offload_test_support::{require_nix, salt, text};

/// Four leaves that take 3 s each, and a top over them.
fn graph(salt: &str) -> String {
    format!(
        r#"let mk = name: deps: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}";
             args = [ "-c" "echo working on $name; sleep 3; mkdir $out" ];
           }};
           leaves = builtins.genList (i: mk "leaf${{toString i}}" []) 4;
         in mk "top" leaves"#
    )
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux runs");
    assert!(out.status.success(), "tmux {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The screen once all of `want` shows on it (or panics after `limit`).
fn screen_with(session: &str, want: &[&str], limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let screen = tmux(&["capture-pane", "-p", "-t", session]);
        if want.iter().all(|w| screen.contains(w)) {
            return screen;
        }
        assert!(
            Instant::now() < deadline,
            "never showed {want:?}:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_terminal_shows_counts_and_each_machines_running_builds() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir: &Path = work.path();
    std::fs::write(dir.join("graph.nix"), graph(&salt("live"))).unwrap();
    let session = format!("offload-live-{}", std::process::id());
    let command = format!(
        "cd {d} && env NIX_CONFIG='substituters =' OFFLOAD_HISTORY={d}/history.sqlite \
         OFFLOAD_CONFIG={d}/none.toml OFFLOAD_SLOTS_DIR={d}/slots TERM=xterm {bin} build \
         graph.nix --local-only -j4 --no-out-link; echo EXITED $?; sleep 60",
        d = dir.display(),
        bin = env!("CARGO_BIN_EXE_offload"),
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "150",
        "-y",
        "30",
        &command,
    ]);
    // The builds run 3 s: the screen shows them running once their first logs are up.
    let during = screen_with(
        &session,
        &["leaf0> working on leaf0", "4 running:"],
        Duration::from_secs(20),
    );
    let after = screen_with(&session, &["EXITED"], Duration::from_secs(30));
    tmux(&["kill-session", "-t", &session]);

    assert!(
        during.contains("0/5 built, 4 running, 1 queued, 0 failed"),
        "{during}"
    );
    let local = during
        .lines()
        .find(|l| l.trim_start().starts_with("local"))
        .unwrap_or_else(|| panic!("no line for the local machine:\n{during}"));
    for leaf in ["leaf0", "leaf1", "leaf2", "leaf3"] {
        assert!(local.contains(leaf), "{local}");
    }
    assert!(local.contains(" s"), "elapsed times: {local}");
    // Logs scroll above the view.
    assert!(during.contains("leaf0> working on leaf0"), "{during}");
    // Afterwards the view is gone and the summary stays.
    assert!(after.contains("EXITED 0"), "{after}");
    assert!(after.contains("built 5 derivations"), "{after}");
    assert!(!after.contains("running:"), "{after}");
}
