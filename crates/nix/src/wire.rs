//! Nix's wire primitives: the framing shared by the serve protocol, NARs and the
//! export format.
//!
//! - integers are u64 little-endian;
//! - byte strings are a u64 length, the bytes, then zero padding up to a multiple of 8;
//! - lists and sets are a u64 count followed by that many strings.
//!
//! Every message is decoded by one sans-I/O [`Decode`]r, run by [`read_message`] over
//! `std::io::Read` or by `tokio_io::read_message` (feature `async`) over tokio; the
//! readers below are such decoders.
//!
//! Readers check every length against a caller-given limit *before* allocating and
//! verify that padding bytes are zero, so a hostile length prefix (say 2^60) is an error,
//! never an allocation. Writers append to a `Vec<u8>`: callers build a frame and flush it.

use std::io::{self, Read};

use thiserror::Error;

mod decode;
#[cfg(feature = "async")]
pub mod tokio_io;

pub use decode::{
    read_message, BoolDecoder, BytesDecoder, Decode, MessageBuffer, Step, StringDecoder,
    StringsDecoder, U64Decoder,
};
pub(crate) use decode::{run, Stages, StringList};

/// Longest string the serve protocol carries in practice (store paths, hashes, error
/// messages, JSON realisations). Build logs never travel as one string.
pub const MAX_STRING_LEN: usize = 1 << 20;

/// Largest list of strings accepted from a peer: a closure of a few hundred thousand
/// store paths fits; 2^60 does not.
pub const MAX_LIST_LEN: usize = 1 << 22;

/// A framing error while reading Nix wire data.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("unexpected end of stream while reading {what}")]
    Eof { what: &'static str },
    #[error("{what} is {len} bytes long, more than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: usize,
    },
    #[error("non-zero padding after {what}")]
    BadPadding { what: &'static str },
    #[error("unexpected value {found:#x} for {what}")]
    BadValue { what: &'static str, found: u64 },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("I/O error while reading {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl WireError {
    fn from_io(what: &'static str, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Eof { what }
        } else {
            WireError::Io { what, source }
        }
    }
}

/// Number of zero bytes that follow a string of `len` bytes.
pub fn padding_len(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

/// Appends a u64 in little-endian order.
pub fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// Appends a bool as u64 0 or 1.
pub fn put_bool(out: &mut Vec<u8>, value: bool) {
    put_u64(out, u64::from(value));
}

/// Appends a length-prefixed, zero-padded byte string.
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u64(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
    out.extend(std::iter::repeat_n(0u8, padding_len(bytes.len() as u64)));
}

/// Appends a list of strings: a count, then each string.
pub fn put_strings<I, S>(out: &mut Vec<u8>, items: I)
where
    I: IntoIterator<Item = S>,
    I::IntoIter: ExactSizeIterator,
    S: AsRef<[u8]>,
{
    let items = items.into_iter();
    put_u64(out, items.len() as u64);
    for item in items {
        put_bytes(out, item.as_ref());
    }
}

fn check_len(what: &'static str, len: u64, max: usize) -> Result<usize, WireError> {
    match usize::try_from(len) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(WireError::TooLong { what, len, max }),
    }
}

fn check_padding(what: &'static str, pad: &[u8]) -> Result<(), WireError> {
    if pad.iter().all(|&b| b == 0) {
        Ok(())
    } else {
        Err(WireError::BadPadding { what })
    }
}

/// Reads a u64.
pub fn read_u64(r: &mut impl Read, what: &'static str) -> Result<u64, WireError> {
    read_message(r, U64Decoder::new(what))
}

/// Reads a bool (any non-zero value is true, as Nix does).
pub fn read_bool(r: &mut impl Read, what: &'static str) -> Result<bool, WireError> {
    read_message(r, BoolDecoder::new(what))
}

/// Reads a byte string of at most `max` bytes, checking its padding.
pub fn read_bytes(r: &mut impl Read, what: &'static str, max: usize) -> Result<Vec<u8>, WireError> {
    read_message(r, BytesDecoder::new(what, max))
}

/// Reads a UTF-8 string of at most `max` bytes.
pub fn read_string(r: &mut impl Read, what: &'static str, max: usize) -> Result<String, WireError> {
    read_message(r, StringDecoder::new(what, max))
}

/// Reads a list of UTF-8 strings, at most [`MAX_LIST_LEN`] entries of at most `max` bytes.
pub fn read_strings(
    r: &mut impl Read,
    what: &'static str,
    max: usize,
) -> Result<Vec<String>, WireError> {
    read_message(r, StringsDecoder::new(what, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_padding_matches_nix() {
        let mut out = Vec::new();
        put_bytes(&mut out, b"/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi");
        assert_eq!(out.len(), 8 + 46 + 2);
        assert_eq!(&out[..8], &[0x2e, 0, 0, 0, 0, 0, 0, 0]);
        let mut empty = Vec::new();
        put_bytes(&mut empty, b"");
        assert_eq!(empty, [0u8; 8]);
    }

    #[test]
    fn roundtrip_list() {
        let mut out = Vec::new();
        put_strings(&mut out, ["a", "bcdefghij", ""]);
        let mut r = &out[..];
        let items = read_strings(&mut r, "list", 100).unwrap();
        assert_eq!(items, ["a", "bcdefghij", ""]);
        assert!(r.is_empty());
    }

    #[test]
    fn huge_length_is_refused_without_allocating() {
        let mut out = Vec::new();
        put_u64(&mut out, 1 << 60);
        let err = read_bytes(&mut &out[..], "path", MAX_STRING_LEN).unwrap_err();
        assert!(matches!(err, WireError::TooLong { len, .. } if len == 1 << 60));
        let err = read_strings(&mut &out[..], "paths", 100).unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }));
    }

    #[test]
    fn non_zero_padding_is_refused() {
        let mut out = Vec::new();
        put_bytes(&mut out, b"abc");
        *out.last_mut().unwrap() = 1;
        let err = read_bytes(&mut &out[..], "name", 100).unwrap_err();
        assert!(matches!(err, WireError::BadPadding { .. }));
    }

    #[test]
    fn truncated_is_eof() {
        let mut out = Vec::new();
        put_bytes(&mut out, b"abcdefghijk");
        out.truncate(12);
        let err = read_bytes(&mut &out[..], "name", 100).unwrap_err();
        assert!(matches!(err, WireError::Eof { .. }));
    }

    proptest::proptest! {
        #[test]
        fn strings_roundtrip_with_nothing_left_over(items in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 0..10)) {
            let mut out = Vec::new();
            put_u64(&mut out, items.len() as u64);
            for item in &items { put_bytes(&mut out, item); }
            proptest::prop_assert_eq!(out.len() % 8, 0);
            let mut r = &out[..];
            let n = read_u64(&mut r, "count").unwrap();
            for item in &items {
                proptest::prop_assert_eq!(&read_bytes(&mut r, "item", 100).unwrap(), item);
            }
            proptest::prop_assert_eq!(n as usize, items.len());
            proptest::prop_assert!(r.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = read_strings(&mut &data[..], "fuzz", 16);
        }
    }
}
