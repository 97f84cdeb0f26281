//! The one trust check: before a run builds anything, the stores themselves are asked
//! what this user may do there, so that a refusal is said up front, with the fix,
//! instead of as the wrong error after the work.
//!
//! A nix-daemon lets only its `trusted-users` build a derivation it does not hold
//! (BuildDerivation: "you are not privileged to build input-addressed derivations") and
//! import a path without a signature by a key in its `trusted-public-keys`. Nix 2.8's
//! daemon has no query for either, so offload probes:
//! - **trust**: BuildDerivation of a derivation for a system no machine has. A trusted
//!   user gets a failed build result at once; anyone else is refused before anything
//!   runs;
//! - **signatures**, for an untrusted user: a tiny path signed with the user's key
//!   (`--sign-key`) is imported; without a key, each builder builds a tiny derivation and
//!   its signed output is imported, which shows both that the builder signs
//!   (`secret-key-files` there) and that this store trusts its key.
//!
//! Probe paths are a few bytes each and are left to the garbage collector.
//!
//! Beside it: signing paths as Nix does ([`signing`]), for a daemon that trusts keys
//! rather than the user, and `offload doctor` ([`doctor`]), which runs this check with
//! the others, machine by machine.

use offload_nix::derivation::{Derivation, Output};
use offload_nix::hash::sha256;
use offload_nix::serve::{BasicDerivation, BuildSettings, PathInfo, WireOutput};
use offload_nix::store_path::{make_output_path, make_store_path, store_dir, StorePath};
use offload_nix::{nar, nixbase32};
use offload_sched::MachineId;

use crate::error::DriverError;
use crate::fleet::{MachineConfig, LOCAL};
use crate::session::ServeConn;

pub mod doctor;
pub mod signing;
use signing::PathSigner;

/// What the local store lets this user do, as the runner needs to know it.
#[derive(Debug, Clone)]
pub struct LocalAccess {
    /// Root on a local store, or a user in the daemon's `trusted-users`: builds of any
    /// derivation and unsigned imports are accepted.
    pub trusted: bool,
    /// Signs every path built elsewhere before it enters the local store.
    pub signer: Option<PathSigner>,
}

impl Default for LocalAccess {
    /// Full access, as root on a local store has.
    fn default() -> LocalAccess {
        LocalAccess {
            trusted: true,
            signer: None,
        }
    }
}

/// The outcome of the check for one run.
#[derive(Debug)]
pub struct TrustCheck {
    pub local: LocalAccess,
    /// Builders whose outputs could not enter the local store, with why and the fix.
    pub refused: Vec<(MachineId, String)>,
}

/// Runs the check for `machines` (the local one at [`LOCAL`]); `signer` is the user's
/// key, if any.
pub async fn check(
    machines: &[MachineConfig],
    signer: Option<PathSigner>,
) -> Result<TrustCheck, DriverError> {
    let local_endpoint = &machines[LOCAL].endpoint;
    let mut local_conn = ServeConn::open(local_endpoint).await?;
    let trusted = probe_trust(&mut local_conn).await?;
    let remotes: Vec<MachineId> = (0..machines.len())
        .filter(|&m| m != LOCAL && machines[m].spec.slots > 0)
        .collect();
    let mut refused = Vec::new();
    if trusted || remotes.is_empty() {
        let local = LocalAccess { trusted, signer };
        return Ok(TrustCheck { local, refused });
    }
    let user = crate::env::current_user();
    let mut local_conn = ServeConn::open(local_endpoint).await?;
    if let Some(signer) = &signer {
        if let Err(e) = import_probe(&mut local_conn, Some(signer)).await {
            let why = format!(
                "the local nix-daemon does not trust you ({user}), and refused a path signed \
                 with your key {}: {e}. Add `trusted-public-keys = {}` (or `trusted-users = \
                 {user}`) to /etc/nix/nix.conf on this machine and restart nix-daemon",
                signer.name(),
                signer.public_key()
            );
            refused.extend(remotes.iter().map(|&m| (m, why.clone())));
        }
    } else {
        for &m in &remotes {
            if let Err(why) = builder_signs(&machines[m], &mut local_conn).await {
                refused.push((
                    m,
                    format!(
                        "the local nix-daemon does not trust you ({user}), so what {} builds \
                         must be signed by a key it trusts, and {why}. Add `trusted-users = \
                         {user}` to /etc/nix/nix.conf on this machine and restart nix-daemon; \
                         or give --sign-key FILE (a key from `nix-store \
                         --generate-binary-cache-key`) and add its public key to \
                         `trusted-public-keys` there",
                        machines[m].spec.name
                    ),
                ));
            }
            if local_conn.is_broken() {
                local_conn = ServeConn::open(local_endpoint).await?;
            }
        }
    }
    let local = LocalAccess { trusted, signer };
    Ok(TrustCheck { local, refused })
}

/// Whether the store behind `conn` lets this user build derivations it does not hold.
pub(crate) async fn probe_trust(conn: &mut ServeConn) -> Result<bool, DriverError> {
    // No real derivation has this hash, and no machine builds for this system: a
    // trusted user's build fails at once without running anything.
    let hash = "0".repeat(32);
    let out = format!("{}/{hash}-offload-trust-probe", store_dir());
    let drv = BasicDerivation {
        outputs: vec![WireOutput {
            name: "out".into(),
            path: out.clone(),
            hash_algo: String::new(),
            hash: String::new(),
        }],
        input_srcs: Vec::new(),
        platform: "offload-trust-probe".into(),
        builder: b"/offload-trust-probe".to_vec(),
        args: Vec::new(),
        env: vec![(b"out".to_vec(), out.into_bytes())],
    };
    let drv_path = format!("{}/{hash}-offload-trust-probe.drv", store_dir());
    match conn
        .build_derivation(&drv_path, &drv, &BuildSettings::default())
        .await
    {
        Ok(_) => Ok(true),
        Err(DriverError::Exited { stderr, .. }) if stderr.contains("not privileged") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Imports a tiny path into the store behind `conn`, signed by `signer` when given.
pub(crate) async fn import_probe(
    conn: &mut ServeConn,
    signer: Option<&PathSigner>,
) -> Result<(), DriverError> {
    let key = signer.map_or_else(|| "unsigned".to_string(), PathSigner::public_key);
    let contents = format!("offload import probe for {key}\n");
    let nar = nar::regular_file_nar(contents.as_bytes(), false);
    // A path of its own per key: the daemon checks the signature before it looks
    // whether the path is already there, so a second run probes again.
    let path = make_store_path(
        "output:out",
        &sha256(key.as_bytes()),
        "offload-import-probe",
    )?;
    let mut info = PathInfo {
        path: path.to_absolute(),
        deriver: None,
        references: Vec::new(),
        nar_size: nar.len() as u64,
        nar_hash: format!("sha256:{}", nixbase32::encode(&sha256(&nar))),
        ca: None,
        sigs: Vec::new(),
    };
    if let Some(signer) = signer {
        signer.sign(&mut info);
    }
    conn.add_to_store_nar(&info, &nar).await.map(|_| ())
}

/// Whether what `machine` builds carries a signature the local store accepts: the
/// builder builds a tiny derivation and its output, with the builder's signatures, is
/// imported through `local`. The error says what was missing.
async fn builder_signs(machine: &MachineConfig, local: &mut ServeConn) -> Result<(), String> {
    let system = machine
        .spec
        .systems
        .first()
        .ok_or_else(|| "it declares no system".to_string())?;
    let (drv_path, drv) = probe_derivation(system).map_err(|e| e.to_string())?;
    let out = drv.outputs[0].path.clone();
    let mut builder = ServeConn::open(&machine.endpoint)
        .await
        .map_err(|e| format!("it could not be reached: {e}"))?;
    let built = builder
        .build_derivation(&drv_path, &drv, &BuildSettings::default())
        .await
        .map_err(|e| format!("it could not build a probe derivation: {e}"))?;
    if !built.status.is_success() {
        return Err(format!(
            "it could not build a probe derivation: {}",
            built.error_msg
        ));
    }
    let info = builder
        .query_path_infos(std::slice::from_ref(&out))
        .await
        .map_err(|e| e.to_string())?
        .pop()
        .ok_or_else(|| format!("its probe output {out} is not valid there"))?;
    if info.sigs.is_empty() {
        return Err(
            "it signs nothing (set `secret-key-files` in its nix.conf, and add the public \
             key to `trusted-public-keys` here)"
                .to_string(),
        );
    }
    local
        .add_to_store_nar_from(&info, &mut builder)
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "this store refused its signature ({}): {e}; add the builder's public key \
                 to `trusted-public-keys`",
                info.sigs.join(", ")
            )
        })
}

/// A derivation that writes one line to `$out`, for `system`; its `.drv` path and the
/// form BuildDerivation sends. It needs nothing on the builder but `/bin/sh`, and is new
/// every run.
pub(crate) fn probe_derivation(system: &str) -> Result<(String, BasicDerivation), DriverError> {
    let name = "offload-builder-probe";
    // New each run: an output built before the builder had a key stays unsigned there.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string();
    let env = |out: &str| {
        [
            ("builder", "/bin/sh"),
            ("name", name),
            ("nonce", nonce.as_str()),
            ("out", out),
            ("system", system),
        ]
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    };
    let mut drv = Derivation {
        outputs: [(
            "out".to_string(),
            Output {
                path: None,
                hash_algo: String::new(),
                hash: String::new(),
            },
        )]
        .into(),
        input_drvs: Default::default(),
        input_srcs: Default::default(),
        system: system.to_string(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), b"echo offload > $out".to_vec()],
        env: env(""),
    };
    // Input-addressed: the output path comes from the derivation with it blanked.
    let modulo = drv.hash_modulo(true, |_: &StorePath| Ok::<_, DriverError>([0; 32]))?;
    let out = make_output_path("out", &modulo, name)?;
    drv.env = env(&out.to_absolute());
    if let Some(o) = drv.outputs.get_mut("out") {
        o.path = Some(out);
    }
    let drv_path = drv.drv_path(name)?.to_absolute();
    Ok((drv_path, drv.to_basic(Vec::new())))
}
