//! A fleet with two views ([`Peers`]): each host's own ssh reaches the others directly
//! by the names the client uses, while the client reaches each host through a
//! [`CountingProxy`](crate::CountingProxy) of its own.
//!
//! A host's own ssh reads `/root/.ssh`, which is the `.ssh` of the host's own layer over
//! `/root` ([`crate::home`]): its config, the fleet's peer key and every host key.

use std::fs;
use std::path::Path;

use crate::proxy::LinkShape;

/// How the client and the hosts of a fleet reach each other
/// ([`require_sshd_fleet_with_peers`](crate::require_sshd_fleet_with_peers)).
#[derive(Debug, Clone, Default)]
pub struct Peers {
    /// The client's link to each host: a proxy per host, shared by all of the client's
    /// connections to it, that counts the bytes ([`SshFleet::bytes_through`]) and shapes
    /// them like this.
    ///
    /// [`SshFleet::bytes_through`]: crate::SshFleet::bytes_through
    pub client_link: LinkShape,
    /// Pairs `(i, j)` of hosts (0-based) where host `i`'s ssh cannot reach host `j`: its
    /// alias for `j` points at a closed port. The client still reaches both.
    pub unreachable: Vec<(usize, usize)>,
}

/// What a host needs to know of each host of the fleet.
pub(crate) struct PeerEntry {
    pub alias: String,
    pub port: u16,
    /// `ssh-ed25519 AAAA…` of its host key.
    pub host_key: String,
}

/// Writes host `me`'s `/root/.ssh` under `home/upper`: a `Host` entry per host with its
/// real port (a `closed_port` for the hosts `peers` says `me` cannot reach), the
/// fleet's peer key `key` and every host key.
pub(crate) fn write_ssh(
    home: &Path,
    me: usize,
    hosts: &[PeerEntry],
    peers: &Peers,
    key: &Path,
    closed_port: u16,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let ssh = home.join("upper/.ssh");
    fs::create_dir_all(&ssh).map_err(|e| format!("{}: {e}", ssh.display()))?;
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
    let id = ssh.join("id_ed25519");
    fs::copy(key, &id).map_err(|e| format!("{}: {e}", id.display()))?;
    fs::set_permissions(&id, fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
    let mut config = String::new();
    let mut known_hosts = String::new();
    for (j, host) in hosts.iter().enumerate() {
        let port = if peers.unreachable.contains(&(me, j)) {
            closed_port
        } else {
            host.port
        };
        config.push_str(&format!(
            "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  HostKeyAlias [127.0.0.1]:{real}\n  \
             User root\n  IdentityFile /root/.ssh/id_ed25519\n  IdentitiesOnly yes\n  \
             UserKnownHostsFile /root/.ssh/known_hosts\n  StrictHostKeyChecking yes\n  \
             BatchMode yes\n  ConnectTimeout 10\n\n",
            alias = host.alias,
            real = host.port,
        ));
        known_hosts.push_str(&format!("[127.0.0.1]:{} {}\n", host.port, host.host_key));
    }
    for (name, text) in [("config", config), ("known_hosts", known_hosts)] {
        let path = ssh.join(name);
        fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
