//! Before `offload build` builds anything: what the stores let this user do
//! ([`offload_driver::trust`]), said once, with the fix, and the fleet narrowed to the
//! machines whose outputs can come home.

use anyhow::anyhow;
use offload_driver::fleet::{MachineConfig, LOCAL};
use offload_driver::trust::signing::PathSigner;
use offload_driver::trust::{self, LocalAccess};

use crate::args::BuildArgs;
use crate::Failure;

/// Runs the trust check and drops the builders it refused, saying why; with
/// `--no-local-fallback`, a refused builder stops the run instead.
pub async fn check(
    args: &BuildArgs,
    machines: &mut Vec<MachineConfig>,
) -> Result<LocalAccess, Failure> {
    let signer = match &args.sign_key {
        Some(path) => Some(PathSigner::load(path).map_err(Failure::usage)?),
        None => None,
    };
    let check = trust::check(machines, signer)
        .await
        .map_err(Failure::usage)?;
    if check.refused.is_empty() {
        return Ok(check.local);
    }
    let mut text = String::new();
    for (m, why) in &check.refused {
        text.push_str(&format!("{}: {why}\n", machines[*m].spec.name));
    }
    if args.no_local_fallback {
        return Err(Failure::usage(anyhow!(
            "outputs built on these machines could not enter the local store:\n{}",
            text.trim_end()
        )));
    }
    let local_slots = machines[LOCAL].spec.slots;
    eprint!(
        "warning: outputs built on these machines could not enter the local store, so they \
         are not used{}:\n{text}",
        if local_slots > 0 {
            " (the rest builds here; --no-local-fallback stops instead)"
        } else {
            ""
        }
    );
    let refused: Vec<usize> = check.refused.iter().map(|(m, _)| *m).collect();
    let mut index = 0;
    machines.retain(|_| {
        let keep = !refused.contains(&index);
        index += 1;
        keep
    });
    Ok(check.local)
}
