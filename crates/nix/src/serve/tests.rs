//! Golden bytes captured from a real Nix 2.8 `nix-store --serve --write` (see
//! docs/nix-protocols facts §6), checked against our encoders and decoders.

use super::*;

fn le(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn padded(s: &str) -> Vec<u8> {
    let mut out = le(s.len() as u64).to_vec();
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len() + crate::wire::padding_len(s.len() as u64), 0);
    out
}

const HI: &str = "/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi";
const MISSING: &str = "/nix/store/00000000000000000000000000000000-missing";

#[test]
fn handshake_bytes() {
    assert_eq!(
        handshake_request(),
        [0xeb, 0x9d, 0x0c, 0x39, 0, 0, 0, 0, 0x07, 0x02, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn query_valid_paths_request_bytes() {
    let paths = vec![HI.to_string(), MISSING.to_string()];
    let frame = Request::QueryValidPaths {
        lock: false,
        substitute: false,
        paths: &paths,
    }
    .encode();
    let mut expected = Vec::new();
    for w in [1u64, 0, 0, 2] {
        expected.extend_from_slice(&le(w));
    }
    // The captured dump: len 0x2e, the path, 2 pad bytes; len 0x33, the path, 5 pad bytes.
    assert_eq!(&frame[32..40], &[0x2e, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend(padded(HI));
    expected.extend(padded(MISSING));
    assert_eq!(frame, expected);
    assert_eq!(frame.len(), 32 + 8 + 48 + 8 + 56);
}

#[tokio::test]
async fn query_valid_paths_reply_decodes() {
    let mut reply = le(1).to_vec();
    reply.extend(padded(HI));
    let mut r = &reply[..];
    assert_eq!(read_path_list(&mut r).await.unwrap(), [HI]);
    assert!(r.is_empty());
}

#[tokio::test]
async fn path_infos_reply_decodes() {
    let mut reply = padded(HI);
    reply.extend(padded("/nix/store/8pql3j9cyj94hnchzwcidj1jj3pqhbf8-hi.drv"));
    reply.extend(le(0)); // no references
    reply.extend(le(0x78));
    reply.extend(le(0x78));
    reply.extend(padded(
        "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h",
    ));
    reply.extend(padded(""));
    reply.extend(le(0));
    reply.extend(padded(""));
    let mut r = &reply[..];
    let infos = read_path_infos(&mut r, PROTOCOL_VERSION).await.unwrap();
    assert!(r.is_empty());
    assert_eq!(
        infos,
        [PathInfo {
            path: HI.into(),
            deriver: Some("/nix/store/8pql3j9cyj94hnchzwcidj1jj3pqhbf8-hi.drv".into()),
            references: vec![],
            nar_size: 120,
            nar_hash: "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h".into(),
            ca: None,
            sigs: vec![],
        }]
    );
}

#[tokio::test]
async fn build_result_success_decodes() {
    // status 0, "", timesBuilt 1, nondet 0, start, stop, one built output.
    let mut reply = Vec::new();
    reply.extend(le(0));
    reply.extend(padded(""));
    reply.extend(le(1));
    reply.extend(le(0));
    reply.extend([0x51, 0xf1, 0x03, 0x6b, 0, 0, 0, 0]);
    reply.extend([0x51, 0xf1, 0x03, 0x6b, 0, 0, 0, 0]);
    reply.extend(le(1));
    let id = "sha256:38b5d1080000000000000000000000000000000000000000000000000000df04!out";
    assert_eq!(id.len(), 75);
    let json = r#"{"dependentRealisations":{},"id":"sha256:38b5d1080000000000000000000000000000000000000000000000000000df04!out","outPath":"agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi","signatures":[]}"#;
    reply.extend(padded(id));
    reply.extend(padded(json));
    let mut r = &reply[..];
    let result = read_build_result(&mut r, PROTOCOL_VERSION).await.unwrap();
    assert!(r.is_empty());
    assert_eq!(result.status, BuildStatus::Built);
    assert!(result.status.is_success());
    assert_eq!(result.times_built, 1);
    assert_eq!(result.start_time, 0x6b03f151);
    assert_eq!(result.built_outputs, [(id.to_string(), json.to_string())]);
}

#[tokio::test]
async fn build_result_failure_strips_ansi() {
    let mut reply = Vec::new();
    reply.extend(le(3));
    reply.extend(padded(
        "builder for '\x1b[35;1m/nix/store/x-fail.drv\x1b[0m' failed with exit code 3",
    ));
    for w in [1u64, 0, 5, 6, 0] {
        reply.extend(le(w));
    }
    let result = read_build_result(&mut &reply[..], PROTOCOL_VERSION)
        .await
        .unwrap();
    assert_eq!(result.status, BuildStatus::PermanentFailure);
    assert_eq!(
        result.error_msg,
        "builder for '/nix/store/x-fail.drv' failed with exit code 3"
    );
}

#[tokio::test]
async fn huge_counts_are_refused() {
    let mut reply = Vec::new();
    reply.extend(le(0));
    reply.extend(padded(""));
    for w in [1u64, 0, 5, 6, 1 << 60] {
        reply.extend(le(w));
    }
    assert!(read_build_result(&mut &reply[..], PROTOCOL_VERSION)
        .await
        .is_err());
    assert!(read_path_list(&mut &le(1 << 60)[..]).await.is_err());
}

#[test]
fn build_settings_match_nix_default() {
    let mut out = Vec::new();
    BuildSettings::default().encode(&mut out, PROTOCOL_VERSION);
    let expected: Vec<u8> = [0u64, 0, 0, 0, 1, 0].iter().flat_map(|w| le(*w)).collect();
    assert_eq!(out, expected);
}

#[test]
fn add_to_store_nar_header_layout() {
    let info = PathInfo {
        path: HI.into(),
        deriver: None,
        references: vec![],
        nar_size: 120,
        nar_hash: "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h".into(),
        ca: Some("fixed:r:sha256:0j9a4m7hi59nx9fjcgh2l297vwin80gy27f5gya19ljnfq2s60rk".into()),
        sigs: vec![],
    };
    let frame = Request::AddToStoreNar { info: &info }.encode();
    let mut expected = le(9).to_vec();
    expected.extend(padded(HI));
    expected.extend(padded(""));
    expected.extend(padded(&info.nar_hash));
    expected.extend(le(0)); // references
    expected.extend(le(0)); // registration time
    expected.extend(le(120));
    expected.extend(le(0)); // ultimate
    expected.extend(le(0)); // sigs
    expected.extend(padded(info.ca.as_deref().unwrap()));
    assert_eq!(frame, expected);
}

proptest::proptest! {
    #[test]
    fn path_infos_roundtrip(paths in proptest::collection::vec("[a-z0-9]{1,20}", 0..5), size in 1u64..1_000_000) {
        let mut reply = Vec::new();
        let mut expected = Vec::new();
        for p in &paths {
            let path = format!("/nix/store/{p}");
            reply.extend(padded(&path));
            reply.extend(padded(""));
            crate::wire::put_strings(&mut reply, std::slice::from_ref(&path));
            reply.extend(le(size));
            reply.extend(le(size));
            reply.extend(padded("sha256:x"));
            reply.extend(padded(""));
            reply.extend(le(0));
            expected.push(PathInfo { path: path.clone(), references: vec![path], nar_size: size, nar_hash: "sha256:x".into(), ..PathInfo::default() });
        }
        reply.extend(padded(""));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut r = &reply[..];
        let infos = rt.block_on(read_path_infos(&mut r, PROTOCOL_VERSION)).unwrap();
        proptest::prop_assert_eq!(infos, expected);
        proptest::prop_assert!(r.is_empty());
    }

    #[test]
    fn garbage_replies_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let _ = read_path_infos(&mut &data[..], PROTOCOL_VERSION).await;
            let _ = read_build_result(&mut &data[..], PROTOCOL_VERSION).await;
            let _ = read_path_list(&mut &data[..]).await;
            let _ = read_build_paths_result(&mut &data[..]).await;
        });
    }
}
