//! Where a derivation Nix offers the hook should build: offload's rule (earliest
//! estimated finish, the local machine included) on Nix's facts (whether Nix is willing
//! to build it locally now, and the free slots in the shared ledger).

use offload_nix::hook::TryRequest;
use offload_sched::{MachineId, MachineSpec, NodeSpec};

use crate::error::DriverError;
use crate::fleet::{MachineConfig, LOCAL};
use crate::slots::{SlotLedger, SlotLock};

/// Seconds a build on another machine costs beyond its duration: Nix's hook protocol
/// opens a session per build (an ssh handshake) and copies inputs and outputs. About what
/// Nix's own hook pays per build over real ssh (docs/nix-protocols.md §9).
pub const REMOTE_OVERHEAD_SECONDS: f64 = 0.5;
/// The same with the agent running: sessions are warm, only the copies remain.
pub const AGENT_OVERHEAD_SECONDS: f64 = 0.05;

/// A remote machine as the choice sees it now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RemoteState {
    /// It cannot build the derivation (system, features).
    Unfit,
    /// It can, but others hold all its slots.
    Full,
    /// It can, and `busy` of its slots are held by others.
    Free { busy: u32 },
}

/// What to answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Verdict {
    Accept(MachineId),
    Decline,
    Postpone,
}

/// The derivation as the fleet's rules see it.
pub(crate) fn node_of(request: &TryRequest, estimate: f64) -> NodeSpec {
    let mut node = NodeSpec::new(&request.drv_path, &request.system, Vec::new(), estimate);
    node.required_features = request.required_features.clone();
    node
}

/// The rule, with no I/O: the machine where the build would finish first. The local
/// machine counts only when Nix is willing (a local slot is free) and it can build the
/// derivation; a remote one only with a free slot, and it pays `overhead` (see
/// [`REMOTE_OVERHEAD_SECONDS`]). Ties go to the remote machine with the lighter load per
/// speed, as in Nix's hook. When nothing can start now: postpone if only busy remote
/// machines could build it, else decline (Nix then builds it or reports it).
pub(crate) fn decide(
    specs: &[MachineSpec],
    remotes: &[RemoteState],
    request: &TryRequest,
    node: &NodeSpec,
    overhead: f64,
) -> Verdict {
    let local_can = request.am_willing && specs[LOCAL].can_build(node);
    let local_finish = local_can.then(|| specs[LOCAL].build_time(node));
    let mut best: Option<(f64, f64, MachineId)> = None;
    let mut fits_somewhere = false;
    for (i, state) in remotes.iter().enumerate() {
        let machine = i + 1;
        let busy = match *state {
            RemoteState::Unfit => continue,
            RemoteState::Full => {
                fits_somewhere = true;
                continue;
            }
            RemoteState::Free { busy } => busy,
        };
        fits_somewhere = true;
        let spec = &specs[machine];
        let finish = overhead + spec.build_time(node);
        let load = f64::from(busy) / spec.speed.max(1e-6);
        if best.is_none_or(|(f, l, _)| finish < f || (finish == f && load < l)) {
            best = Some((finish, load, machine));
        }
    }
    match (best, local_finish) {
        (Some((remote, _, m)), Some(local)) if remote < local => Verdict::Accept(m),
        (Some((_, _, m)), None) => Verdict::Accept(m),
        (_, Some(_)) => Verdict::Decline,
        (None, None) if fits_somewhere => Verdict::Postpone,
        (None, None) => Verdict::Decline,
    }
}

/// The choice made with the shared ledger: under its `main-lock`, each fitting remote
/// machine's slots are looked at, and the chosen one's free slot is kept (held through
/// the build).
pub(crate) fn choose(
    fleet: &[MachineConfig],
    ledger: &SlotLedger,
    request: &TryRequest,
    estimate: f64,
    overhead: f64,
) -> Result<(Verdict, Option<SlotLock>), DriverError> {
    let node = node_of(request, estimate);
    let specs: Vec<MachineSpec> = fleet.iter().map(|m| m.spec.clone()).collect();
    let _choosing = ledger.choosing(&request.drv_path)?;
    let mut free: Vec<Option<SlotLock>> = Vec::new();
    let mut remotes = Vec::new();
    for m in &fleet[1..] {
        if !m.spec.can_build(&node) {
            remotes.push(RemoteState::Unfit);
            free.push(None);
            continue;
        }
        let probe = ledger.probe(&m.endpoint.name, m.spec.slots)?;
        remotes.push(match probe.free {
            Some(_) => RemoteState::Free { busy: probe.busy },
            None => RemoteState::Full,
        });
        free.push(probe.free);
    }
    let verdict = decide(&specs, &remotes, request, &node, overhead);
    let slot = match verdict {
        Verdict::Accept(m) => free.get_mut(m - 1).and_then(Option::take),
        _ => None,
    };
    Ok((verdict, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(remote_speeds: &[f64]) -> Vec<MachineSpec> {
        let mut specs = vec![MachineSpec::local("x86_64-linux", 1)];
        for (i, &speed) in remote_speeds.iter().enumerate() {
            specs.push(MachineSpec::new(format!("b{i}"), "x86_64-linux", 2, speed));
        }
        specs
    }

    fn request(willing: bool) -> TryRequest {
        TryRequest {
            am_willing: willing,
            system: "x86_64-linux".into(),
            drv_path: "/nix/store/00000000000000000000000000000000-x.drv".into(),
            required_features: Vec::new(),
        }
    }

    #[test]
    fn declines_when_the_local_machine_finishes_first() {
        // A 1 s build: locally 1 s, on an equally fast builder 1.5 s.
        let r = request(true);
        let node = node_of(&r, 1.0);
        let free = [RemoteState::Free { busy: 0 }];
        assert_eq!(
            decide(&specs(&[1.0]), &free, &r, &node, REMOTE_OVERHEAD_SECONDS),
            Verdict::Decline
        );
        // Four times faster: 0.75 s there.
        assert_eq!(
            decide(&specs(&[4.0]), &free, &r, &node, REMOTE_OVERHEAD_SECONDS),
            Verdict::Accept(1)
        );
        // Long builds go to a builder only a little faster.
        let long = node_of(&r, 600.0);
        assert_eq!(
            decide(&specs(&[1.5]), &free, &r, &long, REMOTE_OVERHEAD_SECONDS),
            Verdict::Accept(1)
        );
    }

    #[test]
    fn picks_the_earliest_finish_and_postpones_when_only_busy_builders_fit() {
        let r = request(false);
        let node = node_of(&r, 10.0);
        let states = [RemoteState::Free { busy: 1 }, RemoteState::Free { busy: 0 }];
        assert_eq!(
            decide(
                &specs(&[2.0, 3.0]),
                &states,
                &r,
                &node,
                REMOTE_OVERHEAD_SECONDS
            ),
            Verdict::Accept(2)
        );
        let full = [RemoteState::Full, RemoteState::Unfit];
        assert_eq!(
            decide(
                &specs(&[2.0, 3.0]),
                &full,
                &r,
                &node,
                REMOTE_OVERHEAD_SECONDS
            ),
            Verdict::Postpone
        );
        // Willing, so the local machine takes it rather than wait.
        let willing = request(true);
        assert_eq!(
            decide(
                &specs(&[2.0, 3.0]),
                &full,
                &willing,
                &node,
                REMOTE_OVERHEAD_SECONDS
            ),
            Verdict::Decline
        );
        let unfit = [RemoteState::Unfit, RemoteState::Unfit];
        assert_eq!(
            decide(
                &specs(&[2.0, 3.0]),
                &unfit,
                &r,
                &node,
                REMOTE_OVERHEAD_SECONDS
            ),
            Verdict::Decline
        );
    }

    #[test]
    fn the_local_machine_needs_the_system_and_features() {
        let mut r = request(true);
        r.required_features = vec!["kvm".into()];
        let node = node_of(&r, 1.0);
        let mut s = specs(&[1.0]);
        s[1].supported_features = vec!["kvm".into()];
        let free = [RemoteState::Free { busy: 0 }];
        assert_eq!(
            decide(&s, &free, &r, &node, REMOTE_OVERHEAD_SECONDS),
            Verdict::Accept(1)
        );
    }
}
