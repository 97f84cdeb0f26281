//! A machines file or `builders` setting, with the store URIs in it: parsing never
//! panics, and a machine that parses prints back to a line that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_nix::machines::parse_builders;
use offload_nix::store_uri::StoreUri;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `@FILE` includes would read this machine's files: not what is being fuzzed.
    if text
        .split(['\n', ';'])
        .any(|piece| piece.trim_start().starts_with('@'))
    {
        let _ = StoreUri::parse(text);
        return;
    }
    if let Ok(machines) = parse_builders(text, "fuzz", "x86_64-linux") {
        for m in machines {
            let line = m.to_spec();
            let again =
                parse_builders(&line, "fuzz", "x86_64-linux").expect("a printed machine parses");
            let printed: Vec<String> = again.iter().map(|m| m.to_spec()).collect();
            assert_eq!(printed, [line]);
        }
    }
});
