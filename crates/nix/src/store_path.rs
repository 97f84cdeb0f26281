//! Store paths: `/nix/store/<32 nixbase32 chars>-<name>`, parsed, validated and
//! computed the way Nix computes them (`makeStorePath`: a fingerprint hashed with
//! SHA-256 and folded to 20 bytes).

use std::fmt;

use thiserror::Error;

use crate::hash::{sha256, to_base16, Hash, HashAlgo};
use crate::nixbase32;

/// The store directory every path here lives in (chroot stores keep it as the logical
/// location).
pub const STORE_DIR: &str = "/nix/store";

/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// A string that is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path:?} is not a valid store path: {reason}")]
pub struct StorePathError {
    pub path: String,
    pub reason: &'static str,
}

/// A store path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    // Field order makes Ord follow the textual order of the hash part, then the name.
    hash_part: String,
    name: String,
}

impl StorePath {
    /// Parses `/nix/store/<hash>-<name>`.
    pub fn from_absolute_path(path: &str) -> Result<StorePath, StorePathError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError {
                path: path.to_string(),
                reason: "it is not directly under /nix/store",
            })?;
        Self::from_base_name(base).map_err(|e| StorePathError {
            path: path.to_string(),
            reason: e.reason,
        })
    }

    /// Parses `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let err = |reason| StorePathError {
            path: base.to_string(),
            reason,
        };
        let (hash_part, name) = split_base_name(base).map_err(err)?;
        Ok(StorePath {
            hash_part: hash_part.to_string(),
            name: name.to_string(),
        })
    }

    /// From the 20-byte digest and a name.
    pub fn from_digest(digest: &[u8; 20], name: &str) -> Result<StorePath, StorePathError> {
        validate_name(name).map_err(|reason| StorePathError {
            path: name.to_string(),
            reason,
        })?;
        Ok(StorePath {
            hash_part: nixbase32::encode(digest),
            name: name.to_string(),
        })
    }

    pub fn hash_part(&self) -> &str {
        &self.hash_part
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash_part, self.name)
    }

    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }
}

/// Splits `<hash>-<name>` into its valid hash part and name, without allocating.
fn split_base_name(base: &str) -> Result<(&str, &str), &'static str> {
    let (hash_part, name) = match (base.get(..32), base.get(32..33), base.get(33..)) {
        (Some(h), Some("-"), Some(n)) => (h, n),
        _ => return Err("it does not start with a 32-character hash and a dash"),
    };
    if nixbase32::decode(hash_part.as_bytes()).is_err() {
        return Err("its hash part is not nixbase32");
    }
    validate_name(name)?;
    Ok((hash_part, name))
}

/// The name of the store path written as `path` (what [`StorePath::name`] gives), without
/// parsing it into a [`StorePath`]; `None` when `path` is not a store path.
pub fn path_name(path: &str) -> Option<&str> {
    let base = path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    split_base_name(base).ok().map(|(_, name)| name)
}

/// What a derivation is called where a person reads it (progress, logs, the state): its
/// store path's name without `.drv`. A string that is not a store path (a simulated
/// graph's key) is its own name.
pub fn derivation_name(drv: &str) -> &str {
    let name = path_name(drv).unwrap_or(drv);
    name.strip_suffix(".drv").unwrap_or(name)
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash_part, self.name)
    }
}

fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("its name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("its name is longer than 211 characters");
    }
    if name.starts_with('.') {
        return Err("its name starts with a dot");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
    {
        return Err("its name has a character outside [0-9a-zA-Z+-._?=]");
    }
    Ok(())
}

/// `makeStorePath`: the path for a fingerprint of kind `kind` over `inner` (a SHA-256).
pub fn make_store_path(
    kind: &str,
    inner: &[u8; 32],
    name: &str,
) -> Result<StorePath, StorePathError> {
    let fingerprint = format!("{kind}:sha256:{}:{STORE_DIR}:{name}", to_base16(inner));
    let h = sha256(fingerprint.as_bytes());
    let mut folded = [0u8; 20];
    for (i, b) in h.iter().enumerate() {
        folded[i % 20] ^= b;
    }
    StorePath::from_digest(&folded, name)
}

fn with_refs(kind: &str, references: &[StorePath], self_ref: bool) -> String {
    let mut refs: Vec<String> = references.iter().map(StorePath::to_absolute).collect();
    refs.sort();
    let mut kind = kind.to_string();
    for r in refs {
        kind.push(':');
        kind.push_str(&r);
    }
    if self_ref {
        kind.push_str(":self");
    }
    kind
}

/// The path of a text file such as a `.drv`, with its references.
pub fn make_text_path(
    name: &str,
    contents: &[u8],
    references: &[StorePath],
) -> Result<StorePath, StorePathError> {
    make_store_path(
        &with_refs("text", references, false),
        &sha256(contents),
        name,
    )
}

/// The path of fixed-output content: the `source` form for recursive SHA-256 (as
/// `nix-store --add` and `r:sha256` outputs), the `fixed:out:` form otherwise.
pub fn make_fixed_output_path(
    recursive: bool,
    hash: &Hash,
    name: &str,
) -> Result<StorePath, StorePathError> {
    if recursive && hash.algo == HashAlgo::Sha256 {
        let mut inner = [0u8; 32];
        inner.copy_from_slice(&hash.bytes);
        make_store_path("source", &inner, name)
    } else {
        let inner = format!(
            "fixed:out:{}{}:{}:",
            if recursive { "r:" } else { "" },
            hash.algo.name(),
            hash.to_base16()
        );
        make_store_path("output:out", &sha256(inner.as_bytes()), name)
    }
}

/// The path of output `output` of an input-addressed derivation named `drv_name`.
pub fn make_output_path(
    output: &str,
    hash_modulo: &[u8; 32],
    drv_name: &str,
) -> Result<StorePath, StorePathError> {
    let name = if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    };
    make_store_path(&format!("output:{output}"), hash_modulo, &name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_cut_as_a_parsed_store_path_gives_them() {
        let drv = "/nix/store/0c3ajb1q5dlr8ac2qzg9s2rkbmf4x1aa-hello-2.12.drv";
        assert_eq!(
            path_name(drv),
            Some(StorePath::from_absolute_path(drv).unwrap().name())
        );
        assert_eq!(derivation_name(drv), "hello-2.12");
        // Not store paths: a hash of the wrong length, another directory, a plain key.
        assert_eq!(path_name("/nix/store/abc-hello.drv"), None);
        assert_eq!(path_name("/tmp/0c3ajb1q5dlr8ac2qzg9s2rkbmf4x1aa-x"), None);
        assert_eq!(derivation_name("l3-29"), "l3-29");
    }

    use super::*;

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn computes_the_paths_nix_prints() {
        // Worked examples checked against nix-instantiate on Nix 2.8.
        let hi = hex32("6d33a31d86bc2c1a66da88c8fac3df1da7456dd12468b6b503a32e7a416f917f");
        assert_eq!(
            make_output_path("out", &hi, "hi").unwrap().to_string(),
            "/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi"
        );
        let top = hex32("36f49043c4bae75d22f8f6bc5c2654c9d7adf57dd4303577888d89c366da5096");
        assert_eq!(
            make_output_path("out", &top, "top").unwrap().to_string(),
            "/nix/store/mh8lam7z03g1a390lvk5w94g03r5gyfx-top"
        );
        assert_eq!(
            make_output_path("dev", &top, "top").unwrap().to_string(),
            "/nix/store/fhfwimhx5r393fmyv6vmjlb0dghdg6zb-top-dev"
        );
        let fod = Hash::parse(
            "sha256:8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4",
            None,
        )
        .unwrap();
        assert_eq!(
            make_fixed_output_path(false, &fod, "fod")
                .unwrap()
                .to_string(),
            "/nix/store/3ajymwa6hv8pq7bjmbfgdgsh454sikdm-fod"
        );
        let src = Hash::parse(
            "sha256:3303a3057656d214947fc51de11f4036f27d92a0023e265dea3695084f252a49",
            None,
        )
        .unwrap();
        assert_eq!(
            make_fixed_output_path(true, &src, "hi.nix")
                .unwrap()
                .to_string(),
            "/nix/store/45rh2paql15fiakgpdnvzmwgjcvjmiqg-hi.nix"
        );
    }

    #[test]
    fn parses_and_validates() {
        let p = StorePath::from_absolute_path("/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi")
            .unwrap();
        assert_eq!(p.name(), "hi");
        assert_eq!(p.hash_part(), "agv9y5spdscfhh7lbxa5bf94hgx9bbx3");
        assert!(!p.is_derivation());
        for bad in [
            "/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3",
            "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x",
            "/tmp/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi",
            "/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-.hidden",
            "/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-a b",
        ] {
            assert!(StorePath::from_absolute_path(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = StorePath::from_absolute_path(&s);
            let _ = StorePath::from_base_name(&s);
        }
    }
}
