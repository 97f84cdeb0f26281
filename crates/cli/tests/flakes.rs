//! `offload build` with flake installables: the real binary and real Nix, on local
//! flakes in temp dirs (no network), built on this machine.

mod common;
mod invocation;

use std::path::Path;

use invocation::offload;
use offload_test_support::nix_system as system;
use offload_test_support::{salt, text};

/// A flake whose outputs are `mk NAME` derivations with outputs `out` and `dev`, each
/// writing its name; `body` is the attribute set of outputs, with `mk`, `sys` and the
/// inputs in scope.
fn write_flake(dir: &Path, inputs: &str, body: &str) {
    let flake = format!(
        r#"{{
  inputs = {{ {inputs} }};
  outputs = args@{{ self, ... }}: let
    sys = "{system}";
    mk = name: derivation {{
      inherit name; system = sys; builder = "/bin/sh"; PATH = "/bin:/usr/bin";
      salt = "{salt}"; outputs = [ "out" "dev" ];
      args = [ "-c" "echo $name > $out; echo $name-dev > $dev" ];
    }};
  in with args; {body};
}}"#,
        system = system(),
        salt = salt("flake"),
    );
    std::fs::write(dir.join("flake.nix"), flake).expect("writing flake.nix");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn dot_hash_installables_build_and_link_as_nix_build_does() {
    let dir = tempfile::tempdir().unwrap();
    write_flake(
        dir.path(),
        "",
        "{ packages.${sys} = { foo = mk \"foo\"; bar = mk \"bar\"; }; }",
    );
    let out = offload(&["build", ".#foo", ".#bar", ".#foo.dev"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    // nix build numbers the second installable `-1`, and names other outputs after them.
    assert_eq!(read(&dir.path().join("result")), "foo");
    assert_eq!(read(&dir.path().join("result-1")), "bar");
    assert_eq!(read(&dir.path().join("result-2-dev")), "foo-dev");
    assert!(!dir.path().join("result-2").exists());
    assert_eq!(
        text(&out.stdout).lines().count(),
        3,
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn path_references_full_attribute_paths_and_default_packages() {
    let dir = tempfile::tempdir().unwrap();
    write_flake(
        dir.path(),
        "",
        "{ packages.${sys} = { default = mk \"dflt\"; foo = mk \"foo\"; };
           nixosConfigurations.host.config.system.build.toplevel = mk \"toplevel\"; }",
    );
    let d = dir.path().display();
    let full = format!("path:{d}#packages.{}.foo", system());
    let default = format!("path:{d}");
    let nixos = format!("{d}#nixosConfigurations.host.config.system.build.toplevel");
    let out = offload(&["build", &full, &default, &nixos], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(read(&dir.path().join("result")), "foo");
    assert_eq!(read(&dir.path().join("result-1")), "dflt");
    assert_eq!(read(&dir.path().join("result-2")), "toplevel");
}

#[test]
fn git_file_flakes_build_what_git_tracks() {
    let dir = tempfile::tempdir().unwrap();
    write_flake(
        dir.path(),
        "",
        "{ packages.${sys}.default =
             mk (if builtins.pathExists ./untracked then \"saw-untracked\" else \"in-git\"); }",
    );
    for args in [
        &["init", "-q"][..],
        &["add", "flake.nix"],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "flake",
        ],
    ] {
        let status = std::process::Command::new("git")
            .current_dir(dir.path())
            .args(args)
            .status()
            .expect("git is installed");
        assert!(status.success(), "git {args:?}");
    }
    // A file git does not track is not part of the flake.
    std::fs::write(dir.path().join("untracked"), "").unwrap();
    let installable = format!("git+file://{}", dir.path().display());
    let out = offload(&["build", &installable], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(read(&dir.path().join("result")), "in-git");
}

#[test]
fn override_input_takes_the_input_from_another_flake() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [("dep1", "first"), ("dep2", "second")] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(
            d.join("flake.nix"),
            format!("{{ outputs = {{ self }}: {{ value = \"{value}\"; }}; }}"),
        )
        .unwrap();
    }
    let main = dir.path().join("main");
    std::fs::create_dir(&main).unwrap();
    let dep1 = format!("dep.url = \"path:{}\";", dir.path().join("dep1").display());
    write_flake(&main, &dep1, "{ packages.${sys}.default = mk dep.value; }");

    let out = offload(&["build", ".#"], &main);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(read(&main.join("result")), "first");

    let dep2 = format!("path:{}", dir.path().join("dep2").display());
    let out = offload(&["build", ".#", "--override-input", "dep", &dep2], &main);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(read(&main.join("result")), "second");
}

#[test]
fn an_unfetchable_flake_fails_with_nix_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = offload(&["build", "github:owner/repo#pkg"], dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("evaluation failed"), "{stderr}");
    assert!(
        stderr.contains("unable to download 'https://api.github.com/repos/owner/repo"),
        "{stderr}"
    );
}

#[test]
fn nix_build_only_flags_are_refused_with_flakes_and_the_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let out = offload(&["build", ".#foo", "-A", "foo"], dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("-A applies to Nix files"), "{stderr}");
    assert!(stderr.contains("`.#ATTR`"), "{stderr}");

    let out = offload(
        &["build", "default.nix", "--override-input", "dep", "path:/x"],
        dir.path(),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--override-input applies to flake installables"),
        "{stderr}"
    );
}
