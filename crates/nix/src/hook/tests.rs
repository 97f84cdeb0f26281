use super::*;
use crate::wire::read_message;

const ACCEPT: &[u8] = include_bytes!("../../../../fixtures/hook/accept.nix-to-hook.bin");

/// The recorded bytes decode as Nix meant them, with nothing left over, and re-encode
/// to the same bytes.
#[test]
fn decodes_what_nix_wrote_to_an_accepting_hook() {
    let mut r = ACCEPT;
    let settings = read_message(&mut r, SettingsDecoder::default()).unwrap();
    assert!(settings.len() > 50, "{} settings", settings.len());
    let get = |name: &str| {
        settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        get("builders"),
        Some("ssh://recorded x86_64-linux - 1 1 big-parallel")
    );
    assert_eq!(get("max-jobs"), Some("1"));
    assert!(
        settings.windows(2).all(|w| w[0].0 < w[1].0),
        "sorted by name"
    );
    let HookRequest::Try(request) = read_message(&mut r, RequestDecoder::default()).unwrap() else {
        panic!("not a try")
    };
    assert!(request.am_willing);
    assert_eq!(request.system, "x86_64-linux");
    assert!(
        request.drv_path.ends_with("-hook-fixture.drv"),
        "{}",
        request.drv_path
    );
    assert_eq!(request.required_features, ["big-parallel"]);
    let inputs = read_message(&mut r, BuildInputsDecoder::default()).unwrap();
    assert_eq!(inputs.inputs.len(), 2);
    assert!(inputs.inputs[0].ends_with("-hook-fixture-dep"));
    assert!(inputs.inputs[1].ends_with("-graph.nix"));
    assert_eq!(inputs.wanted_outputs, ["out"]);
    assert!(r.is_empty());

    let pairs = settings.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    let mut again = encode_settings(pairs);
    again.extend(request.encode());
    again.extend(inputs.encode());
    assert_eq!(again, ACCEPT);
}

#[test]
fn any_other_word_ends_the_requests() {
    let mut frame = Vec::new();
    put_bytes(&mut frame, b"stop");
    let got = read_message(&mut &frame[..], RequestDecoder::default()).unwrap();
    assert_eq!(got, HookRequest::Other("stop".into()));
}

#[test]
fn replies_and_messages_are_lines_nix_reads() {
    let accept = HookReply::Accept {
        store_uri: "ssh://b1".into(),
    };
    assert_eq!(accept.encode(), "# accept\nssh://b1\n");
    assert_eq!(
        HookReply::DeclinePermanently.encode(),
        "# decline-permanently\n"
    );
    assert_eq!(
        log_line(LogLevel::Error, "a \"quoted\"\nline\u{1}"),
        "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"a \\\"quoted\\\"\\nline\\u0001\"}\n"
    );
}

#[test]
fn a_hostile_setting_length_is_refused() {
    let mut frame = Vec::new();
    put_u64(&mut frame, 1);
    put_u64(&mut frame, 1 << 60);
    let err = read_message(&mut &frame[..], SettingsDecoder::default()).unwrap_err();
    assert!(matches!(err, WireError::TooLong { .. }), "{err}");
}

proptest::proptest! {
    #[test]
    fn requests_roundtrip_split_anywhere(
        willing: bool,
        system in "[a-z0-9_-]{0,20}",
        features in proptest::collection::vec("[a-z-]{0,12}", 0..4),
        split in 0usize..200,
    ) {
        let request = TryRequest {
            am_willing: willing,
            system,
            drv_path: "/nix/store/00000000000000000000000000000000-x.drv".into(),
            required_features: features,
        };
        let frame = request.encode();
        let mut decoder = RequestDecoder::default();
        let cut = split.min(frame.len());
        let got = match decoder.decode(&frame[..cut]).unwrap() {
            Step::Done { value, consumed } => {
                proptest::prop_assert_eq!(consumed, frame.len());
                value
            }
            Step::Incomplete { consumed, .. } => match decoder.decode(&frame[consumed..]).unwrap() {
                Step::Done { value, consumed: rest } => {
                    proptest::prop_assert_eq!(consumed + rest, frame.len());
                    value
                }
                other => panic!("{other:?}"),
            },
        };
        proptest::prop_assert_eq!(got, HookRequest::Try(request));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..96)) {
        let _ = read_message(&mut &data[..], SettingsDecoder::default());
        let _ = read_message(&mut &data[..], RequestDecoder::default());
        let _ = read_message(&mut &data[..], BuildInputsDecoder::default());
    }
}
