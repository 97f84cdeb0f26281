//! The machines a run may use, built in one place from Nix's settings and the user's
//! choice of hosts: the local machine (always index [`LOCAL`], with Nix's `max-jobs`,
//! `system`, `extra-platforms` and `system-features`) and the builders of the machines
//! file or `--builders`, narrowed by `--on`, `--exclude` and `--local-only`. Nix's own
//! settings, which it starts from, are read in [`nixconf`].

use std::collections::HashMap;

use offload_nix::machines::{parse_builders, Machine, MachinesError};
use offload_sched::{MachineId, MachineSpec};
use thiserror::Error;

use crate::error::DriverError;
use nixconf::NixSettings;

pub mod learned;
pub mod nixconf;
use crate::ssh::{Endpoint, Route};

/// Index of the local machine in a fleet.
pub const LOCAL: MachineId = 0;
/// What `--on` and `--exclude` call the local machine.
pub const LOCAL_NAME: &str = "local";
pub use offload_learn::{DEFAULT_BANDWIDTH, DEFAULT_LATENCY};

/// A machine the runner may use.
pub struct MachineConfig {
    pub endpoint: Endpoint,
    pub spec: MachineSpec,
    /// Its CPU cores, when known: builds then share them (`NIX_BUILD_CORES`), a lone
    /// build getting all, many builds a fair part each. `None` leaves the machine's own
    /// `cores` setting alone.
    pub cores: Option<u32>,
}

/// Which hosts a run may use, as the user chose them.
#[derive(Debug, Clone, Default)]
pub struct MachineChoice {
    /// Machines in Nix's syntax (`--builders`); `None` takes Nix's `builders` setting.
    pub builders: Option<String>,
    /// Only these machines (store URIs, host names, or `local`); empty: all.
    pub on: Vec<String>,
    /// Not these machines.
    pub exclude: Vec<String>,
    /// No builders at all.
    pub local_only: bool,
    /// Local build slots (`-j`); `None` takes Nix's `max-jobs`.
    pub max_jobs: Option<u32>,
}

/// The fleet cannot be built from the settings and the choice.
#[derive(Debug, Error)]
pub enum FleetError {
    #[error(transparent)]
    Machines(#[from] MachinesError),
    #[error("--on {wanted}: no such machine; the machines are: {known}")]
    UnknownMachine { wanted: String, known: String },
    /// The parser checks every URI, so this is a machine whose URI passed that check
    /// and still cannot be reached; it names the machine's place all the same.
    #[error("{place}: this machine cannot be used")]
    Endpoint {
        place: String,
        #[source]
        source: DriverError,
    },
}

/// The local machine and the chosen builders, in that order.
#[expect(
    clippy::result_large_err,
    reason = "built once per run; the driver's error stays unboxed so that its hint is found"
)]
pub fn build_fleet(
    choice: &MachineChoice,
    settings: &NixSettings,
) -> Result<Vec<MachineConfig>, FleetError> {
    let (spec, origin) = match &choice.builders {
        Some(s) => (s.as_str(), "--builders"),
        None => (settings.builders.as_str(), "builders setting"),
    };
    let mut machines = if choice.local_only {
        Vec::new()
    } else {
        parse_builders(spec, origin, &settings.system)?
    };
    for wanted in &choice.on {
        if wanted != LOCAL_NAME && !machines.iter().any(|m| machine_matches(m, wanted)) {
            let known: Vec<&str> = std::iter::once(LOCAL_NAME)
                .chain(machines.iter().map(|m| m.uri.as_str()))
                .collect();
            return Err(FleetError::UnknownMachine {
                wanted: wanted.clone(),
                known: known.join(", "),
            });
        }
    }
    if !choice.on.is_empty() {
        machines.retain(|m| choice.on.iter().any(|w| machine_matches(m, w)));
    }
    machines.retain(|m| !choice.exclude.iter().any(|w| machine_matches(m, w)));
    let local_excluded = choice.exclude.iter().any(|w| w == LOCAL_NAME)
        || (!choice.on.is_empty() && !choice.on.iter().any(|w| w == LOCAL_NAME));
    let local_slots = if local_excluded {
        0
    } else {
        choice.max_jobs.unwrap_or(settings.max_jobs)
    };
    let mut local = MachineSpec::local(&settings.system, local_slots);
    local.systems = settings.local_systems();
    local.supported_features = settings.system_features.clone();
    let mut fleet = vec![MachineConfig {
        endpoint: Endpoint::local(LOCAL_NAME, None),
        spec: local,
        cores: Some(local_cores(settings)),
    }];
    let names = machine_names(&machines);
    for (m, name) in machines.iter().zip(names) {
        fleet.push(MachineConfig {
            endpoint: endpoint(m).map_err(|source| FleetError::Endpoint {
                place: m.place.clone(),
                source,
            })?,
            spec: remote_spec(m, name, DEFAULT_BANDWIDTH, DEFAULT_LATENCY),
            // A remote's core count is not in the machines file; its own setting stays.
            cores: None,
        });
    }
    Ok(fleet)
}

/// How to reach a machine: its store URI with the machines file's ssh key and host key
/// (which win over the URI's, as in Nix).
fn endpoint(m: &Machine) -> Result<Endpoint, DriverError> {
    if let Ok(check) = m.store_uri().and_then(|u| u.check_serve()) {
        for key in check.ignored {
            tracing::debug!(place = %m.place, machine = %m.uri, "ignoring parameter {key}: offload keeps one session per build slot");
        }
        for key in check.unknown {
            // Nix warns about these too and goes on.
            tracing::warn!(
                "{}: {}: unknown store parameter {key:?}, ignored",
                m.place,
                m.uri
            );
        }
    }
    let mut endpoint = Endpoint::parse(&m.uri)?;
    with_system_features(&mut endpoint, m);
    if let Route::Ssh {
        ssh_key,
        host_public_key,
        ..
    } = &mut endpoint.route
    {
        if let Some(key) = &m.ssh_key {
            *ssh_key = Some(key.into());
        }
        if m.public_host_key.is_some() {
            *host_public_key = m.host_key_line();
        }
    }
    Ok(endpoint)
}

/// A builder that is a store on this machine (a bare store directory, `local?root=…`)
/// is opened, as Nix opens it, with the machines file's features as its
/// `system-features`, unless its URI sets them: a build that requires one of them is
/// then taken there. (An ssh builder's own Nix has its own setting.)
fn with_system_features(endpoint: &mut Endpoint, m: &Machine) {
    let features: Vec<&str> = m
        .supported_features
        .iter()
        .chain(&m.mandatory_features)
        .map(String::as_str)
        .collect();
    if features.is_empty() || !endpoint.is_local_process() {
        return;
    }
    let Ok(mut uri) = m.store_uri() else { return };
    if !matches!(uri.scheme.as_str(), "path" | "local") || uri.param("system-features").is_some() {
        return;
    }
    uri.params
        .insert("system-features".into(), features.join(" "));
    endpoint.remote_store = Some(uri.to_string());
}

/// The planning figures of a builder from its machines-file line.
pub fn remote_spec(m: &Machine, name: String, bandwidth: f64, latency: f64) -> MachineSpec {
    MachineSpec {
        name,
        systems: m.systems.clone(),
        supported_features: m.supported_features.iter().cloned().collect(),
        mandatory_features: m.mandatory_features.iter().cloned().collect(),
        slots: m.max_jobs,
        speed: m.speed_factor,
        system_speeds: Vec::new(),
        is_local: false,
        bandwidth,
        latency,
        per_build: 0.0,
        session_setup: SESSION_SETUP_SECONDS,
        peers: Vec::new(),
    }
}

/// Seconds a remote's first session takes to open, as the planner counts them for the
/// first build there until the run's probe has opened one: an OpenSSH handshake took
/// 0.22–0.39 s on the loopback test fleet, and a first build over a new session ran
/// 0.5–0.7 s longer than later ones.
pub const SESSION_SETUP_SECONDS: f64 = 0.5;

/// What reports call each machine: `host` (for `ssh://` and `ssh-ng://` alike), or
/// `host:STORE` with a remote store; a name that repeats gets `#2`, `#3`, … so that
/// every machine has its own.
pub fn machine_names(machines: &[Machine]) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(machines.len());
    // How many names so far are each base or start with it and `#`.
    let mut taken: HashMap<String, usize> = HashMap::new();
    for m in machines {
        let base = match m.store_uri() {
            Ok(u) if u.is_ssh() => match u.remote_store() {
                Some(store) => format!("{}:{store}", u.authority),
                None => u.authority.clone(),
            },
            _ => m.uri.clone(),
        };
        let repeats = taken.get(&base).copied().unwrap_or(0);
        let name = if repeats == 0 {
            base
        } else {
            format!("{base}#{}", repeats + 1)
        };
        for (at, _) in name.match_indices('#') {
            *taken.entry(name[..at].to_string()).or_default() += 1;
        }
        *taken.entry(name.clone()).or_default() += 1;
        names.push(name);
    }
    names
}

/// Whether the user's word for a machine (`--on`, `--exclude`) names `m`: its URI, its
/// host, or its host without the user.
fn machine_matches(m: &Machine, wanted: &str) -> bool {
    let uri = m.store_uri().ok();
    m.uri == wanted
        || uri
            .as_ref()
            .is_some_and(|u| u.host() == Some(wanted) || u.hostname() == Some(wanted))
}

/// Cores of this machine: Nix's `cores` when set, else all of them.
fn local_cores(settings: &NixSettings) -> u32 {
    if settings.cores > 0 {
        settings.cores
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(builders: &str) -> NixSettings {
        NixSettings {
            builders: builders.into(),
            max_jobs: 4,
            cores: 2,
            system: "x86_64-linux".into(),
            extra_platforms: vec!["i686-linux".into()],
            system_features: vec!["kvm".into()],
            builders_use_substitutes: false,
            substituters: Vec::new(),
        }
    }

    fn names(fleet: &[MachineConfig]) -> Vec<(&str, u32)> {
        fleet
            .iter()
            .map(|m| (m.spec.name.as_str(), m.spec.slots))
            .collect()
    }

    #[test]
    fn local_machine_first_with_nix_settings() {
        let s = settings("ssh://b1 x86_64-linux - 8 2; ssh://root@b2 aarch64-linux");
        let fleet = build_fleet(&MachineChoice::default(), &s).unwrap();
        assert_eq!(names(&fleet), [("local", 4), ("b1", 8), ("root@b2", 1)]);
        assert_eq!(fleet[LOCAL].spec.systems, ["x86_64-linux", "i686-linux"]);
        assert_eq!(fleet[LOCAL].spec.supported_features, ["kvm"]);
        assert_eq!(fleet[LOCAL].cores, Some(2));
        assert_eq!(fleet[1].spec.speed, 2.0);
        assert_eq!(fleet[1].spec.bandwidth, DEFAULT_BANDWIDTH);
    }

    #[test]
    fn on_and_exclude_narrow_the_fleet() {
        let s = settings("ssh://b1; ssh://root@b2; ssh://b3");
        let choice = MachineChoice {
            on: vec!["b1".into(), "b2".into(), "b3".into()],
            exclude: vec!["b3".into()],
            ..MachineChoice::default()
        };
        let fleet = build_fleet(&choice, &s).unwrap();
        // Naming hosts without `local` keeps builds off this machine.
        assert_eq!(names(&fleet), [("local", 0), ("b1", 1), ("root@b2", 1)]);
        let choice = MachineChoice {
            exclude: vec!["local".into()],
            max_jobs: Some(9),
            ..MachineChoice::default()
        };
        assert_eq!(build_fleet(&choice, &s).unwrap()[LOCAL].spec.slots, 0);
        let choice = MachineChoice {
            local_only: true,
            max_jobs: Some(9),
            ..MachineChoice::default()
        };
        assert_eq!(names(&build_fleet(&choice, &s).unwrap()), [("local", 9)]);
    }

    #[test]
    fn an_unknown_host_is_named_with_the_known_ones() {
        let s = settings("ssh://b1");
        let choice = MachineChoice {
            on: vec!["b9".into()],
            ..MachineChoice::default()
        };
        let e = build_fleet(&choice, &s).err().unwrap().to_string();
        assert_eq!(
            e,
            "--on b9: no such machine; the machines are: local, ssh://b1"
        );
    }

    #[test]
    fn ssh_ng_machines_are_named_and_chosen_like_ssh_ones() {
        let s = settings(
            "ssh-ng://root@b1 x86_64-linux - 2; ssh-ng://localhost?remote-store=/tmp/m1; ssh://b1",
        );
        let fleet = build_fleet(&MachineChoice::default(), &s).unwrap();
        assert_eq!(
            names(&fleet),
            [
                ("local", 4),
                ("root@b1", 2),
                ("localhost:/tmp/m1", 1),
                ("b1", 1)
            ]
        );
        assert_eq!(
            fleet[1].endpoint.describe(),
            "ssh root@b1 nix-store --serve --write"
        );
        assert!(fleet[2].endpoint.is_local_process());
        let choice = MachineChoice {
            on: vec!["b1".into()],
            ..MachineChoice::default()
        };
        // `b1` names both the ssh-ng and the ssh machine on host b1.
        let fleet = build_fleet(&choice, &s).unwrap();
        assert_eq!(names(&fleet), [("local", 0), ("root@b1", 2), ("b1", 1)]);
    }

    #[test]
    fn a_bad_uri_is_named_by_its_place_before_any_machine_is_reached() {
        let e = build_fleet(&MachineChoice::default(), &settings("b1\nssh://[bad"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("builders setting:2: field 1 (store URI) is \"ssh://[bad\""),
            "{e}"
        );
    }

    #[test]
    fn names_are_short_and_unique() {
        let s = settings(
            "ssh://localhost?remote-store=/tmp/m1; ssh://localhost?remote-store=/tmp/m2; b1; ssh://b1",
        );
        let fleet = build_fleet(&MachineChoice::default(), &s).unwrap();
        let got: Vec<&str> = fleet.iter().map(|m| m.spec.name.as_str()).collect();
        assert_eq!(
            got,
            [
                "local",
                "localhost:/tmp/m1",
                "localhost:/tmp/m2",
                "b1",
                "b1#2"
            ]
        );
    }
}
