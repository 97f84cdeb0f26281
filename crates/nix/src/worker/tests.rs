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

/// The replies of real daemons to the requests of `scripts/capture-worker-fixtures.sh`,
/// read as offload reads them: every byte accounted for.
#[cfg(feature = "async")]
mod captured {
    use super::*;
    use crate::serve::BuildStatus;

    const VALID_2_8: &str = include_str!("../../../../fixtures/worker/paths-2.8.txt");
    const MISSING: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-missing";

    async fn replay(replies: &[u8], nix: &str, expect_version: u64) {
        let valid = VALID_2_8.trim();
        let mut r = replies;
        let theirs = read_hello_reply(&mut r).await.unwrap();
        let version = theirs.min(PROTOCOL_VERSION);
        assert_eq!(version, expect_version);
        if exchanges_features(version) {
            read_features(&mut r).await.unwrap();
        }
        let hello = read_hello_info(&mut r, version).await.unwrap();
        assert!(hello.nix_version.unwrap().starts_with(nix));
        if sends_trust(version) {
            assert_eq!(hello.trusted, Some(true), "--stdio on a local store trusts");
        }
        let mut log = Vec::new();
        let until_last = async |r: &mut &[u8], log: &mut Vec<String>| {
            read_until_last(r, version, |l| log.push(l))
                .await
                .unwrap()
                .unwrap()
        };
        until_last(&mut r, &mut log).await;
        // QueryValidPaths.
        until_last(&mut r, &mut log).await;
        assert_eq!(
            read_path_set(&mut r).await.unwrap(),
            vec![valid.to_string()]
        );
        // QueryPathInfo of the valid path, then of the missing one.
        until_last(&mut r, &mut log).await;
        let info = read_path_info(&mut r, valid).await.unwrap().unwrap();
        assert!(info.nar_hash.starts_with("sha256:") && info.references.is_empty());
        until_last(&mut r, &mut log).await;
        assert_eq!(read_path_info(&mut r, MISSING).await.unwrap(), None);
        // NarFromPath: the NAR, of the size and hash the info gave.
        until_last(&mut r, &mut log).await;
        let mut nar = Vec::new();
        let summary = crate::nar::tokio_io::copy_nar(&mut r, &mut nar)
            .await
            .unwrap();
        assert_eq!(summary.size, info.nar_size);
        assert_eq!(
            format!("sha256:{}", crate::nixbase32::encode(&summary.sha256)),
            info.nar_hash
        );
        // BuildDerivation: the log line among the messages, then the failure.
        log.clear();
        until_last(&mut r, &mut log).await;
        assert!(log.iter().any(|l| l == "captured log line"), "{log:?}");
        let result = read_build_result(&mut r, version).await.unwrap();
        assert_eq!(result.status, BuildStatus::from_code(result.status.code()));
        assert!(!result.status.is_success());
        assert!(
            result.error_msg.contains("exit code 3"),
            "{}",
            result.error_msg
        );
        assert!(r.is_empty(), "{} bytes left over", r.len());
    }

    #[tokio::test]
    async fn a_nix_2_8_daemon_reads_as_offload_expects() {
        let replies = include_bytes!("../../../../fixtures/worker/replies-2.8.bin");
        replay(replies, "2.8", 0x122).await;
    }

    #[tokio::test]
    async fn a_nix_2_26_daemon_reads_as_offload_expects() {
        let replies = include_bytes!("../../../../fixtures/worker/replies-2.26.bin");
        replay(replies, "2.26", 0x126).await;
    }
}

/// The realisation operations of `scripts/capture-realisation-fixtures.sh`: the requests
/// offload writes are the bytes the daemons were sent, and their replies read back
/// whole (none, then the realisation registered, as the JSON that was sent).
#[cfg(feature = "async")]
mod realisations {
    use super::*;

    const ID: &str = "sha256:5555555555555555555555555555555555555555555555555555555555555555!out";

    fn requests(version: u64, json: &str) -> Vec<u8> {
        let out_path = json.split("\"outPath\":\"").nth(1).unwrap();
        let out_path = &out_path[..out_path.find('"').unwrap()];
        let mut want = hello();
        want.extend(after_hello(version));
        want.extend(query_realisation(ID));
        want.extend(register_drv_output(ID, out_path, json, version));
        want.extend(query_realisation(ID));
        want
    }

    async fn replay(sent: &[u8], replies: &[u8], json: &str, expect_version: u64) {
        assert_eq!(requests(expect_version, json), sent);
        let mut r = replies;
        let version = read_hello_reply(&mut r)
            .await
            .unwrap()
            .min(PROTOCOL_VERSION);
        assert_eq!(version, expect_version);
        if exchanges_features(version) {
            read_features(&mut r).await.unwrap();
        }
        read_hello_info(&mut r, version).await.unwrap();
        let until_last =
            async |r: &mut &[u8]| read_until_last(r, version, |_| ()).await.unwrap().unwrap();
        until_last(&mut r).await;
        until_last(&mut r).await;
        assert!(read_realisations(&mut r).await.unwrap().is_empty());
        until_last(&mut r).await; // RegisterDrvOutput: messages only
        until_last(&mut r).await;
        assert_eq!(read_realisations(&mut r).await.unwrap(), [json]);
        assert!(r.is_empty(), "{} bytes left over", r.len());
    }

    #[tokio::test]
    async fn a_nix_2_8_daemon_registers_a_realisation() {
        replay(
            include_bytes!("../../../../fixtures/worker/realisation-requests-2.8.bin"),
            include_bytes!("../../../../fixtures/worker/realisation-replies-2.8.bin"),
            include_str!("../../../../fixtures/worker/realisation-2.8.json").trim(),
            0x122,
        )
        .await;
    }

    #[tokio::test]
    async fn a_nix_2_26_daemon_registers_a_realisation() {
        replay(
            include_bytes!("../../../../fixtures/worker/realisation-requests-2.26.bin"),
            include_bytes!("../../../../fixtures/worker/realisation-replies-2.26.bin"),
            include_str!("../../../../fixtures/worker/realisation-2.26.json").trim(),
            0x126,
        )
        .await;
    }

    #[test]
    fn before_1_31_a_realisation_is_its_id_and_path() {
        let bytes = register_drv_output(ID, "abc-x", "{}", 0x11e);
        let mut want = Vec::new();
        put_u64(&mut want, OP_REGISTER_DRV_OUTPUT);
        crate::wire::put_bytes(&mut want, ID.as_bytes());
        crate::wire::put_bytes(&mut want, b"abc-x");
        assert_eq!(bytes, want);
    }
}
