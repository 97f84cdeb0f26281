//! Every `.drv` that a real `nix-instantiate` writes for a varied expression (plain,
//! chained, multi-output, fixed-output flat/recursive/sha1, awkward strings, structured
//! attributes) parses, prints back byte for byte, and yields the same `.drv` path and
//! output paths when recomputed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::process::Command;

use offload_nix::derivation::{name_from_drv_path, Derivation};
use offload_nix::store_path::StorePath;

const EXPR: &str = r#"
let
  sys = builtins.currentSystem;
  mk = attrs: derivation ({ system = sys; builder = "/bin/sh"; PATH = "/bin:/usr/bin"; args = [ "-c" "echo > $out" ]; } // attrs);
  plain = builtins.genList (i: mk { name = "plain-${toString i}"; }) 60;
  chained = builtins.genList (i: mk { name = "chain-${toString i}"; dep = builtins.elemAt plain i; other = builtins.elemAt plain (59 - i); }) 60;
  multi = builtins.genList (i: mk { name = "multi-${toString i}"; outputs = [ "out" "dev" "lib" ]; dep = (builtins.elemAt chained i).out; }) 30;
  usesMulti = builtins.genList (i: mk { name = "uses-multi-${toString i}"; a = (builtins.elemAt multi i).dev; b = (builtins.elemAt multi i).lib; }) 20;
  fixedFlat = builtins.genList (i: mk { name = "fixed-flat-${toString i}"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "content ${toString i}"; }) 10;
  fixedRec = builtins.genList (i: mk { name = "fixed-rec-${toString i}"; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "tree ${toString i}"; }) 10;
  fixedSha1 = builtins.genList (i: mk { name = "fixed-sha1-${toString i}"; outputHashAlgo = "sha1";
    outputHash = builtins.hashString "sha1" "sha1 ${toString i}"; }) 5;
  usesFixed = builtins.genList (i: mk { name = "uses-fixed-${toString i}"; a = builtins.elemAt fixedFlat i; b = builtins.elemAt fixedRec i; }) 10;
  awkward = builtins.genList (i: mk { name = "awkward-${toString i}"; text = "quote \" backslash \\ tab \t newline \n cr \r unicode é ✓ ${toString i}";
    args = [ "-c" "echo '${toString i}' \"$x\" \\ > $out" ]; }) 10;
  structured = builtins.genList (i: mk { name = "structured-${toString i}"; __structuredAttrs = true; list = [ 1 2 i ]; nested = { a = "b"; }; }) 5;
  withSrc = mk { name = "with-src"; src = ./payload.txt; };
in plain ++ chained ++ multi ++ usesMulti ++ fixedFlat ++ fixedRec ++ fixedSha1 ++ usesFixed ++ awkward ++ structured ++ [ withSrc ]
"#;

fn instantiate(dir: &Path) -> Option<Vec<String>> {
    if !offload_test_support::require_nix() {
        return None;
    }
    let file = dir.join("many.nix");
    std::fs::write(&file, EXPR).unwrap();
    std::fs::write(dir.join("payload.txt"), "a source file\n").unwrap();
    let store = dir.join("store");
    let out = match Command::new("nix-instantiate")
        .env("NIX_CONFIG", "substituters =")
        .arg("--store")
        .arg(&store)
        .arg(&file)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("nix-instantiate: {e}"),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split('!').next().unwrap().to_string())
            .collect(),
    )
}

#[test]
fn every_drv_nix_writes_roundtrips_and_hashes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let Some(roots) = instantiate(dir.path()) else {
        return;
    };
    assert!(roots.len() >= 200, "only {} derivations", roots.len());
    let store_dir = dir.path().join("store/nix/store");
    let mut drvs: HashMap<StorePath, Derivation> = HashMap::new();
    let mut fixed = 0;
    let mut multi = 0;
    for entry in std::fs::read_dir(&store_dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if !name.ends_with(".drv") {
            continue;
        }
        let path = StorePath::from_base_name(&name).unwrap();
        let text = std::fs::read(entry.path()).unwrap();
        let drv = Derivation::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            drv.to_aterm() == text,
            "{name} does not print back byte for byte"
        );
        assert_eq!(
            drv.drv_path(name_from_drv_path(&path)).unwrap(),
            path,
            "{name}: .drv path"
        );
        fixed += usize::from(drv.is_fixed_output());
        multi += usize::from(drv.outputs.len() > 1);
        drvs.insert(path, drv);
    }
    assert!(drvs.len() >= 200, "only {} .drv files", drvs.len());
    assert!(fixed >= 25 && multi >= 30, "fixed {fixed}, multi {multi}");
    assert!(drvs.values().any(|d| d.structured_attrs().is_some()));

    // Output paths: hash modulo over the inputs, memoised, unmasked for inputs.
    let mut memo: HashMap<StorePath, [u8; 32]> = HashMap::new();
    fn unmasked(
        p: &StorePath,
        drvs: &HashMap<StorePath, Derivation>,
        memo: &mut HashMap<StorePath, [u8; 32]>,
    ) -> [u8; 32] {
        if let Some(h) = memo.get(p) {
            return *h;
        }
        let drv = &drvs[p];
        let h = drv
            .hash_modulo(false, |i| Ok::<_, Infallible>(unmasked(i, drvs, memo)))
            .unwrap();
        memo.insert(p.clone(), h);
        h
    }
    for (path, drv) in &drvs {
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
                "{path}: output {name}"
            );
        }
    }
}
