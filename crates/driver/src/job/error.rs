//! What stops an `offload build`, and whether the user's input or the work is at fault.

use std::path::PathBuf;

use thiserror::Error;

use crate::agent::AgentError;
use crate::fleet::nixconf::NixConfError;
use crate::fleet::FleetError;
use crate::plan::PlanError;
use crate::process::ProcessError;
use crate::trust::signing::SigningError;
use crate::DriverError;

/// Why a build job stopped. [`JobError::is_usage`] tells the user's input or set-up
/// (bad flags, missing tools, refused machines) from work that failed.
#[derive(Debug, Error)]
pub enum JobError {
    /// The state cannot be used as configured.
    #[error(transparent)]
    State(Box<crate::state::StateError>),
    #[error("reading Nix's settings")]
    Settings(#[source] Box<NixConfError>),
    /// The metrics address (`--metrics`) cannot be bound.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::http::MetricsError),
    #[error(transparent)]
    Fleet(Box<FleetError>),
    /// A `--option` value the build settings cannot take.
    #[error("{0}")]
    NixOption(String),
    #[error(
        "--override-input applies to flake installables only, and none of {targets:?} is one\n\n\
         hint: name the flake with `#` or a flake scheme, e.g. `offload build .#pkg` or \
         `path:/dir#pkg`"
    )]
    OverrideWithoutFlake { targets: Vec<String> },
    #[error(
        "{flag} applies to Nix files, not to the flake installables in {targets:?}\n\n\
         hint: name the attribute in the installable instead: `.#ATTR`"
    )]
    FlagForFiles {
        flag: &'static str,
        targets: Vec<String>,
    },
    /// The evaluator (`nix-instantiate`, `nix`) cannot be run.
    #[error(transparent)]
    Evaluator(ProcessError),
    #[error("evaluation failed")]
    Evaluation(#[source] ProcessError),
    /// The evaluation named something that is not a store path.
    #[error("{0}")]
    NotAStorePath(String),
    #[error("reading what `nix build --dry-run --json` printed: {json}")]
    FlakeOutput {
        json: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("nix build reported {drv}: {reason}")]
    FlakeDerivation { drv: String, reason: String },
    #[error(
        "{path} is a store path, not a derivation: there is nothing to build\n\n\
         hint: pass the installable or .drv that produces it"
    )]
    NotADerivation { path: String },
    #[error(transparent)]
    Plan(Box<PlanError>),
    /// `nix-store --realise --dry-run` failed.
    #[error(transparent)]
    DryRun(ProcessError),
    #[error("substituting {paths} paths failed")]
    Substitution {
        paths: usize,
        #[source]
        source: ProcessError,
    },
    #[error(transparent)]
    Signing(Box<SigningError>),
    /// The trust check could not run.
    #[error(transparent)]
    Trust(Box<DriverError>),
    /// `--no-local-fallback`, and builders whose outputs cannot come home: one line each.
    #[error("outputs built on these machines could not enter the local store:\n{refused}")]
    Refused { refused: String },
    #[error(
        "--through-daemon with --on/--exclude tells the nix-daemon's offload hook your hosts \
         through the offload agent: run `offload agent --group GROUP` as root (the daemon's \
         hook finds it at the same socket, OFFLOAD_AGENT_SOCKET) and be in GROUP"
    )]
    NoAgent(#[source] AgentError),
    #[error(transparent)]
    Agent(AgentError),
    #[error("the nix-daemon's build failed")]
    DaemonBuild(#[source] ProcessError),
    /// `--to`: the target cannot be used; said before any build starts.
    #[error(transparent)]
    Target(Box<DriverError>),
    /// The run itself; [`DriverError::Interrupted`] when a signal stopped it.
    #[error(transparent)]
    Build(Box<DriverError>),
    #[error("writing the {what} to {}", path.display())]
    WriteFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Builds failed, or the results could not come back; `details` has a line per
    /// failure with its log's last lines.
    #[error("{failed} of {total} derivations failed:{details}")]
    Failed {
        failed: usize,
        total: usize,
        details: String,
    },
    #[error("repairing the requested derivations' closures failed")]
    Repair(#[source] ProcessError),
    #[error("cannot create the output link {link}")]
    Link {
        link: String,
        #[source]
        source: ProcessError,
    },
}

impl JobError {
    /// The user's input or set-up is wrong, rather than the work failing.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            JobError::Settings(_)
                | JobError::Fleet(_)
                | JobError::NixOption(_)
                | JobError::OverrideWithoutFlake { .. }
                | JobError::FlagForFiles { .. }
                | JobError::Evaluator(_)
                | JobError::NotAStorePath(_)
                | JobError::NotADerivation { .. }
                | JobError::Signing(_)
                | JobError::Trust(_)
                | JobError::Refused { .. }
                | JobError::NoAgent(_)
                | JobError::WriteFile { .. }
                | JobError::Target(_)
                | JobError::Metrics(_)
        )
    }

    /// A signal stopped the run.
    pub fn is_interrupted(&self) -> bool {
        matches!(self, JobError::Build(e) if matches!(**e, DriverError::Interrupted { .. }))
    }

    /// What to do next, for the errors that stand for another error with a hint.
    pub fn hint(&self) -> Option<String> {
        match self {
            JobError::Trust(e) | JobError::Build(e) | JobError::Target(e) => e.hint(),
            JobError::Evaluator(e) | JobError::DryRun(e) => e.hint(),
            _ => None,
        }
    }
}

impl From<FleetError> for JobError {
    fn from(e: FleetError) -> Self {
        JobError::Fleet(Box::new(e))
    }
}

impl From<PlanError> for JobError {
    fn from(e: PlanError) -> Self {
        JobError::Plan(Box::new(e))
    }
}

impl From<SigningError> for JobError {
    fn from(e: SigningError) -> Self {
        JobError::Signing(Box::new(e))
    }
}
