//! Errors of the driver: each names the machine, the operation and, where one exists,
//! the next step for the user ([`DriverError::hint`]).

use std::io;

use offload_nix::nar::NarError;
use offload_nix::wire::WireError;
use thiserror::Error;

/// Something went wrong talking to a machine's Nix store.
#[derive(Debug, Error)]
pub enum DriverError {
    #[error("cannot start `{program}` for {machine}")]
    Spawn {
        machine: String,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("ssh to {machine} was refused: authentication failed\n{stderr}")]
    SshAuth { machine: String, stderr: String },
    #[error("ssh to {machine} failed: the host key is unknown or does not match\n{stderr}")]
    SshHostKey { machine: String, stderr: String },
    #[error("ssh to {machine} failed: connection refused or host unreachable\n{stderr}")]
    SshUnreachable { machine: String, stderr: String },
    #[error(
        "ssh to {machine} gave up: the host stopped answering (no reply to keepalives)\n{stderr}"
    )]
    SshStalled { machine: String, stderr: String },
    #[error("ssh to {machine} failed (exit status 255)\n{stderr}")]
    Ssh { machine: String, stderr: String },
    #[error(
        "{machine} printed text before the Nix serve protocol started: {got:?} \
         (serialised integer {word:#x} is too big for the handshake)"
    )]
    NotServeProtocol {
        machine: String,
        got: String,
        word: u64,
    },
    #[error(
        "{machine} answers only the daemon protocol (a forced `nix-daemon --stdio`?): \
         write it as {fix}"
    )]
    DaemonOnly { machine: String, fix: String },
    #[error("{machine}: {op} failed there: {message}")]
    DaemonRefused {
        machine: String,
        op: &'static str,
        message: String,
    },
    #[error("{machine}: {op} is not offered over the daemon protocol, which its sessions speak")]
    NotOverDaemon { machine: String, op: &'static str },
    #[error("{machine} speaks serve protocol version {version:#x}; offload needs 2.4 or later")]
    IncompatibleVersion { machine: String, version: u64 },
    #[error("{machine}: `{command}` ended during {op} ({status}){stderr}")]
    Exited {
        machine: String,
        command: String,
        op: &'static str,
        status: String,
        /// The last lines of its stderr, prefixed by a newline, or empty.
        stderr: String,
    },
    #[error("{machine}: malformed reply during {op}")]
    Protocol {
        machine: String,
        op: &'static str,
        #[source]
        source: WireError,
    },
    #[error("{machine}: bad NAR during {op} of {path}")]
    Nar {
        machine: String,
        op: &'static str,
        path: String,
        #[source]
        source: NarError,
    },
    #[error("{machine}: I/O error during {op}")]
    Io {
        machine: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{machine}: {op} timed out after {secs} s")]
    Timeout {
        machine: String,
        op: &'static str,
        secs: u64,
    },
    #[error(
        "{machine}: NAR of {path} does not match its recorded {what} \
         (recorded {expected}, received {got})"
    )]
    NarMismatch {
        machine: String,
        path: String,
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("{machine}: {path} is not valid there")]
    NotValid { machine: String, path: String },
    #[error("{machine}: {op} was refused (reply {reply})")]
    Refused {
        machine: String,
        op: &'static str,
        reply: u64,
    },
    #[error(
        "{machine}: inputs went from its store {attempts} times before a build there could \
         hold them (its garbage collector?)"
    )]
    InputsCollected { machine: String, attempts: usize },
    #[error(
        "{machine}: its store has {} free, less than the {} of inputs a build there needs \
         beside its min-free of {}",
        crate::reporter::human_bytes(*free),
        crate::reporter::human_bytes(*needed),
        crate::reporter::human_bytes(*min_free)
    )]
    NoRoom {
        machine: String,
        free: u64,
        needed: u64,
        min_free: u64,
    },
    #[error(
        "{machine} keeps its store in {theirs}, not in this machine's store directory \
         {ours}: it refuses this machine's paths ({said})"
    )]
    OtherStoreDir {
        machine: String,
        ours: String,
        /// Its store directory, or "another directory" when it could not be asked.
        theirs: String,
        said: String,
    },
    #[error("interrupted: {stopped} running builds were stopped")]
    Interrupted { stopped: usize },
    #[error("a store path offload made is not valid")]
    StorePath(#[from] offload_nix::store_path::StorePathError),
    #[error("{uri:?} is not a store offload can reach: {reason}")]
    BadStoreUri { uri: String, reason: String },
    /// `--to`: the target could not be opened, or refused what was sent.
    #[error("cannot deliver to {target}: {reason}")]
    Delivery { target: String, reason: String },
    #[error("{machine}: {op} {path}")]
    SlotLock {
        machine: String,
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{machine}: all {slots} of its build slots stayed taken by other processes for {secs} s \
         (lock files {dir}/…)"
    )]
    SlotsBusy {
        machine: String,
        slots: u32,
        dir: String,
        secs: u64,
    },
}

impl DriverError {
    /// The machine the error is about.
    /// Whether it failed for its connection (a link cut, a session or host that went
    /// away, a timeout), which another attempt may not meet; not for what a retry would
    /// only repeat (a NAR that does not match, a path no machine has, a refusal).
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            DriverError::Exited { .. }
                | DriverError::Ssh { .. }
                | DriverError::SshUnreachable { .. }
                | DriverError::SshStalled { .. }
                | DriverError::Io { .. }
                | DriverError::Timeout { .. }
        )
    }

    pub fn machine(&self) -> &str {
        match self {
            DriverError::Spawn { machine, .. }
            | DriverError::SshAuth { machine, .. }
            | DriverError::SshHostKey { machine, .. }
            | DriverError::SshUnreachable { machine, .. }
            | DriverError::SshStalled { machine, .. }
            | DriverError::Ssh { machine, .. }
            | DriverError::NotServeProtocol { machine, .. }
            | DriverError::IncompatibleVersion { machine, .. }
            | DriverError::DaemonOnly { machine, .. }
            | DriverError::DaemonRefused { machine, .. }
            | DriverError::NotOverDaemon { machine, .. }
            | DriverError::Exited { machine, .. }
            | DriverError::Protocol { machine, .. }
            | DriverError::Nar { machine, .. }
            | DriverError::Io { machine, .. }
            | DriverError::Timeout { machine, .. }
            | DriverError::NarMismatch { machine, .. }
            | DriverError::NotValid { machine, .. }
            | DriverError::Refused { machine, .. }
            | DriverError::SlotLock { machine, .. }
            | DriverError::SlotsBusy { machine, .. }
            | DriverError::InputsCollected { machine, .. }
            | DriverError::NoRoom { machine, .. }
            | DriverError::OtherStoreDir { machine, .. } => machine,
            DriverError::BadStoreUri { uri, .. } => uri,
            DriverError::Delivery { target, .. } => target,
            DriverError::Interrupted { .. } | DriverError::StorePath(_) => "local",
        }
    }

    /// The error as one line of text with the next step, when there is one: for
    /// messages that travel as text (a build's failure, Nix's build log).
    pub fn with_hint(&self) -> String {
        match self.hint() {
            Some(hint) => format!("{self} (hint: {hint})"),
            None => self.to_string(),
        }
    }

    /// What the user can do about it, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            DriverError::Spawn { program, .. } => format!(
                "install `{program}` or put it on PATH (Nix comes with `apt-get install nix-bin`)"
            ),
            DriverError::SshAuth { machine, .. } => format!(
                "check that `ssh {}` logs in without a password: give the key in the machines \
                 file (field 3) or the URI (`?ssh-key=PATH`), or load it into ssh-agent",
                ssh_host(machine)
            ),
            DriverError::SshHostKey { machine, .. } => format!(
                "add the host's key to known_hosts (`ssh {}` once, after checking its \
                 fingerprint) or put its base64 public key in field 8 of the machines file; \
                 offload never turns host-key checking off",
                ssh_host(machine)
            ),
            DriverError::SshUnreachable { machine, .. } => format!(
                "check that sshd runs on {} and that its address and port (ssh config) are right",
                ssh_host(machine)
            ),
            DriverError::SshStalled { machine, .. } => format!(
                "check that {} is up and its link carries traffic; `--stall-timeout S` sets \
                 how long a silent host is waited for",
                ssh_host(machine)
            ),
            DriverError::NotServeProtocol { .. } => "the remote shell prints to stdout for \
                 non-interactive logins (a `.bashrc` banner, `echo` in a profile): make those \
                 lines print only when the shell is interactive (`[[ $- == *i* ]]`) or to stderr"
                .to_string(),
            DriverError::Exited {
                machine, stderr, ..
            } if stderr.contains("lacks a signature by a trusted key") => format!(
                "the nix-daemon on {machine} does not trust the user offload runs Nix as there, \
                 so it refuses unsigned inputs: add that user to `trusted-users` in \
                 /etc/nix/nix.conf on {} and restart its nix-daemon",
                ssh_host(machine)
            ),
            DriverError::Exited {
                stderr, command, ..
            } if stderr.contains("not found") => {
                // The program that was missing: `nix-store` for the serve protocol, the
                // daemon program for an ssh-ng host that speaks only the daemon's.
                let daemon = command.contains("--stdio");
                let program = if daemon { "nix-daemon" } else { "nix-store" };
                format!(
                    "the machine has no `{program}` on the PATH of non-interactive ssh sessions: \
                     install Nix there or set `?remote-program=/path/to/{program}` in the store URI"
                )
            }
            DriverError::DaemonOnly { fix, .. } => format!(
                "its `authorized_keys` runs the daemon whatever offload asks for; in the \
                 machines file or --builders, write {fix} (offload then speaks the daemon's \
                 protocol there)"
            ),
            DriverError::IncompatibleVersion { .. } => {
                "upgrade Nix on that machine to 2.3 or later".to_string()
            }
            DriverError::NarMismatch { machine, path, .. } => format!(
                "the store on {machine} may be corrupt: run `nix-store --verify-path {path}` there"
            ),
            DriverError::BadStoreUri { .. } => "use `ssh://[user@]host[?remote-store=DIR]`, \
                 `local`, `daemon`, `auto` or an absolute path to a chroot store"
                .to_string(),
            DriverError::Delivery { target, .. } => format!(
                "check that this machine opens it: `nix-store --store '{target}' \
                 --check-validity --print-invalid {}/00000000000000000000000000000000-x` \
                 (ssh config, keys, a cache directory that can be written); --to takes any store \
                 `nix copy --to` takes",
                offload_nix::store_path::store_dir()
            ),
            DriverError::SlotLock { .. } => format!(
                "the slot lock directory must be writable by every user that builds (Nix \
                 creates it mode 0777); set {} to another directory to keep offload's own",
                crate::env::OFFLOAD_SLOTS_DIR
            ),
            DriverError::NoRoom { machine, .. } => format!(
                "free space on {} (`nix-collect-garbage` there, or a larger disk) or lower its \
                 `min-free`; offload leaves it out until then",
                ssh_host(machine)
            ),
            DriverError::InputsCollected { machine, .. } => format!(
                "something collects garbage on {} all the time (a `min-free` close to its free \
                 space?): give its store more room",
                ssh_host(machine)
            ),
            DriverError::OtherStoreDir { machine, ours, .. } => format!(
                "a store path names its store directory, so a builder must keep the same one \
                 (Nix refuses such a builder too): run Nix on {} with NIX_STORE_DIR={ours}, \
                 or leave it out of the builders (Nix's default is {})",
                ssh_host(machine),
                offload_nix::store_path::DEFAULT_STORE_DIR
            ),
            DriverError::SlotsBusy { .. } => "other builds (another offload, or Nix's own \
                 build hook) hold that machine's slots: wait for them, or leave the machine out \
                 with --exclude"
                .to_string(),
            _ => return None,
        })
    }
}

impl DriverError {
    /// The error as what it is when the machine refused a path of this machine's store
    /// directory as not in its store (Nix: "path '…' is not in the Nix store"): its
    /// store directory is another.
    /// `theirs` asks the machine for its own directory (None: it cannot say).
    pub(crate) async fn or_other_store_dir(
        self,
        theirs: impl AsyncFnOnce() -> Option<String>,
    ) -> DriverError {
        let said = match &self {
            DriverError::Exited { stderr, .. } => stderr,
            DriverError::DaemonRefused { message, .. } => message,
            _ => return self,
        };
        let ours = offload_nix::store_path::store_dir();
        let Some(line) = said
            .lines()
            .find(|l| l.contains("is not in the Nix store") && l.contains(&format!("'{ours}/")))
        else {
            return self;
        };
        let said = line.trim().trim_start_matches("error: ").to_string();
        DriverError::OtherStoreDir {
            machine: self.machine().to_string(),
            ours: ours.to_string(),
            theirs: theirs()
                .await
                .unwrap_or_else(|| "another directory".to_string()),
            said,
        }
    }
}

fn ssh_host(machine: &str) -> &str {
    let rest = machine.strip_prefix("ssh://").unwrap_or(machine);
    rest.split(['?', '/']).next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_named_as_the_protocol_needs_it() {
        let missing = |command: &str| DriverError::Exited {
            machine: "ssh://b".into(),
            command: command.into(),
            op: "the handshake",
            status: "exit status: 127".into(),
            stderr: "; its last output:\nsh: 1: nix-daemon: not found".into(),
        };
        let hint = missing("ssh b nix-daemon --stdio").hint().unwrap();
        assert!(hint.contains("no `nix-daemon`"), "{hint}");
        assert!(
            hint.contains("remote-program=/path/to/nix-daemon"),
            "{hint}"
        );
        let hint = missing("ssh b nix-store --serve --write").hint().unwrap();
        assert!(hint.contains("no `nix-store`"), "{hint}");
    }
}
