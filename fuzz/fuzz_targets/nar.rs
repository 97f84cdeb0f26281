//! A NAR stream from a remote: relaying never panics, and a NAR that relays comes out
//! byte for byte as it went in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_nix::nar::copy_nar;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if let Ok(summary) = copy_nar(&mut &data[..], &mut out) {
        assert_eq!(summary.size as usize, out.len());
        assert_eq!(&data[..out.len()], &out[..]);
    }
});
