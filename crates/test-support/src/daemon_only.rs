//! Hosts that answer only the daemon protocol, as hardened builders and hosted services
//! are set up: the client's key is accepted with `command="nix-daemon --stdio",restrict`
//! in `authorized_keys`, so whatever the client asks to run, the daemon answers.
//!
//! [`DaemonOnly::alias`] gives a host of an [`SshFleet`] a second key and an ssh alias
//! that uses it; the host's `authorized_keys` forces the daemon for that key alone, so
//! the fleet's own commands ([`SshFleet::ssh`]) still run as before.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use crate::SshFleet;

/// What a daemon-only login runs.
#[derive(Debug, Clone)]
pub struct DaemonOnly {
    /// The daemon program, run as `PROGRAM --stdio` (`nix-daemon`, or the daemon of a
    /// root on another Nix through `chroot ROOT /usr/bin/nix-daemon`).
    pub daemon: String,
}

impl Default for DaemonOnly {
    fn default() -> Self {
        DaemonOnly {
            daemon: "nix-daemon".into(),
        }
    }
}

impl DaemonOnly {
    /// The daemon of a root on a newer Nix ([`crate::require_newer_nix`]), as a host
    /// started with that root as its [`crate::HostOptions::chroot`] runs it.
    pub fn in_root(root: &Path) -> Self {
        DaemonOnly {
            daemon: format!("chroot {} /usr/bin/nix-daemon", root.display()),
        }
    }

    /// A new ssh alias for host `i` of `fleet` whose key is forced to the daemon.
    pub fn alias(&self, fleet: &SshFleet, i: usize) -> String {
        let config = fleet.ssh_config();
        let dir = config.parent().expect("the fleet's directory");
        let alias = format!("{}-daemon-only", fleet.alias(i));
        let key = dir.join(format!("{alias}-key"));
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(&key)
            .status()
            .unwrap_or_else(|e| panic!("ssh-keygen: {e}"));
        assert!(made.success(), "ssh-keygen failed for {}", key.display());
        let public = fs::read_to_string(key.with_extension("pub"))
            .or_else(|_| fs::read_to_string(format!("{}.pub", key.display())))
            .unwrap_or_else(|e| panic!("reading the public key of {}: {e}", key.display()));
        append(
            &dir.join("authorized_keys"),
            &format!(
                "command=\"{} --stdio\",restrict {}\n",
                self.daemon,
                public.trim()
            ),
        );
        append(
            &config,
            &format!(
                "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  HostKeyAlias [127.0.0.1]:{port}\n  \
                 User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  \
                 BatchMode yes\n\n",
                port = fleet.port(i),
                key = key.display(),
                known = dir.join("known_hosts").display(),
            ),
        );
        alias
    }
}

fn append(path: &Path, text: &str) {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("adding to {}: {e}", path.display()));
}
