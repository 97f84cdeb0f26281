//! Before a build job builds anything: what the stores let this user do
//! ([`crate::trust`]), said once, with the fix, and the fleet narrowed to the machines
//! whose outputs can come home.

use std::path::Path;

use super::{Events, JobError};
use crate::fleet::{MachineConfig, LOCAL};
use crate::trust::signing::PathSigner;
use crate::trust::{self, LocalAccess};

/// Runs the trust check (signing with the key at `sign_key`, if any) and drops the
/// builders it refused, saying why; with `no_local_fallback`, a refused builder stops the
/// run instead.
pub async fn check(
    sign_key: Option<&Path>,
    no_local_fallback: bool,
    machines: &mut Vec<MachineConfig>,
    events: &dyn Events,
) -> Result<LocalAccess, JobError> {
    let signer = match sign_key {
        Some(path) => Some(PathSigner::load(path)?),
        None => None,
    };
    let check = trust::check(machines, signer)
        .await
        .map_err(|e| JobError::Trust(Box::new(e)))?;
    if check.refused.is_empty() {
        return Ok(check.local);
    }
    let mut text = String::new();
    for (m, why) in &check.refused {
        text.push_str(&format!("{}: {why}\n", machines[*m].spec.name));
    }
    if no_local_fallback {
        return Err(JobError::Refused {
            refused: text.trim_end().to_string(),
        });
    }
    let local_slots = machines[LOCAL].spec.slots;
    events.notice(&format!(
        "warning: outputs built on these machines could not enter the local store, so they \
         are not used{}:\n{text}",
        if local_slots > 0 {
            " (the rest builds here; --no-local-fallback stops instead)"
        } else {
            ""
        }
    ));
    let refused: Vec<usize> = check.refused.iter().map(|(m, _)| *m).collect();
    let mut index = 0;
    machines.retain(|_| {
        let keep = !refused.contains(&index);
        index += 1;
        keep
    });
    Ok(check.local)
}
