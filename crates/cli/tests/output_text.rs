//! Snapshots of what the real `offload` binary prints on stderr (and stdout) for bad
//! usage, a failed build, a successful build and a simulation, each with its exit code.
//! Store hashes, timings and temporary directories are filtered out, so the snapshots
//! hold on any machine and across runs. Run under `INSTA_UPDATE=no` (as
//! `scripts/test.sh` does), a changed output fails instead of being written.

mod common;

use std::process::Output;

use offload_test_support::require_nix;

/// Regex → replacement for what differs between machines: store hashes depend on the
/// system, and temporary directories are new every run.
const MACHINE_FILTERS: &[(&str, &str)] = &[
    (r"/nix/store/[0-9a-z]{32}-", "/nix/store/HASH-"),
    (r"/[^\s:']*offload-snap[0-9A-Za-z_]*", "[TMP]"),
];

/// Regex → replacement for the timings of real builds, which differ every run.
const TIMING_FILTERS: &[(&str, &str)] = &[
    (r"\b\d+\.\d+ s\b", "N.NN s"),
    (r"\(\d+\.\d+x\)", "(N.NNx)"),
    (r"\b\d+(\.\d+)? ms\b", "N ms"),
];

/// Whether the output holds wall-clock timings (a real build) or only computed ones
/// (usage errors, simulations), which the snapshot keeps.
#[derive(Clone, Copy, PartialEq)]
enum Timings {
    Measured,
    Computed,
}

/// A scratch directory that the path filter recognises.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("offload-snap")
        .tempdir()
        .unwrap()
}

/// `offload ARGS…` run in `work`.
fn offload(work: &std::path::Path, args: &[&str]) -> Output {
    common::offload(work).args(args).output().unwrap()
}

/// Snapshots the exit code, stdout and stderr of `out` under `name`, filtered.
fn assert_output(name: &str, out: &Output, timings: Timings) {
    let shown = format!(
        "exit code: {}\n----- stdout -----\n{}----- stderr -----\n{}",
        out.status
            .code()
            .map_or_else(|| "none (killed)".to_string(), |c| c.to_string()),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let mut settings = insta::Settings::clone_current();
    let timing_filters = if timings == Timings::Measured {
        TIMING_FILTERS
    } else {
        &[]
    };
    for (regex, replacement) in MACHINE_FILTERS.iter().chain(timing_filters) {
        settings.add_filter(regex, *replacement);
    }
    settings.bind(|| insta::assert_snapshot!(name, shown));
}

#[test]
fn an_unknown_flag_is_bad_usage() {
    let work = scratch();
    let out = offload(work.path(), &["build", "--no-such-flag"]);
    assert_output("unknown_flag", &out, Timings::Computed);
}

#[test]
fn a_malformed_builders_spec_names_the_field() {
    // The local machine's settings come from Nix.
    if !require_nix() {
        return;
    }
    let work = scratch();
    let out = offload(
        work.path(),
        &[
            "build",
            "x.nix",
            "--builders",
            "ssh://b1 x86_64-linux - many",
        ],
    );
    assert_output("malformed_builders", &out, Timings::Computed);
}

#[test]
fn on_naming_an_unknown_machine_lists_the_machines() {
    if !require_nix() {
        return;
    }
    let work = scratch();
    let out = offload(
        work.path(),
        &["build", "x.nix", "--builders", "ssh://b1", "--on", "b9"],
    );
    assert_output("on_unknown_machine", &out, Timings::Computed);
}

#[test]
fn a_bad_field_in_a_machines_file_names_file_and_line() {
    if !require_nix() {
        return;
    }
    let work = scratch();
    let machines = work.path().join("machines");
    std::fs::write(
        &machines,
        "# the fleet\nssh://a x86_64-linux - 2 1\nssh://b x86_64-linux - two\n",
    )
    .unwrap();
    let builders = format!("@{}", machines.display());
    let out = offload(work.path(), &["build", "x.nix", "--builders", &builders]);
    assert_output("machines_file_bad_field", &out, Timings::Computed);
}

/// Writes `expr` as `build.nix` in a fresh scratch directory and builds it on this
/// machine alone; the salt makes every run build anew.
fn build_locally(expr: &str) -> Output {
    let work = scratch();
    let salt = offload_test_support::salt("snapshot");
    let file = work.path().join("build.nix");
    std::fs::write(&file, expr.replace("SALT", &salt)).unwrap();
    offload(
        work.path(),
        &[
            "build",
            file.to_str().unwrap(),
            "--builders",
            "",
            "-j",
            "1",
            "--no-out-link",
        ],
    )
}

#[test]
fn a_failed_build_names_derivation_machine_and_last_log_lines() {
    if !require_nix() {
        return;
    }
    let out = build_locally(
        r#"derivation {
             name = "snap-fails"; system = builtins.currentSystem; builder = "/bin/sh";
             salt = "SALT"; PATH = "/bin:/usr/bin";
             args = [ "-c" "for i in 1 2 3 4; do echo compiling part $i; done; echo 'error: part 4 is broken' >&2; exit 3" ];
           }"#,
    );
    assert_output("failed_build", &out, Timings::Measured);
}

#[test]
fn a_successful_build_prints_its_output_and_summary() {
    if !require_nix() {
        return;
    }
    let out = build_locally(
        r#"derivation {
             name = "snap-ok"; system = builtins.currentSystem; builder = "/bin/sh";
             salt = "SALT"; PATH = "/bin:/usr/bin";
             args = [ "-c" "echo built > $out" ];
           }"#,
    );
    assert_output("successful_build", &out, Timings::Measured);
}

#[test]
fn simulate_prints_a_fixed_graph_the_same_every_time() {
    let work = scratch();
    // A diamond: a base, two middles over it, a top over both.
    std::fs::write(
        work.path().join("graph.json"),
        r#"{"nodes":[
             {"id":"base","deps":[],"duration_s":2,"output_bytes":1048576},
             {"id":"left","deps":["base"],"duration_s":3,"output_bytes":2048},
             {"id":"right","deps":["base"],"duration_s":1.5,"output_bytes":2048},
             {"id":"top","deps":["left","right"],"duration_s":1,"output_bytes":4096}
           ]}"#,
    )
    .unwrap();
    let out = offload(
        work.path(),
        &[
            "simulate",
            "--dag",
            "graph.json",
            "--builders",
            "b1 x86_64-linux - 1 1; b2 x86_64-linux - 1 2",
            "--local-slots",
            "1",
        ],
    );
    assert_output("simulate_diamond", &out, Timings::Computed);
}
