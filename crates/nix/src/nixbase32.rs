//! Nix's base-32: the alphabet `0123456789abcdfghijklmnpqrsvwxyz` (no `e o u t`), with
//! the bytes read as one little-endian number printed most significant digit first.
//! It is not RFC 4648: store path hashes and `sha256:` hashes only round-trip this way.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Text that is not valid nixbase32.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Nixbase32Error {
    #[error("invalid character {0:?} in a nixbase32 string")]
    BadChar(char),
    #[error("nixbase32 string {0:?} has bits beyond its last byte")]
    Overflow(String),
}

/// Length of the encoding of `n` bytes.
pub fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

/// Number of bytes a string of `n` characters decodes to.
pub fn decoded_len(n: usize) -> usize {
    n * 5 / 8
}

/// Encodes `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for k in 0..len {
        let g = len - 1 - k;
        let b = g * 5;
        let i = b / 8;
        let j = b % 8;
        let mut v = u16::from(bytes[i]) >> j;
        if i + 1 < bytes.len() {
            v |= u16::from(bytes[i + 1]) << (8 - j);
        }
        out.push(char::from(ALPHABET[usize::from(v & 0x1f)]));
    }
    out
}

/// Decodes `text`, refusing foreign characters and set bits past the last byte.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, Nixbase32Error> {
    let n = decoded_len(text.len());
    let mut out = vec![0u8; n];
    for (k, &c) in text.iter().enumerate() {
        let digit = ALPHABET
            .iter()
            .position(|&a| a == c)
            .ok_or(Nixbase32Error::BadChar(char::from(c)))? as u16;
        let g = text.len() - 1 - k;
        let b = g * 5;
        let i = b / 8;
        let j = b % 8;
        let low = (digit << j) as u8;
        let high = (digit << j >> 8) as u8;
        match out.get_mut(i) {
            Some(byte) => *byte |= low,
            None if low != 0 => return Err(overflow(text)),
            None => {}
        }
        match out.get_mut(i + 1) {
            Some(byte) => *byte |= high,
            None if high != 0 => return Err(overflow(text)),
            None => {}
        }
    }
    Ok(out)
}

fn overflow(text: &[u8]) -> Nixbase32Error {
    Nixbase32Error::Overflow(String::from_utf8_lossy(text).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn matches_nix_hash_to_base32() {
        // `nix-hash --type sha256 --to-base32 <hex>` on Nix 2.8.
        let empty = hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(
            encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        let hi_nar = hex("10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6");
        assert_eq!(
            encode(&hi_nar),
            "1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"
        );
        assert_eq!(
            decode(b"1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h").unwrap(),
            hi_nar
        );
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(20), 32);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode(b"0e"), Err(Nixbase32Error::BadChar('e')));
        // 52 chars decode to 32 bytes; a leading 'z' sets bits past byte 31.
        let mut s = encode(&[0xff; 32]);
        s.replace_range(0..1, "z");
        assert!(matches!(
            decode(s.as_bytes()),
            Err(Nixbase32Error::Overflow(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn roundtrips(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let text = encode(&bytes);
            proptest::prop_assert_eq!(text.len(), encoded_len(bytes.len()));
            proptest::prop_assert_eq!(decode(text.as_bytes()).unwrap(), bytes);
        }

        #[test]
        fn never_panics(text in "[0-9a-z]{0,60}") {
            let _ = decode(text.as_bytes());
        }
    }
}
