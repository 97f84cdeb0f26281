//! Shell completions (`offload completions bash|zsh|fish`) and man pages (`offload man
//! --out DIR`), generated from the flag definitions: each names the subcommands and
//! their flags, bash accepts and runs its script, and `man` renders the pages.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use offload_test_support::{text, REQUIRE_E2E};

const SUBCOMMANDS: [&str; 8] = [
    "build", "copy", "simulate", "machines", "report", "doctor", "hook", "agent",
];

fn offload(work: &Path, args: &[&str]) -> Output {
    common::offload(work).args(args).output().unwrap()
}

/// The completion script for `shell`.
fn script(work: &Path, shell: &str) -> String {
    let out = offload(work, &["completions", shell]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Runs `cmd`, or says its program is missing (a failure under `OFFLOAD_REQUIRE_E2E`,
/// which scripts/test.sh sets after scripts/setup.sh installed it).
fn run_if_installed(cmd: &mut Command) -> Option<Output> {
    match cmd.output() {
        Ok(out) => Some(out),
        Err(e) => {
            let program = cmd.get_program().to_string_lossy().into_owned();
            assert!(
                std::env::var_os(REQUIRE_E2E).is_none(),
                "{program}: {e} (scripts/setup.sh installs it)"
            );
            eprintln!("skipped: {program} is not installed");
            None
        }
    }
}

#[test]
fn completion_scripts_name_the_subcommands_and_their_flags() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // Each defines the completion of `offload`, and offers `build --builders`.
    for (shell, defines, builders) in [
        ("bash", "complete -F _offload ", "--builders"),
        ("zsh", "#compdef offload", "'--builders=["),
        (
            "fish",
            "complete -c offload",
            "__fish_offload_using_subcommand build\" -l builders",
        ),
    ] {
        let script = script(dir, shell);
        assert!(script.contains(defines), "{shell}: {script}");
        assert!(script.contains(builders), "{shell}: {script}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell}: no {sub} in {script}");
        }
    }

    // bash takes the script, and completing with it offers the flags and subcommands.
    let path = dir.join("offload.bash");
    std::fs::write(&path, script(dir, "bash")).unwrap();
    let checked = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(checked.status.success(), "{}", text(&checked.stderr));
    let complete = |words: &str, cword: usize, cur: &str, prev: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source '{}'; COMP_WORDS=({words}); COMP_CWORD={cword}; \
                 _offload offload '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                path.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let flags = complete("offload build --buil", 2, "--buil", "build");
    assert_eq!(flags, "--builders\n--builders-use-substitutes\n");
    let subcommands = complete("offload co", 1, "co", "offload");
    assert_eq!(subcommands, "copy\nconfig\ncompletions\n");

    let out = offload(dir, &["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn man_pages_cover_offload_and_each_subcommand_and_render() {
    let work = tempfile::tempdir().unwrap();
    let pages = work.path().join("share/man/man1");
    let out = offload(work.path(), &["man", "--out", pages.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut written: Vec<String> = std::fs::read_dir(&pages)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    for name in std::iter::once("offload.1".to_string())
        .chain(SUBCOMMANDS.iter().map(|s| format!("offload-{s}.1")))
    {
        assert!(written.contains(&name), "no {name} in {written:?}");
    }
    let build = std::fs::read_to_string(pages.join("offload-build.1")).unwrap();
    assert!(build.starts_with(".ie"), "{build}");
    assert!(build.contains(".TH offload-build 1"), "{build}");
    assert!(build.contains(r"\fB\-\-builders\fR"), "{build}");

    let page = pages.join("offload-build.1");
    // Wide enough that no flag is hyphenated across lines.
    let Some(shown) = run_if_installed(
        Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANWIDTH", "250"),
    ) else {
        return;
    };
    let shown = text(&shown.stdout);
    assert!(
        shown.contains("offload-build - Build derivations"),
        "{shown}"
    );
    assert!(shown.contains("--builders"), "{shown}");
    assert!(shown.contains("--exclude"), "{shown}");
}
