//! `offload hook`: Nix's build hook (the `build-hook` setting) with offload's machine
//! choice and transport, so plain `nix-build`, `nix build`, `nixos-rebuild` and the
//! nix-daemon hand builds to the fleet the way offload would.
//!
//! Nix starts the hook with its verbosity as the one argument and writes, on stdin, its
//! settings and then one `try` per derivation it could hand off; the hook answers each on
//! stderr (docs/nix-protocols.md §9). Per `try` the hook estimates the finish on every
//! machine, this one included (`choice.rs`): it declines when this machine would finish
//! first, postpones when only busy builders could build it, and otherwise accepts with a
//! slot of the chosen builder held in the shared ledger ([`crate::slots`]). An accepted
//! build (`remote.rs`) copies the inputs the builder lacks, builds with the log on fd 4,
//! copies the outputs back into the local store and exits with the status Nix reads.
//! Floating content-addressed outputs (Nix with `ca-derivations`) come back by the paths
//! the builder reports, their realisations registered in the store Nix names
//! (`realise.rs`), as Nix's own hook does.

mod choice;
mod machines;
mod remote;

use std::io::Write;
use std::path::PathBuf;

use offload_nix::hook::{
    log_line, HookReply, HookRequest, LogLevel, RequestDecoder, SettingsDecoder, TryRequest,
};
use offload_nix::serve::BuildSettings;
use offload_nix::store_path::{derivation_name, set_store_dir, StoreDir};
use offload_nix::wire::{tokio_io::read_message, WireError};
use tokio::io::AsyncRead;

use crate::env::HOOK_SLOT_WAIT;
use crate::env::OFFLOAD_HOOK_BUILDERS;
use crate::fleet::learned::ApplyKnowledge;
use crate::fleet::nixconf::NixSettings;
use crate::fleet::{build_fleet, MachineChoice, MachineConfig};
use crate::slots::SlotLedger;
use crate::state::StateDb;
use offload_learn::Knowledge;

pub use choice::{AGENT_OVERHEAD_SECONDS, REMOTE_OVERHEAD_SECONDS};

/// How the hook was started.
#[derive(Debug, Clone)]
pub struct HookOptions {
    /// Machines replacing Nix's `builders` ([`OFFLOAD_HOOK_BUILDERS`]).
    pub builders: Option<String>,
    /// The duration history for estimates; None: the defaults.
    pub history: Option<PathBuf>,
    pub ledger: SlotLedger,
}

/// How the hook ends, as Nix reads its exit status (docs/nix-protocols.md §9.3). Nix's own
/// hook exits 1 whenever an accepted build fails (the builder's status is in its
/// message), so `nix-build` ends with 1 then, as it does here, through the agent or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookExit {
    /// Declined, postponed until Nix stopped asking, or built with the outputs valid here.
    Done,
    /// The build failed, or the hook could not go on (Nix: MiscFailure).
    Failed,
}

impl HookExit {
    pub fn code(self) -> u8 {
        match self {
            HookExit::Done => 0,
            HookExit::Failed => 1,
        }
    }
}

/// The settings Nix hands the hook, as offload uses them.
#[derive(Debug, Clone, Default)]
pub struct HookSettings {
    pub builders: String,
    pub max_jobs: u32,
    pub system: String,
    pub extra_platforms: Vec<String>,
    pub system_features: Vec<String>,
    pub builders_use_substitutes: bool,
    /// Limits sent with every build.
    pub build: BuildSettings,
    /// The store Nix builds into (`store`), unless it is the default local one.
    pub store: Option<String>,
    /// Nix's `experimental-features` (`ca-derivations`: floating content-addressed
    /// derivations may be handed off).
    pub experimental_features: Vec<String>,
}

impl HookSettings {
    /// From Nix's name/value pairs; a value offload cannot read keeps its default.
    pub fn from_pairs(pairs: &[(String, String)]) -> HookSettings {
        let mut s = HookSettings {
            max_jobs: 1,
            ..HookSettings::default()
        };
        let words = |v: &str| v.split_whitespace().map(str::to_string).collect();
        for (name, value) in pairs {
            let number = value.parse::<u64>().ok();
            match name.as_str() {
                "builders" => s.builders = value.clone(),
                "max-jobs" => s.max_jobs = value.parse().unwrap_or(1),
                "system" => s.system = value.clone(),
                "extra-platforms" => s.extra_platforms = words(value),
                "system-features" => s.system_features = words(value),
                "builders-use-substitutes" => s.builders_use_substitutes = value == "true",
                "max-silent-time" => s.build.max_silent_time = number.unwrap_or(0),
                "timeout" => s.build.build_timeout = number.unwrap_or(0),
                "max-build-log-size" => s.build.max_log_size = number.unwrap_or(0),
                "keep-failed" => s.build.keep_failed = value == "true",
                "experimental-features" => s.experimental_features = words(value),
                "store" if !matches!(value.as_str(), "" | "auto" | "local") => {
                    s.store = Some(value.clone());
                }
                _ => {}
            }
        }
        s
    }

    fn nix_settings(&self, builders: String) -> NixSettings {
        NixSettings {
            builders,
            max_jobs: self.max_jobs,
            cores: 0,
            system: self.system.clone(),
            extra_platforms: self.extra_platforms.clone(),
            system_features: self.system_features.clone(),
            builders_use_substitutes: self.builders_use_substitutes,
            substituters: Vec::new(),
        }
    }
}

/// Writes a reply or a message where Nix reads them; a hook whose Nix is gone has
/// nobody to tell.
fn say(to: &mut impl Write, text: &str) {
    let _ = to.write_all(text.as_bytes()).and_then(|()| to.flush());
}

/// A message Nix shows, at `level`; errors and warnings begin as Nix's own do
/// (`error: `, `warning: `).
fn tell(to: &mut impl Write, level: LogLevel, msg: &str) {
    let prefix = match level {
        LogLevel::Error => "error: ",
        LogLevel::Warn => "warning: ",
        _ => "",
    };
    say(to, &log_line(level, &format!("{prefix}{msg}")));
}

/// Speaks the hook protocol on `input` (Nix's requests) and `replies` (the pipe Nix
/// reads, the hook's stderr) until a build ends, Nix stops asking, or no machine could
/// ever take a build.
pub async fn run(
    options: HookOptions,
    mut input: impl AsyncRead + Unpin,
    replies: &mut (impl Write + Send),
) -> HookExit {
    let setup = match set_up(&options, &mut input, replies).await {
        Ok(setup) => setup,
        Err(exit) => return exit,
    };
    loop {
        let request = match read_message(&mut input, RequestDecoder::default()).await {
            Ok(HookRequest::Try(request)) => request,
            Ok(HookRequest::Other(_)) | Err(WireError::Eof { .. }) => return HookExit::Done,
            Err(e) => {
                tell(
                    replies,
                    LogLevel::Error,
                    &format!("offload hook: bad request from Nix: {e}"),
                );
                return HookExit::Failed;
            }
        };
        if let Some(exit) = answer(&setup, &options, &request, &mut input, replies).await {
            return exit;
        }
    }
}

/// What the hook knows before Nix's first request: Nix's settings, the machines, and
/// what earlier builds taught of them.
struct Setup {
    settings: HookSettings,
    choice: MachineChoice,
    nix_settings: NixSettings,
    history: Option<StateDb>,
    knowledge: Knowledge,
    fleet: Vec<MachineConfig>,
    /// What an accepted build costs besides the build: less when the agent is up.
    overhead: f64,
    agent_up: bool,
}

/// Reads the settings Nix sends first and builds the fleet; the exit status instead
/// when no build can be handed off (told to Nix).
async fn set_up(
    options: &HookOptions,
    input: &mut (impl AsyncRead + Unpin),
    replies: &mut impl Write,
) -> Result<Setup, HookExit> {
    let pairs = match read_message(input, SettingsDecoder::default()).await {
        Ok(pairs) => pairs,
        Err(e) => {
            tell(replies, LogLevel::Error, &format!("offload hook: cannot read the settings Nix sends first: {e}; run it only as Nix's build-hook"));
            return Err(HookExit::Failed);
        }
    };
    let settings = HookSettings::from_pairs(&pairs);
    if let Err(why) = use_store_dir(settings.store.as_deref()) {
        tell(replies, LogLevel::Error, &format!("offload hook: {why}"));
        say(replies, &HookReply::DeclinePermanently.encode());
        return Err(HookExit::Done);
    }
    let written = options
        .builders
        .clone()
        .unwrap_or_else(|| settings.builders.clone());
    // A machine offload cannot use is skipped, as Nix's hook skips one it cannot reach.
    let (builders, skipped) = machines::usable(&written, &settings.system);
    for why in skipped {
        tell(replies, LogLevel::Warn, &format!("offload hook: {why}"));
    }
    let choice = MachineChoice {
        builders: Some(builders.clone()),
        max_jobs: Some(settings.max_jobs),
        ..MachineChoice::default()
    };
    let nix_settings = settings.nix_settings(builders);
    let history = options.history.as_deref().and_then(|path| {
        StateDb::open(path)
            .map_err(|e| tracing::debug!("estimates are the defaults: {e}"))
            .ok()
    });
    // What earlier builds taught: durations, and each machine's speed per system.
    let knowledge = history
        .as_ref()
        .and_then(|h| h.knowledge(&nix_settings.system).ok())
        .unwrap_or_default();
    let fleet = match build_fleet(&choice, &nix_settings) {
        Ok(mut fleet) => {
            knowledge.apply(&mut fleet);
            fleet
        }
        Err(e) => {
            let mut msg = format!("offload hook: no builds are handed off: {e}");
            if let Some(source) = std::error::Error::source(&e) {
                msg.push_str(&format!(": {source}"));
            }
            msg.push_str(&format!(
                "; fix the `builders` setting (or {OFFLOAD_HOOK_BUILDERS})"
            ));
            tell(replies, LogLevel::Error, &msg);
            say(replies, &HookReply::DeclinePermanently.encode());
            return Err(HookExit::Done);
        }
    };
    if fleet.len() == 1 {
        say(replies, &HookReply::DeclinePermanently.encode());
        return Err(HookExit::Done);
    }
    // With the agent, an accepted build costs no handshake: builders are worth more.
    let agent_up = crate::agent::AgentClient::connect(&crate::env::agent_socket())
        .await
        .is_ok();
    let overhead = if agent_up {
        AGENT_OVERHEAD_SECONDS
    } else {
        REMOTE_OVERHEAD_SECONDS
    };
    Ok(Setup {
        settings,
        choice,
        nix_settings,
        history,
        knowledge,
        fleet,
        overhead,
        agent_up,
    })
}

/// Makes the store directory Nix builds in this process's, before any path is read: the
/// `?store=` of the store Nix names (`store`), else the one Nix's environment gives
/// (`NIX_STORE_DIR`, as Nix reads it), as Nix's hook opens that store.
fn use_store_dir(store: Option<&str>) -> Result<(), String> {
    let named = store
        .and_then(|uri| offload_nix::store_uri::StoreUri::parse(uri).ok())
        .and_then(|uri| uri.param("store").map(str::to_string));
    let dir = match named {
        Some(dir) => StoreDir::new(&dir, "the `store` setting's `?store=`"),
        None => StoreDir::from_env(),
    };
    dir.and_then(set_store_dir).map_err(|e| {
        format!("{e}; no builds are handed off (fix NIX_STORE_DIR or the `store` setting)")
    })
}

/// Answers one `try`: declines or postpones it (None: Nix asks again or builds it
/// itself), or accepts it and carries the build out (the exit status).
async fn answer(
    setup: &Setup,
    options: &HookOptions,
    request: &TryRequest,
    input: &mut (impl AsyncRead + Unpin),
    replies: &mut (impl Write + Send),
) -> Option<HookExit> {
    let name = derivation_name(&request.drv_path);
    let estimate = setup.knowledge.estimate(name).0;
    let narrowed = narrowed_fleet(setup, &request.drv_path, replies).await;
    let fleet = narrowed.as_ref().unwrap_or(&setup.fleet);
    // Machines that could not be reached for this request: the choice is made again
    // without them, so a builder that is down means a local build, not a failure.
    let mut down: Vec<usize> = Vec::new();
    loop {
        let current = without(fleet, &down);
        let chosen =
            choose_waiting(&current, &options.ledger, request, estimate, setup.overhead).await;
        let (verdict, slot) = match chosen {
            Ok(chosen) => chosen,
            Err(e) => {
                let why = e.with_hint();
                let msg = format!("offload hook: {why}; {} is built here", request.drv_path);
                tell(replies, LogLevel::Warn, &msg);
                say(replies, &HookReply::Decline.encode());
                return None;
            }
        };
        let machine = match verdict {
            choice::Verdict::Decline => {
                say(replies, &HookReply::Decline.encode());
                return None;
            }
            choice::Verdict::Postpone => {
                say(replies, &HookReply::Postpone.encode());
                return None;
            }
            choice::Verdict::Accept(machine) => machine,
        };
        // Read as Nix's hook reads it, before the accept: what offload cannot build
        // remotely is declined, not accepted and then failed.
        if let Some((level, why)) = unbuildable_remotely(setup, request).await {
            drop(slot);
            let msg = format!(
                "offload hook: {why}; {} is not handed off",
                request.drv_path
            );
            tell(replies, level, &msg);
            say(replies, &HookReply::Decline.encode());
            return None;
        }
        let config = &current[machine];
        let msg = format!("connecting to '{}'...", config.endpoint.name);
        tell(replies, LogLevel::Talkative, &msg);
        // The session opens (here, or warm in the agent) before Nix is told: a machine
        // that cannot be reached is passed over, as Nix's own hook does.
        let session = match reach(&config.endpoint, setup.agent_up).await {
            Ok(session) => session,
            Err(why) => {
                let msg = format!("offload hook: cannot use {}: {why}", config.spec.name);
                tell(replies, LogLevel::Warn, &msg);
                drop(slot);
                down.push(machine);
                continue;
            }
        };
        say(
            replies,
            &HookReply::Accept {
                store_uri: config.endpoint.name.clone(),
            }
            .encode(),
        );
        let job = remote::Job {
            request,
            machine: config,
            settings: &setup.settings,
            history: setup.history.as_ref(),
            ledger: &options.ledger,
        };
        let exit = remote::build(job, session, input, replies).await;
        drop(slot);
        return Some(exit);
    }
}

/// Why the derivation of `request` is not for a builder (and how loud to say it): it
/// cannot be read through the store Nix names, or offload cannot build it remotely.
async fn unbuildable_remotely(setup: &Setup, request: &TryRequest) -> Option<(LogLevel, String)> {
    match crate::drv::read(setup.settings.store.as_deref(), &request.drv_path).await {
        Ok(drv) => {
            let features = &setup.settings.experimental_features;
            crate::drv::cannot_build_remotely(&request.drv_path, &drv, features)
                .map(|why| (LogLevel::Talkative, why))
        }
        Err(e) => {
            let e = crate::order::OrderError::from(e);
            Some((LogLevel::Warn, crate::order::OrderFailure::from(&e).message))
        }
    }
}

/// The machines a user chose for `drv` through the agent (`offload build
/// --through-daemon --on …`); None: any builder may take it.
async fn narrowed_fleet(
    setup: &Setup,
    drv: &str,
    replies: &mut impl Write,
) -> Option<Vec<MachineConfig>> {
    let hosts = chosen_hosts(drv).await?;
    let narrowed = MachineChoice {
        on: hosts.on,
        exclude: hosts.exclude,
        ..setup.choice.clone()
    };
    match build_fleet(&narrowed, &setup.nix_settings) {
        Ok(mut fleet) => {
            setup.knowledge.apply(&mut fleet);
            Some(fleet)
        }
        Err(e) => {
            tell(
                replies,
                LogLevel::Warn,
                &format!(
                    "offload hook: the hosts chosen for {drv} do not fit the builders: \
                     {e}; any builder may take it"
                ),
            );
            None
        }
    }
}

/// A session with the machine: opened here without the agent; with it, readied in the
/// agent (None here). The error says why the machine cannot be used, with the fix.
async fn reach(
    endpoint: &crate::ssh::Endpoint,
    agent_up: bool,
) -> Result<Option<crate::session::ServeConn>, String> {
    if agent_up {
        let client = crate::agent::AgentClient::connect(&crate::env::agent_socket())
            .await
            .map_err(|e| e.to_string())?;
        return match client.warm(endpoint).await {
            Ok(Ok(())) => Ok(None),
            Ok(Err(failure)) => Err(failure.message),
            Err(e) => Err(e.to_string()),
        };
    }
    crate::session::ServeConn::open(endpoint)
        .await
        .map(Some)
        .map_err(|e| e.with_hint())
}

/// The fleet with the machines in `down` given no slots (indices stay the same).
fn without(
    fleet: &[crate::fleet::MachineConfig],
    down: &[usize],
) -> Vec<crate::fleet::MachineConfig> {
    fleet
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut spec = m.spec.clone();
            if down.contains(&i) {
                spec.slots = 0;
            }
            crate::fleet::MachineConfig {
                endpoint: m.endpoint.clone(),
                spec,
                cores: m.cores,
            }
        })
        .collect()
}

/// The hosts a user chose for `drv` through the agent, when an agent runs.
async fn chosen_hosts(drv: &str) -> Option<crate::agent::HostChoice> {
    let client = crate::agent::AgentClient::connect(&crate::env::agent_socket())
        .await
        .ok()?;
    client
        .ask(drv)
        .await
        .map_err(|e| tracing::debug!("asking the agent for chosen hosts: {e}"))
        .ok()
        .flatten()
}

/// The choice, tried again for up to [`HOOK_SLOT_WAIT`] while only busy builders could take
/// the build.
async fn choose_waiting(
    fleet: &[crate::fleet::MachineConfig],
    ledger: &SlotLedger,
    request: &offload_nix::hook::TryRequest,
    estimate: f64,
    overhead: f64,
) -> Result<(choice::Verdict, Option<crate::slots::SlotLock>), crate::error::DriverError> {
    let deadline = std::time::Instant::now() + HOOK_SLOT_WAIT;
    loop {
        let chosen = choice::choose(fleet, ledger, request, estimate, overhead)?;
        if chosen.0 != choice::Verdict::Postpone || std::time::Instant::now() >= deadline {
            return Ok(chosen);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_settings_nix_hands_over() {
        let pairs: Vec<(String, String)> = [
            ("builders", "@/etc/nix/machines"),
            ("max-jobs", "4"),
            ("system-features", "kvm big-parallel"),
            ("timeout", "60"),
            ("store", "auto"),
            ("experimental-features", "nix-command ca-derivations"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        let s = HookSettings::from_pairs(&pairs);
        assert_eq!(s.builders, "@/etc/nix/machines");
        assert_eq!(s.max_jobs, 4);
        assert_eq!(s.system_features, ["kvm", "big-parallel"]);
        assert_eq!(s.build.build_timeout, 60);
        assert_eq!(s.store, None);
        assert_eq!(s.experimental_features, ["nix-command", "ca-derivations"]);
    }
}
