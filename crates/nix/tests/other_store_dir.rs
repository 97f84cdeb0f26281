//! A store directory other than `/nix/store` (`NIX_STORE_DIR`, as Nix's own test suite
//! and relocated installs use): every `.drv` a real `nix-instantiate` writes there
//! parses, prints back, and yields the `.drv` path and output paths Nix gave, and a file
//! `nix-store --add` puts there has the path computed here. The process's store
//! directory is chosen once, before any path is read, as the driver does.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::process::Command;

use offload_nix::derivation::{name_from_drv_path, Derivation};
use offload_nix::hash::Hash;
use offload_nix::store_path::{
    make_fixed_output_path, set_store_dir, store_dir, StoreDir, StorePath,
};

const EXPR: &str = r#"
let
  sys = builtins.currentSystem;
  mk = attrs: derivation ({ system = sys; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; } // attrs);
  plain = builtins.genList (i: mk { name = "plain-${toString i}"; }) 5;
  chained = builtins.genList (i: mk { name = "chain-${toString i}"; dep = builtins.elemAt plain i; }) 5;
  multi = mk { name = "multi"; outputs = [ "out" "dev" ]; deps = chained; src = ./payload.txt; };
  uses = mk { name = "uses"; a = multi.dev; };
  fixed = mk { name = "fixed"; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "tree"; };
in [ uses fixed ]
"#;

/// Runs a Nix tool with the store at `dir/store` and its state beside it.
fn nix(dir: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .env("NIX_CONFIG", "substituters =")
        .env("NIX_STORE_DIR", dir.join("store"))
        .env("NIX_STATE_DIR", dir.join("state"))
        .env("NIX_LOG_DIR", dir.join("log"))
        .env_remove("NIX_REMOTE")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn paths_under_another_store_directory_are_those_nix_computes() {
    if !offload_test_support::require_nix() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let chosen = StoreDir::new(store.to_str().unwrap(), "the test").unwrap();
    set_store_dir(chosen.clone()).unwrap();
    assert_eq!(store_dir(), &chosen);
    // Chosen once: another directory is refused, naming both.
    let other = StoreDir::new("/elsewhere/store", "the test").unwrap();
    let refused = set_store_dir(other).unwrap_err().to_string();
    assert!(
        refused.contains(chosen.as_str()) && refused.contains("/elsewhere/store"),
        "{refused}"
    );

    let file = dir.path().join("payload.txt");
    std::fs::write(&file, "a source file\n").unwrap();
    let added = nix(dir.path(), "nix-store", &["--add", file.to_str().unwrap()]);
    let hash = nix(
        dir.path(),
        "nix-hash",
        &["--type", "sha256", file.to_str().unwrap()],
    );
    let hash = Hash::parse(&format!("sha256:{}", hash.trim()), None).unwrap();
    let computed = make_fixed_output_path(true, &hash, "payload.txt").unwrap();
    assert_eq!(computed.to_string(), added.trim());
    assert_eq!(
        StorePath::from_absolute_path(added.trim()).unwrap(),
        computed
    );

    std::fs::write(dir.path().join("t.nix"), EXPR).unwrap();
    let expr = dir.path().join("t.nix");
    let roots = nix(dir.path(), "nix-instantiate", &[expr.to_str().unwrap()]);
    assert!(
        roots.lines().all(|r| r.starts_with(chosen.as_str())),
        "{roots}"
    );

    let mut drvs: HashMap<StorePath, Derivation> = HashMap::new();
    for entry in std::fs::read_dir(&store).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if !name.ends_with(".drv") {
            continue;
        }
        let path = StorePath::from_base_name(&name).unwrap();
        let text = std::fs::read(entry.path()).unwrap();
        let drv = Derivation::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(drv.to_aterm() == text, "{name} does not print back");
        let drv_path = drv.drv_path(name_from_drv_path(&path)).unwrap();
        assert_eq!(drv_path, path, "{name}: .drv path");
        assert_eq!(drv_path.to_string(), entry.path().to_str().unwrap());
        drvs.insert(path, drv);
    }
    assert_eq!(drvs.len(), 13, "{:?}", drvs.keys());

    fn unmasked(
        p: &StorePath,
        drvs: &HashMap<StorePath, Derivation>,
        memo: &mut HashMap<StorePath, [u8; 32]>,
    ) -> [u8; 32] {
        if let Some(h) = memo.get(p) {
            return *h;
        }
        let h = drvs[p]
            .hash_modulo(false, |i| Ok::<_, Infallible>(unmasked(i, drvs, memo)))
            .unwrap();
        memo.insert(p.clone(), h);
        h
    }
    let mut memo = HashMap::new();
    let mut checked = 0;
    for (path, drv) in &drvs {
        let show = nix(
            dir.path(),
            "nix-store",
            &["--query", "--outputs", &path.to_string()],
        );
        let mut from_nix: Vec<&str> = show.lines().collect();
        from_nix.sort_unstable();
        let mut ours: Vec<String> = drv
            .outputs
            .values()
            .filter_map(|o| o.path.as_ref().map(StorePath::to_string))
            .collect();
        ours.sort_unstable();
        assert_eq!(ours, from_nix, "{path}");
        if drv.is_fixed_output() {
            continue;
        }
        let masked = drv
            .hash_modulo(true, |i| Ok::<_, Infallible>(unmasked(i, &drvs, &mut memo)))
            .unwrap();
        let expected = drv
            .expected_output_paths(name_from_drv_path(path), &masked)
            .unwrap();
        for (name, output) in &drv.outputs {
            assert_eq!(
                output.path.as_ref(),
                Some(&expected[name]),
                "{path}: {name}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 13, "outputs recomputed");
}
