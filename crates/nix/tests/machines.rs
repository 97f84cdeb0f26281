//! Machines files with `@file` includes, on real files.

use offload_nix::machines::{parse_builders, parse_machines_file};

#[test]
fn includes_nest_and_missing_files_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("inner");
    let outer = dir.path().join("machines");
    std::fs::write(&inner, "ssh://c x86_64-linux - 2\n").unwrap();
    std::fs::write(
        &outer,
        format!(
            "a\n@{}\n@{}/missing\nb;d",
            inner.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let m = parse_machines_file(&outer, "x86_64-linux").unwrap();
    let uris: Vec<&str> = m.iter().map(|m| m.uri.as_str()).collect();
    assert_eq!(uris, ["ssh://a", "ssh://c", "ssh://b", "ssh://d"]);
    assert_eq!(m[1].place, format!("{}:1", inner.display()));
    assert!(
        parse_machines_file(&dir.path().join("none"), "x86_64-linux")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn include_cycles_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::write(&a, format!("@{}\n", b.display())).unwrap();
    std::fs::write(&b, format!("host\n@{}\n", a.display())).unwrap();
    let e = parse_builders(&format!("@{}", a.display()), "--builders", "x86_64-linux").unwrap_err();
    assert!(e.to_string().contains("includes itself"), "{e}");
}

#[test]
fn errors_in_included_files_name_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m");
    std::fs::write(&f, "# fleet\nok\nbroken x86_64-linux - 2 quick\n").unwrap();
    let e = parse_builders(
        &format!("@{}", f.display()),
        "builders setting",
        "x86_64-linux",
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:3: field 5 (speed factor)", f.display())),
        "{e}"
    );
}

/// Nix 2.8 itself refuses the same bad field: its error says "bad machine specification".
#[test]
fn nix_agrees_about_a_bad_field() {
    if !offload_test_support::require_nix() {
        return;
    }
    let out = offload_test_support::nix_command("nix-build")
        .args([
            "--builders",
            "host x86_64-linux - many",
            "-E",
            "derivation { name = \"x\"; system = \"aarch64-linux\"; builder = \"/bin/sh\"; }",
            "--no-out-link",
            "--max-jobs",
            "0",
        ])
        .output()
        .expect("run nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad machine specification") || stderr.contains("many"),
        "{stderr}"
    );
    assert!(parse_builders("host x86_64-linux - many", "--builders", "x86_64-linux").is_err());
}

#[test]
fn fixture_machines_file_parses_as_nix_reads_it() {
    // Expected values follow machines.cc at tag 2.8.0 (docs/nix-protocols.md §8).
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/machines/machines");
    let m = parse_machines_file(&file, "x86_64-linux").unwrap();
    let uris: Vec<&str> = m.iter().map(|m| m.uri.as_str()).collect();
    assert_eq!(
        uris,
        [
            "ssh://alice@builder1",
            "ssh://builder2",
            "ssh-ng://builder3",
            "local"
        ]
    );
    assert_eq!(m[0].systems, ["x86_64-linux", "i686-linux"]);
    assert_eq!(m[0].ssh_key.as_deref(), Some("/root/.ssh/id_builder"));
    assert_eq!((m[0].max_jobs, m[0].speed_factor), (4, 2.0));
    assert!(m[0].supported_features.contains("big-parallel"));
    assert!(m[0].mandatory_features.contains("kvm"));
    assert_eq!(m[0].public_host_key, None);
    // Missing fields take defaults; a speed factor below 1 becomes 1.
    assert_eq!((m[1].max_jobs, m[1].speed_factor), (1, 1.0));
    assert_eq!(m[2].systems, ["x86_64-linux"]);
    assert_eq!(m[3].max_jobs, 8);
}
