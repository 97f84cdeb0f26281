//! Floating content-addressed outputs built on a builder, brought home as Nix's own
//! hook brings them (`build-remote.cc`): their paths are known only once built, so the
//! builder's BuildResult names them (`builtOutputs`: per output id, the realisation as
//! Nix's JSON); each wanted output the local store has no realisation for is copied
//! home by that path, and its realisation registered there, which is how Nix, once the
//! hook exits, finds the output it asked for.
//!
//! The realisations are read and registered through the worker protocol's
//! QueryRealisation and RegisterDrvOutput, spoken to `nix-daemon --stdio` on the store
//! Nix builds into (`--store URI` unless it is the default), with the experimental
//! features Nix runs with: the serve protocol has no realisations (docs/nix-protocols.md
//! §4.4, §9, §11).

use std::collections::BTreeMap;

use offload_nix::derivation::Derivation;
use offload_nix::serve::BuildResult;
use offload_nix::store_path::store_dir;
use serde::Deserialize;
use thiserror::Error;

use crate::error::DriverError;
use crate::session::ServeConn;
use crate::ssh::{Endpoint, Speaks};

/// Why a floating output could not be brought home.
#[derive(Debug, Error)]
pub enum RealiseError {
    #[error(
        "the build of '{drv}' on '{machine}' reported no path for its output {output} \
         (id {id}); its Nix needs the `ca-derivations` experimental feature"
    )]
    NotReported {
        drv: String,
        machine: String,
        output: String,
        id: String,
    },
    #[error("'{machine}' reported the realisation of {id} as {json:?}, not Nix's JSON")]
    BadJson {
        machine: String,
        id: String,
        json: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// The outputs of a floating content-addressed derivation, by name, with their ids.
#[derive(Debug, Clone)]
pub(crate) struct Floating {
    ids: BTreeMap<String, String>,
}

impl Floating {
    /// The outputs of `drv` when their paths are known only once built (and their ids
    /// can be computed: `drv` has no input derivations, as Nix resolves them before it
    /// hands such a build to a hook); None for any other derivation.
    pub(crate) fn of(drv: &Derivation) -> Option<Floating> {
        if !drv.outputs.values().any(|o| o.is_floating()) {
            return None;
        }
        drv.output_ids().map(|ids| Floating { ids })
    }

    /// The wanted outputs' ids (every output when `wanted` is empty).
    fn wanted<'a>(&'a self, wanted: &'a [String]) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.ids
            .iter()
            .filter(move |(name, _)| wanted.is_empty() || wanted.contains(name))
            .map(|(name, id)| (name.as_str(), id.as_str()))
    }
}

/// A realisation the builder reported: the output's id, its path, Nix's JSON of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Built {
    pub id: String,
    /// Absolute.
    pub out_path: String,
    pub json: String,
}

/// The fields of Nix's realisation JSON offload reads; the rest travels as written.
#[derive(Deserialize)]
struct RealisationJson {
    id: String,
    #[serde(rename = "outPath")]
    out_path: String,
}

/// The realisations in `result` of the outputs of `floating` that are wanted, checked
/// against the ids Nix gives them here.
pub(crate) fn reported(
    floating: &Floating,
    wanted: &[String],
    result: &BuildResult,
    machine: &str,
    drv: &str,
) -> Result<Vec<Built>, RealiseError> {
    floating
        .wanted(wanted)
        .map(|(output, id)| {
            let not_reported = || RealiseError::NotReported {
                drv: drv.to_string(),
                machine: machine.to_string(),
                output: output.to_string(),
                id: id.to_string(),
            };
            let (_, json) = result
                .built_outputs
                .iter()
                .find(|(key, _)| key == id)
                .ok_or_else(not_reported)?;
            let parsed: RealisationJson =
                serde_json::from_str(json).map_err(|source| RealiseError::BadJson {
                    machine: machine.to_string(),
                    id: id.to_string(),
                    json: json.clone(),
                    source,
                })?;
            if parsed.id != id || parsed.out_path.contains('/') || parsed.out_path.is_empty() {
                return Err(not_reported());
            }
            Ok(Built {
                id: id.to_string(),
                out_path: format!("{}/{}", store_dir(), parsed.out_path),
                json: json.clone(),
            })
        })
        .collect()
}

/// A session with the daemon of the store Nix builds into, for its realisations.
pub(crate) struct LocalRealisations {
    daemon: ServeConn,
}

impl LocalRealisations {
    /// Starts `nix-daemon --stdio` on `store` (None: the default store) with Nix's
    /// experimental features `features`.
    pub(crate) async fn open(
        store: Option<&str>,
        features: &[String],
    ) -> Result<LocalRealisations, DriverError> {
        let mut endpoint = Endpoint::local("local", store.map(str::to_string));
        endpoint.daemon_program = Some("nix-daemon".into());
        endpoint.protocol.set(Speaks::Daemon);
        endpoint.extra_args = vec![
            "--option".into(),
            "experimental-features".into(),
            features.join(" "),
        ];
        Ok(LocalRealisations {
            daemon: ServeConn::open(&endpoint).await?,
        })
    }

    /// Those of `built` the store has no realisation for (Nix's hook registers only
    /// those).
    pub(crate) async fn missing(&mut self, built: Vec<Built>) -> Result<Vec<Built>, DriverError> {
        let ids: Vec<String> = built.iter().map(|b| b.id.clone()).collect();
        let known = self.daemon.query_realisations(&ids).await?;
        Ok(built
            .into_iter()
            .zip(known)
            .filter(|(_, known)| known.is_none())
            .map(|(b, _)| b)
            .collect())
    }

    /// Registers each of `built` (its output valid in the store by now).
    pub(crate) async fn register(mut self, built: &[Built]) -> Result<(), DriverError> {
        let realisations: Vec<(String, String, String)> = built
            .iter()
            .map(|b| {
                let base = b.out_path.rsplit('/').next().unwrap_or(&b.out_path);
                (b.id.clone(), base.to_string(), b.json.clone())
            })
            .collect();
        if !realisations.is_empty() {
            self.daemon.register_drv_outputs(&realisations).await?;
        }
        let _ = self.daemon.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:9fcb7f76f1298b26d085e0e8e5565ddb6f541ff4a7536659454a5bcd262bc248!out";

    fn leaf() -> Floating {
        let drv = Derivation::parse(include_bytes!("../../../fixtures/drv/ca-leaf.drv")).unwrap();
        Floating::of(&drv).unwrap()
    }

    fn result(outputs: Vec<(String, String)>) -> BuildResult {
        BuildResult {
            status: offload_nix::serve::BuildStatus::Built,
            error_msg: String::new(),
            times_built: 1,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: outputs,
        }
    }

    #[test]
    fn the_builders_realisation_names_the_path() {
        let json = format!(
            r#"{{"dependentRealisations":{{}},"id":"{ID}","outPath":"aqmg1q2v33z56bs9w43nsh296vv2zn1a-ca-leaf","signatures":[]}}"#
        );
        let got = reported(
            &leaf(),
            &[],
            &result(vec![(ID.into(), json.clone())]),
            "b",
            "d",
        )
        .unwrap();
        assert_eq!(
            got,
            [Built {
                id: ID.into(),
                out_path: "/nix/store/aqmg1q2v33z56bs9w43nsh296vv2zn1a-ca-leaf".into(),
                json,
            }]
        );
    }

    #[test]
    fn a_missing_or_foreign_realisation_is_named() {
        let e = reported(&leaf(), &[], &result(Vec::new()), "b1", "/nix/store/x.drv").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("b1") && msg.contains("output out") && msg.contains("ca-derivations"),
            "{msg}"
        );
        let other = r#"{"id":"sha256:00!out","outPath":"a-b"}"#.to_string();
        let e = reported(&leaf(), &[], &result(vec![(ID.into(), other)]), "b", "d").unwrap_err();
        assert!(matches!(e, RealiseError::NotReported { .. }), "{e}");
        let e = reported(
            &leaf(),
            &[],
            &result(vec![(ID.into(), "nope".into())]),
            "b",
            "d",
        )
        .unwrap_err();
        assert!(matches!(e, RealiseError::BadJson { .. }), "{e}");
        // An output nobody wants needs no realisation.
        assert!(
            reported(&leaf(), &["dev".into()], &result(Vec::new()), "b", "d")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn only_floating_derivations_are_floating() {
        let fod = Derivation::parse(include_bytes!("../../../fixtures/drv/fod.drv")).unwrap();
        assert!(Floating::of(&fod).is_none());
        let hi = Derivation::parse(include_bytes!("../../../fixtures/drv/hi.drv")).unwrap();
        assert!(Floating::of(&hi).is_none());
    }
}
