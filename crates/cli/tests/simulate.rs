//! `offload simulate` through the real binary.

mod common;

use offload_test_support::{nix_command, nix_system, require_nix, run_ok};

fn offload(args: &[&str]) -> std::process::Output {
    let work = tempfile::tempdir().unwrap();
    common::offload(work.path()).args(args).output().unwrap()
}

#[test]
fn json_lines_per_policy() {
    let out = offload(&[
        "simulate",
        "--generate",
        "layered:40:1",
        "--builders",
        "b1 x86_64-linux - 2 1; b2 x86_64-linux - 2 1; b3 x86_64-linux - 2 2",
        "--local-slots",
        "2",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let policies: Vec<&str> = lines
        .iter()
        .map(|v| v["policy"].as_str().unwrap())
        .collect();
    assert_eq!(policies, ["offload", "nix", "hydra"]);
    for v in &lines {
        assert_eq!(v["type"], "simulation");
        assert_eq!(v["built"], 40);
        assert!(v["makespan_s"].as_f64().unwrap() >= v["lower_bound_s"].as_f64().unwrap());
        assert_eq!(v["bytes_per_link"].as_array().unwrap().len(), 3);
    }
}

#[test]
fn a_bad_graph_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let dag = dir.path().join("g.json");
    std::fs::write(
        &dag,
        r#"{"nodes":[{"id":"a","deps":["ghost"],"duration_s":1}]}"#,
    )
    .unwrap();
    let out = offload(&[
        "simulate",
        "--dag",
        dag.to_str().unwrap(),
        "--local-slots",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("g.json") && stderr.contains("ghost"),
        "{stderr}"
    );
}

#[test]
fn a_machine_failing_mid_run_loses_its_builds_to_the_others_and_the_trace_shows_both() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.json");
    std::fs::write(
        &fleet,
        r#"{"bandwidth": 1e8, "failures": [{"machine": "b1", "at": 1.0}]}"#,
    )
    .unwrap();
    let trace = dir.path().join("t.json");
    let out = offload(&[
        "simulate",
        "--generate",
        "wide:30:2",
        "--builders",
        "b1 x86_64-linux - 4 1; b2 x86_64-linux - 4 1",
        "--fleet",
        fleet.to_str().unwrap(),
        "--policy",
        "offload",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("30/30"));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    let b1 = events
        .iter()
        .find(|e| e["ph"] == "M" && e["args"]["name"] == "b1")
        .unwrap()["pid"]
        .clone();
    let builds: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    let (on_b1, elsewhere): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) =
        builds.into_iter().partition(|e| e["pid"] == b1);
    // b1 started builds before it failed, and none after; each ran again elsewhere, so
    // every one of the 30 derivations was built off b1.
    assert!(!on_b1.is_empty(), "{t}");
    assert!(on_b1.iter().all(|e| e["ts"].as_f64().unwrap() < 1e6), "{t}");
    let mut names: Vec<&str> = elsewhere
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 30, "{t}");
    assert_eq!(elsewhere.len(), 30, "{t}");
}

#[test]
fn a_failure_of_an_unknown_machine_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.json");
    std::fs::write(&fleet, r#"{"failures": [{"machine": "nope", "at": 1.0}]}"#).unwrap();
    let out = offload(&[
        "simulate",
        "--generate",
        "wide:3",
        "--builders",
        "b1",
        "--fleet",
        fleet.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("failure of \"nope\": no such machine; the machines are: local, b1"),
        "{stderr}"
    );
}

#[test]
fn a_generated_mixed_fleet_takes_every_system() {
    let out = offload(&[
        "simulate",
        "--generate",
        "nixpkgs-mixed:2000:3",
        "--generate-fleet",
        "mixed:50:2",
        "--local-slots",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["built"], 2000, "{line}");
        // One link per generated machine.
        assert_eq!(v["bytes_per_link"].as_array().unwrap().len(), 50);
    }
    let bad = offload(&[
        "simulate",
        "--generate",
        "wide:5",
        "--generate-fleet",
        "cloud:9",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("--generate-fleet cloud:9"), "{stderr}");
}

/// A real closure: two derivations instantiated by Nix, one with a recorded duration.
#[test]
fn a_drv_closure_with_durations_from_the_history() {
    if !require_nix() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let expr = dir.path().join("graph.nix");
    std::fs::write(
        &expr,
        r#"let
  mk = name: deps: derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    salt = "SALT";
    args = [ "-c" "echo > $out" ];
  };
  base = mk "sim-base-7dq2" [ ];
in mk "sim-app-7dq2" [ base ]
"#
        .replace("SALT", &offload_test_support::salt("sim")),
    )
    .unwrap();
    let drv = run_ok(nix_command("nix-instantiate").arg(&expr))
        .trim()
        .to_string();
    let history = dir.path().join("history.sqlite");
    offload_driver::StateDb::open(&history)
        .unwrap()
        .record("sim-base-7dq2", nix_system(), "local", 30.0, 1.0, None)
        .unwrap();
    let out = offload(&[
        "simulate",
        "--from-drv",
        &drv,
        "--history",
        history.to_str().unwrap(),
        "--local-slots",
        "1",
        "--policy",
        "offload",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodes"], 2);
    assert_eq!(v["built"], 2);
    // 30 s from the history, then the default estimate for the unknown app.
    let bound = v["lower_bound_s"].as_f64().unwrap();
    assert!(
        (bound - (30.0 + offload_driver::DEFAULT_SECONDS)).abs() < 1e-6,
        "{v}"
    );

    // Built once, the outputs' real NAR sizes replace the default 1 MiB: on one
    // builder, only the app's output crosses a link (back to the client).
    let link_bytes = |v: &serde_json::Value| v["bytes_per_link"][0][1].as_u64().unwrap();
    let builder = format!("b1 {} - 1 1", nix_system());
    let remote = [
        "simulate",
        "--from-drv",
        &drv,
        "--builders",
        &builder,
        "--policy",
        "offload",
        "--json",
    ];
    let before: serde_json::Value = serde_json::from_slice(&offload(&remote).stdout).unwrap();
    assert_eq!(link_bytes(&before), 1 << 20, "{before}");
    run_ok(nix_command("nix-store").args(["--realise", &drv]));
    let after: serde_json::Value = serde_json::from_slice(&offload(&remote).stdout).unwrap();
    assert!((1..4096).contains(&link_bytes(&after)), "{after}");
}

#[test]
fn derivations_no_machine_can_build_are_named() {
    let out = offload(&[
        "simulate",
        "--generate",
        "nixpkgs-mixed:200:1",
        "--builders",
        "b1 x86_64-linux - 2 1",
        "--policy",
        "offload",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no machine can build (needing aarch64-linux"),
        "{text}"
    );
}

/// `--second-run` plans with what offload fits from a simulated first run: on builders
/// three times slower than this machine, declared as fast, it comes near planning with
/// the truth, though the first run sent one builder only two builds.
#[test]
fn a_second_run_plans_with_what_the_first_taught() {
    let work = tempfile::tempdir().unwrap();
    let fleet = work.path().join("fleet.json");
    let third = 1.0 / 3.0;
    std::fs::write(
        &fleet,
        serde_json::json!({"speeds": {
            "fleet1": {"x86_64-linux": third},
            "fleet2": {"x86_64-linux": third},
            "fleet3": {"x86_64-linux": third},
        }})
        .to_string(),
    )
    .unwrap();
    let makespan = |mode: &[&str]| -> f64 {
        let mut args = vec![
            "simulate",
            "--generate",
            "layered:30:1",
            "--builders",
            "ssh://fleet1 x86_64-linux - 2 1; ssh://fleet2 x86_64-linux - 2 1; ssh://fleet3 x86_64-linux - 2 1",
            "--local-slots",
            "2",
            "--fleet",
            fleet.to_str().unwrap(),
            "--policy",
            "offload",
            "--json",
        ];
        args.extend(mode);
        let out = offload(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str::<serde_json::Value>(line.lines().next().unwrap()).unwrap()
            ["makespan_s"]
            .as_f64()
            .unwrap()
    };
    let (cold, second, truth) = (
        makespan(&["--cold"]),
        makespan(&["--second-run"]),
        makespan(&[]),
    );
    assert!(
        second < 0.85 * cold,
        "second run {second} s, first {cold} s"
    );
    assert!(
        second < 1.15 * truth,
        "second run {second} s, with the truth {truth} s"
    );
    let both = offload(&["simulate", "--generate", "wide:5", "--cold", "--second-run"]);
    assert_eq!(both.status.code(), Some(2));
}

/// The routes benchmark's fleet file (scripts/fleets/routes.json): builders that reach
/// each other and a target beside them, the client behind a slow link. With pair links
/// nothing crosses the client's links; with --relay everything does, and the run takes
/// longer; both print the bytes by route.
#[test]
fn a_fleet_with_pair_links_and_a_target_and_the_same_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let dag = dir.path().join("g.json");
    // a → b, a → c: 8 MiB outputs.
    std::fs::write(
        &dag,
        r#"{"nodes":[{"id":"a","deps":[],"duration_s":1,"output_bytes":8388608},
                     {"id":"b","deps":["a"],"duration_s":1,"output_bytes":8388608},
                     {"id":"c","deps":["a"],"duration_s":1,"output_bytes":8388608}]}"#,
    )
    .unwrap();
    let fleet = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/fleets/routes.json"
    );
    let sim = |extra: &[&str]| {
        let mut args = vec![
            "simulate",
            "--dag",
            dag.to_str().unwrap(),
            "--fleet",
            fleet,
            "--builders",
            "ssh://b1 x86_64-linux - 1 1; ssh://b2 x86_64-linux - 1 1",
            "--policy",
            "offload",
        ];
        args.extend(extra);
        let out = offload(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = sim(&[]);
    assert!(
        text.contains("offload: bytes by route: client links 0 B, builder to builder 8.0 MiB, to the target 24.0 MiB"),
        "{text}"
    );
    let json = |extra: &[&str]| -> serde_json::Value {
        serde_json::from_str(sim(&[extra, &["--json"]].concat()).trim()).unwrap()
    };
    let (direct, relayed) = (json(&[]), json(&["--relay"]));
    assert_eq!(relayed["bytes_by_route"]["builder_to_builder"], 0);
    assert_eq!(relayed["bytes_by_route"]["to_target"], 3 * 8388608);
    // Relayed: each delivery crosses its builder's link and the target's.
    assert!(relayed["bytes_by_route"]["client_links"].as_u64().unwrap() >= 6 * 8388608);
    let span = |v: &serde_json::Value| v["makespan_s"].as_f64().unwrap();
    assert!(
        span(&direct) * 3.0 < span(&relayed),
        "{direct} vs {relayed}"
    );
}

#[test]
fn a_pair_naming_no_machine_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.json");
    std::fs::write(
        &fleet,
        r#"{"peers": {"bandwidth": 1e9, "latency": 0.1, "unreachable": [{"from": "b1", "to": "b9"}]}}"#,
    )
    .unwrap();
    let out = offload(&[
        "simulate",
        "--generate",
        "layered:10:1",
        "--builders",
        "ssh://b1 x86_64-linux - 1 1; ssh://b2 x86_64-linux - 1 1",
        "--fleet",
        fleet.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"b9\"") && stderr.contains("b1, b2"),
        "{stderr}"
    );
}
