//! A Nix store under a directory other than `/nix/store`, as Nix's own test suite and
//! relocated installs have it: `NIX_STORE_DIR`, `NIX_STATE_DIR` and `NIX_LOG_DIR` point
//! into a scratch directory, and loopback builders (chroot stores reached as
//! `ssh://localhost`) run their `nix-store` with the same store directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{nix_system, write_executable, NIX_CONFIG};

/// The scratch directory: `store/` (the store directory), `state/`, `log/`, and a
/// builder's chroot store per name.
pub struct OtherStore {
    dir: tempfile::TempDir,
}

impl Default for OtherStore {
    fn default() -> Self {
        Self::new()
    }
}

impl OtherStore {
    pub fn new() -> OtherStore {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["store", "state", "log"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let this = OtherStore { dir };
        write_executable(
            &this.serve_program(),
            &format!(
                "#!/bin/sh\nexport {}\nexec nix-store --option build-users-group '' \"$@\"\n",
                this.variables()
                    .iter()
                    .map(|(k, v)| format!("{k}='{}'", v.display()))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        this
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The store directory (`NIX_STORE_DIR`).
    pub fn store_dir(&self) -> PathBuf {
        self.path().join("store")
    }

    fn variables(&self) -> [(&'static str, PathBuf); 3] {
        [
            ("NIX_STORE_DIR", self.store_dir()),
            ("NIX_STATE_DIR", self.path().join("state")),
            ("NIX_LOG_DIR", self.path().join("log")),
        ]
    }

    /// Gives `cmd` this store's environment (and no binary cache, no daemon).
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        for (k, v) in self.variables() {
            cmd.env(k, v);
        }
        cmd.env(NIX_CONFIG.0, NIX_CONFIG.1).env_remove("NIX_REMOTE")
    }

    /// `program` run with this store's environment.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        self.env(&mut cmd);
        cmd
    }

    /// The `remote-program` of this store's loopback builders: `nix-store` with this
    /// store directory, without build users.
    pub fn serve_program(&self) -> PathBuf {
        self.path().join("nix-store-other-dir")
    }

    /// Builder `name`'s chroot store (its files under `ROOT/<store dir>`).
    pub fn builder_root(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// A machines line for loopback builder `name`, with `program` as its
    /// `remote-program` (None: [`OtherStore::serve_program`], this store directory).
    pub fn builder(&self, name: &str, program: Option<&Path>, slots: u32, speed: u32) -> String {
        let serve = self.serve_program();
        format!(
            "ssh://localhost?remote-store={}&remote-program={} {} - {slots} {speed}",
            self.builder_root(name).display(),
            program.unwrap_or(&serve).display(),
            nix_system()
        )
    }

    /// Whether `path` is valid in builder `name`'s store.
    pub fn builder_has(&self, name: &str, path: &str) -> bool {
        self.command("nix-store")
            .arg("--store")
            .arg(self.builder_root(name))
            .args(["--check-validity", path])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Whether `path` is valid in this store and its contents match its recorded hash.
    pub fn verifies(&self, path: &str) -> bool {
        self.command("nix-store")
            .args(["--verify-path", path])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}
