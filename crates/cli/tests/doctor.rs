//! `offload doctor` on loopback machines: a healthy one, one whose login prints to
//! stdout, one that declares a system it cannot build.

use std::path::Path;

use offload_test_support::text;
use offload_test_support::{nix_system, require_nix};

mod common;

/// A `remote-program` that runs `nix-store` without build users, after `before`.
fn remote_program(dir: &Path, name: &str, before: &str) -> String {
    let path = dir.join(name);
    offload_test_support::write_executable(
        &path,
        &format!("#!/bin/sh\n{before}\nexec nix-store --option build-users-group '' \"$@\"\n"),
    );
    path.display().to_string()
}

fn machine(dir: &Path, store: &str, program: &str, systems: &str) -> String {
    format!(
        "ssh://localhost?remote-store={}/{store}&remote-program={program} {systems} - 2 1",
        dir.display()
    )
}

#[test]
fn each_problem_is_named_with_its_fix_and_broken_machines_fail_the_run() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let plain = remote_program(dir, "plain", "");
    let noisy = remote_program(dir, "noisy", "echo 'Welcome to the builder'");
    let system = nix_system();
    let builders = [
        machine(dir, "good", &plain, system),
        machine(dir, "noisy", &noisy, system),
        machine(dir, "odd", &plain, &format!("{system},mips64el-linux")),
    ]
    .join(";");
    let out = common::offload(dir)
        .args(["doctor", "--builders", &builders])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Split the report by machine: each starts at an unindented line.
    let section = |name: &str| -> String {
        let start = stderr.find(&format!("\n{name}\n")).expect(&stderr);
        let rest = &stderr[start + 1..];
        let end = rest[1..].find("\n\n").map_or(rest.len(), |e| e + 1);
        rest[..end].to_string()
    };
    let good = section(&format!("localhost:{}/good", dir.display()));
    assert!(!good.contains("broken"), "{good}");
    assert!(good.contains("nix-store (Nix) 2."), "{good}");
    assert!(
        good.contains("its store takes what offload sends"),
        "{good}"
    );
    assert!(good.contains(&format!("system {system}")), "{good}");
    let noisy = section(&format!("localhost:{}/noisy", dir.display()));
    assert!(noisy.contains("broken"), "{noisy}");
    assert!(noisy.contains("Welcome to the builder"), "{noisy}");
    assert!(
        noisy.contains("fix: the remote shell prints to stdout"),
        "{noisy}"
    );
    let odd = section(&format!("localhost:{}/odd", dir.display()));
    assert!(odd.contains("broken   system mips64el-linux"), "{odd}");
    assert!(odd.contains(&format!("ok       system {system}")), "{odd}");
    assert!(
        odd.contains("fix: make the machine build mips64el-linux"),
        "{odd}"
    );
    assert!(
        stderr.contains("cannot build: see the fixes above"),
        "{stderr}"
    );

    // Only the healthy machine, named as a host: exit 0, and this machine left out.
    let out = common::offload(dir)
        .args(["doctor", "--builders", &builders])
        .arg(format!(
            "ssh://localhost?remote-store={}/good&remote-program={plain}",
            dir.display()
        ))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.starts_with("local\n"), "{stderr}");
}

#[test]
fn hostile_machine_values_never_run_as_commands() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let marker = dir.join("pwned");
    // A store directory and a program whose names would run commands in a shell.
    let builders = format!(
        "ssh://localhost?remote-store={d}/s$(touch${{IFS}}{m})&remote-program=nix-store`touch${{IFS}}{m}` {} - 1 1",
        nix_system(),
        d = dir.display(),
        m = marker.display()
    );
    let out = common::offload(dir)
        .args(["doctor", "--builders", &builders])
        .output()
        .unwrap();
    // The machine is broken (no program of that name), and nothing ran.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!marker.exists(), "a machines-file value ran as a command");
}
