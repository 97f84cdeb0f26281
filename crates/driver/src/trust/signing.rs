//! Signing store paths the way Nix does (`nix store sign`, `secret-key-files`), so that a
//! nix-daemon that does not trust this user still accepts outputs built elsewhere: it
//! takes a path whose signature is by a key in its `trusted-public-keys`.
//!
//! A key file holds `NAME:BASE64`, the 64-byte ed25519 secret key (seed, then public
//! key) that `nix-store --generate-binary-cache-key` writes. What is signed is the path's
//! fingerprint, `1;PATH;NARHASH;NARSIZE;REF,REF,…`; a signature is `NAME:BASE64`.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use offload_nix::serve::PathInfo;
use thiserror::Error;

/// A signing key could not be used.
#[derive(Debug, Error)]
pub enum SigningError {
    #[error("cannot read the signing key {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a Nix secret key: expected NAME:BASE64 of 64 bytes, as \
         `nix-store --generate-binary-cache-key NAME SECRET PUBLIC` writes"
    )]
    Malformed { path: PathBuf },
}

/// A named ed25519 key that signs store paths.
#[derive(Clone)]
pub struct PathSigner {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for PathSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "PathSigner({})", self.name)
    }
}

impl PathSigner {
    /// Reads a key file in Nix's format.
    pub fn load(path: &Path) -> Result<PathSigner, SigningError> {
        let text = std::fs::read_to_string(path).map_err(|source| SigningError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(text.trim()).ok_or_else(|| SigningError::Malformed {
            path: path.to_path_buf(),
        })
    }

    fn parse(text: &str) -> Option<PathSigner> {
        let (name, b64) = text.split_once(':')?;
        let bytes = BASE64.decode(b64).ok()?;
        let seed: [u8; 32] = bytes.get(..32)?.try_into().ok()?;
        let key = SigningKey::from_bytes(&seed);
        // The file's second half is the public key: it must belong to the seed.
        if name.is_empty() || bytes.len() != 64 || bytes[32..] != key.verifying_key().to_bytes() {
            return None;
        }
        Some(PathSigner {
            name: name.to_string(),
            key,
        })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key as `trusted-public-keys` takes it: `NAME:BASE64`.
    pub fn public_key(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.verifying_key().to_bytes())
        )
    }

    /// Adds this key's signature to `info` (once).
    pub fn sign(&self, info: &mut PathInfo) {
        let signature = format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.sign(fingerprint(info).as_bytes()).to_bytes())
        );
        if !info.sigs.contains(&signature) {
            info.sigs.push(signature);
        }
    }
}

/// What Nix signs for a path: `1;PATH;NARHASH;NARSIZE;REFS` with the references sorted
/// and comma-separated.
pub fn fingerprint(info: &PathInfo) -> String {
    let mut refs: Vec<&str> = info.references.iter().map(String::as_str).collect();
    refs.sort_unstable();
    format!(
        "1;{};{};{};{}",
        info.path,
        info.nar_hash,
        info.nar_size,
        refs.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> PathInfo {
        PathInfo {
            path: "/nix/store/7rjj86a15146cq1d4ylx9smz2dbimbqm-hello".into(),
            deriver: None,
            references: vec![
                "/nix/store/zzzz86a15146cq1d4ylx9smz2dbimbqm-b".into(),
                "/nix/store/aaaa86a15146cq1d4ylx9smz2dbimbqm-a".into(),
            ],
            nar_size: 120,
            nar_hash: "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into(),
            ca: None,
            sigs: Vec::new(),
        }
    }

    #[test]
    fn fingerprint_sorts_references() {
        assert_eq!(
            fingerprint(&info()),
            "1;/nix/store/7rjj86a15146cq1d4ylx9smz2dbimbqm-hello;\
             sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s;120;\
             /nix/store/aaaa86a15146cq1d4ylx9smz2dbimbqm-a,\
             /nix/store/zzzz86a15146cq1d4ylx9smz2dbimbqm-b"
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(PathSigner::parse("no-colon").is_none());
        assert!(PathSigner::parse("k:not base64").is_none());
        assert!(PathSigner::parse(&format!("k:{}", BASE64.encode([1u8; 32]))).is_none());
        // 64 bytes whose second half is not the seed's public key.
        assert!(PathSigner::parse(&format!("k:{}", BASE64.encode([1u8; 64]))).is_none());
    }
}
