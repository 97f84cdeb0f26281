//! The derivation Nix offers the hook, read through the store Nix builds into (its
//! `store` setting), as Nix's own hook reads it (`store->readDerivation`): from the
//! file where the store keeps it on this machine (the local store, a chroot store,
//! `local?root=DIR`), else through a session with that store (`nix-store --serve
//! --store URI`: a binary cache, for one, has no `.drv` file to open).

use std::path::Path;

use offload_nix::derivation::Derivation;
use offload_nix::nar::{NarDecoder, NarEvent};
use offload_nix::store_path::StorePath;

use crate::error::DriverError;
use crate::plan::{output_path, PlanError};
use crate::session::ServeConn;
use crate::ssh::Endpoint;

/// Why a derivation could not be read.
pub(crate) use crate::ssh::files_root;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// Reads and parses `drv_path` through `store` (see the module doc).
pub(crate) async fn read(store: Option<&str>, drv_path: &str) -> Result<Derivation, ReadError> {
    let text = match files_root(store) {
        Some(root) => {
            let file = root.join(drv_path.trim_start_matches('/'));
            std::fs::read(&file).map_err(|source| PlanError::Read { path: file, source })?
        }
        None => {
            let endpoint = Endpoint::local("local", store.map(str::to_string));
            let mut session = ServeConn::open(&endpoint).await?;
            let mut nar = Vec::new();
            session.dump_store_path(drv_path, &mut nar).await?;
            let _ = session.close().await;
            regular_file(&nar).map_err(|e| PlanError::Read {
                path: Path::new(drv_path).to_path_buf(),
                source: std::io::Error::other(format!(
                    "its NAR in the store {} is not one regular file: {e}",
                    store.unwrap_or("")
                )),
            })?
        }
    };
    Ok(Derivation::parse(&text).map_err(|source| PlanError::Parse {
        path: drv_path.to_string(),
        source,
    })?)
}

/// The contents of a NAR that holds one regular file (a `.drv`).
fn regular_file(nar: &[u8]) -> Result<Vec<u8>, String> {
    let mut decoder = NarDecoder::new();
    let mut contents = Vec::new();
    let mut rest = nar;
    while !decoder.is_done() {
        let (used, event) = decoder.feed(rest).map_err(|e| e.to_string())?;
        if used == 0 {
            return Err(format!("it ends early, after {} bytes", nar.len()));
        }
        match event {
            Some(NarEvent::Contents(piece)) => contents.extend_from_slice(piece),
            Some(NarEvent::Regular { .. } | NarEvent::RegularEnd) | None => {}
            Some(other) => return Err(format!("it holds {other:?}")),
        }
        rest = rest.get(used..).unwrap_or_default();
    }
    Ok(contents)
}

/// Why offload declines to build `drv` remotely, if it does, as Nix's hook would: a
/// floating content-addressed derivation goes to a builder only when Nix runs with the
/// `ca-derivations` feature (`features`, Nix's `experimental-features`: the outputs'
/// realisations are registered here) and has no input derivations left (Nix resolves
/// them first); an output whose path is known only once it is built in any other way
/// (an impure or deferred one) cannot be named to the builder nor brought back.
pub(crate) fn cannot_build_remotely(
    drv_path: &str,
    drv: &Derivation,
    features: &[String],
) -> Option<String> {
    let parsed = StorePath::from_absolute_path(drv_path).ok()?;
    let floating = drv.outputs.values().all(|o| o.is_floating());
    if floating && features.iter().any(|f| f == "ca-derivations") {
        // Output ids can be computed (realise.rs brings the outputs home by them).
        return match drv.output_ids() {
            Some(_) => None,
            None => Some(format!(
                "{drv_path} is content-addressed and still names input derivations; \
                 offload builds such a derivation once Nix has resolved them"
            )),
        };
    }
    let name = drv
        .outputs
        .keys()
        .find(|name| output_path(&parsed, drv, name).is_err())?;
    let why = match floating {
        true => "Nix runs without the `ca-derivations` experimental feature, which \
                 registering its outputs here takes"
            .to_string(),
        false => "offload brings outputs back by their paths".to_string(),
    };
    Some(format!(
        "{drv_path} is content-addressed: the path of its output {name} is known only once \
         it is built, and {why}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn stores_with_files_here_and_without() {
        assert_eq!(files_root(None), Some(PathBuf::from("/")));
        assert_eq!(files_root(Some("/tmp/s")), Some(PathBuf::from("/tmp/s")));
        assert_eq!(
            files_root(Some("local?root=/tmp/r")),
            Some(PathBuf::from("/tmp/r"))
        );
        assert_eq!(files_root(Some("daemon")), Some(PathBuf::from("/")));
        assert_eq!(files_root(Some("file:///tmp/cache")), None);
    }

    #[test]
    fn floating_derivations_go_to_builders_only_with_ca_derivations() {
        let drv = Derivation::parse(include_bytes!("../../../fixtures/drv/ca-leaf.drv")).unwrap();
        let path = "/nix/store/mz3fplqhs7cmzp654g1ibf3afc3r2w79-ca-leaf.drv";
        let on = ["nix-command".to_string(), "ca-derivations".to_string()];
        assert_eq!(cannot_build_remotely(path, &drv, &on), None);
        let why = cannot_build_remotely(path, &drv, &on[..1]).unwrap();
        assert!(
            why.contains("output out") && why.contains("`ca-derivations`"),
            "{why}"
        );
        let mut unresolved = drv.clone();
        let input =
            StorePath::from_absolute_path("/nix/store/0bnn10dqaj63j3rwn5x0d6pyjvmjjhyk-top.drv")
                .unwrap();
        unresolved
            .input_drvs
            .insert(input, ["out".to_string()].into());
        let why = cannot_build_remotely(path, &unresolved, &on).unwrap();
        assert!(why.contains("input derivations"), "{why}");
        let hi = Derivation::parse(include_bytes!("../../../fixtures/drv/hi.drv")).unwrap();
        let hi_path = "/nix/store/8pql3j9cyj94hnchzwcidj1jj3pqhbf8-hi.drv";
        assert_eq!(cannot_build_remotely(hi_path, &hi, &[]), None);
    }

    #[test]
    fn a_drv_comes_out_of_its_nar() {
        let nar = offload_nix::nar::regular_file_nar(b"Derive([])", false);
        assert_eq!(regular_file(&nar).unwrap(), b"Derive([])");
    }
}
