//! offload's own config file, through the real binary: what `offload config` shows,
//! groups in `--on`, and a bad file named with its key.

use offload_test_support::require_nix;
use offload_test_support::text;

mod common;

#[test]
fn config_shows_each_setting_and_where_it_came_from() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("config.toml");
    std::fs::write(
        &file,
        "state_dir = \"/srv/offload\"\n[groups]\nfast = [\"b1\", \"b2\"]\n[build]\nmax_jobs = 3\n",
    )
    .unwrap();
    let out = common::offload(work.path())
        .env("OFFLOAD_CONFIG", &file)
        .env_remove("OFFLOAD_HISTORY")
        .env_remove("OFFLOAD_SIGN_KEY")
        .arg("config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let from = format!("({})", file.display());
    assert!(
        shown.contains(&format!("config file: {}", file.display())),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("state_dir = /srv/offload {from}")),
        "{shown}"
    );
    assert!(
        shown.contains("history = /srv/offload/history.sqlite (state_dir)"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("groups.fast = b1, b2 {from}")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("build.max_jobs = 3 {from}")),
        "{shown}"
    );
    assert!(
        shown.contains("build.keep_going = false (default)"),
        "{shown}"
    );

    // A misspelt key stops every command, naming the file and the key.
    std::fs::write(&file, "[build]\nmax_job = 3\n").unwrap();
    let out = common::offload(work.path())
        .env("OFFLOAD_CONFIG", &file)
        .arg("config")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("unknown field `max_job`"), "{stderr}");
}

#[test]
fn groups_choose_machines_and_an_unknown_group_is_named() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let program = offload_test_support::loopback_serve_program(dir);
    let machine = |store: &str| offload_test_support::loopback_machine(dir, store, &program, 1, 1);
    let builders = format!("{};{}", machine("m1"), machine("m2"));
    let file = dir.join("config.toml");
    std::fs::write(
        &file,
        format!(
            "[groups]\nfirst = [{:?}]\n",
            machine("m1").split(' ').next().unwrap()
        ),
    )
    .unwrap();
    let out = common::offload(dir)
        .env("OFFLOAD_CONFIG", &file)
        .args(["doctor", "--builders", &builders, "--on", "@first"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("/m1\n"), "{stderr}");
    assert!(
        !stderr.contains("/m2\n"),
        "only the group's machine: {stderr}"
    );

    let out = common::offload(dir)
        .env("OFFLOAD_CONFIG", &file)
        .args(["build", "-E", "throw \"not evaluated\"", "--on", "@second"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("@second: no such machine group in")
            && stderr.contains("groups there: first"),
        "{stderr}"
    );
}

#[test]
fn a_store_directory_nix_could_not_use_is_named_before_anything_runs() {
    let work = tempfile::tempdir().unwrap();
    for (variable, dir) in [("NIX_STORE_DIR", "relative/store"), ("NIX_STORE", "/")] {
        let out = common::offload(work.path())
            .env_remove("NIX_STORE_DIR")
            .env(variable, dir)
            .args(["build", "-E", "builtins.toFile \"x\" \"y\""])
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("{dir:?} (from {variable})")) && stderr.contains("unset it"),
            "{stderr}"
        );
    }
}
