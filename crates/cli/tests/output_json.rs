//! `offload build --json`: stdout holds only JSON Lines, one event per line, each with a
//! `type`; the summary carries the output paths and structured failures.

use offload_test_support::{nix_command, require_nix, run_ok, salt, text};

mod common;

/// Two independent leaves, one failing after printing lines, and a top over the good one.
fn graph(salt: &str) -> String {
    format!(
        r#"let mk = name: deps: script: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}"; args = [ "-c" script ];
           }};
           good = mk "good" [] "mkdir $out";
           bad = mk "bad" [] "echo first; echo second; exit 3";
         in {{ top = mk "top" [ good ] "mkdir $out"; inherit bad; }}"#
    )
}

/// `offload build FILE -A top --json ARGS` in `dir`: it succeeded, and its events.
fn json_run(
    dir: &std::path::Path,
    file: &std::path::Path,
    args: &[&str],
) -> Vec<serde_json::Value> {
    let out = common::offload(dir)
        .arg("build")
        .arg(file)
        .args(["-A", "top", "--json", "--no-out-link"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[test]
fn events_are_json_lines_and_the_summary_carries_outputs_and_failures() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("graph.nix");
    std::fs::write(&file, graph(&salt("json"))).unwrap();
    let out = common::offload(work.path())
        .arg("build")
        .arg(&file)
        .args([
            "-A",
            "top",
            "-A",
            "bad",
            "--json",
            "-k",
            "-j2",
            "--no-out-link",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"planned"));
    assert_eq!(types.last(), Some(&"summary"));
    assert_eq!(events[0]["derivations"], 3);
    let count = |t: &str| types.iter().filter(|x| **x == t).count();
    assert_eq!(count("build_started"), 3);
    assert_eq!(count("build_finished"), 2);
    assert_eq!(count("build_failed"), 1);
    let summary = events.last().unwrap();
    assert_eq!(summary["ok"], false);
    assert_eq!(summary["built"], 2);
    let failures = summary["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1);
    assert!(failures[0]["drv"].as_str().unwrap().ends_with("-bad.drv"));
    assert!(failures[0]["reason"]
        .as_str()
        .unwrap()
        .contains("exit code 3"));
    assert_eq!(
        failures[0]["log_tail"],
        serde_json::json!(["first", "second"])
    );

    // Everything built: the summary lists the output paths, and stdout has nothing else.
    let out = common::offload(work.path())
        .arg("build")
        .arg(&file)
        .args(["-A", "top", "--json", "--no-out-link"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let last: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["ok"], true);
    let outputs = last["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert!(outputs[0].as_str().unwrap().ends_with("-top"));
}

#[test]
fn transfers_between_machines_are_events_with_their_route_and_size() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let program = offload_test_support::loopback_serve_program(dir);
    let builder = offload_test_support::loopback_machine(dir, "m1", &program, 2, 1);
    let file = dir.join("graph.nix");
    std::fs::write(&file, graph(&salt("transfers"))).unwrap();
    // -j0: everything builds on the builder, and the top's output comes back here.
    let events = json_run(dir, &file, &["-j0", "--builders", &builder]);
    let home: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["type"] == "transfer_finished" && e["to"] == "local")
        .collect();
    assert!(!home.is_empty(), "no transfer home: {events:?}");
    for e in &home {
        assert_eq!(e["from"], format!("localhost:{}/m1", dir.display()));
        assert_eq!(e["ok"], true);
        // Its size is the path's NAR size, as the local store now records it.
        let path = e["path"].as_str().unwrap();
        let nar_size = run_ok(nix_command("nix-store").args(["-q", "--size", path]));
        assert_eq!(e["bytes"].as_u64(), nar_size.trim().parse().ok(), "{e}");
    }
    let started = events
        .iter()
        .filter(|e| e["type"] == "transfer_started")
        .count();
    let finished = events
        .iter()
        .filter(|e| e["type"] == "transfer_finished")
        .count();
    assert_eq!(started, finished);
}

#[test]
fn a_machine_that_cannot_be_used_is_an_event() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // A builder whose serve program fails at once.
    let builder =
        offload_test_support::loopback_machine(dir, "m1", std::path::Path::new("/bin/false"), 2, 4);
    let file = dir.join("graph.nix");
    std::fs::write(&file, graph(&salt("lost"))).unwrap();
    let events = json_run(dir, &file, &["--builders", &builder]);
    let lost = events
        .iter()
        .find(|e| e["type"] == "machine_lost")
        .unwrap_or_else(|| panic!("no machine_lost: {events:?}"));
    assert_eq!(lost["machine"], format!("localhost:{}/m1", dir.display()));
    assert!(!lost["why"].as_str().unwrap().is_empty());
    // Everything was built here instead.
    let summary = events.last().unwrap();
    assert_eq!(summary["ok"], true);
}

#[test]
fn a_redirected_run_prints_calm_lines_without_colour_codes() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("graph.nix");
    std::fs::write(&file, graph(&salt("calm"))).unwrap();
    let out = common::offload(work.path())
        .arg("build")
        .arg(&file)
        .args(["-A", "top", "-v", "--no-out-link"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a redirected log:\n{stderr}"
    );
    assert!(stderr.contains("INFO"), "-v shows info lines:\n{stderr}");
    assert_eq!(stderr.matches("building '").count(), 2, "{stderr}");
}
