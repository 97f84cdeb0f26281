//! `offload build` with nix-build's everyday flags: the real binary and real Nix, on this
//! machine and on a loopback machine with its own chroot store.

mod common;
mod invocation;

use std::path::Path;
use std::process::Command;

use invocation::offload;
use offload_test_support::nix_system as system;
use offload_test_support::{salt, text};

/// A Nix file with one derivation per attribute of `scripts` (name = shell script).
fn write_file(dir: &Path, scripts: &[(&str, &str)]) -> String {
    let salt = salt("flags");
    let attrs: String = scripts
        .iter()
        .map(|(name, script)| {
            format!(
                "{name} = derivation {{ name = \"{name}\"; system = builtins.currentSystem; \
                 builder = \"/bin/sh\"; PATH = \"/bin:/usr/bin\"; salt = \"{salt}\"; \
                 args = [ \"-c\" {script:?} ]; }};\n"
            )
        })
        .collect();
    let file = dir.join("default.nix");
    std::fs::write(&file, format!("{{\n{attrs}}}\n")).expect("writing default.nix");
    file.display().to_string()
}

fn ok(out: &std::process::Output) -> String {
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    stderr
}

fn failed(out: &std::process::Output) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// One loopback machine: a chroot store under a temp dir, reached as
/// `ssh://localhost?remote-store=…` (a local process, as Nix does it).
struct Machine {
    dir: tempfile::TempDir,
    program: std::path::PathBuf,
}

impl Machine {
    fn new() -> Machine {
        let dir = tempfile::tempdir().expect("temp dir");
        let program = offload_test_support::loopback_serve_program(dir.path());
        Machine { dir, program }
    }

    /// What offload calls the machine in messages.
    fn name(&self) -> String {
        format!("localhost:{}/store", self.dir.path().display())
    }

    fn uri(&self) -> String {
        format!(
            "ssh://localhost?remote-store={}/store&remote-program={}",
            self.dir.path().display(),
            self.program.display()
        )
    }

    /// `--builders` spec of this one machine (2 slots).
    fn spec(&self) -> String {
        format!("{} {} - 2 1", self.uri(), system())
    }
}

#[test]
fn keep_failed_names_the_kept_directory_and_its_machine() {
    let dir = tempfile::tempdir().unwrap();
    let m = Machine::new();
    let file = write_file(dir.path(), &[("broken", "echo failing; exit 3")]);
    let spec = m.spec();
    let build = |extra: &[&str]| {
        let mut args = vec!["build", &file, "-A", "broken", "--builders", &spec, "-j0"];
        args.extend(extra);
        offload(&args, dir.path())
    };
    let stderr = failed(&build(&[]));
    assert!(!stderr.contains("kept at"), "{stderr}");

    let stderr = failed(&build(&["-K"]));
    let kept = stderr
        .split_once("its build directory is kept there at '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .unwrap_or_else(|| panic!("no kept directory in: {stderr}"))
        .0;
    assert!(kept.starts_with("/tmp/nix-build-broken.drv-"), "{stderr}");
    assert!(Path::new(kept).is_dir(), "{kept} is not kept");
    assert!(stderr.contains(&format!("' (on {})", m.name())), "{stderr}");
    std::fs::remove_dir_all(kept).unwrap();
}

#[test]
fn timeouts_go_with_every_build_and_fail_with_nix_message() {
    let dir = tempfile::tempdir().unwrap();
    let m = Machine::new();
    let file = write_file(
        dir.path(),
        &[
            ("sleeper", "sleep 10; touch $out"),
            ("quiet", "sleep 10; touch $out"),
        ],
    );
    let spec = m.spec();
    let out = offload(
        &[
            "build",
            &file,
            "-A",
            "sleeper",
            "--builders",
            &spec,
            "-j0",
            "--timeout",
            "1",
        ],
        dir.path(),
    );
    let stderr = failed(&out);
    assert!(
        stderr.contains("sleeper.drv!out' from in-memory derivation timed out after 1 seconds ("),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("(on {})", m.name())), "{stderr}");

    // The local machine gets them too.
    let out = offload(
        &[
            "build",
            &file,
            "-A",
            "quiet",
            "--local-only",
            "--max-silent-time",
            "1",
        ],
        dir.path(),
    );
    let stderr = failed(&out);
    assert!(
        stderr.contains("timed out after 1 seconds of silence (on local)"),
        "{stderr}"
    );
}

#[test]
fn check_rebuilds_where_the_plan_puts_it_and_reports_nondeterminism() {
    let dir = tempfile::tempdir().unwrap();
    let m = Machine::new();
    let file = write_file(
        dir.path(),
        &[
            ("same", "echo same > $out"),
            ("random", "cat /proc/sys/kernel/random/uuid > $out"),
        ],
    );
    ok(&offload(
        &["build", &file, "-A", "same", "-A", "random", "--local-only"],
        dir.path(),
    ));
    let spec = m.spec();
    let check = |attr: &str| {
        offload(
            &[
                "build",
                &file,
                "-A",
                attr,
                "--check",
                "--builders",
                &spec,
                "-j0",
            ],
            dir.path(),
        )
    };
    // Valid here, and still built again on the machine the plan chose.
    let stderr = ok(&check("same"));
    assert!(
        stderr.contains(&format!("same.drv' on '{}'", m.name())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("builds per machine: {} 1", m.name())),
        "{stderr}"
    );

    let stderr = failed(&check("random"));
    assert!(
        stderr.contains("random.drv' may not be deterministic: output '"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("(on {})", m.name())), "{stderr}");

    // On this machine as well.
    let out = offload(
        &["build", &file, "-A", "random", "--check", "--local-only"],
        dir.path(),
    );
    let stderr = failed(&out);
    assert!(stderr.contains("may not be deterministic"), "{stderr}");
    assert!(stderr.contains("(on local)"), "{stderr}");
}

#[test]
fn repair_restores_a_corrupted_output() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), &[("fragile", "echo intact > $out")]);
    let out = offload(
        &["build", &file, "-A", "fragile", "--local-only"],
        dir.path(),
    );
    ok(&out);
    let path = text(&out.stdout).trim().to_string();
    let chmod = Command::new("chmod").args(["u+w", &path]).status();
    assert!(chmod.is_ok_and(|s| s.success()));
    std::fs::write(&path, "corrupted\n").unwrap();

    let out = offload(&["build", &file, "-A", "fragile", "--repair"], dir.path());
    ok(&out);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "intact\n");
}

#[test]
fn option_reaches_the_evaluation_and_every_build_session() {
    let dir = tempfile::tempdir().unwrap();
    let m = Machine::new();
    let hook_log = dir.path().join("hook.log");
    let hook = dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$DRV_PATH\" >> {}\n", hook_log.display()),
    )
    .unwrap();
    assert!(Command::new("chmod")
        .arg("+x")
        .arg(&hook)
        .status()
        .is_ok_and(|s| s.success()));
    let expr = format!(
        "derivation {{ name = if builtins ? exec then \"with-exec\" else \"without-exec\"; \
         system = builtins.currentSystem; builder = \"/bin/sh\"; salt = \"{}\"; \
         args = [ \"-c\" \"echo > $out\" ]; }}",
        salt("flags")
    );
    let spec = m.spec();
    let out = offload(
        &[
            "build",
            "-E",
            &expr,
            "--builders",
            &spec,
            "-j0",
            "--option",
            "allow-unsafe-native-code-during-evaluation",
            "true",
            "--option",
            "post-build-hook",
            hook.to_str().unwrap(),
        ],
        dir.path(),
    );
    ok(&out);
    let path = text(&out.stdout).trim().to_string();
    assert!(path.ends_with("-with-exec"), "{path}");
    let hooked = std::fs::read_to_string(&hook_log).unwrap_or_default();
    // Nix 2.8 gives the hook the derivation (its OUT_PATHS comes empty).
    assert!(
        hooked.trim().ends_with("-with-exec.drv"),
        "the post-build hook did not run on the builder: {hooked:?}"
    );

    let out = offload(
        &["build", "-E", &expr, "--option", "timeout", "soon"],
        dir.path(),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`--option timeout` takes a number"),
        "{stderr}"
    );
}

#[test]
fn include_path_and_show_trace_reach_the_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    std::fs::write(
        lib.join("default.nix"),
        format!(
            "derivation {{ name = \"from-lib\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; salt = \"{}\"; args = [ \"-c\" \"echo > $out\" ]; }}",
            salt("flags")
        ),
    )
    .unwrap();
    let include = format!("mylib={}", lib.display());
    let out = offload(
        &["build", "-E", "import <mylib>", "-I", &include],
        dir.path(),
    );
    ok(&out);
    assert!(text(&out.stdout).trim().ends_with("-from-lib"));

    let broken = "let f = x: x.y; in f 1";
    let stderr = failed(&offload(&["build", "-E", broken], dir.path()));
    assert!(
        stderr.contains("value is an integer while a set was expected"),
        "{stderr}"
    );
    assert!(!stderr.contains("while evaluating 'f'"), "{stderr}");
    let stderr = failed(&offload(
        &["build", "-E", broken, "--show-trace"],
        dir.path(),
    ));
    assert!(stderr.contains("… while evaluating 'f'"), "{stderr}");
}

#[test]
fn no_build_output_hides_the_build_log() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        &[("chatty", "echo hello-from-the-build; touch $out")],
    );
    let stderr = ok(&offload(&["build", &file, "--local-only"], dir.path()));
    assert!(stderr.contains("chatty> hello-from-the-build"), "{stderr}");
    let file = write_file(
        dir.path(),
        &[("chatty", "echo hello-from-the-build; touch $out")],
    );
    let stderr = ok(&offload(
        &["build", &file, "--local-only", "-Q"],
        dir.path(),
    ));
    assert!(stderr.contains("building '"), "{stderr}");
    assert!(!stderr.contains("hello-from-the-build"), "{stderr}");
}

#[test]
fn an_unknown_flag_names_the_closest_known_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = offload(&["build", "--keep-faild"], dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unexpected argument '--keep-faild'"),
        "{stderr}"
    );
    assert!(
        stderr.contains("a similar argument exists: '--keep-failed'"),
        "{stderr}"
    );
}

#[test]
fn arg_and_argstr_reach_the_expression() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("function.nix");
    std::fs::write(
        &file,
        format!(
            "{{ greeting ? \"none\", count ? 0 }}: derivation {{ \
             name = \"count-${{toString count}}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; salt = \"{}\"; \
             args = [ \"-c\" \"echo ${{greeting}} > $out\" ]; }}",
            salt("flags")
        ),
    )
    .unwrap();
    let file = file.display().to_string();
    let build = |extra: &[&str]| {
        let mut args = vec!["build", &file, "--local-only", "--no-out-link"];
        args.extend(extra);
        let out = offload(&args, dir.path());
        ok(&out);
        text(&out.stdout).trim().to_string()
    };
    let plain = build(&[]);
    assert!(plain.ends_with("-count-0"), "{plain}");
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "none\n");
    // --arg takes an expression, --argstr a string.
    let given = build(&["--arg", "count", "1 + 2", "--argstr", "greeting", "a b"]);
    assert!(given.ends_with("-count-3"), "{given}");
    assert_eq!(std::fs::read_to_string(&given).unwrap(), "a b\n");
}

#[test]
fn dry_run_says_what_would_be_built_and_builds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = Machine::new();
    let file = write_file(dir.path(), &[("untouched", "echo built > $out")]);
    let drv = String::from_utf8(
        offload_test_support::nix_command("nix-instantiate")
            .args([&file, "-A", "untouched"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    assert!(drv.ends_with("-untouched.drv"), "{drv}");
    let spec = m.spec();
    let out = offload(
        &[
            "build",
            &file,
            "-A",
            "untouched",
            "--builders",
            &spec,
            "--dry-run",
        ],
        dir.path(),
    );
    let stderr = ok(&out);
    assert!(
        stderr.contains("1 derivations to build, 0 paths to fetch"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("  build {drv}\n")), "{stderr}");
    assert!(
        stderr.contains(&format!("  {} (2 slots", m.name())),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout), "", "a dry run prints no output path");
    assert!(
        !dir.path().join("result").exists(),
        "a dry run links nothing"
    );
    let output = offload_test_support::nix_command("nix-store")
        .args(["-q", "--outputs", &drv])
        .output()
        .unwrap();
    let output = text(&output.stdout).trim().to_string();
    let valid = offload_test_support::nix_command("nix-store")
        .args(["--check-validity", &output])
        .output()
        .unwrap();
    assert!(!valid.status.success(), "the dry run built {output}");
}
