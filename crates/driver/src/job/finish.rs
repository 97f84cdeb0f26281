//! The steps of a build job that hand work to Nix itself: fetching what substituters
//! have, the nix-daemon's build with `--through-daemon`, `--repair`, and the result
//! links; and where build logs go.

use std::path::Path;
use std::process::Command;

use super::{Events, JobError, Outcome};
use crate::agent::{AgentClient, HostChoice};
use crate::build::LogDestination;
use crate::fleet::MachineChoice;
use crate::process;
use crate::trust::LocalAccess;

/// Nix fetches `paths` from its substituters.
pub fn substitute(paths: &[String], events: &dyn Events) -> Result<(), JobError> {
    if paths.is_empty() {
        return Ok(());
    }
    events.fetching(paths.len());
    process::run(Command::new("nix-store").arg("--realise").args(paths)).map_err(|source| {
        JobError::Substitution {
            paths: paths.len(),
            source,
        }
    })?;
    Ok(())
}

/// `--through-daemon`: the nix-daemon builds `roots`, handing derivations to its
/// `offload hook`; the user's choice of hosts reaches the hook through the agent, since
/// the daemon passes an untrusted client's `builders` on to nobody.
pub async fn through_daemon(
    machines: &MachineChoice,
    will_build: &[String],
    roots: &[String],
) -> Result<(), JobError> {
    let socket = crate::env::agent_socket();
    let choice = HostChoice {
        on: machines.on.clone(),
        exclude: machines.exclude.clone(),
    };
    if choice != HostChoice::default() {
        let client = AgentClient::connect(&socket)
            .await
            .map_err(JobError::NoAgent)?;
        client
            .prefer(will_build.to_vec(), choice)
            .await
            .map_err(JobError::Agent)?;
    }
    tokio::task::block_in_place(|| {
        process::run_showing_progress(Command::new("nix-store").arg("--realise").args(roots))
    })
    .map_err(JobError::DaemonBuild)
}

/// `--repair`: Nix repairs the closures of `drvs` in the local store, rebuilding
/// here what it cannot substitute. It runs on this machine because the store it repairs
/// is this one: a path rebuilt elsewhere would not replace the corrupted copy here.
pub fn repair(drvs: &[String]) -> Result<(), JobError> {
    process::run(
        Command::new("nix-store")
            .args(["--realise", "--repair"])
            .args(drvs),
    )
    .map_err(JobError::Repair)?;
    Ok(())
}

/// The result links (GC roots, when `make` is set), as nix-build makes them; the outcome
/// carries the output paths.
pub fn link(make: bool, links: &[(String, String)]) -> Result<Outcome, JobError> {
    for (link, path) in links {
        if make {
            add_root(link, path)?;
        }
    }
    Ok(Outcome::Built {
        outputs: links.iter().map(|(_, p)| p.clone()).collect(),
    })
}

/// `link` → `path`, registered as a GC root the way nix-build does it.
fn add_root(link: &str, path: &str) -> Result<(), JobError> {
    process::run(Command::new("nix-store").args([
        "--add-root",
        link,
        "--indirect",
        "--realise",
        path,
    ]))
    .map_err(|source| JobError::Link {
        link: link.to_string(),
        source,
    })?;
    Ok(())
}

/// CPU seconds this process used (user + system), from /proc; 0 where unavailable.
/// Children (the serve processes, Nix) are not counted.
pub fn own_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // Linux reports these in USER_HZ, 100 on every architecture it supports.
    ticks / 100.0
}

/// Where build logs go: Nix's log directory, where `nix log` finds them, when this user
/// may write there; else, for a user the daemon trusts, the daemon; else offload's own
/// state directory (beside the state database `state`), said once.
pub fn log_destination(access: &LocalAccess, state: &Path, events: &dyn Events) -> LogDestination {
    let nix = Path::new(NIX_LOG_DIR);
    if writable(&nix.join("drvs")) {
        return LogDestination::Dir(nix.to_path_buf());
    }
    if access.trusted {
        return LogDestination::Daemon(crate::env::daemon_socket());
    }
    match state.parent() {
        Some(dir) => {
            let own = dir.join("log");
            events.notice(&format!(
                "note: logs of builds on other machines are kept in {} (only users the \
                 nix-daemon trusts can add logs where `nix log` looks)\n",
                own.display()
            ));
            LogDestination::Dir(own)
        }
        None => LogDestination::Nowhere,
    }
}

/// Nix's log directory on every install.
const NIX_LOG_DIR: &str = "/nix/var/log/nix";

/// Whether this process may create files in `dir` (which need not exist yet).
fn writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".offload-write-probe-{}", std::process::id()));
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}
