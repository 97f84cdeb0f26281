//! Derivations from Nix 2.8 (facts §4), parsed, printed back and hashed.

use std::convert::Infallible;

use super::*;

const HI_DRV: &str = r#"Derive([("out","/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hello from builder; echo hi > $out"],[("PATH","/bin:/usr/bin"),("builder","/bin/sh"),("name","hi"),("out","/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi"),("system","x86_64-linux")])"#;

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
