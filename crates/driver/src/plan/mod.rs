//! From `.drv` files to the build nodes the runner executes: reading the derivation
//! closure straight from the store directory, and keeping the derivations Nix would
//! build.
//!
//! What Nix would build and fetch itself comes from its dry run ([`dry_run`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use offload_nix::derivation::{name_from_drv_path, Derivation, DerivationError};
use offload_nix::store_path::{StorePath, StorePathError};
use thiserror::Error;

pub mod dry_run;

use crate::build::BuildNode;
use crate::state::EstimateSource;
use offload_learn::Knowledge;

/// The derivation graph could not be read.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error("cannot read derivation {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("derivation {path} is malformed")]
    Parse {
        path: String,
        #[source]
        source: DerivationError,
    },
    #[error("{0}")]
    Path(#[from] StorePathError),
    #[error("derivation {drv} has no path for output {output} (content-addressed derivations are not supported yet)")]
    NoOutputPath { drv: String, output: String },
}

/// Reads `roots` and every derivation they depend on. `store_root` is `/` for the
/// local store, or a chroot store's directory.
pub fn read_drv_closure(
    store_root: &Path,
    roots: &[StorePath],
) -> Result<HashMap<StorePath, Derivation>, PlanError> {
    let mut drvs = HashMap::new();
    let mut todo: Vec<StorePath> = roots.to_vec();
    let mut seen: HashSet<StorePath> = roots.iter().cloned().collect();
    while let Some(path) = todo.pop() {
        let file = store_root.join(path.to_absolute().trim_start_matches('/'));
        let text = std::fs::read(&file).map_err(|source| PlanError::Read {
            path: file.clone(),
            source,
        })?;
        let drv = Derivation::parse(&text).map_err(|source| PlanError::Parse {
            path: path.to_string(),
            source,
        })?;
        for input in drv.input_drvs.keys() {
            if seen.insert(input.clone()) {
                todo.push(input.clone());
            }
        }
        drvs.insert(path, drv);
    }
    Ok(drvs)
}

/// The path of output `name` of `drv`.
pub fn output_path(
    drv_path: &StorePath,
    drv: &Derivation,
    name: &str,
) -> Result<String, PlanError> {
    drv.outputs
        .get(name)
        .and_then(|o| o.path.as_ref())
        .map(StorePath::to_absolute)
        .ok_or_else(|| PlanError::NoOutputPath {
            drv: drv_path.to_string(),
            output: name.to_string(),
        })
}

/// Build nodes for the derivations in `will_build` (what Nix's dry run says it would
/// build), in a stable order, with estimates (durations, output sizes) from what was
/// learned.
pub fn build_nodes(
    drvs: &HashMap<StorePath, Derivation>,
    will_build: &[StorePath],
    knowledge: &Knowledge,
) -> Result<Vec<BuildNode>, PlanError> {
    let mut order: Vec<&StorePath> = will_build
        .iter()
        .filter(|p| drvs.contains_key(*p))
        .collect();
    order.sort();
    order.dedup();
    let index: HashMap<&StorePath, usize> =
        order.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let mut nodes = Vec::with_capacity(order.len());
    for path in &order {
        let drv = &drvs[*path];
        let mut inputs: Vec<String> = drv.input_srcs.iter().map(StorePath::to_absolute).collect();
        let mut deps = Vec::new();
        for (input, outputs) in &drv.input_drvs {
            let Some(input_drv) = drvs.get(input) else {
                continue;
            };
            for o in outputs {
                inputs.push(output_path(input, input_drv, o)?);
            }
            if let Some(&i) = index.get(input) {
                deps.push(i);
            }
        }
        inputs.sort();
        inputs.dedup();
        let name = name_from_drv_path(path).to_string();
        let (estimate, source) = knowledge.estimate(&name);
        let output_bytes = knowledge.output_bytes(&name);
        let outputs = drv
            .outputs
            .keys()
            .map(|o| Ok((o.clone(), output_path(path, drv, o)?)))
            .collect::<Result<Vec<_>, PlanError>>()?;
        nodes.push(BuildNode {
            drv_path: path.to_absolute(),
            name,
            system: drv.system.clone(),
            required_features: drv.required_system_features(),
            prefer_local: drv.prefer_local_build(),
            deps,
            inputs,
            outputs,
            drv: drv.to_basic(Vec::new()),
            estimate,
            estimate_known: source != EstimateSource::Default,
            output_bytes,
        });
    }
    Ok(nodes)
}

/// NAR sizes of those of `paths` that are valid in the local store; none when the store
/// cannot be asked.
pub async fn local_nar_sizes(paths: &[String]) -> HashMap<String, u64> {
    let query = async {
        let mut conn = crate::ServeConn::open(&crate::Endpoint::local("local", None)).await?;
        let valid = conn.query_valid_paths(paths, false, false).await?;
        conn.query_path_infos(&valid).await
    };
    match query.await {
        Ok(infos) => infos.into_iter().map(|i| (i.path, i.nar_size)).collect(),
        Err(e) => {
            tracing::debug!("output sizes from the local store: {e}");
            HashMap::new()
        }
    }
}
