//! Helpers for the unit tests: the captured fixtures and a reader that hands out bytes
//! a few at a time, to show that decoders resume correctly wherever a read stops.

use std::io::Read;

use crate::wire::{read_message, Decode, WireError};

/// The bytes of `fixtures/<path>` (see fixtures/README.md), embedded at compile time.
macro_rules! fixture {
    ($path:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/",
            $path
        ))
        .as_slice()
    };
}
pub(crate) use fixture;

/// Hands out at most `piece` bytes per read.
pub(crate) struct Trickle<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) piece: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Decodes the whole of `bytes` with fresh decoders from `new`, reading it whole and in
/// pieces of 1 to 17 bytes; every way must give the same value and consume every byte.
pub(crate) fn decode_exact<D, F>(bytes: &[u8], new: F) -> D::Output
where
    D: Decode,
    D::Output: PartialEq + std::fmt::Debug,
    F: Fn() -> D,
{
    let mut whole = bytes;
    let value = read_message(&mut whole, new()).expect("fixture decodes");
    assert!(whole.is_empty(), "{} bytes left over", whole.len());
    for piece in 1..=17 {
        let mut r = Trickle { data: bytes, piece };
        let again = read_message(&mut r, new()).expect("fixture decodes in pieces");
        assert_eq!(again, value, "read {piece} bytes at a time");
        assert!(r.data.is_empty());
    }
    value
}

/// Decoding every proper prefix of `bytes` fails with end of stream, never panics.
pub(crate) fn every_prefix_is_eof<D: Decode>(bytes: &[u8], new: impl Fn() -> D) {
    for cut in 0..bytes.len() {
        let err = read_message(&mut &bytes[..cut], new()).err();
        assert!(
            matches!(err, Some(WireError::Eof { .. })),
            "prefix of {cut} bytes: {err:?}"
        );
    }
}
