//! A multi-user install on this machine: a `nix-daemon` of its own (run as root, on a
//! private socket, with its own `nix.conf`) serving the real store, and an ordinary user
//! who builds through it, as on NixOS or any daemon install.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{run, unavailable, NIX_CONFIG};

/// The ordinary user the tests build as.
pub const TEST_USER: &str = "offload-tester";

/// How the daemon is configured.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    /// The test user is in `trusted-users`.
    pub trust_user: bool,
    /// `trusted-public-keys`: signatures by these keys let paths in.
    pub trusted_public_keys: Vec<String>,
    /// Further `nix.conf` lines (`build-hook = …`, `builders = …`).
    pub extra_conf: Vec<String>,
}

/// A running daemon and the user who builds through it. Dropping it stops the daemon.
pub struct DaemonInstall {
    dir: tempfile::TempDir,
    daemon: Child,
}

/// A daemon install (see [`DaemonInstall`]), or None after a `skipped: …` line saying
/// what is missing (Nix, root); under [`crate::REQUIRE_E2E`]`=1` it panics instead.
pub fn require_daemon_install(config: &DaemonConfig) -> Option<DaemonInstall> {
    if !crate::require_nix() {
        return None;
    }
    match DaemonInstall::start(config) {
        Ok(install) => Some(install),
        Err(e) => {
            unavailable(&e);
            None
        }
    }
}

impl DaemonInstall {
    fn start(config: &DaemonConfig) -> Result<DaemonInstall, String> {
        let id = run(Command::new("id").arg("-u"))?;
        if String::from_utf8_lossy(&id.stdout).trim() != "0" {
            return Err("starting a nix-daemon and creating a user needs root".into());
        }
        ensure_user()?;
        let dir = tempfile::Builder::new()
            .prefix("offload-daemon")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // The user reaches the socket and its own directories below this one.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let system_conf = fs::read_to_string("/etc/nix/nix.conf").unwrap_or_default();
        let mut conf: String = system_conf
            .lines()
            .filter(|l| {
                let key = l.split('=').next().unwrap_or("").trim();
                !matches!(
                    key,
                    "build-users-group" | "trusted-users" | "trusted-public-keys"
                )
            })
            .map(|l| format!("{l}\n"))
            .collect();
        conf.push_str("build-users-group = nixbld\nsubstituters =\nrequire-sigs = true\n");
        conf.push_str(if config.trust_user {
            "trusted-users = root offload-tester\n"
        } else {
            "trusted-users = root\n"
        });
        conf.push_str(&format!(
            "trusted-public-keys = {}\n",
            config.trusted_public_keys.join(" ")
        ));
        for line in &config.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        fs::write(dir.path().join("nix.conf"), conf).map_err(|e| e.to_string())?;
        let socket = dir.path().join("socket");
        let daemon = Command::new("nix-daemon")
            .env("NIX_CONF_DIR", dir.path())
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nix-daemon: {e}"))?;
        let install = DaemonInstall { dir, daemon };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err("nix-daemon did not open its socket within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(install)
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// The daemon's `nix.conf` directory.
    pub fn conf_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A new directory the test user owns.
    pub fn user_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        let made = fs::create_dir_all(&dir)
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)));
        made.unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        run(Command::new("chown").arg(TEST_USER).arg(&dir)).unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    /// `program` run as the test user through this daemon (`NIX_REMOTE=daemon` and the
    /// socket), with no binary cache, in `cwd`.
    pub fn command(&self, program: &Path, cwd: &Path) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.current_dir(cwd)
            .args(["-u", TEST_USER, "--", "env"])
            .arg(format!("HOME={}", cwd.display()))
            .arg(format!("USER={TEST_USER}"))
            .arg("NIX_REMOTE=daemon")
            .arg(format!(
                "NIX_DAEMON_SOCKET_PATH={}",
                self.socket().display()
            ))
            .arg(format!("{}={}", NIX_CONFIG.0, NIX_CONFIG.1))
            .arg(program);
        cmd
    }
}

impl Drop for DaemonInstall {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// Creates [`TEST_USER`] once.
fn ensure_user() -> Result<(), String> {
    static MADE: OnceLock<Result<(), String>> = OnceLock::new();
    MADE.get_or_init(|| {
        let exists = |_: ()| {
            Command::new("id")
                .arg(TEST_USER)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if exists(()) {
            return Ok(());
        }
        let made = run(Command::new("useradd").args(["--create-home", TEST_USER]));
        // Another test binary may have made it meanwhile.
        if made.is_err() && !exists(()) {
            return made.map(|_| ());
        }
        Ok(())
    })
    .clone()
}
