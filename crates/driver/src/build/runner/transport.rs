//! What the runner needs from the machines, as a trait: the serve transport
//! ([`crate::build::serve::ServeTransport`]) for real machines, a fake in the unit tests.

use std::future::Future;
use std::sync::Arc;

use offload_sched::{Link, MachineId};

use super::{BuildTask, TaskDone};
use crate::error::DriverError;
use crate::transfer::{RouteBytes, TransferNews};

/// What the runner needs from the machines. [`crate::build::serve::ServeTransport`] speaks the
/// serve protocol; the unit tests use a fake.
pub(crate) trait BuildTransport: Send + Sync + 'static {
    /// Ships the inputs of the node that the machine lacks, builds it there and learns
    /// its outputs. Dropping the future stops the build.
    fn build(self: Arc<Self>, task: BuildTask) -> impl Future<Output = TaskDone> + Send + 'static;

    /// Makes the closures of `paths` valid in the local store.
    fn fetch(
        self: Arc<Self>,
        paths: Vec<String>,
    ) -> impl Future<Output = Result<(), DriverError>> + Send + 'static;

    /// Copies the closures of `paths` to `machine` ahead of the builds that will need
    /// them there, best effort: a failure only means the builds ship them themselves.
    fn send_ahead(
        self: Arc<Self>,
        _machine: MachineId,
        _paths: Vec<String>,
    ) -> impl Future<Output = ()> + Send + 'static {
        async {}
    }

    /// `machine` is lost: nothing it held can be fetched from it any more.
    fn forget_machine(&self, machine: MachineId);

    /// Whether `machine` answers: a session opens there, one that builds with `cores`
    /// (those of a build alone there), kept for the first build. The error says why not.
    fn probe(
        self: Arc<Self>,
        machine: MachineId,
        cores: Option<u32>,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static;

    /// Ends every idle session.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Copies that landed and were timed since the last call.
    fn take_news(&self) -> TransferNews {
        TransferNews::default()
    }

    /// NAR bytes moved so far, by the way they went.
    fn route_bytes(&self) -> RouteBytes {
        RouteBytes::default()
    }

    /// `machine`'s link to this one turned out to carry `bandwidth` after `latency`:
    /// the copies' routes go by that from now on, as the plan does.
    fn set_link(&self, _machine: MachineId, _bandwidth: f64, _latency: f64) {}

    /// The link from `from` to `to` turned out to be `link`: their direct copies go by
    /// that from now on.
    fn set_peer_link(&self, _from: MachineId, _to: MachineId, _link: Link) {}

    /// The most `machine`'s link can carry by the copies crossing it now
    /// ([`crate::transfer::TransferEngine::crossing_bound`]).
    fn link_bound(&self, _machine: MachineId, _latency: f64) -> Option<f64> {
        None
    }

    /// Whether `machine` refused offload for good (authentication, host key): trying
    /// it again in this run would meet the same refusal.
    fn refused(&self, _machine: MachineId) -> bool {
        false
    }

    /// Per machine with slots to share, how many of them others hold now (other runs,
    /// Nix's own build hook).
    fn slots_held_elsewhere(
        self: Arc<Self>,
    ) -> impl Future<Output = Vec<(MachineId, u32)>> + Send + 'static {
        std::future::ready(Vec::new())
    }
}
