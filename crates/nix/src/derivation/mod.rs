//! Derivations (`.drv` files): the parsed form, its ATerm text, and the hashes that
//! decide store paths (the `.drv` path, and "hash modulo" for input-addressed outputs).

mod aterm;

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

pub use aterm::MAX_DRV_SIZE;

use crate::hash::{sha256, to_base16};
use crate::serve::{BasicDerivation, WireOutput};
use crate::store_path::{make_output_path, make_text_path, StorePath, StorePathError};

/// A `.drv` that cannot be used.
#[derive(Debug, Error)]
pub enum DerivationError {
    #[error("at byte {offset}: expected {expected}, found {found:?}")]
    Syntax {
        offset: usize,
        expected: &'static str,
        found: String,
    },
    #[error("at byte {offset}: the {what} is not UTF-8")]
    NotUtf8 { offset: usize, what: &'static str },
    #[error("at byte {offset}: {source}")]
    BadPath {
        offset: usize,
        #[source]
        source: StorePathError,
    },
    #[error("{what} {name:?} appears twice")]
    Duplicate { what: &'static str, name: String },
    #[error("the derivation is {size} bytes, more than the limit of {MAX_DRV_SIZE}")]
    TooLarge { size: usize },
    #[error(transparent)]
    Path(#[from] StorePathError),
}

/// One output: its path (absent for floating content-addressed and deferred outputs)
/// and, for content-addressed ones, the hash algorithm (`[r:]sha256`) and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub path: Option<StorePath>,
    pub hash_algo: String,
    pub hash: String,
}

impl Output {
    /// Fixed-output: the content hash is given in advance.
    pub fn is_fixed(&self) -> bool {
        !self.hash_algo.is_empty() && !self.hash.is_empty() && self.hash != "impure"
    }

    /// Floating content-addressed (`hashAlgo` `r:sha256` or `sha256`, no path, no
    /// hash): its path is known only once it is built, from its contents.
    pub fn is_floating(&self) -> bool {
        self.path.is_none() && !self.hash_algo.is_empty() && self.hash.is_empty()
    }
}

/// A parsed derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub outputs: BTreeMap<String, Output>,
    /// Input derivations and the outputs of each that are needed.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub system: String,
    pub builder: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Derivation {
    /// Parses the text of a `.drv` file.
    pub fn parse(text: &[u8]) -> Result<Derivation, DerivationError> {
        aterm::parse(text)
    }

    /// The text Nix writes for it, byte for byte.
    pub fn to_aterm(&self) -> Vec<u8> {
        aterm::print(self, false, None)
    }

    /// An environment variable, if present and UTF-8.
    pub fn env_str(&self, key: &str) -> Option<&str> {
        self.env
            .get(key.as_bytes())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The `name` attribute.
    pub fn name(&self) -> Option<&str> {
        self.env_str("name")
    }

    /// `requiredSystemFeatures`, space-separated (or from `__json` with structured
    /// attributes, which offload does not interpret: none are reported then).
    pub fn required_system_features(&self) -> Vec<String> {
        self.env_str("requiredSystemFeatures")
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// `preferLocalBuild = true`.
    pub fn prefer_local_build(&self) -> bool {
        self.env_str("preferLocalBuild") == Some("1")
    }

    /// `allowSubstitutes`, true unless set to false.
    pub fn allow_substitutes(&self) -> bool {
        self.env_str("allowSubstitutes") != Some("")
    }

    /// A fixed-output derivation: one output, `out`, with a content hash.
    pub fn is_fixed_output(&self) -> bool {
        self.outputs.len() == 1 && self.outputs.get("out").is_some_and(Output::is_fixed)
    }

    /// The `__json` of structured attributes, if any.
    pub fn structured_attrs(&self) -> Option<&[u8]> {
        self.env.get(&b"__json"[..]).map(Vec::as_slice)
    }

    /// The store path this derivation's `.drv` has (`name` without `.drv`).
    pub fn drv_path(&self, name: &str) -> Result<StorePath, StorePathError> {
        let refs: Vec<StorePath> = self
            .input_drvs
            .keys()
            .chain(self.input_srcs.iter())
            .cloned()
            .collect();
        make_text_path(&format!("{name}.drv"), &self.to_aterm(), &refs)
    }

    /// Nix's `hashDerivationModulo`. `input_hash` gives, for an input `.drv`, its own
    /// unmasked modulo hash (what [`Derivation::hash_modulo`] returns with
    /// `mask_outputs = false`). With `mask_outputs`, this derivation's output paths are
    /// blanked: the hash its own output paths derive from.
    pub fn hash_modulo<E>(
        &self,
        mask_outputs: bool,
        mut input_hash: impl FnMut(&StorePath) -> Result<[u8; 32], E>,
    ) -> Result<[u8; 32], E> {
        if self.is_fixed_output() {
            let out = &self.outputs["out"];
            let path = out
                .path
                .as_ref()
                .map(StorePath::to_absolute)
                .unwrap_or_default();
            let text = format!("fixed:out:{}:{}:{path}", out.hash_algo, out.hash);
            return Ok(sha256(text.as_bytes()));
        }
        let mut inputs = BTreeMap::new();
        for (drv, outs) in &self.input_drvs {
            let h = to_base16(&input_hash(drv)?);
            inputs
                .entry(h)
                .or_insert_with(BTreeSet::new)
                .extend(outs.iter().cloned());
        }
        Ok(sha256(&aterm::print(self, mask_outputs, Some(&inputs))))
    }

    /// The output paths an input-addressed derivation must have, given its name (that
    /// of its `.drv` path, see [`name_from_drv_path`]) and masked modulo hash.
    pub fn expected_output_paths(
        &self,
        name: &str,
        hash_modulo_masked: &[u8; 32],
    ) -> Result<BTreeMap<String, StorePath>, DerivationError> {
        self.outputs
            .keys()
            .map(|o| Ok((o.clone(), make_output_path(o, hash_modulo_masked, name)?)))
            .collect()
    }

    /// The ids Nix gives this derivation's outputs, by which their realisations (the
    /// paths they were built at) are found: `DrvOutput`, `sha256:<base16>!<output>`, the
    /// hash being [`Derivation::hash_modulo`] with outputs masked. Only for a
    /// derivation without input derivations, which is what Nix hands a build hook for
    /// a floating content-addressed one (it resolves the inputs first); None else.
    pub fn output_ids(&self) -> Option<BTreeMap<String, String>> {
        if !self.input_drvs.is_empty() {
            return None;
        }
        let hash = self.hash_modulo(true, |_| Err::<[u8; 32], ()>(())).ok()?;
        let hex = to_base16(&hash);
        Some(
            self.outputs
                .keys()
                .map(|name| (name.clone(), format!("sha256:{hex}!{name}")))
                .collect(),
        )
    }

    /// The derivation as BuildDerivation sends it, with `input_srcs` as given.
    pub fn to_basic(&self, input_srcs: Vec<String>) -> BasicDerivation {
        BasicDerivation {
            outputs: self
                .outputs
                .iter()
                .map(|(name, o)| WireOutput {
                    name: name.clone(),
                    path: o
                        .path
                        .as_ref()
                        .map(StorePath::to_absolute)
                        .unwrap_or_default(),
                    hash_algo: o.hash_algo.clone(),
                    hash: o.hash.clone(),
                })
                .collect(),
            input_srcs,
            platform: self.system.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// The derivation name of a `.drv` path: its name without `.drv`.
pub fn name_from_drv_path(path: &StorePath) -> &str {
    path.name().strip_suffix(".drv").unwrap_or(path.name())
}

#[cfg(test)]
mod tests;
