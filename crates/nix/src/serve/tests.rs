//! The serve-protocol session in `fixtures/serve/` (captured from Nix 2.8's
//! `nix-store --serve --write` by scripts/capture-fixtures.sh): our request frames equal
//! the client's bytes, and the server's bytes decode to what the session did.

use std::convert::Infallible;

use super::*;
use crate::derivation::Derivation;
use crate::hash::to_base16;
use crate::testing::{decode_exact, every_prefix_is_eof, fixture};
use crate::wire::{put_strings, read_message, StringsDecoder, WireError};

const HI: &str = "/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi";
const HI_DRV: &str = "/nix/store/8pql3j9cyj94hnchzwcidj1jj3pqhbf8-hi.drv";
const FOD: &str = "/nix/store/3ajymwa6hv8pq7bjmbfgdgsh454sikdm-fod";
const TOP: &str = "/nix/store/ayid1qzgm0js81dim9xh40p3cl64cr8q-top";
const TOP_DRV: &str = "/nix/store/0bnn10dqaj63j3rwn5x0d6pyjvmjjhyk-top.drv";
const FAIL_DRV: &str = "/nix/store/6gsfxrhndq4sc643l5k8zs8h00dqz323-fail.drv";
const MISSING: &str = "/nix/store/00000000000000000000000000000000-missing";
const HI_NAR_HASH: &str = "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h";

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn handshake_matches_the_session() {
    assert_eq!(
        handshake_request(),
        fixture!("serve/01-handshake.client.bin")
    );
    let reply = fixture!("serve/01-handshake.server.bin");
    let mut r = reply;
    assert_eq!(
        read_message(&mut r, handshake_decoder()).unwrap(),
        SERVE_MAGIC_2
    );
    assert_eq!(
        read_message(&mut r, handshake_decoder()).unwrap(),
        PROTOCOL_VERSION
    );
    assert!(r.is_empty());
}

/// BuildDerivation of a fixture `.drv`, with the inputs sent as sources.
fn build_request(drv_file: &[u8], drv_path: &str, input_srcs: &[&str]) -> Vec<u8> {
    let drv = Derivation::parse(drv_file).unwrap();
    let basic = drv.to_basic(strings(input_srcs));
    Request::BuildDerivation {
        drv_path,
        drv: &basic,
        settings: &BuildSettings::default(),
    }
    .encode()
}

#[test]
fn build_derivation_requests_match_the_session() {
    let fod_drv = "/nix/store/fcggh4wmps2y2yzdc9bp835g77znrj3n-fod.drv";
    for (drv, path, srcs, client) in [
        (
            fixture!("drv/hi.drv"),
            HI_DRV,
            &[][..],
            fixture!("serve/02-build-hi.client.bin"),
        ),
        (
            fixture!("drv/fail.drv"),
            FAIL_DRV,
            &[],
            fixture!("serve/03-build-fail.client.bin"),
        ),
        (
            fixture!("drv/fod.drv"),
            fod_drv,
            &[],
            fixture!("serve/04-build-fod.client.bin"),
        ),
        (
            fixture!("drv/top.drv"),
            TOP_DRV,
            &[FOD, HI],
            fixture!("serve/05-build-top.client.bin"),
        ),
    ] {
        assert_eq!(build_request(drv, path, srcs), client, "{path}");
    }
}

#[test]
fn successful_build_result_decodes() {
    let bytes = fixture!("serve/02-build-hi.server.bin");
    let result = decode_exact(bytes, || BuildResultDecoder::new(PROTOCOL_VERSION));
    assert_eq!(result.status, BuildStatus::Built);
    assert!(result.status.is_success());
    assert_eq!((result.error_msg.as_str(), result.times_built), ("", 1));
    // Start and stop times vary between captures (fixtures/README.md).
    assert!(result.start_time > 1_600_000_000 && result.stop_time >= result.start_time);
    // The DrvOutput id is the masked hash modulo of hi.drv.
    let drv = Derivation::parse(fixture!("drv/hi.drv")).unwrap();
    let modulo = drv
        .hash_modulo(true, |_| Ok::<_, Infallible>([0; 32]))
        .unwrap();
    let id = format!("sha256:{}!out", to_base16(&modulo));
    let json = format!(
        r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi","signatures":[]}}"#
    );
    assert_eq!(result.built_outputs, [(id, json)]);
    every_prefix_is_eof(bytes, || BuildResultDecoder::new(PROTOCOL_VERSION));
}

#[test]
fn failed_build_result_decodes_without_colours() {
    let bytes = fixture!("serve/03-build-fail.server.bin");
    assert!(
        bytes.windows(2).any(|w| w == b"\x1b["),
        "Nix colours the message"
    );
    let result = decode_exact(bytes, || BuildResultDecoder::new(PROTOCOL_VERSION));
    assert_eq!(result.status, BuildStatus::PermanentFailure);
    assert_eq!(
        result.error_msg,
        format!("builder for '{FAIL_DRV}' failed with exit code 3")
    );
    assert_eq!(result.times_built, 1);
    assert!(result.built_outputs.is_empty());
}

#[test]
fn multi_output_build_result_decodes() {
    let bytes = fixture!("serve/05-build-top.server.bin");
    let result = decode_exact(bytes, || BuildResultDecoder::new(PROTOCOL_VERSION));
    let names: Vec<&str> = result
        .built_outputs
        .iter()
        .map(|(id, _)| id.rsplit('!').next().unwrap())
        .collect();
    assert_eq!(names, ["dev", "out"]);
}

#[test]
fn path_queries_match_the_session() {
    let asked = strings(&[HI, MISSING]);
    let request = Request::QueryValidPaths {
        lock: false,
        substitute: false,
        paths: &asked,
    };
    assert_eq!(
        request.encode(),
        fixture!("serve/06-query-valid-paths.client.bin")
    );
    let valid = decode_exact(
        fixture!("serve/06-query-valid-paths.server.bin"),
        path_list_decoder,
    );
    assert_eq!(valid, [HI]);

    let asked = strings(&[MISSING, HI, TOP]);
    let request = Request::QueryClosure {
        include_outputs: false,
        paths: &asked[2..],
    };
    assert_eq!(
        request.encode(),
        fixture!("serve/08-query-closure.client.bin")
    );
    let closure = decode_exact(
        fixture!("serve/08-query-closure.server.bin"),
        path_list_decoder,
    );
    assert_eq!(closure, [FOD, HI, TOP]);
}

#[test]
fn path_infos_match_the_session() {
    let asked = strings(&[MISSING, HI, TOP]);
    let request = Request::QueryPathInfos { paths: &asked };
    assert_eq!(
        request.encode(),
        fixture!("serve/07-query-path-infos.client.bin")
    );
    let bytes = fixture!("serve/07-query-path-infos.server.bin");
    let infos = decode_exact(bytes, || PathInfosDecoder::new(PROTOCOL_VERSION));
    // The missing path is left out, as Nix does.
    assert_eq!(infos.len(), 2);
    assert_eq!(
        infos[0],
        PathInfo {
            path: HI.into(),
            deriver: Some(HI_DRV.into()),
            references: vec![],
            nar_size: 120,
            nar_hash: HI_NAR_HASH.into(),
            ca: None,
            sigs: vec![],
        }
    );
    assert_eq!(infos[1].path, TOP);
    assert_eq!(infos[1].deriver.as_deref(), Some(TOP_DRV));
    assert_eq!(infos[1].references, [FOD, HI]);
    every_prefix_is_eof(bytes, || PathInfosDecoder::new(PROTOCOL_VERSION));
}

#[test]
fn dump_and_export_requests_match_the_session() {
    let request = Request::DumpStorePath { path: HI };
    assert_eq!(
        request.encode(),
        fixture!("serve/09-dump-store-path.client.bin")
    );
    assert_eq!(
        fixture!("serve/09-dump-store-path.server.bin"),
        fixture!("nar/hi.nar")
    );
    let paths = strings(&[HI]);
    let request = Request::ExportPaths { paths: &paths };
    assert_eq!(
        request.encode(),
        fixture!("serve/10-export-paths.client.bin")
    );
}

#[test]
fn build_settings_match_nix_default() {
    // The last 48 bytes of every captured BuildDerivation are the settings block.
    let client = fixture!("serve/02-build-hi.client.bin");
    let mut out = Vec::new();
    BuildSettings::default().encode(&mut out, PROTOCOL_VERSION);
    assert_eq!(out, client[client.len() - 48..]);
}

#[test]
fn build_paths_results_decode() {
    // Layouts from docs/nix-protocols.md §6.9: 0 on success, else status and message.
    assert_eq!(
        decode_exact(&0u64.to_le_bytes(), BuildPathsResultDecoder::new),
        Ok(())
    );
    let mut failed = 100u64.to_le_bytes().to_vec();
    crate::wire::put_bytes(
        &mut failed,
        b"error: builder for '\x1b[35;1mx\x1b[0m' failed",
    );
    assert_eq!(
        decode_exact(&failed, BuildPathsResultDecoder::new),
        Err((100, "error: builder for 'x' failed".to_string()))
    );
}

#[test]
fn add_to_store_nar_header_layout() {
    // Layout from docs/nix-protocols.md §6.7 (not in the captured session).
    let info = PathInfo {
        path: HI.into(),
        deriver: None,
        references: vec![],
        nar_size: 120,
        nar_hash: HI_NAR_HASH.into(),
        ca: Some("fixed:r:sha256:0j9a4m7hi59nx9fjcgh2l297vwin80gy27f5gya19ljnfq2s60rk".into()),
        sigs: vec![],
    };
    let frame = Request::AddToStoreNar { info: &info }.encode();
    let mut expected = 9u64.to_le_bytes().to_vec();
    crate::wire::put_bytes(&mut expected, HI.as_bytes());
    crate::wire::put_bytes(&mut expected, b"");
    crate::wire::put_bytes(&mut expected, info.nar_hash.as_bytes());
    // references, registration time, NAR size, ultimate, signatures
    for word in [0u64, 0, 120, 0, 0] {
        expected.extend(word.to_le_bytes());
    }
    crate::wire::put_bytes(&mut expected, info.ca.as_deref().unwrap().as_bytes());
    assert_eq!(frame, expected);
}

#[test]
fn huge_counts_are_refused() {
    let mut reply = 0u64.to_le_bytes().to_vec();
    crate::wire::put_bytes(&mut reply, b"");
    for w in [1u64, 0, 5, 6, 1 << 60] {
        reply.extend(w.to_le_bytes());
    }
    let err = read_message(&mut &reply[..], BuildResultDecoder::new(PROTOCOL_VERSION));
    assert!(matches!(err, Err(WireError::TooLong { len, .. }) if len == 1 << 60));
    let err = read_message(&mut &(1u64 << 60).to_le_bytes()[..], path_list_decoder());
    assert!(matches!(err, Err(WireError::TooLong { .. })));
}

#[test]
fn path_list_of_100_000_paths_decodes_in_linear_time() {
    let paths: Vec<String> = (0..100_000)
        .map(|i| format!("/nix/store/{i:032}-p"))
        .collect();
    let mut bytes = Vec::new();
    put_strings(&mut bytes, &paths);
    let start = std::time::Instant::now();
    // Pipe-sized reads: a decoder that re-parsed what it had would do ~10^10 steps here.
    let mut r = crate::testing::Trickle {
        data: &bytes,
        piece: 65536,
    };
    let decoded = read_message(&mut r, path_list_decoder()).unwrap();
    // And one byte at a time: a re-parse per read would never finish.
    let mut r = crate::testing::Trickle {
        data: &bytes,
        piece: 1,
    };
    let again = read_message(&mut r, StringsDecoder::new("paths", 100)).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(decoded, paths);
    assert_eq!(again, paths);
    // Linear work is well under a second even unoptimised; quadratic is hours.
    assert!(elapsed.as_secs() < 20, "took {elapsed:?}");
}

proptest::proptest! {
    #[test]
    fn path_infos_roundtrip(paths in proptest::collection::vec("[a-z0-9]{1,20}", 0..5), size in 1u64..1_000_000, version in 0x202u64..=0x207) {
        let mut reply = Vec::new();
        let mut expected = Vec::new();
        for p in &paths {
            let path = format!("/nix/store/{p}");
            crate::wire::put_bytes(&mut reply, path.as_bytes());
            crate::wire::put_bytes(&mut reply, b"");
            put_strings(&mut reply, std::slice::from_ref(&path));
            reply.extend(size.to_le_bytes());
            reply.extend(size.to_le_bytes());
            let nar_hash = if sends_nar_hash(version) {
                crate::wire::put_bytes(&mut reply, b"sha256:x");
                crate::wire::put_bytes(&mut reply, b"");
                reply.extend(0u64.to_le_bytes());
                "sha256:x".into()
            } else {
                String::new()
            };
            expected.push(PathInfo { path: path.clone(), references: vec![path], nar_size: size, nar_hash, ..PathInfo::default() });
        }
        crate::wire::put_bytes(&mut reply, b"");
        let infos = decode_exact(&reply, || PathInfosDecoder::new(version));
        proptest::prop_assert_eq!(infos, expected);
    }

    #[test]
    fn garbage_replies_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let _ = read_message(&mut &data[..], PathInfosDecoder::new(PROTOCOL_VERSION));
        let _ = read_message(&mut &data[..], BuildResultDecoder::new(PROTOCOL_VERSION));
        let _ = read_message(&mut &data[..], path_list_decoder());
        let _ = read_message(&mut &data[..], BuildPathsResultDecoder::new());
    }
}

/// The async readers run the same decoders over tokio.
#[cfg(feature = "async")]
#[tokio::test]
async fn async_readers_decode_the_session() {
    let mut r = fixture!("serve/01-handshake.server.bin");
    assert_eq!(read_handshake(&mut r).await.unwrap(), SERVE_MAGIC_2);
    assert_eq!(read_handshake(&mut r).await.unwrap(), PROTOCOL_VERSION);
    let mut r = fixture!("serve/07-query-path-infos.server.bin");
    let infos = read_path_infos(&mut r, PROTOCOL_VERSION).await.unwrap();
    assert_eq!((infos.len(), r.len()), (2, 0));
    let mut r = fixture!("serve/08-query-closure.server.bin");
    assert_eq!(read_path_list(&mut r).await.unwrap(), [FOD, HI, TOP]);
    let mut r = fixture!("serve/03-build-fail.server.bin");
    let result = read_build_result(&mut r, PROTOCOL_VERSION).await.unwrap();
    assert_eq!((result.status, r.len()), (BuildStatus::PermanentFailure, 0));
    let mut r = &1u64.to_le_bytes()[..];
    assert_eq!(read_ack(&mut r).await.unwrap(), 1);
    let mut r = &0u64.to_le_bytes()[..];
    assert_eq!(read_build_paths_result(&mut r).await.unwrap(), Ok(()));
}
