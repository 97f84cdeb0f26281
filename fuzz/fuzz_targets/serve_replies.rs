//! Serve-protocol replies from a remote: every decoder, at both protocol versions in
//! use, never panics on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_nix::serve::{
    ack_decoder, handshake_decoder, path_list_decoder, BuildPathsResultDecoder, BuildResultDecoder,
    PathInfosDecoder,
};
use offload_nix::wire::read_message;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let version = if selector & 1 == 0 { 0x204 } else { 0x207 };
    let mut r = bytes;
    let _ = match selector >> 1 & 7 {
        0 => read_message(&mut r, handshake_decoder()).map(drop),
        1 => read_message(&mut r, path_list_decoder()).map(drop),
        2 => read_message(&mut r, ack_decoder()).map(drop),
        3 => read_message(&mut r, PathInfosDecoder::new(version)).map(drop),
        4 => read_message(&mut r, BuildResultDecoder::new(version)).map(drop),
        _ => read_message(&mut r, BuildPathsResultDecoder::new()).map(drop),
    };
});
