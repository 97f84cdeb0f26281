//! Nix's own settings, as Nix resolves them (nix.conf, its includes, `NIX_CONFIG`), read
//! with `nix show-config --json` so offload never disagrees with Nix about them.

use std::process::Command;

use serde::Deserialize;
use thiserror::Error;

use crate::process::{self, ProcessError};

/// The settings offload plans with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixSettings {
    /// The `builders` setting (machines in Nix's syntax, or `@file`).
    pub builders: String,
    /// Local build slots (`max-jobs`).
    pub max_jobs: u32,
    /// Cores per build (`cores`; 0 = all).
    pub cores: u32,
    pub system: String,
    pub extra_platforms: Vec<String>,
    pub system_features: Vec<String>,
    pub builders_use_substitutes: bool,
    pub substituters: Vec<String>,
}

/// Nix's settings could not be read.
#[derive(Debug, Error)]
pub enum NixConfError {
    #[error(transparent)]
    Run(#[from] ProcessError),
    #[error("`nix show-config --json` printed something offload cannot read: {0}")]
    Parse(String),
}

impl NixSettings {
    /// Asks the local Nix.
    pub fn load() -> Result<NixSettings, NixConfError> {
        let out = process::run(Command::new("nix").args([
            "show-config",
            "--json",
            "--extra-experimental-features",
            "nix-command",
        ]))?;
        Self::from_json(&out.stdout)
    }

    /// Parses the output of `nix show-config --json`.
    pub fn from_json(json: &[u8]) -> Result<NixSettings, NixConfError> {
        // Nix prints every setting; only these are read (so no `deny_unknown_fields`).
        #[derive(Deserialize)]
        struct Setting<T> {
            value: T,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "kebab-case")]
        struct Settings {
            builders: Setting<String>,
            max_jobs: Setting<u32>,
            cores: Setting<u32>,
            system: Setting<String>,
            extra_platforms: Setting<Vec<String>>,
            system_features: Setting<Vec<String>>,
            builders_use_substitutes: Setting<bool>,
            substituters: Setting<Vec<String>>,
        }
        let s: Settings =
            serde_json::from_slice(json).map_err(|e| NixConfError::Parse(e.to_string()))?;
        Ok(NixSettings {
            builders: s.builders.value,
            max_jobs: s.max_jobs.value,
            cores: s.cores.value,
            system: s.system.value,
            extra_platforms: s.extra_platforms.value,
            system_features: s.system_features.value,
            builders_use_substitutes: s.builders_use_substitutes.value,
            substituters: s.substituters.value,
        })
    }

    /// Systems the local machine builds for: `system` and `extra-platforms`.
    pub fn local_systems(&self) -> Vec<String> {
        let mut systems = vec![self.system.clone()];
        systems.extend(self.extra_platforms.iter().cloned());
        systems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nix_json() {
        let json = br#"{"builders":{"value":"@/etc/nix/machines"},"max-jobs":{"value":4},
            "cores":{"value":2},"system":{"value":"x86_64-linux"},
            "extra-platforms":{"value":["i686-linux"]},"system-features":{"value":["kvm"]},
            "builders-use-substitutes":{"value":true},"substituters":{"value":[]}}"#;
        let s = NixSettings::from_json(json).unwrap();
        assert_eq!(s.max_jobs, 4);
        assert!(s.builders_use_substitutes);
        assert_eq!(s.local_systems(), ["x86_64-linux", "i686-linux"]);
        assert!(NixSettings::from_json(b"{}").is_err());
        assert!(NixSettings::from_json(b"garbage").is_err());
    }

    #[test]
    fn reads_the_real_nix() {
        if !offload_test_support::require_nix() {
            return;
        }
        let s = NixSettings::load().unwrap();
        assert!(!s.system.is_empty());
    }
}
