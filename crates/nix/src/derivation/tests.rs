//! Derivations written by Nix 2.8 (`fixtures/drv/`, docs/nix-protocols.md §4), parsed,
//! printed back and hashed to the paths Nix computed (`fixtures/drv/paths.txt`).

use std::convert::Infallible;

use super::*;

const HI_DRV: &str = match std::str::from_utf8(crate::testing::fixture!("drv/hi.drv")) {
    Ok(text) => text,
    Err(_) => panic!("hi.drv is UTF-8"),
};

/// `fixtures/drv/paths.txt`: per fixture, a `drv <path>` line, then `<output> <path>` lines.
fn paths_nix_computed() -> Vec<(String, BTreeMap<String, String>)> {
    let text = std::str::from_utf8(crate::testing::fixture!("drv/paths.txt")).unwrap();
    let mut drvs: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for line in text.lines() {
        let (key, path) = line.split_once(' ').unwrap();
        if key == "drv" {
            drvs.push((path.to_string(), BTreeMap::new()));
        } else {
            drvs.last_mut()
                .unwrap()
                .1
                .insert(key.to_string(), path.to_string());
        }
    }
    drvs
}

#[test]
fn fixture_drvs_roundtrip_and_give_the_paths_nix_computed() {
    let files: [(&str, &[u8]); 4] = [
        ("hi", crate::testing::fixture!("drv/hi.drv")),
        ("fod", crate::testing::fixture!("drv/fod.drv")),
        ("top", crate::testing::fixture!("drv/top.drv")),
        ("fail", crate::testing::fixture!("drv/fail.drv")),
    ];
    let expected = paths_nix_computed();
    assert_eq!(expected.len(), files.len());
    // Input derivations are hashed unmasked (docs/nix-protocols.md §4.3).
    let unmasked: BTreeMap<String, [u8; 32]> = files
        .iter()
        .zip(&expected)
        .map(|((_, text), (drv_path, _))| {
            let drv = Derivation::parse(text).unwrap();
            let hash = drv
                .hash_modulo(false, |_| Ok::<_, Infallible>([0; 32]))
                .unwrap();
            (drv_path.clone(), hash)
        })
        .collect();
    for ((name, text), (drv_path, outputs)) in files.iter().zip(&expected) {
        let drv = Derivation::parse(text).unwrap();
        assert_eq!(drv.to_aterm(), *text, "{name}");
        assert_eq!(drv.drv_path(name).unwrap().to_string(), *drv_path);
        let masked = drv
            .hash_modulo(true, |input: &StorePath| {
                Ok::<_, Infallible>(unmasked[&input.to_string()])
            })
            .unwrap();
        let computed: BTreeMap<String, String> = if drv.is_fixed_output() {
            // A fixed output's path comes from its content hash alone (§3.2).
            let out = &drv.outputs["out"];
            let recursive = out.hash_algo.starts_with("r:");
            let algo = crate::hash::HashAlgo::parse(out.hash_algo.trim_start_matches("r:"));
            let hash = crate::hash::Hash::parse(&out.hash, algo).unwrap();
            let path = crate::store_path::make_fixed_output_path(recursive, &hash, name).unwrap();
            [("out".to_string(), path.to_string())].into()
        } else {
            drv.expected_output_paths(name, &masked)
                .unwrap()
                .into_iter()
                .map(|(o, p)| (o, p.to_string()))
                .collect()
        };
        assert_eq!(&computed, outputs, "{name}");
    }
    let fod = Derivation::parse(files[1].1).unwrap();
    assert!(fod.is_fixed_output());
    let top = Derivation::parse(files[2].1).unwrap();
    assert_eq!(top.input_drvs.len(), 2);
}

#[test]
fn hi_drv_roundtrips_and_hashes_like_nix() {
    assert_eq!(HI_DRV.len(), 298);
    let drv = Derivation::parse(HI_DRV.as_bytes()).unwrap();
    assert_eq!(drv.to_aterm(), HI_DRV.as_bytes());
    assert_eq!(drv.name(), Some("hi"));
    assert_eq!(
        drv.drv_path("hi").unwrap().to_string(),
        "/nix/store/8pql3j9cyj94hnchzwcidj1jj3pqhbf8-hi.drv"
    );
    let masked = drv
        .hash_modulo(true, |_| Ok::<_, Infallible>([0; 32]))
        .unwrap();
    assert_eq!(
        to_base16(&masked),
        "6d33a31d86bc2c1a66da88c8fac3df1da7456dd12468b6b503a32e7a416f917f"
    );
    let outs = drv.expected_output_paths("hi", &masked).unwrap();
    assert_eq!(outs["out"], *drv.outputs["out"].path.as_ref().unwrap());
    // As an input, it is hashed unmasked: the sha256 of its text.
    let unmasked = drv
        .hash_modulo(false, |_| Ok::<_, Infallible>([0; 32]))
        .unwrap();
    assert_eq!(
        to_base16(&unmasked),
        "348ecf71fbd0a2fc12f78b1d2eff3967f43d6f023c1226c0a2cc458301df4c85"
    );
}

#[test]
fn escapes_roundtrip() {
    let text = r#"Derive([("out","/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi","","")],[],[],"x86_64-linux","/bin/sh",["a\"b\\\\c\td\ne\rf"],[("k","café")])"#;
    let drv = Derivation::parse(text.as_bytes()).unwrap();
    assert_eq!(drv.args[0], b"a\"b\\\\c\td\ne\rf".to_vec());
    assert_eq!(drv.to_aterm(), text.as_bytes());
}

#[test]
fn errors_give_the_offset() {
    for (bad, offset) in [
        ("Derive([", 8),
        ("Derivx", 0),
        (&HI_DRV[..HI_DRV.len() - 1], 297),
    ] {
        match Derivation::parse(bad.as_bytes()) {
            Err(DerivationError::Syntax { offset: o, .. }) => assert_eq!(o, offset, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    let bad_path = HI_DRV.replace(
        "agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi\",\"\"",
        "eeee-hi\",\"\"",
    );
    assert!(matches!(
        Derivation::parse(bad_path.as_bytes()),
        Err(DerivationError::BadPath { .. })
    ));
    let mut trailing = HI_DRV.to_string();
    trailing.push('\n');
    assert!(Derivation::parse(trailing.as_bytes()).is_err());
}

proptest::proptest! {
    #[test]
    fn generated_derivations_roundtrip(
        args in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..20), 0..5),
        env in proptest::collection::btree_map(proptest::collection::vec(proptest::num::u8::ANY, 1..10), proptest::collection::vec(proptest::num::u8::ANY, 0..20), 0..6),
        outputs in proptest::collection::btree_set("[a-z]{1,6}", 1..4),
    ) {
        let drv = Derivation {
            outputs: outputs.into_iter().map(|o| (o, Output { path: None, hash_algo: String::new(), hash: String::new() })).collect(),
            input_drvs: BTreeMap::new(),
            input_srcs: [StorePath::from_base_name("agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi").unwrap()].into_iter().collect(),
            system: "x86_64-linux".into(),
            builder: b"/bin/sh".to_vec(),
            args,
            env,
        };
        let text = drv.to_aterm();
        proptest::prop_assert_eq!(Derivation::parse(&text).unwrap(), drv);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300), cut in 0usize..298) {
        let _ = Derivation::parse(&data);
        let mut mangled = HI_DRV.as_bytes()[..cut].to_vec();
        mangled.extend_from_slice(&data);
        let _ = Derivation::parse(&mangled);
    }
}

/// Found by fuzzing (`fuzz/`, target `drv`): Nix writes the system, names, paths and
/// hashes without escapes, so an escape there could not be printed back the same.
#[test]
fn escapes_in_fields_nix_writes_plain_are_refused() {
    let drv = br#"Derive([("out","","","")],[],[],"x86_64\\linux","/bin/sh",[],[])"#;
    let e = Derivation::parse(drv).unwrap_err().to_string();
    assert!(e.contains("no escape sequence"), "{e}");
    let ok = br#"Derive([("out","","","")],[],[],"x86_64-linux","/bin/sh",["a\\b"],[])"#;
    let parsed = Derivation::parse(ok).unwrap();
    assert_eq!(parsed.args, [b"a\\b".to_vec()]);
    assert_eq!(parsed.to_aterm(), ok.to_vec());
}

/// A floating content-addressed derivation as Nix 2.8 writes it (`fixtures/drv/ca-leaf.drv`):
/// its output has a hash algorithm and no path; it goes to a builder with an empty path
/// and hash (as Nix's `writeDerivation` sends `CAFloating`), and its output id is the one
/// Nix registered its realisation under (`nix realisation info --json`).
#[test]
fn a_floating_output_has_no_path_and_the_id_nix_gives_it() {
    let text = crate::testing::fixture!("drv/ca-leaf.drv");
    let drv = Derivation::parse(text).unwrap();
    assert_eq!(drv.to_aterm(), text);
    let out = &drv.outputs["out"];
    assert!(out.is_floating() && !out.is_fixed());
    assert_eq!(
        (out.path.as_ref(), out.hash_algo.as_str()),
        (None, "r:sha256")
    );
    let basic = drv.to_basic(Vec::new());
    let wire = &basic.outputs[0];
    assert_eq!(
        (
            wire.path.as_str(),
            wire.hash_algo.as_str(),
            wire.hash.as_str()
        ),
        ("", "r:sha256", "")
    );
    let ids = drv.output_ids().unwrap();
    assert_eq!(
        ids["out"],
        "sha256:9fcb7f76f1298b26d085e0e8e5565ddb6f541ff4a7536659454a5bcd262bc248!out"
    );
    let fod = Derivation::parse(crate::testing::fixture!("drv/fod.drv")).unwrap();
    assert!(!fod.outputs["out"].is_floating());
    let top = Derivation::parse(crate::testing::fixture!("drv/top.drv")).unwrap();
    assert_eq!(
        top.output_ids(),
        None,
        "input derivations are resolved first"
    );
}
