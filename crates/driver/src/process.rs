//! Running Nix's own tools on this machine (`nix-instantiate`, `nix-store`, `nix`): one
//! way to start a program and collect its output, whose error names the command line,
//! how it ended and the end of what it printed on stderr.

use std::process::{Command, Output};

use thiserror::Error;

use crate::ssh::shell_quote;

/// Lines of a failed command's stderr kept in its error.
const STDERR_TAIL_LINES: usize = 40;

/// A local command could not be run, or failed.
#[derive(Debug, Error)]
pub enum ProcessError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}){stderr}")]
    Failed {
        command: String,
        status: String,
        /// The last lines of its stderr, after a newline; empty when it printed none.
        stderr: String,
    },
}

impl ProcessError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            ProcessError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Some(
                    "install Nix (`apt-get install nix-bin`, or `bash scripts/setup.sh` from \
                     offload's repository) or put its tools on PATH"
                        .to_string(),
                )
            }
            _ => None,
        }
    }
}

/// Runs `cmd` to its end with stdout and stderr captured; a non-zero exit is an error
/// carrying the end of its stderr.
pub fn run(cmd: &mut Command) -> Result<Output, ProcessError> {
    let out = cmd.output().map_err(|source| ProcessError::Spawn {
        command: describe(cmd),
        source,
    })?;
    if out.status.success() {
        return Ok(out);
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n");
    Err(ProcessError::Failed {
        command: describe(cmd),
        status: out.status.to_string(),
        stderr: if tail.is_empty() {
            String::new()
        } else {
            format!(":\n{tail}")
        },
    })
}

/// Runs `cmd` with its stderr shown as it comes (a build's progress), stdout discarded;
/// a non-zero exit is an error naming the command.
pub fn run_showing_progress(cmd: &mut Command) -> Result<(), ProcessError> {
    let status = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .status()
        .map_err(|source| ProcessError::Spawn {
            command: describe(cmd),
            source,
        })?;
    if status.success() {
        return Ok(());
    }
    Err(ProcessError::Failed {
        command: describe(cmd),
        status: status.to_string(),
        stderr: String::new(),
    })
}

/// The command line as a shell would take it.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_command_status_and_stderr() {
        let e = run(Command::new("sh").args(["-c", "echo out; echo oops >&2; exit 3"]))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "`sh -c 'echo out; echo oops >&2; exit 3'` failed (exit status: 3):\noops"
        );
        let out = run(Command::new("sh").args(["-c", "echo fine"])).unwrap();
        assert_eq!(out.stdout, b"fine\n");
    }

    #[test]
    fn a_missing_program_says_how_to_get_it() {
        let e = run(&mut Command::new("/nonexistent/nix-store"))
            .err()
            .unwrap();
        assert!(e
            .to_string()
            .starts_with("cannot run `/nonexistent/nix-store`"));
        assert!(e.hint().unwrap().contains("nix-bin"));
    }
}
