//! How a serve session reaches a store: the command line of `nix-store --serve --write`,
//! run through OpenSSH for remote machines, or as a local process for the local store and
//! for host `localhost` (as Nix itself does, so `ssh://localhost?remote-store=/dir`
//! addresses a chroot store without any ssh). An `ssh-ng://` store is reached the same
//! way, through the `nix-store` beside the daemon its `remote-program` names; where that
//! cannot run (a forced `nix-daemon --stdio` in `authorized_keys`), through the daemon
//! itself, `remote-program --stdio` ([`Endpoint::daemon_command`], [`Protocol`]).
//!
//! OpenSSH runs as a child process so that the user's ssh config, agent, ControlMaster
//! and known_hosts all apply. Host-key checking is never turned off: a public host key
//! from the machines file goes into a private known_hosts file for that session.
//!
//! Sessions with one builder share one ssh connection ([`master`]); a failed ssh is
//! told apart (refused, auth, host key, unreachable) from its stderr.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

use offload_nix::store_uri::{ServeKind, StoreUri};

use crate::error::DriverError;

/// How long a machine may take to say its store directory.
const STORE_DIR_QUESTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

pub mod master;
mod protocol;
pub use protocol::{Protocol, Speaks};

/// How the command reaches the machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Route {
    /// A child process on this machine.
    LocalProcess,
    /// `ssh HOST -- COMMAND`.
    Ssh {
        /// `[user@]host` or an ssh config alias, passed to ssh verbatim.
        host: String,
        /// Identity file (machines-file field 3, `?ssh-key=`).
        ssh_key: Option<PathBuf>,
        /// Decoded public host key line (`ssh-ed25519 AAAA…`), machines-file field 8.
        host_public_key: Option<String>,
        /// `?compress=true`: ssh `-C`.
        compress: bool,
    },
}

/// A store reachable through the serve protocol.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    /// What messages call it: the store URI as the user wrote it.
    pub name: String,
    pub route: Route,
    /// The program run with `--serve --write`; `nix-store` by default.
    pub remote_program: String,
    /// `--store` for that program: a chroot store directory or store URI.
    pub remote_store: Option<String>,
    /// Further arguments, e.g. `--option cores 4` to give builds more cores.
    pub extra_args: Vec<String>,
    /// Environment variables for a server run as a local process (ssh carries none),
    /// e.g. `NIX_HELD_LOCKS` for the build hook's imports.
    pub env: Vec<(String, String)>,
    /// Options for ssh itself (keepalives, connect timeout), after the user's
    /// `NIX_SSHOPTS` so that the user's own choice wins.
    pub ssh_options: Vec<String>,
    /// The control socket of the connection shared with this machine
    /// ([`crate::ssh::master`]): sessions go over it while it is up.
    #[serde(skip)]
    pub control_path: Option<PathBuf>,
    /// Forward this machine's ssh agent (`ssh -A`), for a command that goes on to a
    /// third machine with the user's keys (`--forward-agent`); never for sessions.
    #[serde(skip)]
    pub forward_agent: bool,
    /// For `ssh-ng://`: the daemon its `remote-program` names (`nix-daemon`), run as
    /// `PROGRAM --stdio` where `nix-store --serve` cannot run.
    #[serde(default)]
    pub daemon_program: Option<String>,
    /// Which protocol its sessions speak, learned at the first session and shared by
    /// every copy of this endpoint for the run.
    #[serde(skip)]
    pub protocol: Protocol,
}

impl Endpoint {
    /// The local store (`store` = None), or a chroot store / store URI on this machine.
    pub fn local(name: impl Into<String>, store: Option<String>) -> Self {
        Endpoint {
            name: name.into(),
            route: Route::LocalProcess,
            remote_program: "nix-store".into(),
            remote_store: store,
            extra_args: Vec::new(),
            env: Vec::new(),
            ssh_options: Vec::new(),
            control_path: None,
            forward_agent: false,
            daemon_program: None,
            protocol: Protocol::default(),
        }
    }

    /// The endpoint for a Nix store URI: `ssh://[user@]host[?remote-store=…&…]`, its
    /// `ssh-ng://` twin (driven through the `nix-store` beside the daemon, see
    /// [`StoreUri::serve_program`]), `local`, `daemon`, `auto`, or a chroot store
    /// directory.
    pub fn parse(uri: &str) -> Result<Endpoint, DriverError> {
        let bad = |e: offload_nix::store_uri::StoreUriError| DriverError::BadStoreUri {
            uri: uri.to_string(),
            reason: e.reason,
        };
        let parsed = StoreUri::parse(uri).map_err(bad)?;
        let check = parsed.check_serve().map_err(bad)?;
        let mut endpoint = Endpoint::local(uri, None);
        match check.kind {
            ServeKind::Ssh => {
                match parsed.serve_program() {
                    Some(program) => endpoint.remote_program = program,
                    // An ssh-ng daemon with no `nix-store` known beside it: the daemon's
                    // protocol from the first session.
                    None => endpoint.protocol.set(Speaks::Daemon),
                }
                if parsed.scheme == "ssh-ng" {
                    endpoint.daemon_program = Some(parsed.remote_program().to_string());
                }
                endpoint.remote_store = parsed.remote_store().map(str::to_string);
                if !parsed.is_localhost() {
                    endpoint.route = Route::Ssh {
                        host: parsed.ssh_destination().unwrap_or_default(),
                        ssh_key: parsed.ssh_key().map(PathBuf::from),
                        host_public_key: parsed.host_key_line(),
                        compress: parsed.compress(),
                    };
                }
            }
            ServeKind::ThisMachine => {
                endpoint.remote_store = match parsed.scheme.as_str() {
                    "path" if parsed.params.is_empty() => Some(parsed.authority.clone()),
                    "auto" if parsed.params.is_empty() => None,
                    // With its parameters (`local?root=…`), which Nix itself reads.
                    _ => Some(parsed.to_string()),
                }
            }
        }
        Ok(endpoint)
    }

    /// Whether the server runs as a process on this machine.
    pub fn is_local_process(&self) -> bool {
        self.route == Route::LocalProcess
    }

    /// Whether the machine is reached over ssh.
    pub fn is_ssh(&self) -> bool {
        matches!(self.route, Route::Ssh { .. })
    }

    /// The shell command that starts the server on the machine.
    pub fn server_command(&self) -> String {
        self.store_command(&self.remote_program, "--serve --write")
    }

    /// The shell command that starts the daemon's side of a session in the worker
    /// protocol: `remote-program --stdio`, as Nix's `ssh-ng://` store runs it, or
    /// `nix-daemon --stdio` for a machine written without one.
    pub fn daemon_command(&self) -> String {
        let program = self.daemon_program.as_deref().unwrap_or("nix-daemon");
        self.store_command(program, "--stdio")
    }

    /// The machine's store directory, asked with a command that prints a path of its
    /// store and writes nothing (`nix-store --print-fixed-path`); None when it does not
    /// say (a daemon-only host runs no other command).
    pub(crate) async fn store_dir(&self) -> Option<String> {
        if self.protocol.is_daemon_only() {
            return None;
        }
        let hash = "0".repeat(64);
        let mode = format!("--print-fixed-path sha256 {hash} offload-store-dir");
        let question = self.store_command(&self.remote_program, &mode);
        let answer = self.ask(&question, STORE_DIR_QUESTION_TIMEOUT).await?;
        let (dir, _) = answer.trim().rsplit_once('/')?;
        dir.starts_with('/').then(|| dir.to_string())
    }

    /// `program mode` on the machine's store, with the endpoint's extra arguments.
    fn store_command(&self, program: &str, mode: &str) -> String {
        // The program is one word, as Nix documents it (a path to `nix-store`): quoted,
        // so no machines-file value reaches the shell as anything but text.
        let mut cmd = format!("{} {mode}", shell_quote(program));
        if let Some(store) = &self.remote_store {
            cmd.push_str(" --store ");
            cmd.push_str(&shell_quote(store));
        }
        for arg in &self.extra_args {
            cmd.push(' ');
            cmd.push_str(&shell_quote(arg));
        }
        cmd
    }

    /// The full local command line of `remote`, for messages.
    pub fn describe_command(&self, remote: &str) -> String {
        match &self.route {
            Route::LocalProcess => remote.to_string(),
            Route::Ssh { host, .. } => format!("ssh {host} {remote}"),
        }
    }

    /// The full local command line, for messages.
    pub fn describe(&self) -> String {
        self.describe_command(&self.server_command())
    }

    /// Starts `remote` (the server's command) on the machine with piped stdio. The
    /// returned guard keeps a private known_hosts file alive for as long as it runs.
    pub(crate) fn spawn_command(
        &self,
        remote: &str,
    ) -> Result<(Child, Option<tempfile::NamedTempFile>), DriverError> {
        let (cmd, known_hosts) = self.command(remote)?;
        let mut cmd = Command::from(cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let program = match self.route {
            Route::LocalProcess => self.remote_program.clone(),
            Route::Ssh { .. } => "ssh".to_string(),
        };
        let child = cmd.spawn().map_err(|source| DriverError::Spawn {
            machine: self.name.clone(),
            program,
            source,
        })?;
        Ok((child, known_hosts))
    }

    /// Asks the machine a short question: runs the shell command `question` there by
    /// [`Endpoint::command`] and returns what it printed on stdout, or None when it
    /// could not be run, failed, or gave no answer within `limit`.
    pub(crate) async fn ask(&self, question: &str, limit: std::time::Duration) -> Option<String> {
        let (mut cmd, known_hosts) = self.command(question).ok()?;
        let asked = tokio::task::spawn_blocking(move || {
            let _known_hosts = known_hosts;
            cmd.stdin(std::process::Stdio::null()).output()
        });
        match tokio::time::timeout(limit, asked).await {
            Ok(Ok(Ok(out))) if out.status.success() => {
                Some(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            _ => None,
        }
    }

    /// The local command that runs the shell command `remote` on the machine, by the
    /// same route as its sessions; the guard keeps a private known_hosts file alive.
    pub fn command(
        &self,
        remote: &str,
    ) -> Result<(std::process::Command, Option<tempfile::NamedTempFile>), DriverError> {
        Ok(match &self.route {
            Route::LocalProcess => {
                let mut cmd = std::process::Command::new("sh");
                cmd.arg("-c").arg(remote);
                cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
                (cmd, None)
            }
            Route::Ssh { host, .. } => {
                let (mut cmd, known_hosts) = self.ssh()?;
                if let Some(socket) = &self.control_path {
                    // Over the shared connection while it answers; on its own otherwise.
                    cmd.arg("-oControlMaster=no").arg("-S").arg(socket);
                }
                cmd.arg("--").arg(host).arg(remote);
                (cmd, known_hosts)
            }
        })
    }

    /// The command that starts the connection shared by this machine's sessions, its
    /// control socket at `socket` ([`crate::ssh::master`]); the guard keeps a private
    /// known_hosts file alive. An error for a machine not reached over ssh.
    pub(crate) fn master_command(
        &self,
        socket: &std::path::Path,
    ) -> Result<(std::process::Command, Option<tempfile::NamedTempFile>), DriverError> {
        let Route::Ssh { host, .. } = &self.route else {
            return Err(DriverError::Ssh {
                machine: self.name.clone(),
                stderr: "it is not reached over ssh: it has no shared connection".into(),
            });
        };
        let (mut cmd, known_hosts) = self.ssh()?;
        // In the foreground as this process's child, whatever the user's ssh config
        // says of persisting, and ended with it.
        cmd.args(["-M", "-N", "-oControlPersist=no"])
            .arg("-S")
            .arg(socket)
            .arg("--")
            .arg(host);
        Ok((cmd, known_hosts))
    }

    /// `ssh` with every option a connection to this machine takes, up to the
    /// destination (bare for a machine not reached over ssh).
    fn ssh(&self) -> Result<(std::process::Command, Option<tempfile::NamedTempFile>), DriverError> {
        let mut cmd = std::process::Command::new("ssh");
        let Route::Ssh {
            host,
            ssh_key,
            host_public_key,
            compress,
        } = &self.route
        else {
            return Ok((cmd, None));
        };
        // No X11 forwarding, no agent forwarding unless asked, never a password prompt.
        let agent = if self.forward_agent { "-A" } else { "-a" };
        cmd.args(["-x", agent, "-oBatchMode=yes"]);
        if let Some(opts) = crate::env::nix_sshopts() {
            cmd.args(opts.split_whitespace());
        }
        cmd.args(&self.ssh_options);
        if let Some(key) = ssh_key {
            cmd.arg("-i").arg(key);
        }
        let known_hosts = match host_public_key {
            Some(key) => {
                let file = write_known_hosts(&self.name, host, key)?;
                cmd.arg(format!("-oUserKnownHostsFile={}", file.path().display()));
                Some(file)
            }
            None => None,
        };
        if *compress {
            cmd.arg("-C");
        }
        Ok((cmd, known_hosts))
    }
}

/// Turns the stderr of an ssh that exited with 255 (its own failure, not the remote
/// command's) into the error that says what to fix.
pub(crate) fn classify_ssh_failure(machine: &str, stderr: String) -> DriverError {
    let machine = machine.to_string();
    if stderr.contains("Permission denied") {
        DriverError::SshAuth { machine, stderr }
    } else if stderr.contains("Host key verification failed")
        || stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("No ED25519 host key is known")
        || stderr.contains("host key for")
    {
        DriverError::SshHostKey { machine, stderr }
    } else if stderr.contains("Connection refused")
        || stderr.contains("Could not resolve hostname")
        || stderr.contains("No route to host")
        || stderr.contains("Connection timed out")
    {
        DriverError::SshUnreachable { machine, stderr }
    } else if stderr.contains("not responding") {
        // ssh's own keepalives (ServerAliveInterval) went unanswered.
        DriverError::SshStalled { machine, stderr }
    } else {
        DriverError::Ssh { machine, stderr }
    }
}

fn write_known_hosts(
    machine: &str,
    host: &str,
    key: &str,
) -> Result<tempfile::NamedTempFile, DriverError> {
    let io_err = |source| DriverError::Io {
        machine: machine.to_string(),
        op: "writing the known_hosts file for its public host key",
        source,
    };
    let host_only = host.rsplit('@').next().unwrap_or(host);
    let mut file = tempfile::Builder::new()
        .prefix("offload-known-hosts")
        .tempfile()
        .map_err(io_err)?;
    writeln!(file, "{host_only} {}", key.trim()).map_err(io_err)?;
    file.flush().map_err(io_err)?;
    Ok(file)
}

/// Quotes a word for a POSIX shell unless it is plainly safe.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The directory under which the store `store` (Nix's `store` setting; None: the
/// default) keeps its files on this machine; None when it keeps none there.
pub(crate) fn files_root(store: Option<&str>) -> Option<std::path::PathBuf> {
    let Some(store) = store else {
        return Some(std::path::PathBuf::from("/"));
    };
    let uri = offload_nix::store_uri::StoreUri::parse(store).ok()?;
    match uri.scheme.as_str() {
        "path" => Some(std::path::PathBuf::from(&uri.authority)),
        "auto" | "local" | "daemon" | "unix" => {
            Some(std::path::PathBuf::from(uri.param("root").unwrap_or("/")))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_map_to_routes() {
        let e = Endpoint::parse("ssh://localhost?remote-store=/tmp/fleet/m1").unwrap();
        assert_eq!(e.route, Route::LocalProcess);
        assert_eq!(
            e.server_command(),
            "nix-store --serve --write --store /tmp/fleet/m1"
        );
        let e = Endpoint::parse("ssh://root@b1?ssh-key=/k&compress=true").unwrap();
        assert!(
            matches!(e.route, Route::Ssh { ref host, compress: true, .. } if host == "root@b1")
        );
        assert_eq!(
            Endpoint::parse("/tmp/s").unwrap().remote_store.as_deref(),
            Some("/tmp/s")
        );
        assert_eq!(Endpoint::parse("auto").unwrap().remote_store, None);
        assert!(Endpoint::parse("file:///tmp/cache").is_err());
        assert!(Endpoint::parse("ssh://h?base64-ssh-public-host-key=!!").is_err());
    }

    #[test]
    fn ssh_failures_are_told_apart_by_what_ssh_printed() {
        let kind = |stderr: &str| {
            let e = classify_ssh_failure("ssh://b1", stderr.into());
            format!("{e:?}")
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(kind("Timeout, server b1 not responding."), "SshStalled");
        assert_eq!(
            kind("ssh: connect to host b1 port 22: Connection refused"),
            "SshUnreachable"
        );
        assert_eq!(kind("root@b1: Permission denied (publickey)."), "SshAuth");
        assert_eq!(kind("Host key verification failed."), "SshHostKey");
        assert_eq!(kind("kex_exchange_identification: read: reset"), "Ssh");
    }

    #[test]
    fn ssh_ng_runs_the_nix_store_beside_the_daemon() {
        let e = Endpoint::parse("ssh-ng://localhost?remote-store=/tmp/m1").unwrap();
        assert_eq!(e.route, Route::LocalProcess);
        assert_eq!(
            e.server_command(),
            "nix-store --serve --write --store /tmp/m1"
        );
        let key = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUhyZQo=";
        let e = Endpoint::parse(&format!(
            "ssh-ng://root@[::1]?remote-program=/opt/nix/bin/nix-daemon&ssh-key=/k&compress=true&base64-ssh-public-host-key={key}"
        ))
        .unwrap();
        assert_eq!(e.remote_program, "/opt/nix/bin/nix-store");
        assert_eq!(
            e.route,
            Route::Ssh {
                host: "root@::1".into(),
                ssh_key: Some("/k".into()),
                host_public_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHre".into()),
                compress: true,
            }
        );
        assert_eq!(
            e.describe(),
            "ssh root@::1 /opt/nix/bin/nix-store --serve --write"
        );
        let e = Endpoint::parse("local?root=/tmp/r").unwrap();
        assert_eq!(e.remote_store.as_deref(), Some("local?root=/tmp/r"));
    }

    #[test]
    fn hostile_values_reach_the_shell_as_text() {
        let e = Endpoint::parse(
            "ssh://localhost?remote-store=/tmp/x$(touch${IFS}/tmp/pwned)&remote-program=nix-store;reboot",
        )
        .unwrap();
        let cmd = e.server_command();
        assert_eq!(
            cmd,
            "'nix-store;reboot' --serve --write --store '/tmp/x$(touch${IFS}/tmp/pwned)'"
        );
    }

    #[test]
    fn server_command_quotes_store() {
        let mut e = Endpoint::local("x", Some("/tmp/my store".into()));
        e.extra_args = vec!["--option".into(), "cores".into(), "4".into()];
        assert_eq!(
            e.server_command(),
            "nix-store --serve --write --store '/tmp/my store' --option cores 4"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
