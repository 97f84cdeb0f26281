//! Store paths: `<store dir>/<32 nixbase32 chars>-<name>`, parsed, validated and
//! computed the way Nix computes them (`makeStorePath`: a fingerprint hashed with
//! SHA-256 and folded to 20 bytes; the fingerprint holds the store directory, so the same
//! content has another path under another directory).
//!
//! The store directory is a [`StoreDir`]. Each process has one ([`store_dir`]), read
//! once from the environment as Nix reads it (`NIX_STORE_DIR`, else `NIX_STORE`, else
//! `/nix/store`) unless [`set_store_dir`] chose it before the first use; [`StorePath`]
//! parses and prints with it. A [`StoreDir`] value does the same for any directory.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use thiserror::Error;

use crate::hash::{sha256, to_base16, Hash, HashAlgo};
use crate::nixbase32;

/// Nix's store directory when the environment names none.
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

/// The environment variables Nix takes its store directory from, first one set wins.
pub const STORE_DIR_VARIABLES: [&str; 2] = ["NIX_STORE_DIR", "NIX_STORE"];

/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// A string that is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path:?} is not a valid store path: {reason}")]
pub struct StorePathError {
    pub path: String,
    pub reason: Cow<'static, str>,
}

/// A directory that cannot be a store directory, or one chosen too late.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreDirError {
    #[error("the store directory {dir:?} (from {from}) is not an absolute path other than /")]
    NotAbsolute { dir: String, from: String },
    #[error("the store directory is {current} in this process already; it cannot become {wanted}")]
    AlreadySet { current: String, wanted: String },
}

/// A store directory: absolute, without `.`, `..`, doubled or trailing slashes (Nix's
/// `canonPath`; symlinks are kept as written, as Nix keeps them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(Cow<'static, str>);

static DEFAULT: StoreDir = StoreDir(Cow::Borrowed(DEFAULT_STORE_DIR));
static CURRENT: OnceLock<StoreDir> = OnceLock::new();

/// This process's store directory: the one [`set_store_dir`] chose, else the one the
/// environment names ([`StoreDir::from_env`]; Nix's default when it names none or one
/// that cannot be a store directory).
pub fn store_dir() -> &'static StoreDir {
    CURRENT.get_or_init(|| StoreDir::from_env().unwrap_or_else(|_| DEFAULT.clone()))
}

/// Chooses this process's store directory; an error when another one is in use already
/// (the same one again is fine).
pub fn set_store_dir(dir: StoreDir) -> Result<(), StoreDirError> {
    let current = CURRENT.get_or_init(|| dir.clone());
    if *current == dir {
        Ok(())
    } else {
        Err(StoreDirError::AlreadySet {
            current: current.to_string(),
            wanted: dir.to_string(),
        })
    }
}

impl StoreDir {
    /// `dir` made canonical; `from` says where it was written, for the error.
    pub fn new(dir: &str, from: &str) -> Result<StoreDir, StoreDirError> {
        let bad = || StoreDirError::NotAbsolute {
            dir: dir.to_string(),
            from: from.to_string(),
        };
        if !dir.starts_with('/') {
            return Err(bad());
        }
        let mut parts: Vec<&str> = Vec::new();
        for part in dir.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                part => parts.push(part),
            }
        }
        if parts.is_empty() {
            return Err(bad());
        }
        Ok(StoreDir(Cow::Owned(format!("/{}", parts.join("/")))))
    }

    /// Nix's default, `/nix/store`.
    pub fn default_dir() -> StoreDir {
        DEFAULT.clone()
    }

    /// The directory the environment names, as Nix reads it ([`STORE_DIR_VARIABLES`];
    /// an empty one counts as unset, as for Nix since 2.19).
    pub fn from_env() -> Result<StoreDir, StoreDirError> {
        for name in STORE_DIR_VARIABLES {
            match std::env::var(name) {
                Ok(dir) if !dir.is_empty() => return StoreDir::new(&dir, name),
                _ => {}
            }
        }
        Ok(DEFAULT.clone())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses `<dir>/<hash>-<name>`.
    pub fn parse(&self, path: &str) -> Result<StorePath, StorePathError> {
        let base = self.base_name(path).ok_or_else(|| StorePathError {
            path: path.to_string(),
            reason: format!("it is not directly under the store directory {self}").into(),
        })?;
        StorePath::from_base_name(base).map_err(|e| StorePathError {
            path: path.to_string(),
            reason: e.reason,
        })
    }

    /// The absolute path of `path` in this directory.
    pub fn print(&self, path: &StorePath) -> String {
        format!("{self}/{}-{}", path.hash_part, path.name)
    }

    /// What follows `<dir>/` in `path`, when `path` is directly under this directory.
    fn base_name<'a>(&self, path: &'a str) -> Option<&'a str> {
        let base = path.strip_prefix(self.as_str())?.strip_prefix('/')?;
        (!base.contains('/')).then_some(base)
    }

    /// The name of the store path written as `path`, without parsing it into a
    /// [`StorePath`]; None when it is not a store path of this directory.
    pub fn path_name<'a>(&self, path: &'a str) -> Option<&'a str> {
        split_base_name(self.base_name(path)?)
            .ok()
            .map(|(_, name)| name)
    }

    /// Nix's `makeStorePath`: the path for a fingerprint of kind `kind` over `inner` (a
    /// SHA-256).
    pub fn make_store_path(
        &self,
        kind: &str,
        inner: &[u8; 32],
        name: &str,
    ) -> Result<StorePath, StorePathError> {
        let fingerprint = format!("{kind}:sha256:{}:{self}:{name}", to_base16(inner));
        let h = sha256(fingerprint.as_bytes());
        let mut folded = [0u8; 20];
        for (i, b) in h.iter().enumerate() {
            folded[i % 20] ^= b;
        }
        StorePath::from_digest(&folded, name)
    }

    /// The path of a text file such as a `.drv`, with its references.
    pub fn make_text_path(
        &self,
        name: &str,
        contents: &[u8],
        references: &[StorePath],
    ) -> Result<StorePath, StorePathError> {
        let mut refs: Vec<String> = references.iter().map(|r| self.print(r)).collect();
        refs.sort();
        let mut kind = "text".to_string();
        for r in refs {
            kind.push(':');
            kind.push_str(&r);
        }
        self.make_store_path(&kind, &sha256(contents), name)
    }

    /// The path of fixed-output content: the `source` form for recursive SHA-256 (as
    /// `nix-store --add` and `r:sha256` outputs), the `fixed:out:` form otherwise.
    pub fn make_fixed_output_path(
        &self,
        recursive: bool,
        hash: &Hash,
        name: &str,
    ) -> Result<StorePath, StorePathError> {
        if recursive && hash.algo == HashAlgo::Sha256 {
            let mut inner = [0u8; 32];
            inner.copy_from_slice(&hash.bytes);
            self.make_store_path("source", &inner, name)
        } else {
            let inner = format!(
                "fixed:out:{}{}:{}:",
                if recursive { "r:" } else { "" },
                hash.algo.name(),
                hash.to_base16()
            );
            self.make_store_path("output:out", &sha256(inner.as_bytes()), name)
        }
    }

    /// The path of output `output` of an input-addressed derivation named `drv_name`.
    pub fn make_output_path(
        &self,
        output: &str,
        hash_modulo: &[u8; 32],
        drv_name: &str,
    ) -> Result<StorePath, StorePathError> {
        let name = if output == "out" {
            drv_name.to_string()
        } else {
            format!("{drv_name}-{output}")
        };
        self.make_store_path(&format!("output:{output}"), hash_modulo, &name)
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A store path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    // Field order makes Ord follow the textual order of the hash part, then the name.
    hash_part: String,
    name: String,
}

impl StorePath {
    /// Parses `<store dir>/<hash>-<name>` in this process's [`store_dir`].
    pub fn from_absolute_path(path: &str) -> Result<StorePath, StorePathError> {
        store_dir().parse(path)
    }

    /// Parses `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let err = |reason: &'static str| StorePathError {
            path: base.to_string(),
            reason: reason.into(),
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
            reason: reason.into(),
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

    /// The absolute path in this process's [`store_dir`].
    pub fn to_absolute(&self) -> String {
        store_dir().print(self)
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
/// parsing it into a [`StorePath`]; `None` when `path` is not a store path of this
/// process's [`store_dir`].
pub fn path_name(path: &str) -> Option<&str> {
    store_dir().path_name(path)
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
        write!(f, "{}/{}-{}", store_dir(), self.hash_part, self.name)
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

/// Nix's `makeStorePath` in this process's [`store_dir`] ([`StoreDir::make_store_path`]).
pub fn make_store_path(
    kind: &str,
    inner: &[u8; 32],
    name: &str,
) -> Result<StorePath, StorePathError> {
    store_dir().make_store_path(kind, inner, name)
}

/// [`StoreDir::make_text_path`] in this process's [`store_dir`].
pub fn make_text_path(
    name: &str,
    contents: &[u8],
    references: &[StorePath],
) -> Result<StorePath, StorePathError> {
    store_dir().make_text_path(name, contents, references)
}

/// [`StoreDir::make_fixed_output_path`] in this process's [`store_dir`].
pub fn make_fixed_output_path(
    recursive: bool,
    hash: &Hash,
    name: &str,
) -> Result<StorePath, StorePathError> {
    store_dir().make_fixed_output_path(recursive, hash, name)
}

/// [`StoreDir::make_output_path`] in this process's [`store_dir`].
pub fn make_output_path(
    output: &str,
    hash_modulo: &[u8; 32],
    drv_name: &str,
) -> Result<StorePath, StorePathError> {
    store_dir().make_output_path(output, hash_modulo, drv_name)
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

    /// Paths Nix 2.8 gave with `NIX_STORE_DIR=/tmp/sdx/store`: `nix-store --add` of a
    /// file holding "hello\n", and `nix-instantiate` of a derivation `dep` (builder
    /// `/bin/sh`, args `-c "echo dep > $out"`, no inputs).
    #[test]
    fn computes_the_paths_nix_prints_under_another_store_directory() {
        let dir = StoreDir::new("/tmp/sdx//store/", "a test").unwrap();
        assert_eq!(dir.as_str(), "/tmp/sdx/store");
        let hi = Hash::parse(
            "sha256:1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13",
            None,
        )
        .unwrap();
        let added = dir.make_fixed_output_path(true, &hi, "sdx-hi.txt").unwrap();
        assert_eq!(
            dir.print(&added),
            "/tmp/sdx/store/7zidm018yprw6i5hw6yf8wwfcvbyg9qj-sdx-hi.txt"
        );
        // The same content has another path in the default directory.
        let default = StoreDir::default_dir()
            .make_fixed_output_path(true, &hi, "sdx-hi.txt")
            .unwrap();
        assert_ne!(default.hash_part(), added.hash_part());

        let dep_out = "/tmp/sdx/store/k49x5dfhh72byrvip3lk8sifhfwnjppp-dep";
        let dep_drv = format!(
            "Derive([(\"out\",\"{dep_out}\",\"\",\"\")],[],[],\"x86_64-linux\",\"/bin/sh\",\
             [\"-c\",\"echo dep > $out\"],[(\"builder\",\"/bin/sh\"),(\"name\",\"dep\"),\
             (\"out\",\"{dep_out}\"),(\"system\",\"x86_64-linux\")])"
        );
        let drv = dir
            .make_text_path("dep.drv", dep_drv.as_bytes(), &[])
            .unwrap();
        assert_eq!(
            dir.print(&drv),
            "/tmp/sdx/store/qan1q24c8ls5yl2nwdpvqycf7z8rh39n-dep.drv"
        );
        // The output's path hashes the derivation with its output paths left empty.
        let masked = dep_drv.replace(dep_out, "");
        let out = dir
            .make_output_path("out", &sha256(masked.as_bytes()), "dep")
            .unwrap();
        assert_eq!(dir.print(&out), dep_out);

        assert_eq!(dir.parse(dep_out).unwrap(), out);
        assert_eq!(dir.path_name(dep_out), Some("dep"));
        let in_default = format!("/nix/store/{}-dep", out.hash_part());
        let err = dir.parse(&in_default).unwrap_err();
        assert!(err.to_string().contains("/tmp/sdx/store"), "{err}");
        assert_eq!(dir.path_name(&in_default), None);
        assert_eq!(
            dir.path_name("/tmp/sdx/store/sub/k49x5dfhh72byrvip3lk8sifhfwnjppp-dep"),
            None
        );
        assert_eq!(StoreDir::default_dir().path_name(dep_out), None);
    }

    #[test]
    fn store_directories_are_made_canonical_or_refused() {
        let ok = |d: &str| StoreDir::new(d, "test").map(|d| d.to_string());
        assert_eq!(ok("/nix/store").unwrap(), "/nix/store");
        assert_eq!(ok("/a/./b/../store//").unwrap(), "/a/store");
        for bad in ["", "store", "relative/store", "/", "/..", "//"] {
            let err = ok(bad).unwrap_err();
            assert!(err.to_string().contains("test"), "{bad}: {err}");
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
