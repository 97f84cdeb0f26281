//! Copies that do not pass through this machine: the machine that holds the paths sends
//! them itself, with stock Nix on it (Nix 2.8 and later alike):
//!
//! ```text
//! nix-store --export PATHS | nix-store --store URI --import
//! ```
//!
//! run there over the machine's usual ssh route. `URI` is the destination as Nix on the
//! source machine opens it: another builder by the name this machine uses for it
//! (resolved by the source's own ssh config, keys and known_hosts, or with this
//! machine's ssh agent forwarded when the user asks), or a delivery target (`ssh://`,
//! `ssh-ng://`, a binary cache). The export is in dependency order, and the importing
//! Nix registers each path whole or not at all: a copy that breaks midway leaves
//! nothing half-imported, and what landed stays.
//!
//! A relay through this machine, for a destination the source cannot reach, pipes the
//! source's export over ssh into the same import run here ([`relay_command`]).

use std::process::Stdio;
use std::time::{Duration, Instant};

use offload_nix::store_uri::StoreUri;
use tokio::io::AsyncReadExt;

use crate::ssh::{shell_quote, Endpoint};

/// How long the source's ssh may take to reach the destination before the copy counts
/// as failed (and relays).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a machine keeps its connection to another open after a direct copy, for
/// the next copy between them.
pub const CONNECTION_KEPT: Duration = Duration::from_secs(60);

/// The end of a failed copy's stderr kept in its error.
const STDERR_TAIL: usize = 2000;

/// A path that no store holds: asking whether it is valid opens the store and nothing
/// else.
const PROBE_PATH: &str = "00000000000000000000000000000000-offload-probe";

/// `endpoint` as Nix on another machine opens it: its store URI without what only
/// makes sense here (`ssh-key`, a file on this machine). None for a store this machine
/// reaches as a local process (`localhost`, a chroot store): others cannot by that name.
pub fn uri_from_elsewhere(endpoint: &Endpoint) -> Option<String> {
    if !endpoint.is_ssh() {
        return None;
    }
    let mut uri = StoreUri::parse(&endpoint.name).ok()?;
    if !uri.is_ssh() {
        return None;
    }
    uri.params.remove("ssh-key");
    Some(uri.to_string())
}

/// The `nix-store` words that open `endpoint`'s store there.
fn store_program(endpoint: &Endpoint) -> String {
    let mut words = shell_quote(&endpoint.remote_program);
    if let Some(store) = &endpoint.remote_store {
        words.push_str(" --store ");
        words.push_str(&shell_quote(store));
    }
    words
}

/// The ssh options a Nix started by offload uses to reach a store it copies to: never a
/// prompt, a bounded wait, and one connection shared by the copies to the same host (an
/// ssh handshake per copy would cost more than the copy of a small path). After the
/// user's own `NIX_SSHOPTS`, so that their choices win.
fn copy_sshopts() -> String {
    format!(
        "-oBatchMode=yes -oConnectTimeout={} -oControlMaster=auto \
         -oControlPath=/tmp/offload-ssh-%C -oControlPersist={}",
        CONNECT_TIMEOUT.as_secs(),
        CONNECTION_KEPT.as_secs()
    )
}

/// `NIX_SSHOPTS=…` for a command run on another machine ([`copy_sshopts`]).
fn nix_sshopts() -> String {
    format!(
        "NIX_SSHOPTS=\"${{NIX_SSHOPTS:+$NIX_SSHOPTS }}{}\"",
        copy_sshopts()
    )
}

/// `NIX_SSHOPTS` for a Nix this process starts: the user's own, then what copies add
/// (no prompt, a bounded wait, a connection kept for the next copy).
pub fn local_sshopts() -> String {
    match crate::env::nix_sshopts() {
        Some(user) => format!("{user} {}", copy_sshopts()),
        None => copy_sshopts(),
    }
}

/// The shell command, run on `source`, that sends `paths` (with their references that
/// the destination lacks among them) to the store `to`. It fails unless both the
/// export and the import succeed, saying which did not.
pub fn copy_command(source: &Endpoint, to: &str, paths: &[String]) -> String {
    let quoted: Vec<String> = paths.iter().map(|p| shell_quote(p)).collect();
    let program = shell_quote(&source.remote_program);
    pipe_command(
        &format!("{} --export {}", store_program(source), quoted.join(" ")),
        &format!(
            "{} {program} --store {} --import",
            nix_sshopts(),
            shell_quote(to)
        ),
    )
}

/// `export | import`, whose status is a failure naming the side that failed: a POSIX
/// shell has no `pipefail`, so the export's status comes out on descriptor 3.
fn pipe_command(export: &str, import: &str) -> String {
    format!(
        "e=$( {{ {{ {export}; echo $? >&3; }} | {import} >/dev/null; }} 3>&1 ); i=$?; \
         [ \"$e\" = 0 ] && [ \"$i\" = 0 ] && exit 0; \
         echo \"offload: the export exited with ${{e:-?}}, the import with $i\" >&2; exit 1"
    )
}

/// The shell command, run on `source`, that opens the store `to` the way a copy would,
/// and nothing more.
pub fn probe_command(source: &Endpoint, to: &str, store_dir: &str) -> String {
    format!(
        "{} {} --store {} --check-validity --print-invalid {}",
        nix_sshopts(),
        shell_quote(&source.remote_program),
        shell_quote(to),
        shell_quote(&format!("{store_dir}/{PROBE_PATH}"))
    )
}

/// The local command that relays `paths` from `source` into the store `to` through
/// this machine: the source's export over its ssh route, piped into an import here.
pub fn relay_command(source: &Endpoint, to: &str, paths: &[String]) -> Result<String, String> {
    let quoted: Vec<String> = paths.iter().map(|p| shell_quote(p)).collect();
    let export = format!("{} --export {}", store_program(source), quoted.join(" "));
    let (cmd, _known_hosts) = source.command(&export).map_err(|e| e.to_string())?;
    let mut words = vec![shell_quote(&cmd.get_program().to_string_lossy())];
    words.extend(cmd.get_args().map(|a| shell_quote(&a.to_string_lossy())));
    Ok(pipe_command(
        &words.join(" "),
        &format!(
            "NIX_SSHOPTS={} nix-store --store {} --import",
            shell_quote(&local_sshopts()),
            shell_quote(to)
        ),
    ))
}

/// How a copy ran: its time, or why it failed (the end of its stderr).
#[derive(Debug, Clone, PartialEq)]
pub enum Ran {
    Done { seconds: f64 },
    Failed { reason: String },
}

/// Runs the shell command `script` on `source` (over its shared ssh connection when
/// `control_path` is set; with this machine's ssh agent when `forward_agent` is).
/// Killed when the future is dropped.
pub async fn run_on(source: &Endpoint, script: &str) -> Ran {
    match source.command(script) {
        Ok((cmd, known_hosts)) => run(tokio::process::Command::from(cmd), known_hosts).await,
        Err(e) => Ran::Failed {
            reason: e.to_string(),
        },
    }
}

/// Runs the local shell command `script` (a relay).
pub async fn run_here(script: &str) -> Ran {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(script);
    run(cmd, None).await
}

async fn run(
    mut cmd: tokio::process::Command,
    known_hosts: Option<tempfile::NamedTempFile>,
) -> Ran {
    let _known_hosts = known_hosts;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Ran::Failed {
                reason: format!("cannot start {:?}: {e}", cmd.as_std().get_program()),
            }
        }
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    match child.wait().await {
        Ok(status) if status.success() => Ran::Done {
            seconds: started.elapsed().as_secs_f64(),
        },
        Ok(status) => {
            let text = stderr.trim();
            let start = text.len().saturating_sub(STDERR_TAIL);
            let start = (start..text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(text.len());
            Ran::Failed {
                reason: if text.is_empty() {
                    format!("it exited with {status}")
                } else {
                    text[start..].to_string()
                },
            }
        }
        Err(e) => Ran::Failed {
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_machine_opens_a_builder_by_its_uri_without_local_files() {
        let b = Endpoint::parse("ssh://root@b2?remote-store=/x&ssh-key=/home/me/.ssh/id").unwrap();
        assert_eq!(
            uri_from_elsewhere(&b).as_deref(),
            Some("ssh://root@b2?remote-store=/x")
        );
        let local = Endpoint::parse("ssh://localhost?remote-store=/tmp/m1").unwrap();
        assert_eq!(uri_from_elsewhere(&local), None);
    }

    #[test]
    fn the_copy_command_fails_unless_both_sides_succeed() {
        let ok = pipe_command("printf x", "cat");
        let export_fails = pipe_command("false", "cat");
        let import_fails = pipe_command("printf x", "false");
        let status = |s: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(s)
                .output()
                .unwrap()
        };
        assert!(status(&ok).status.success());
        let e = status(&export_fails);
        assert!(!e.status.success());
        assert!(String::from_utf8_lossy(&e.stderr).contains("export exited with 1"));
        let i = status(&import_fails);
        assert!(!i.status.success());
        assert!(String::from_utf8_lossy(&i.stderr).contains("import with 1"));
    }

    #[test]
    fn paths_and_stores_reach_the_shell_as_words() {
        let a = Endpoint::parse("ssh://a?remote-store=/tmp/a%20b").unwrap();
        let cmd = copy_command(&a, "ssh://b?remote-store=/y", &["/nix/store/x-y z".into()]);
        assert!(
            cmd.contains("--store '/tmp/a b' --export '/nix/store/x-y z'"),
            "{cmd}"
        );
        assert!(
            cmd.contains("--store 'ssh://b?remote-store=/y' --import"),
            "{cmd}"
        );
    }
}
