//! What the driver tells its caller while it works: builds placed, started, logging and
//! ending, machines lost, transfers started and ended. The CLI implements [`Reporter`] to
//! draw its progress; the driver never prints.

/// Progress, for the CLI to show.
pub trait Reporter: Send + Sync {
    fn build_started(&self, drv: &str, machine: &str);
    /// A build starts, with what the plan expects of it; by default the same as
    /// [`Reporter::build_started`].
    fn build_placed(&self, drv: &str, machine: &str, _placement: Placement) {
        self.build_started(drv, machine);
    }
    fn build_log(&self, drv: &str, machine: &str, line: &str);
    fn build_finished(&self, drv: &str, machine: &str, ok: bool, seconds: f64);
    /// A build running on `from` overran its plan: a duplicate of it starts on
    /// `machine`; the first to finish is the build ([`Reporter::build_finished`] names
    /// its machine), the other is stopped.
    fn build_hedged(&self, _drv: &str, _from: &str, _machine: &str) {}
    /// A machine cannot be used, for now or for the run; `message` names it and says why.
    fn machine_warning(&self, message: &str);
    /// What happened to a machine, for machine-readable output: `kind` is
    /// `machine_lost` (down, tried again later), `machine_quarantined` (failed too
    /// often) or `machine_skipped` (quarantined by an earlier run); `why` says why.
    fn machine_event(&self, _kind: &str, _machine: &str, _why: &str) {}
    /// A store path's NAR (`bytes`) started from machine `from` to machine `to`.
    fn transfer_started(&self, _path: &str, _from: &str, _to: &str, _bytes: u64) {}
    /// That transfer ended after `seconds`; `ok` when the receiver took the path.
    fn transfer_finished(
        &self,
        _path: &str,
        _from: &str,
        _to: &str,
        _bytes: u64,
        _seconds: f64,
        _ok: bool,
    ) {
    }
    /// `bytes` NAR bytes landed by `route`, from machine `from` to `to` (for
    /// [`ByteRoute::ToTarget`], the target's URI): what the run's `RouteBytes` count.
    fn bytes_moved(&self, _route: ByteRoute, _from: &str, _to: &str, _bytes: u64) {}
}

/// The way bytes went, as the run counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRoute {
    /// From this machine's store to a builder.
    ClientToMachine,
    /// From a builder to this machine's store.
    MachineToClient,
    /// From one builder to another through this machine, over both of its links.
    Relayed,
    /// From one builder to another directly.
    BuilderToBuilder,
    /// Into the delivery target (`--to`), whichever way.
    ToTarget,
}

impl ByteRoute {
    pub fn as_str(self) -> &'static str {
        match self {
            ByteRoute::ClientToMachine => "client_to_machine",
            ByteRoute::MachineToClient => "machine_to_client",
            ByteRoute::Relayed => "relayed",
            ByteRoute::BuilderToBuilder => "builder_to_builder",
            ByteRoute::ToTarget => "to_target",
        }
    }
}

/// What the plan expects of a build it starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Estimated seconds on that machine (the estimate over its speed factor).
    pub estimate_seconds: f64,
    /// Cores its builder gets (`NIX_BUILD_CORES`), when shared out.
    pub cores: Option<u32>,
}

/// Bytes in the units Nix prints (KiB, MiB, GiB), for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(2048), "2.0 KiB");
        assert_eq!(human_bytes(200 * 1024 * 1024), "200.0 MiB");
    }
}
