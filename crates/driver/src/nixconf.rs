//! Nix's own settings, as Nix resolves them (nix.conf, its includes, `NIX_CONFIG`), read
//! with `nix show-config --json` so offload never disagrees with Nix about them.

use std::process::Command;

use serde_json::Value;
use thiserror::Error;

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
    #[error("cannot run `nix show-config`")]
    Spawn(#[source] std::io::Error),
    #[error("`nix show-config --json` failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("`nix show-config --json` printed something offload cannot read: {0}")]
    Parse(String),
}

impl NixSettings {
    /// Asks the local Nix.
    pub fn load() -> Result<NixSettings, NixConfError> {
        let out = Command::new("nix")
            .args([
                "show-config",
                "--json",
                "--extra-experimental-features",
                "nix-command",
            ])
            .output()
            .map_err(NixConfError::Spawn)?;
        if !out.status.success() {
            return Err(NixConfError::Failed {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Self::from_json(&out.stdout)
    }

    /// Parses the output of `nix show-config --json`.
    pub fn from_json(json: &[u8]) -> Result<NixSettings, NixConfError> {
        let v: Value =
            serde_json::from_slice(json).map_err(|e| NixConfError::Parse(e.to_string()))?;
        let get = |key: &str| -> Result<&Value, NixConfError> {
            v.get(key)
                .and_then(|s| s.get("value"))
                .ok_or_else(|| NixConfError::Parse(format!("no setting `{key}`")))
        };
        let string = |key: &str| -> Result<String, NixConfError> {
            get(key)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| NixConfError::Parse(format!("`{key}` is not a string")))
        };
        let number = |key: &str| -> Result<u32, NixConfError> {
            get(key)?
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| NixConfError::Parse(format!("`{key}` is not a number")))
        };
        let list = |key: &str| -> Result<Vec<String>, NixConfError> {
            get(key)?
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .ok_or_else(|| NixConfError::Parse(format!("`{key}` is not a list")))
        };
        Ok(NixSettings {
            builders: string("builders")?,
            max_jobs: number("max-jobs")?,
            cores: number("cores")?,
            system: string("system")?,
            extra_platforms: list("extra-platforms")?,
            system_features: list("system-features")?,
            builders_use_substitutes: get("builders-use-substitutes")?.as_bool().unwrap_or(false),
            substituters: list("substituters")?,
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
        if Command::new("nix").arg("--version").output().is_err() {
            eprintln!("skipped: nix not found");
            return;
        }
        let s = NixSettings::load().unwrap();
        assert!(!s.system.is_empty());
    }
}
