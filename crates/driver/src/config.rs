//! offload's own configuration file: what only offload knows, in an optional TOML file at
//! `$OFFLOAD_CONFIG`, else `$XDG_CONFIG_HOME/offload/config.toml`, else
//! `~/.config/offload/config.toml`. Nothing Nix's own files say is repeated here:
//! machines stay in Nix's `builders` / machines file.
//!
//! ```toml
//! state_dir = "/var/lib/offload"        # history and logs; default ~/.local/state/offload
//! metrics = "127.0.0.1:9464"            # the agent's Prometheus metrics; default none
//! state = "postgresql:///offload?host=/run/postgresql"  # one state for a team (OFFLOAD_STATE)
//!
//! [groups]                              # --on @fast, --exclude @slow
//! fast = ["b1", "b2"]
//!
//! [build]                               # defaults for `offload build`; flags win
//! keep_going = true
//! max_jobs = 4
//! sign_key = "/etc/offload/key.sec"
//! metrics = "127.0.0.1:9465"            # each build's own, while it runs
//! ```
//!
//! Unknown keys are errors that name the key and the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::fleet::MachineChoice;

/// The configuration file cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or a key offload does not know.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: group {group:?} names another group; list its machines instead", path.display())]
    NestedGroup { path: PathBuf, group: String },
    /// `@NAME` names no group; `known` says where groups are (or would be) defined.
    #[error("@{group}: no such machine group{known}")]
    UnknownGroup { group: String, known: String },
    /// The environment names a store directory Nix could not use either.
    #[error("{message}; unset it for Nix's /nix/store, or give the absolute directory Nix keeps its store in")]
    StoreDir { message: String },
}

/// The file, as read.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where offload keeps its state (the build history, logs it keeps itself).
    pub state_dir: Option<PathBuf>,
    /// A PostgreSQL database (libpq-style URI) that holds the state instead of the
    /// SQLite file in `state_dir`, shared by every client that names it.
    pub state: Option<String>,
    /// Named sets of machines, for `--on @NAME` and `--exclude @NAME`.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Defaults for `offload build`.
    #[serde(default)]
    pub build: BuildDefaults,
    /// Where `offload agent` serves Prometheus metrics (`--metrics`); none by default.
    /// Builds have their own (`[build] metrics`): one address cannot serve both.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Defaults for `offload build` flags; a flag given on the command line wins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildDefaults {
    pub keep_going: Option<bool>,
    pub max_jobs: Option<u32>,
    pub sign_key: Option<PathBuf>,
    /// Every copy between machines through this one (`--relay`).
    pub relay: Option<bool>,
    /// Forward the ssh agent to builders for their copies (`--forward-agent`).
    pub forward_agent: Option<bool>,
    pub on: Option<Vec<String>>,
    pub exclude: Option<Vec<String>>,
    /// Where each build serves its Prometheus metrics while it runs (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}

/// The configuration and where it came from.
#[derive(Debug, Default)]
pub struct Loaded {
    pub config: Config,
    /// The file read, if one exists.
    pub file: Option<PathBuf>,
}

/// Where the configuration file is looked for.
pub fn path() -> Option<PathBuf> {
    crate::env::config_path()
}

/// Reads the configuration file; none is fine, a bad one is an error naming it.
pub fn load() -> Result<Loaded, ConfigError> {
    // A store directory the environment names wrongly is said now, rather than taken as
    // /nix/store and met later as paths "not in the store".
    offload_nix::store_path::StoreDir::from_env().map_err(|e| ConfigError::StoreDir {
        message: e.to_string(),
    })?;
    let Some(file) = path() else {
        return Ok(Loaded::default());
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(source) => return Err(ConfigError::Read { path: file, source }),
    };
    let config = parse(&text, &file)?;
    // Every state this process opens is the shared one from here on.
    crate::state::use_shared(config.state.clone());
    Ok(Loaded {
        config,
        file: Some(file),
    })
}

fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: file.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })?;
    if let Some(uri) = &config.state {
        if !(uri.starts_with("postgresql://") || uri.starts_with("postgres://")) {
            return Err(ConfigError::Parse {
                path: file.to_path_buf(),
                message: format!(
                    "state = {uri:?}: give a PostgreSQL URI \
                     (postgresql:///offload?host=/run/postgresql&user=offload), or leave \
                     `state` out for the SQLite file in state_dir"
                ),
            });
        }
    }
    for (name, members) in &config.groups {
        if members.iter().any(|m| m.starts_with('@')) {
            return Err(ConfigError::NestedGroup {
                path: file.to_path_buf(),
                group: name.clone(),
            });
        }
    }
    Ok(config)
}

impl Loaded {
    /// The machines `offload build` chooses: the file's defaults where no flag chose,
    /// then groups expanded.
    pub fn build_machines(&self, mut choice: MachineChoice) -> Result<MachineChoice, ConfigError> {
        let defaults = &self.config.build;
        if choice.max_jobs.is_none() {
            choice.max_jobs = defaults.max_jobs;
        }
        if choice.on.is_empty() {
            choice.on = defaults.on.clone().unwrap_or_default();
        }
        if choice.exclude.is_empty() {
            choice.exclude = defaults.exclude.clone().unwrap_or_default();
        }
        self.machines(choice)
    }

    /// `choice` with `@NAME` in `--on` and `--exclude` replaced by the group's machines.
    pub fn machines(&self, mut choice: MachineChoice) -> Result<MachineChoice, ConfigError> {
        for list in [&mut choice.on, &mut choice.exclude] {
            let mut expanded = Vec::new();
            for word in list.drain(..) {
                match word.strip_prefix('@') {
                    Some(name) => match self.config.groups.get(name) {
                        Some(members) => expanded.extend(members.iter().cloned()),
                        None => return Err(self.unknown_group(name)),
                    },
                    None => expanded.push(word),
                }
            }
            *list = expanded;
        }
        Ok(choice)
    }

    fn unknown_group(&self, name: &str) -> ConfigError {
        let known = match &self.file {
            Some(f) => format!(
                " in {} (groups there: {})",
                f.display(),
                self.config
                    .groups
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!(
                "; define it under [groups] in {}",
                path().map_or("the config file".into(), |p| p.display().to_string())
            ),
        };
        ConfigError::UnknownGroup {
            group: name.to_string(),
            known,
        }
    }

    /// The state database: `flag` (`--history`), else `$OFFLOAD_HISTORY`, else
    /// `history.sqlite` in the file's state directory, else the default.
    pub fn state_db(&self, flag: Option<PathBuf>) -> PathBuf {
        flag.or_else(|| {
            (!crate::env::state_db_overridden())
                .then(|| self.state_dir().map(|d| d.join("history.sqlite")))
                .flatten()
        })
        .unwrap_or_else(crate::env::state_db_path)
    }

    /// The state directory the file sets.
    pub fn state_dir(&self) -> Option<PathBuf> {
        self.config.state_dir.clone()
    }

    /// Every setting with its value and where it came from, for `offload config`.
    pub fn describe(&self) -> String {
        let from_file = match &self.file {
            Some(f) => format!("({})", f.display()),
            None => "(default)".to_string(),
        };
        let mut out = match (&self.file, path()) {
            (Some(f), _) => format!("config file: {}\n", f.display()),
            (None, Some(p)) => format!("config file: {} (not present)\n", p.display()),
            (None, None) => "config file: none (no HOME or XDG_CONFIG_HOME)\n".to_string(),
        };
        let history = match crate::env::state_db_from_env() {
            Some(h) => format!("{} (OFFLOAD_HISTORY)", h.display()),
            None => match self.state_dir() {
                Some(d) => format!("{} (state_dir)", d.join("history.sqlite").display()),
                None => format!("{} (default)", crate::env::state_db_path().display()),
            },
        };
        let state_dir = match self.state_dir() {
            Some(d) => format!("{} {from_file}", d.display()),
            None => "~/.local/state/offload (default)".to_string(),
        };
        out.push_str(&format!("state_dir = {state_dir}\nhistory = {history}\n"));
        let metrics = self.config.metrics.map(|a| a.to_string());
        out.push_str(&format!(
            "metrics = {}\n",
            show_from(metrics, "none", &from_file)
        ));
        let shared = match (crate::env::state_uri_from_env(), &self.config.state) {
            (Some(uri), _) => format!("{} (OFFLOAD_STATE)", crate::state::redact(&uri)),
            (None, Some(uri)) => format!("{} {from_file}", crate::state::redact(uri)),
            (None, None) => "the history file (default)".to_string(),
        };
        out.push_str(&format!("state = {shared}\n"));
        for (name, members) in &self.config.groups {
            out.push_str(&format!(
                "groups.{name} = {} {from_file}\n",
                members.join(", ")
            ));
        }
        let b = &self.config.build;
        let show = |v: Option<String>, default: &str| show_from(v, default, &from_file);
        out.push_str(&format!(
            "build.keep_going = {}\n",
            show(b.keep_going.map(|v| v.to_string()), "false")
        ));
        out.push_str(&format!(
            "build.max_jobs = {}\n",
            show(b.max_jobs.map(|v| v.to_string()), "Nix's max-jobs")
        ));
        let sign_key = match crate::env::sign_key_from_env() {
            Some(k) => format!("{} (OFFLOAD_SIGN_KEY)", k.display()),
            None => show(b.sign_key.as_ref().map(|p| p.display().to_string()), "none"),
        };
        out.push_str(&format!("build.sign_key = {sign_key}\n"));
        out.push_str(&format!(
            "build.on = {}\n",
            show(b.on.as_ref().map(|v| v.join(", ")), "all machines")
        ));
        out.push_str(&format!(
            "build.exclude = {}\n",
            show(b.exclude.as_ref().map(|v| v.join(", ")), "none")
        ));
        let metrics = b.metrics.map(|a| a.to_string());
        out.push_str(&format!("build.metrics = {}\n", show(metrics, "none")));
        out
    }
}

/// A setting's value with where it came from: the file, or the default.
fn show_from(v: Option<String>, default: &str, from_file: &str) -> String {
    match v {
        Some(v) => format!("{v} {from_file}"),
        None => format!("{default} (default)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        let e = parse("[build]\nkeep_goin = true\n", Path::new("/etc/o.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/o.toml: "), "{e}");
        assert!(e.contains("unknown field `keep_goin`"), "{e}");
        let e = parse("colour = 1\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn groups_expand_and_an_unknown_group_is_named() {
        let config = parse("[groups]\nfast = [\"b1\", \"b2\"]\n", Path::new("c.toml")).unwrap();
        let loaded = Loaded {
            config,
            file: Some("c.toml".into()),
        };
        let mut machines = MachineChoice {
            on: vec!["@fast".into(), "b9".into()],
            exclude: vec!["@fast".into()],
            ..MachineChoice::default()
        };
        machines = loaded.machines(machines).unwrap();
        assert_eq!(machines.on, ["b1", "b2", "b9"]);
        assert_eq!(machines.exclude, ["b1", "b2"]);
        machines.on = vec!["@slow".into()];
        let e = loaded.machines(machines).unwrap_err().to_string();
        assert_eq!(
            e,
            "@slow: no such machine group in c.toml (groups there: fast)"
        );
    }

    #[test]
    fn build_defaults_fill_what_no_flag_chose_and_groups_expand() {
        let text = "[groups]\nfast = [\"b1\", \"b2\"]\n\n[build]\non = [\"@fast\"]\n\
                    exclude = [\"b2\"]\nmax_jobs = 3\n";
        let loaded = Loaded {
            config: parse(text, Path::new("c.toml")).unwrap(),
            file: Some("c.toml".into()),
        };
        let chosen = loaded.build_machines(MachineChoice::default()).unwrap();
        assert_eq!(chosen.on, ["b1", "b2"]);
        assert_eq!(chosen.exclude, ["b2"]);
        assert_eq!(chosen.max_jobs, Some(3));
        let flags = MachineChoice {
            on: vec!["b9".into()],
            max_jobs: Some(0),
            ..MachineChoice::default()
        };
        let chosen = loaded.build_machines(flags).unwrap();
        assert_eq!(chosen.on, ["b9"]);
        assert_eq!(chosen.exclude, ["b2"]);
        assert_eq!(chosen.max_jobs, Some(0));
    }

    #[test]
    fn metrics_addresses_are_read_and_a_bad_one_is_named() {
        let text = "metrics = \"127.0.0.1:9464\"\n[build]\nmetrics = \"[::1]:0\"\n";
        let config = parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(config.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(config.build.metrics, Some("[::1]:0".parse().unwrap()));
        let e = parse("metrics = \"localhost\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml: ") && e.contains("metrics"), "{e}");
    }

    #[test]
    fn a_group_of_groups_is_refused() {
        let e = parse("[groups]\nall = [\"@fast\"]\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("names another group"), "{e}");
    }
}
