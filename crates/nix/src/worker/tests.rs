use super::*;
use crate::wire::put_u64;

#[test]
fn versions_read_as_nix_writes_them() {
    assert_eq!((major(PROTOCOL_VERSION), minor(PROTOCOL_VERSION)), (1, 38));
    assert!(is_supported(0x115) && is_supported(0x122) && is_supported(0x126));
    assert!(!is_supported(0x114) && !is_supported(0x215));
    assert!(!sends_nix_version(0x120) && sends_nix_version(0x121));
    assert!(!sends_trust(0x122) && sends_trust(0x123));
    assert!(!exchanges_features(0x125) && exchanges_features(0x126));
}

#[test]
fn the_opening_is_magic_and_version_then_features_from_1_38() {
    let mut want = Vec::new();
    put_u64(&mut want, 0x6e69_7863);
    put_u64(&mut want, 0x126);
    assert_eq!(hello(), want);
    // 1.34 (Nix 2.8): CPU affinity and reserve space only.
    assert_eq!(after_hello(0x122), vec![0u8; 16]);
    // 1.38 (Nix 2.26): an empty feature list first.
    assert_eq!(after_hello(0x126), vec![0u8; 24]);
}

#[test]
fn nar_hashes_come_back_in_offloads_form() {
    let hex = "a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a";
    let typed = typed_nar_hash(hex).unwrap();
    assert!(
        typed.starts_with("sha256:") && typed.len() == 7 + 52,
        "{typed}"
    );
    assert_eq!(typed_nar_hash(&typed).as_deref(), Some(typed.as_str()));
    assert_eq!(typed_nar_hash("md5:00"), None);
}

#[test]
fn frames_end_with_an_empty_one() {
    let mut out = Vec::new();
    put_frames(&mut out, &vec![7u8; FRAME + 3]);
    assert_eq!(out.len(), 8 + FRAME + 8 + 3 + 8);
    assert_eq!(&out[out.len() - 8..], &[0u8; 8]);
    let mut empty = Vec::new();
    put_frames(&mut empty, b"");
    assert_eq!(empty, vec![0u8; 8]);
}

#[test]
fn set_options_names_cores_and_carries_overrides() {
    let settings = BuildSettings {
        build_timeout: 60,
        ..BuildSettings::default()
    };
    let bytes = set_options(&settings, 4);
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
    assert_eq!(word(0), OP_SET_OPTIONS);
    assert_eq!(word(11), 4, "cores");
    assert_eq!(word(13), 1, "one override");
    assert!(bytes.windows(7).any(|w| w == b"timeout"));
}
