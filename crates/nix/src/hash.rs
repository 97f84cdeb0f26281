//! Hashes as Nix writes them: base16, nixbase32 or base64, with or without an
//! `algo:` prefix, and SRI (`sha256-<base64>`).

use base64::Engine as _;
use thiserror::Error;

use crate::nixbase32;

/// The algorithms Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    pub fn parse(name: &str) -> Option<HashAlgo> {
        Some(match name {
            "md5" => HashAlgo::Md5,
            "sha1" => HashAlgo::Sha1,
            "sha256" => HashAlgo::Sha256,
            "sha512" => HashAlgo::Sha512,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Digest size in bytes.
    pub fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }
}

/// A hash string Nix would not accept.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("hash {text:?}: {reason}")]
pub struct HashError {
    pub text: String,
    pub reason: &'static str,
}

/// A digest with its algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hash {
    pub algo: HashAlgo,
    pub bytes: Vec<u8>,
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// Lowercase hex.
pub fn to_base16(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

impl Hash {
    /// Parses `algo:digest`, SRI `algo-base64`, or a bare digest when `expected` names
    /// the algorithm; the encoding is chosen by length, as Nix does.
    pub fn parse(text: &str, expected: Option<HashAlgo>) -> Result<Hash, HashError> {
        let err = |reason| HashError {
            text: text.to_string(),
            reason,
        };
        let (algo, digest, sri) = if let Some((a, d)) = text.split_once(':') {
            (
                HashAlgo::parse(a).ok_or(err("unknown hash algorithm"))?,
                d,
                false,
            )
        } else if let Some((a, d)) = text
            .split_once('-')
            .filter(|(a, _)| HashAlgo::parse(a).is_some())
        {
            (
                HashAlgo::parse(a).ok_or(err("unknown hash algorithm"))?,
                d,
                true,
            )
        } else {
            (expected.ok_or(err("no hash algorithm given"))?, text, false)
        };
        if let Some(e) = expected {
            if e != algo {
                return Err(err("hash algorithm differs from the expected one"));
            }
        }
        let size = algo.size();
        let bytes = if sri {
            base64::engine::general_purpose::STANDARD
                .decode(digest)
                .map_err(|_| err("invalid base64"))?
        } else if digest.len() == size * 2 {
            hex_decode(digest).ok_or(err("invalid base16"))?
        } else if digest.len() == nixbase32::encoded_len(size) {
            nixbase32::decode(digest.as_bytes()).map_err(|_| err("invalid nixbase32"))?
        } else if digest.len() == size.div_ceil(3) * 4 {
            base64::engine::general_purpose::STANDARD
                .decode(digest)
                .map_err(|_| err("invalid base64"))?
        } else {
            return Err(err("wrong length for its algorithm"));
        };
        if bytes.len() != size {
            return Err(err("wrong length for its algorithm"));
        }
        Ok(Hash { algo, bytes })
    }

    pub fn to_base16(&self) -> String {
        to_base16(&self.bytes)
    }

    pub fn to_nix32(&self) -> String {
        nixbase32::encode(&self.bytes)
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }

    /// `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo.name(), self.to_base64())
    }

    /// `sha256:<nixbase32>`, as `nix-store -q --hash` prints.
    pub fn to_typed_nix32(&self) -> String {
        format!("{}:{}", self.algo.name(), self.to_nix32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6";
    const NIX32: &str = "1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h";

    #[test]
    fn parses_every_form() {
        let h = Hash::parse(&format!("sha256:{NIX32}"), None).unwrap();
        assert_eq!(h.to_base16(), HEX);
        assert_eq!(Hash::parse(HEX, Some(HashAlgo::Sha256)).unwrap(), h);
        assert_eq!(Hash::parse(&h.to_sri(), None).unwrap(), h);
        assert_eq!(
            Hash::parse(&format!("sha256:{}", h.to_base64()), None).unwrap(),
            h
        );
        assert_eq!(h.to_typed_nix32(), format!("sha256:{NIX32}"));
        assert_eq!(
            to_base16(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn rejects_bad_hashes() {
        assert!(Hash::parse("sha256:abc", None).is_err());
        assert!(Hash::parse("sha3:abc", None).is_err());
        assert!(Hash::parse(HEX, None).is_err());
        assert!(Hash::parse(HEX, Some(HashAlgo::Sha1)).is_err());
        assert!(Hash::parse(&format!("sha1:{HEX}"), None).is_err());
    }

    proptest::proptest! {
        #[test]
        fn roundtrips(bytes in proptest::collection::vec(proptest::num::u8::ANY, 32..=32)) {
            let h = Hash { algo: HashAlgo::Sha256, bytes };
            for text in [h.to_typed_nix32(), h.to_sri(), format!("sha256:{}", h.to_base16())] {
                proptest::prop_assert_eq!(&Hash::parse(&text, None).unwrap(), &h);
            }
        }

        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = Hash::parse(&s, Some(HashAlgo::Sha256));
        }
    }
}
