//! Test-only helpers for offload's integration tests: real Nix, real OpenSSH.
//!
//! - [`require_nix`] and [`require_sshd_fleet`] are the one way an end-to-end test
//!   learns whether it can run. When what it needs is missing, the test prints
//!   `skipped: …` and returns; with [`REQUIRE_E2E`]`=1` in the environment (as
//!   `scripts/test.sh` and so CI set it) it fails instead, naming what is missing.
//!   `scripts/setup.sh` installs everything they need.
//! - [`nix_system`] is this machine's Nix system, for machines specs of real builds.
//! - [`nix_command`] and [`run_ok`] run Nix's tools with no binary cache configured.
//! - [`SshFleet`] is real `sshd` hosts on 127.0.0.1, each in its own mount namespace
//!   with a private `/nix` (its own store) and `/etc/nix` and a layer of its own over
//!   `/root` (no shell set-up of this machine's), reached through a generated ssh config
//!   with one `Host` alias per host and pinned host keys.
//!
//! - [`HostOptions`] makes a host of the fleet special: its store on a small tmpfs (a
//!   disk that fills up), or its Nix the newer one of [`require_newer_nix`] (Debian 13's
//!   Nix 2.26, in a root that `scripts/setup.sh` makes once), reached through `chroot`.
//! - [`LinkCutter`] is a TCP proxy on loopback that cuts the link under load, and
//!   [`SshFleet::alias_via`] routes a host's ssh through it.
//! - [`require_sshd_fleet_with_peers`] gives a fleet two views ([`Peers`]): the hosts
//!   reach each other directly by the client's names for them, and the client reaches
//!   each through a [`CountingProxy`] that counts the bytes and can shape them
//!   ([`LinkShape`]); one pair of hosts can be kept from reaching each other.
//!
//! - [`require_daemon_install`] is a multi-user install: a `nix-daemon` of its own and an
//!   ordinary user, [`daemon::TEST_USER`], who builds through it.
//!
//! - [`require_postgres`] is a private PostgreSQL server ([`PgServer`]) for the shared
//!   state.
//!
//! Nothing here is used outside tests.

pub mod daemon;
mod daemon_only;
mod home;
mod hook_agent;
pub mod newer_client;
mod other_store;
mod peers;
pub mod postgres;
mod proxy;

pub use daemon::{require_daemon_install, DaemonConfig, DaemonInstall};
pub use daemon_only::DaemonOnly;
pub use hook_agent::start_hook_agent;
pub use other_store::OtherStore;
pub use peers::Peers;
pub use postgres::{require_postgres, PgServer};
pub use proxy::{CountingProxy, LinkCutter, LinkShape};

use peers::PeerEntry;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment every Nix call in tests runs with: no binary cache is reachable.
pub const NIX_CONFIG: (&str, &str) = ("NIX_CONFIG", "substituters =");

/// The environment variable that turns a skipped end-to-end test into a failing one:
/// where it is `1`, a missing requirement panics instead of skipping.
pub const REQUIRE_E2E: &str = "OFFLOAD_REQUIRE_E2E";

/// Reports a requirement that is not met: a `skipped:` line, or a panic when
/// [`REQUIRE_E2E`] is set.
fn unavailable(what: &str) {
    if std::env::var_os(REQUIRE_E2E).is_some_and(|v| v == "1") {
        panic!(
            "end-to-end test cannot run: {what}. {REQUIRE_E2E}=1 makes that a failure; \
             `bash scripts/setup.sh` (as root) installs Nix, its build users and OpenSSH"
        );
    }
    eprintln!("skipped: {what} (`bash scripts/setup.sh` installs what end-to-end tests need)");
}

/// Whether this process runs as root (builds into the real store, starts daemons). When
/// not, prints `skipped: …` and returns false, or panics under [`REQUIRE_E2E`]`=1`.
pub fn require_root() -> bool {
    let id = run(Command::new("id").arg("-u"));
    let root = id.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        unavailable("this test builds into the real Nix store, which needs root");
    }
    root
}

/// Whether the Nix tools run here. When they do not, prints `skipped: …` and returns
/// false, or panics under [`REQUIRE_E2E`]`=1`.
pub fn require_nix() -> bool {
    // Asked once per test binary: every e2e test calls this first.
    static FOUND: OnceLock<bool> = OnceLock::new();
    let found = *FOUND.get_or_init(|| {
        nix_command("nix-store")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !found {
        unavailable("the Nix tools (nix-store) are not installed");
    }
    found
}

/// A fleet of `n` real sshd hosts (see [`SshFleet`]) with Nix on them, or None after a
/// `skipped: …` line saying what is missing (Nix, sshd, root); under
/// [`REQUIRE_E2E`]`=1` it panics instead.
pub fn require_sshd_fleet(n: usize) -> Option<SshFleet> {
    if !require_nix() {
        return None;
    }
    match SshFleet::start(n) {
        Ok(fleet) => Some(fleet),
        Err(e) => {
            unavailable(&e);
            None
        }
    }
}

/// A fleet whose hosts are set up as `hosts` says, one entry per host (see
/// [`require_sshd_fleet`]).
pub fn require_sshd_fleet_with(hosts: &[HostOptions]) -> Option<SshFleet> {
    if !require_nix() {
        return None;
    }
    match SshFleet::start_with(hosts, None) {
        Ok(fleet) => Some(fleet),
        Err(e) => {
            unavailable(&e);
            None
        }
    }
}

/// A fleet with two views (see [`Peers`]): each host's own ssh reaches every other host
/// directly by the alias the client uses for it, while the client reaches host `i`
/// through a proxy of its own that counts ([`SshFleet::bytes_through`]) and shapes
/// ([`Peers::client_link`]) what it carries. One entry of `hosts` per host, as in
/// [`require_sshd_fleet_with`].
pub fn require_sshd_fleet_with_peers(hosts: &[HostOptions], peers: &Peers) -> Option<SshFleet> {
    if !require_nix() {
        return None;
    }
    match SshFleet::start_with(hosts, Some(peers)) {
        Ok(fleet) => Some(fleet),
        Err(e) => {
            unavailable(&e);
            None
        }
    }
}

/// Where `scripts/newer-nix.sh` keeps what it makes (`OFFLOAD_TEST_CACHE`, by default
/// `/var/cache/offload-test`).
fn test_cache() -> PathBuf {
    std::env::var_os("OFFLOAD_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/offload-test"))
}

/// The root of a Debian 13 system with its Nix (2.26), for a host on a newer Nix
/// ([`HostOptions::chroot`]); `scripts/setup.sh` makes it once. When it is missing,
/// prints `skipped: …` and returns None, or panics under [`REQUIRE_E2E`]`=1`.
pub fn require_newer_nix() -> Option<PathBuf> {
    cached_root("nix-trixie-2", "Debian 13 root with Nix 2.26", "")
}

/// The root of a Debian unstable system with its Nix (the newest Debian has: 2.34 when
/// it was made), made once like [`require_newer_nix`]'s.
pub fn require_newest_nix() -> Option<PathBuf> {
    cached_root("nix-sid-1", "Debian unstable root with its Nix", " sid")
}

/// A root `scripts/newer-nix.sh` made under `name` (it renames a root there only when
/// whole), or None after saying how to make it.
fn cached_root(name: &str, what: &str, script_args: &str) -> Option<PathBuf> {
    let root = test_cache().join(name);
    if root.join("usr/bin/nix-store").exists() {
        Some(root)
    } else {
        unavailable(&format!(
            "no {what} at {}: `bash scripts/newer-nix.sh{script_args}` (as root) makes it",
            root.display()
        ));
        None
    }
}

/// What is special about one host of an [`SshFleet`]; the default is a plain host.
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    /// Its `/nix` is a tmpfs of this many MiB: a store that fills up.
    pub store_mib: Option<u32>,
    /// It runs the Nix of this root ([`require_newer_nix`]) through `chroot`: the host's
    /// own `/nix`, `/etc/nix` and `/tmp` are mounted there, with `/proc` and `/dev`, in
    /// its mount namespace, and its `nix.conf` says `sandbox = false` (Nix's sandbox
    /// does not start inside a chroot). Offload reaches it through
    /// [`SshFleet::remote_program`]; the host's own Nix must not touch that store.
    pub chroot: Option<PathBuf>,
    /// Lines added to its `nix.conf` (`system-features = …`, say).
    pub nix_conf: String,
    /// Its sshd's `MaxSessions`: sessions one connection may carry (sshd's default 10).
    pub max_sessions: Option<u32>,
    /// It builds nothing (`max-jobs = 0` in its `nix.conf`): a plain store that others
    /// copy to, a deploy target.
    pub target: bool,
}

/// (pid, parent pid) of every process on this machine.
fn process_parents() -> Vec<(u32, u32)> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// This machine's Nix system (`builtins.currentSystem`), as a machines spec of a real
/// build must name it. Call [`require_nix`] first.
pub fn nix_system() -> &'static str {
    static SYSTEM: OnceLock<String> = OnceLock::new();
    SYSTEM.get_or_init(|| {
        let out = run_ok(nix_command("nix-instantiate").args([
            "--eval",
            "--expr",
            "builtins.currentSystem",
        ]));
        out.trim().trim_matches('"').to_string()
    })
}

/// A Nix tool (`nix-store`, `nix-build`, …) with [`NIX_CONFIG`] set.
pub fn nix_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env(NIX_CONFIG.0, NIX_CONFIG.1);
    cmd
}

/// A `remote-program` for loopback machines (`ssh://localhost?remote-store=DIR&…`),
/// written into `dir`: `nix-store` without build users, which every store on this
/// machine shares.
pub fn loopback_serve_program(dir: &Path) -> PathBuf {
    let path = dir.join("nix-store-loopback");
    write_executable(
        &path,
        "#!/bin/sh\nexec nix-store --option build-users-group '' \"$@\"\n",
    );
    path
}

/// Writes a script (`body`, with its `#!` line) to `path`, executable by everyone.
pub fn write_executable(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, body)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o755)))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A machines-file line for a loopback machine: the chroot store `dir/store` served by
/// `program` (see [`loopback_serve_program`]), for this machine's system.
pub fn loopback_machine(dir: &Path, store: &str, program: &Path, slots: u32, speed: u32) -> String {
    format!(
        "ssh://localhost?remote-store={}/{store}&remote-program={} {} - {slots} {speed}",
        dir.display(),
        program.display(),
        nix_system()
    )
}

/// A command's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A word no earlier run used (`tag`, the time, the process), for derivations that must
/// be new to every store.
pub fn salt(tag: &str) -> String {
    format!(
        "{tag}-{:?}-{}",
        std::time::SystemTime::now(),
        std::process::id()
    )
}

/// Runs `cmd` and returns its stdout; panics with its stderr if it fails.
/// The local store verifies clean, and `again`, a second run of a build that ended, built
/// nothing: every output was already here.
pub fn assert_sound_and_nothing_rebuilt(again: &Output) {
    run_ok(nix_command("nix-store").args(["--verify", "--check-contents"]));
    let stderr = text(&again.stderr);
    assert!(again.status.success(), "second run: {stderr}");
    assert!(
        stderr.contains("built 0 derivations"),
        "the second run builds nothing: {stderr}"
    );
}

pub fn run_ok(cmd: &mut Command) -> String {
    match run(cmd) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => panic!("{e}"),
    }
}

fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Real sshd hosts on loopback. Dropping the fleet stops them.
pub struct SshFleet {
    dir: tempfile::TempDir,
    hosts: Vec<Host>,
    /// The client's proxy to each host, in a fleet with [`Peers`]; else empty.
    proxies: Vec<CountingProxy>,
}

struct Host {
    alias: String,
    pid_file: PathBuf,
    port: u16,
    /// The `remote-program` of a host on another Nix.
    remote_program: Option<PathBuf>,
}

impl SshFleet {
    /// Starts `n` hosts, or says why it cannot (not root, no sshd, no `unshare`).
    /// Tests start fleets through [`require_sshd_fleet`].
    fn start(n: usize) -> Result<SshFleet, String> {
        SshFleet::start_with(&vec![HostOptions::default(); n], None)
    }

    /// Starts one host per entry of `options`, each set up as it says; with `peers`,
    /// the hosts reach each other and the client reaches them through proxies (see
    /// [`Peers`]).
    fn start_with(options: &[HostOptions], peers: Option<&Peers>) -> Result<SshFleet, String> {
        let n = options.len();
        if !Path::new("/usr/sbin/sshd").exists() {
            return Err("no /usr/sbin/sshd: openssh-server is not installed".into());
        }
        // Mount namespaces need root.
        let id = run(Command::new("id").arg("-u"))?;
        if String::from_utf8_lossy(&id.stdout).trim() != "0" {
            return Err(
                "starting sshd hosts with private stores needs root: run the tests as root".into(),
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("offload-sshfleet")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let d = dir.path();
        fs::create_dir_all("/run/sshd").map_err(|e| e.to_string())?;
        let key = d.join("client_key");
        keygen(&key)?;
        let mut authorized =
            fs::read_to_string(d.join("client_key.pub")).map_err(|e| e.to_string())?;
        // The key the hosts use to reach each other.
        let peer_key = d.join("peer_key");
        if peers.is_some() {
            keygen(&peer_key)?;
            authorized += &fs::read_to_string(d.join("peer_key.pub")).map_err(|e| e.to_string())?;
        }
        fs::write(d.join("authorized_keys"), authorized).map_err(|e| e.to_string())?;
        // Every port is chosen before any sshd starts: hosts' configs name each other.
        let listeners = (0..=n)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        drop(listeners);
        // The last one stays closed: where an unreachable peer's alias points.
        let closed_port = ports[n];
        let mut entries = Vec::new();
        for (i, opts) in options.iter().enumerate() {
            let h = d.join(format!("h{}", i + 1));
            prepare_host(d, &h, ports[i], opts)?;
            let host_key = fs::read_to_string(h.join("host_key.pub")).map_err(|e| e.to_string())?;
            let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
            entries.push(PeerEntry {
                alias: format!("offload-test-h{}", i + 1),
                port: ports[i],
                host_key: host_key.join(" "),
            });
        }
        for i in 0..n {
            let home = d.join(format!("h{}/home", i + 1));
            home::write_home(&home)?;
            if let Some(peers) = peers {
                peers::write_ssh(&home, i, &entries, peers, &peer_key, closed_port)?;
            }
        }
        let mut hosts = Vec::new();
        for (i, opts) in options.iter().enumerate() {
            let h = d.join(format!("h{}", i + 1));
            let remote_program = launch_host(&h, opts)?;
            hosts.push(Host {
                alias: entries[i].alias.clone(),
                pid_file: h.join("sshd.pid"),
                port: ports[i],
                remote_program,
            });
        }
        let proxies = match peers {
            Some(peers) => hosts
                .iter()
                .map(|h| CountingProxy::start(h.port, peers.client_link))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("starting the client's proxies: {e}"))?,
            None => Vec::new(),
        };
        let known_hosts: String = entries
            .iter()
            .map(|e| format!("[127.0.0.1]:{} {}\n", e.port, e.host_key))
            .collect();
        fs::write(d.join("known_hosts"), known_hosts).map_err(|e| e.to_string())?;
        // The client's view: through the proxies when there are, else direct; the
        // fleet's own commands (`ssh`, `is_valid`) always go direct, uncounted.
        let entry = |i: usize, port: u16| {
            client_entry(
                &entries[i].alias,
                port,
                entries[i].port,
                &key,
                &d.join("known_hosts"),
            )
        };
        let direct: String = (0..n).map(|i| entry(i, ports[i])).collect();
        let client: String = match proxies.is_empty() {
            true => direct.clone(),
            false => (0..n).map(|i| entry(i, proxies[i].port())).collect(),
        };
        fs::write(d.join("direct_config"), direct).map_err(|e| e.to_string())?;
        fs::write(d.join("ssh_config"), client).map_err(|e| e.to_string())?;
        watch_hosts(&hosts)?;
        let fleet = SshFleet {
            dir,
            hosts,
            proxies,
        };
        for i in 0..n {
            fleet.wait_ready(i)?;
        }
        Ok(fleet)
    }

    fn wait_ready(&self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.ssh(i, "true") {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let log =
                        fs::read_to_string(self.dir.path().join(format!("h{}/sshd.log", i + 1)))
                            .unwrap_or_default();
                    return Err(format!(
                        "host {} did not come up: {e}\nsshd log:\n{log}",
                        self.hosts[i].alias
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The ssh config file with the hosts' aliases.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    /// `NIX_SSHOPTS` pointing ssh (for Nix and offload alike) at the fleet's config.
    pub fn ssh_opts(&self) -> (&'static str, String) {
        ("NIX_SSHOPTS", format!("-F {}", self.ssh_config().display()))
    }

    /// The ssh alias of host `i` (0-based).
    pub fn alias(&self, i: usize) -> &str {
        &self.hosts[i].alias
    }

    /// The `remote-program` that reaches host `i`'s Nix, for a host on another Nix
    /// ([`HostOptions::chroot`]).
    pub fn remote_program(&self, i: usize) -> Option<&Path> {
        self.hosts[i].remote_program.as_deref()
    }

    /// The port host `i`'s sshd listens on (127.0.0.1).
    pub fn port(&self, i: usize) -> u16 {
        self.hosts[i].port
    }

    /// A new ssh alias for host `i` that connects to `port` on loopback (a
    /// [`LinkCutter`] in front of it) and expects host `i`'s key there.
    pub fn alias_via(&self, i: usize, port: u16) -> String {
        use std::io::Write as _;
        let host = &self.hosts[i];
        let alias = format!("{}-via-{port}", host.alias);
        let d = self.dir.path();
        let entry = format!(
            "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  HostKeyAlias [127.0.0.1]:{}\n  \
             User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
             BatchMode yes\n\n",
            host.port,
            d.join("client_key").display(),
            d.join("known_hosts").display()
        );
        fs::OpenOptions::new()
            .append(true)
            .open(self.ssh_config())
            .and_then(|mut f| f.write_all(entry.as_bytes()))
            .unwrap_or_else(|e| panic!("adding {alias} to the fleet's ssh config: {e}"));
        alias
    }

    /// `ssh://alias` of host `i`.
    pub fn store_uri(&self, i: usize) -> String {
        format!("ssh://{}", self.hosts[i].alias)
    }

    /// The bytes the client's proxy to host `i` carried so far: (to the host, from the
    /// host). Only a fleet with [`Peers`] has proxies; the fleet's own commands
    /// ([`SshFleet::ssh`], [`SshFleet::is_valid`]) do not go through them.
    pub fn bytes_through(&self, i: usize) -> (u64, u64) {
        self.proxies
            .get(i)
            .unwrap_or_else(|| panic!("host {i} has no proxy: start the fleet with peers"))
            .bytes()
    }

    /// The port of the client's proxy to host `i`, in a fleet with [`Peers`].
    pub fn proxy_port(&self, i: usize) -> Option<u16> {
        self.proxies.get(i).map(CountingProxy::port)
    }

    /// Runs a shell command on host `i` (in its namespace, so its store), directly
    /// rather than through the client's proxy.
    pub fn ssh(&self, i: usize, command: &str) -> Result<String, String> {
        let out = run(Command::new("ssh")
            .arg("-F")
            .arg(self.dir.path().join("direct_config"))
            .arg(&self.hosts[i].alias)
            .arg(format!("NIX_CONFIG='substituters =' {command}")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops host `i`'s sshd: new connections to it are refused.
    pub fn stop(&self, i: usize) {
        if let Some(pid) = self.listener(i) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        // Until the port is closed, a connection could still get through.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self
            .listener(i)
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of host `i`'s listening sshd.
    pub fn listener(&self, i: usize) -> Option<u32> {
        fs::read_to_string(&self.hosts[i].pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Every process under host `i`'s listening sshd: its sessions and what they run.
    pub fn session_processes(&self, i: usize) -> Vec<u32> {
        let Some(root) = self.listener(i) else {
            return Vec::new();
        };
        let parents = process_parents();
        let mut found = vec![root];
        let mut i = 0;
        while i < found.len() {
            let parent = found[i];
            found.extend(
                parents
                    .iter()
                    .filter(|(_, pp)| *pp == parent)
                    .map(|(p, _)| *p),
            );
            i += 1;
        }
        found.remove(0);
        found
    }

    /// How many ssh connections host `i` has open: its listening sshd forks one process
    /// per connection, however many sessions that connection carries.
    pub fn connections(&self, i: usize) -> usize {
        let Some(root) = self.listener(i) else {
            return 0;
        };
        process_parents()
            .iter()
            .filter(|(_, pp)| *pp == root)
            .count()
    }

    /// Sends `signal` (`STOP`, `CONT`, `KILL`, …) to every process of host `i`'s sessions.
    pub fn signal_sessions(&self, i: usize, signal: &str) {
        for pid in self.session_processes(i) {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// Whether `path` is valid in host `i`'s store.
    pub fn is_valid(&self, i: usize, path: &str) -> bool {
        self.ssh(i, &format!("nix-store --check-validity {path}"))
            .is_ok()
    }
}

impl Drop for SshFleet {
    fn drop(&mut self) {
        for h in &self.hosts {
            if let Ok(pid) = fs::read_to_string(&h.pid_file) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
}

/// Makes an ed25519 key pair without a passphrase at `path` (and `path.pub`).
fn keygen(path: &Path) -> Result<(), String> {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(path))
    .map(drop)
}

/// A client `Host` entry: `alias` at `port` on loopback, expecting the key of the sshd
/// that listens on `real_port` (the same port, or a proxy's in front of it).
fn client_entry(alias: &str, port: u16, real_port: u16, key: &Path, known_hosts: &Path) -> String {
    format!(
        "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  HostKeyAlias [127.0.0.1]:{real_port}\n  \
         User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
         BatchMode yes\n\n",
        key.display(),
        known_hosts.display()
    )
}

/// Writes host directory `h` of the fleet in `d`: its `nix.conf`, host key and
/// `sshd_config` listening on `port`.
fn prepare_host(d: &Path, h: &Path, port: u16, opts: &HostOptions) -> Result<(), String> {
    for sub in ["nix", "etc-nix", "tmp"] {
        fs::create_dir_all(h.join(sub)).map_err(|e| e.to_string())?;
    }
    // Builds without build users: the nixbld uids are shared by every host on this
    // machine, and Nix kills all processes of a build user around a build.
    let system_conf = fs::read_to_string("/etc/nix/nix.conf").unwrap_or_default();
    let conf: String = system_conf
        .lines()
        .filter(|l| !l.trim_start().starts_with("build-users-group"))
        .map(|l| format!("{l}\n"))
        .collect();
    let sandbox = if opts.chroot.is_some() {
        "sandbox = false\n"
    } else {
        ""
    };
    let target = if opts.target { "max-jobs = 0\n" } else { "" };
    fs::write(
        h.join("etc-nix/nix.conf"),
        conf + "build-users-group =\nsubstituters =\n" + sandbox + target + &opts.nix_conf,
    )
    .map_err(|e| e.to_string())?;
    let host_key = h.join("host_key");
    keygen(&host_key)?;
    fs::write(
        h.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\n\
             AuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nStrictModes no\nUsePAM no\n{}",
            host_key.display(),
            h.join("sshd.pid").display(),
            d.join("authorized_keys").display(),
            opts.max_sessions
                .map(|n| format!("MaxSessions {n}\n"))
                .unwrap_or_default()
        ),
    )
    .map_err(|e| e.to_string())
}

/// Starts the sshd of host directory `h` in a mount namespace of its own (its `/nix`,
/// `/etc/nix`, and its layer over `/root`: [`home`]); returns the `remote-program` of a
/// host on another Nix.
fn launch_host(h: &Path, opts: &HostOptions) -> Result<Option<PathBuf>, String> {
    let (nix, etc) = (h.join("nix"), h.join("etc-nix"));
    let mut mounts = Vec::new();
    if let Some(mib) = opts.store_mib {
        mounts.push(format!(
            "mount -t tmpfs -o size={mib}m offload-test-store '{}'",
            nix.display()
        ));
    }
    mounts.push(format!("mount --bind '{}' /nix", nix.display()));
    mounts.push(format!("mount --bind '{}' /etc/nix", etc.display()));
    mounts.push(home::mount_home(&h.join("home")));
    let mut remote_program = None;
    if let Some(root) = &opts.chroot {
        let r = root.display();
        mounts.extend([
            format!("mount --bind '{}' '{r}/nix'", nix.display()),
            format!("mount --bind '{}' '{r}/etc/nix'", etc.display()),
            format!("mount --bind '{}' '{r}/tmp'", h.join("tmp").display()),
            format!("mount -t proc proc '{r}/proc'"),
            format!("mount --rbind /dev '{r}/dev'"),
        ]);
        let program = h.join("nix-store-chroot");
        write_executable(
            &program,
            &format!("#!/bin/sh\nexec chroot '{r}' /usr/bin/nix-store \"$@\"\n"),
        );
        remote_program = Some(program);
    }
    let script = format!(
        "{} && exec /usr/sbin/sshd -f '{cfg}' -E '{log}'",
        mounts.join(" && "),
        cfg = h.join("sshd_config").display(),
        log = h.join("sshd.log").display(),
    );
    run(Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]))?;
    Ok(remote_program)
}

/// A fleet kept in a `static` is never dropped: a watcher stops the hosts when this
/// process exits, whatever way it does.
fn watch_hosts(hosts: &[Host]) -> Result<(), String> {
    let pid_files: Vec<String> = hosts
        .iter()
        .map(|h| format!("'{}'", h.pid_file.display()))
        .collect();
    let watcher = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; for f in {files}; do kill $(cat $f) 2>/dev/null; done",
        me = std::process::id(),
        files = pid_files.join(" ")
    );
    Command::new("sh")
        .args(["-c", &watcher])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("starting the fleet watcher: {e}"))
}
