//! `offload machines`: the fleet as a build would use it, with the load the shared slot
//! ledger shows (a slot held the way Nix's own hook holds one).

use std::process::{Command, Stdio};

use offload_test_support::{require_nix, text};

mod common;

#[test]
fn lists_each_machine_with_its_slots_and_current_load() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let slots = work.path().join("slots");
    std::fs::create_dir_all(&slots).unwrap();
    let builders = "ssh://b1 x86_64-linux,aarch64-linux - 3 2 kvm big-parallel; ssh://b2 - - 2";
    // Slot 0 of b1 held by another process, as Nix's hook or another run would.
    let mut holder = Command::new("flock")
        .arg(slots.join("ssh:__b1-0"))
        .args(["sleep", "30"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !slots.join("ssh:__b1-0").exists() {
        assert!(std::time::Instant::now() < deadline, "flock did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The state database remembers b2 failing, and quarantined for an hour.
    let history = offload_driver::StateDb::open(&work.path().join("history.sqlite")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    history
        .machine_failed("b2", "connection refused", now - 10)
        .unwrap();
    history.quarantine("b2", now + 3600).unwrap();
    // And that b1 built two derivations three times as fast as this machine, and one
    // for aarch64-linux five times slower than that; that its link carried 16 MB in
    // 6.42 s and small paths in 20 ms; that it has 12 cores.
    for name in ["a", "b"] {
        history
            .record(name, "x86_64-linux", "local", 3.0, 1.0, None)
            .unwrap();
        history
            .record(name, "x86_64-linux", "ssh://b1", 1.0, 2.0, Some(1000))
            .unwrap();
    }
    history
        .record("a", "aarch64-linux", "ssh://b1", 5.0, 2.0, None)
        .unwrap();
    history
        .record_transfer("ssh://b1", true, 16_000_000, 6.42, 1)
        .unwrap();
    history
        .record_transfer("ssh://b1", false, 1000, 0.02, 1)
        .unwrap();
    history.set_cores("ssh://b1", 12).unwrap();
    drop(history);
    let out = common::offload(work.path())
        .env("OFFLOAD_SLOTS_DIR", &slots)
        .args(["machines", "--json", "--builders", builders])
        .output()
        .unwrap();
    holder.kill().unwrap();
    let _ = holder.wait();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["name"], "local");
    assert_eq!(rows[1]["name"], "b1");
    assert_eq!(rows[1]["slots"], 3);
    assert_eq!(rows[1]["speed_factor"], 2.0);
    assert_eq!(
        rows[1]["systems"],
        serde_json::json!(["x86_64-linux", "aarch64-linux"])
    );
    assert_eq!(
        rows[1]["features"],
        serde_json::json!(["kvm", "big-parallel(mandatory)"])
    );
    assert_eq!(rows[1]["busy_slots"], 1);
    assert_eq!(rows[2]["busy_slots"], 0);
    assert_eq!(rows[1]["state"], "up");
    // Two comparisons take b1 most of the way from its declared 2 to the measured 3.
    let learned = &rows[1]["learned_speed"];
    let native = learned["x86_64-linux"]["relative_to_local"]
        .as_f64()
        .unwrap();
    assert!((2.8..=3.0).contains(&native), "{learned}");
    assert_eq!(learned["x86_64-linux"]["samples"], 2);
    let emulated = learned["aarch64-linux"]["relative_to_local"]
        .as_f64()
        .unwrap();
    assert!((0.5..=0.8).contains(&emulated), "{learned}");
    let link = &rows[1]["link"];
    assert_eq!(link["latency_seconds"], 0.02);
    let bandwidth = link["bandwidth_bytes_per_second"].as_f64().unwrap();
    assert!((bandwidth - 2.5e6).abs() < 1e4, "{link}");
    assert_eq!(rows[1]["cores"], 12);
    assert_eq!(rows[2]["learned_speed"], serde_json::json!({}));
    // Nothing was learned of b2: the planner takes its factor 1 on the scale b1 showed
    // (declared 2, measured about 2.9).
    let planned = rows[2]["planned_speed"]["x86_64-linux"].as_f64().unwrap();
    assert!(
        (1.4..=1.5).contains(&planned),
        "{}",
        rows[2]["planned_speed"]
    );
    assert_eq!(
        rows[1]["planned_speed"]["x86_64-linux"].as_f64(),
        Some(native)
    );
    assert!(rows[2]["link"].is_null() && rows[2]["cores"].is_null());
    assert_eq!(rows[2]["state"], "quarantined");
    let detail = rows[2]["state_detail"].as_str().unwrap();
    assert!(
        detail.starts_with("until ") && detail.ends_with("connection refused"),
        "{detail}"
    );

    let table = common::offload(work.path())
        .env("OFFLOAD_SLOTS_DIR", &slots)
        .args(["machines", "--builders", builders])
        .output()
        .unwrap();
    let shown = text(&table.stdout);
    assert!(shown.starts_with("machine "), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("b2 ") && l.contains("0/2") && l.contains("quarantined until")),
        "{shown}"
    );
    let b1 = shown.lines().find(|l| l.starts_with("b1 ")).unwrap();
    for column in [
        "x86_64-linux 2.",
        "(2), aarch64-linux 0.",
        "2.5 MB/s 20 ms (2)",
        " 12 ",
    ] {
        assert!(b1.contains(column), "{column:?} missing from {b1}");
    }
}
