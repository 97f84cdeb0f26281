//! A client machine on a newer Nix: Debian 13's Nix 2.26 as the local Nix that offload
//! runs with, in the root of [`crate::require_newer_nix`].
//!
//! The root is entered as a container is, not with `chroot`: inside a chroot, Nix 2.26
//! cannot start its sandbox ("user namespaces are not enabled": the kernel refuses a
//! user namespace to a chrooted process), so builds here would not be sandboxed as a
//! user's are. A holder process makes private mount and PID namespaces, lays a private
//! overlay over the cached root (what a test writes there, a user it adds, stays its
//! own, in memory), mounts `/proc`, `/dev`, a fresh `/nix` (the client's own store),
//! `/etc/nix`, a tmpfs `/tmp`, and the directories the test names at their own paths,
//! then `pivot_root`s into it. Every command of the test enters those namespaces with
//! `nsenter`, so the client's processes, an optional 2.26 `nix-daemon` among them, share
//! one machine. Dropping the client kills the holder, and with it every process inside.

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{run, unavailable, NIX_CONFIG};

/// The ordinary user made inside a client with a daemon ([`ClientOptions::daemon`]).
pub const CLIENT_USER: &str = "offload-tester";

/// The `sandbox-paths` a 2.26 build needs in the Debian 13 root: `/bin` and the library
/// directories are symlinks into `/usr` there, and Nix 2.26 refuses a sandbox path that
/// is a symlink (`extra-sandbox-paths = /bin` fails), so each is named as its target.
pub const SANDBOX_PATHS: &str =
    "sandbox-paths = /usr /bin=/usr/bin /lib=/usr/lib /lib64=/usr/lib64";

/// How a [`NewerClient`] is set up; the default is root on a local store, no daemon.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// The offload binary under test, made visible inside at the same path.
    pub offload: PathBuf,
    /// Lines added to the client's `/etc/nix/nix.conf`.
    pub nix_conf: String,
    /// Start a 2.26 `nix-daemon` inside with these arguments (`--option build-hook …`:
    /// Nix 2.25 to 2.33 ignore `build-hook` in `nix.conf`), on the client's own socket
    /// (its `/nix` is its own), and add [`CLIENT_USER`], who builds through it.
    pub daemon: Option<Vec<String>>,
    /// Host directories the client sees at their own paths: an [`crate::SshFleet`]'s
    /// (its ssh config, key and known hosts), a work directory of the test's.
    pub visible: Vec<PathBuf>,
    /// Run Debian unstable's Nix ([`crate::require_newest_nix`]) instead of 13's 2.26.
    pub newest: bool,
}

/// A client on Nix 2.26 (see the module doc). Dropping it ends everything inside.
pub struct NewerClient {
    dir: tempfile::TempDir,
    /// `setpriv … unshare …`: killing it kills the namespace's first process.
    holder: Child,
    /// The host pid of the namespace's first process, which `nsenter` targets.
    init: u32,
    /// The `nsenter` that started the daemon, waited for once the holder is gone.
    daemon: Option<Child>,
}

/// A client on Nix 2.26 set up as `options` says, or None after a `skipped: …` line
/// saying what is missing (the Debian 13 root, root, `unshare`); under
/// [`crate::REQUIRE_E2E`]`=1` it panics instead.
pub fn require_newer_client(options: &ClientOptions) -> Option<NewerClient> {
    let root = if options.newest {
        crate::require_newest_nix()?
    } else {
        crate::require_newer_nix()?
    };
    if !crate::require_root() {
        return None;
    }
    match NewerClient::start(&root, options) {
        Ok(client) => Some(client),
        Err(e) => {
            unavailable(&format!("a client on Nix 2.26 did not start: {e}"));
            None
        }
    }
}

impl NewerClient {
    fn start(root: &Path, options: &ClientOptions) -> Result<NewerClient, String> {
        let dir = tempfile::Builder::new()
            .prefix("offload-newer-client")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let d = dir.path();
        // The ordinary user reaches the work directory below this one.
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        for sub in ["rw", "merged", "nix", "etc-nix", "work"] {
            fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
        }
        fs::set_permissions(d.join("work"), fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        // No build users (the root has no nixbld group; the sandbox isolates builds),
        // no binary cache, and the sandbox paths of the root.
        let conf = format!(
            "build-users-group =\nsubstituters =\nsandbox = true\n{SANDBOX_PATHS}\n{}",
            options.nix_conf
        );
        fs::write(d.join("etc-nix/nix.conf"), conf).map_err(|e| e.to_string())?;
        let mut visible = vec![d.join("work")];
        visible.extend(options.visible.iter().cloned());
        let script = holder_script(root, d, &options.offload, &visible);
        let mut holder = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .args([
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--propagation",
                "private",
            ])
            .args(["--kill-child", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start unshare: {e}"))?;
        let mut line = String::new();
        let stdout = holder.stdout.take().ok_or("no stdout")?;
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "ready" {
            let _ = holder.kill();
            let mut stderr = String::new();
            if let Some(mut err) = holder.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            let _ = holder.wait();
            return Err(format!("entering {} failed: {stderr}", root.display()));
        }
        let init = match first_child(holder.id()) {
            Ok(init) => init,
            Err(e) => {
                let _ = holder.kill();
                let _ = holder.wait();
                return Err(e);
            }
        };
        let mut client = NewerClient {
            dir,
            holder,
            init,
            daemon: None,
        };
        if let Some(args) = &options.daemon {
            client.start_daemon(args)?;
        }
        Ok(client)
    }

    /// Adds [`CLIENT_USER`] and starts the daemon, once its socket is there.
    fn start_daemon(&mut self, args: &[String]) -> Result<(), String> {
        run(self.enter().args(["useradd", "--create-home", CLIENT_USER]))?;
        run(self.enter().args(["chown", CLIENT_USER]).arg(self.work()))?;
        let log =
            fs::File::create(self.dir.path().join("daemon.log")).map_err(|e| e.to_string())?;
        // The holder's end takes the daemon with it; this process only enters.
        let daemon = self
            .enter()
            .arg("nix-daemon")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start nix-daemon: {e}"))?;
        self.daemon = Some(daemon);
        let socket = self.host_path("/nix/var/nix/daemon-socket/socket");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "the 2.26 nix-daemon did not open its socket within 10 s: {}",
                    self.daemon_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `nsenter` into the client's namespaces, as root, in `/`.
    fn enter(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.init.to_string())
            .args(["--mount", "--pid", "--root", "--wd", "--"]);
        cmd
    }

    /// A directory both sides see at this path, for the test's files (mode 0755; owned
    /// by [`CLIENT_USER`] in a client with a daemon).
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// The path on this host of `path` inside the client (its store is the client's
    /// own, under the test's directory).
    pub fn host_path(&self, path: &str) -> PathBuf {
        match path.strip_prefix("/nix/") {
            Some(rest) => self.dir.path().join("nix").join(rest),
            None => PathBuf::from(path),
        }
    }

    /// `program` run inside as root on the client's store (not through a daemon), in
    /// `cwd`, with [`NIX_CONFIG`] set; arguments and environment added to the command
    /// reach it.
    pub fn command(&self, program: &str, cwd: &Path) -> Command {
        let mut cmd = self.enter();
        cmd.arg("/usr/bin/env")
            .arg("-C")
            .arg(cwd)
            .arg(format!("{}={}", NIX_CONFIG.0, NIX_CONFIG.1))
            .arg(program);
        cmd
    }

    /// `program` run inside as [`CLIENT_USER`] through the client's 2.26 daemon, in
    /// `cwd`, with `HOME` there and [`NIX_CONFIG`] set.
    pub fn user_command(&self, program: &str, cwd: &Path) -> Command {
        assert!(
            self.daemon.is_some(),
            "a user command needs a client with a daemon"
        );
        let mut cmd = self.enter();
        cmd.args(["runuser", "-u", CLIENT_USER, "--", "/usr/bin/env", "-C"])
            .arg(cwd)
            .arg(format!("HOME={}", cwd.display()))
            .arg(format!("USER={CLIENT_USER}"))
            .arg("NIX_REMOTE=daemon")
            .arg(format!("{}={}", NIX_CONFIG.0, NIX_CONFIG.1))
            .arg(program);
        cmd
    }

    /// Gives `path` (inside) and what is under it to [`CLIENT_USER`].
    pub fn give_to_user(&self, path: &Path) {
        run(self.enter().args(["chown", "-R", CLIENT_USER]).arg(path))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// What the daemon wrote to stderr so far.
    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for NewerClient {
    fn drop(&mut self) {
        // unshare's --kill-child ends the namespace's first process, and the kernel
        // every other one in it.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        if let Some(daemon) = &mut self.daemon {
            let _ = daemon.wait();
        }
    }
}

/// The script the holder runs in its new namespaces: the overlay, the mounts, the
/// pivot into the root; then it says `ready` and stays, reaping orphans, as an init.
fn holder_script(root: &Path, d: &Path, offload: &Path, visible: &[PathBuf]) -> String {
    let q = |p: &Path| format!("'{}'", p.display());
    let m = d.join("merged");
    let at = |p: &Path| q(&m.join(p.strip_prefix("/").unwrap_or(p)));
    // The overlay's writable layer is a tmpfs of the namespace's own: it goes with
    // the namespace, and works whatever file system the host's /tmp is (an overlay
    // cannot have its upper layer on another overlay).
    let rw = d.join("rw");
    let mut lines = vec![
        "set -e".to_string(),
        format!("mount -t tmpfs offload-client-rw {}", q(&rw)),
        format!("mkdir {} {}", q(&rw.join("upper")), q(&rw.join("work"))),
        format!(
            "mount -t overlay offload-newer-client -o lowerdir={},upperdir={},workdir={} {}",
            root.display(),
            rw.join("upper").display(),
            rw.join("work").display(),
            q(&m)
        ),
        format!("mount -t proc proc {}", at(Path::new("/proc"))),
        format!("mount --rbind /dev {}", at(Path::new("/dev"))),
        format!(
            "mount --bind {} {}",
            q(&d.join("nix")),
            at(Path::new("/nix"))
        ),
        format!(
            "mount --bind {} {}",
            q(&d.join("etc-nix")),
            at(Path::new("/etc/nix"))
        ),
        format!(
            "mount -t tmpfs -o mode=1777 offload-client-tmp {}",
            at(Path::new("/tmp"))
        ),
    ];
    for dir in visible {
        lines.push(format!("mkdir -p {}", at(dir)));
        lines.push(format!("mount --bind {} {}", q(dir), at(dir)));
    }
    if !offload.as_os_str().is_empty() {
        if let Some(parent) = offload.parent() {
            lines.push(format!("mkdir -p {}", at(parent)));
        }
        lines.push(format!("touch {}", at(offload)));
        lines.push(format!("mount --bind {} {}", q(offload), at(offload)));
    }
    lines.extend([
        format!("cd {}", q(&m)),
        "mkdir -p .offload-old-root".to_string(),
        "pivot_root . .offload-old-root".to_string(),
        "umount -l /.offload-old-root".to_string(),
        "rmdir /.offload-old-root".to_string(),
        "cd /".to_string(),
        "echo ready".to_string(),
        // `wait` collects any child, so processes left to the first one do not stay
        // zombies.
        "exec sh -c 'while :; do sleep 3600 & wait; done' >/dev/null 2>&1".to_string(),
    ]);
    lines.join("\n")
}

/// The one child of `pid` (unshare's forked child, the namespace's first process).
fn first_child(pid: u32) -> Result<u32, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((child, _)) = crate::process_parents()
            .into_iter()
            .find(|(_, parent)| *parent == pid)
        {
            return Ok(child);
        }
        if Instant::now() > deadline {
            return Err(format!("unshare ({pid}) has no child"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
