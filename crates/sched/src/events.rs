//! The scheduler's inputs and outputs: the [`Event`]s the driver (or a simulation)
//! feeds in, the [`Action`]s it gets back, and where each node stands.

use crate::fleet::MachineId;
use crate::graph::NodeId;

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A build that was started on `machine` ended.
    Finished {
        node: NodeId,
        machine: MachineId,
        outcome: Outcome,
    },
    /// The machine is gone for the rest of the run (the driver gave up on it). Its
    /// running builds go back to the ready set without counting as failed attempts, the
    /// outputs only it held are built again, and what no other machine can build fails.
    MachineLost { machine: MachineId },
    /// The machine cannot be reached for now: as [`Event::MachineLost`], except that
    /// what only it can build waits for it. The driver follows up with
    /// [`Event::MachineBack`] or [`Event::MachineLost`].
    MachineDown { machine: MachineId },
    /// A machine that was down answers again: it takes builds from now on.
    MachineBack { machine: MachineId },
    /// The node's outputs are now also valid on `machine` (e.g. copied to the client).
    OutputsAt { node: NodeId, machine: MachineId },
    /// Others (another run, Nix's own build hook, another client) hold `count` of the
    /// machine's slots now. Those slots count as busy until a later event says otherwise,
    /// so builds go to machines that are free rather than queue behind them.
    SlotsHeldElsewhere { machine: MachineId, count: u32 },
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Built,
    /// The build itself failed (builder exit code, timeout, …): not retried.
    Failed {
        reason: String,
    },
    /// The build did not run to its end for a reason that is not the build's (an input
    /// could not be shipped): it runs again, up to [`crate::MAX_ATTEMPTS`] times. A broken
    /// connection is reported as the machine's loss instead, which costs no attempt.
    Lost {
        reason: String,
    },
    /// The build never began: others took the machine's last slot first. It goes back
    /// to the ready set at no attempt's cost; the driver says which slots others hold
    /// ([`Event::SlotsHeldElsewhere`]) first, so that it goes elsewhere.
    Deferred,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start {
        node: NodeId,
        machine: MachineId,
    },
    /// Stop a running build (the run is stopping after a failure).
    Cancel {
        node: NodeId,
        machine: MachineId,
    },
    /// The node will not be built; `reason` says why.
    Fail {
        node: NodeId,
        reason: Failure,
    },
}

/// Why a node was not built.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// No machine of the fleet can build it.
    NoMachine {
        system: String,
        features: Vec<String>,
        considered: Vec<String>,
    },
    /// Its build failed on that machine.
    BuildFailed { machine: MachineId, reason: String },
    /// One of its dependencies failed.
    DependencyFailed { dep: NodeId },
    /// Did not run to its end too often (see [`Outcome::Lost`]).
    TooManyAttempts { attempts: u32, reason: String },
    /// The run stopped after another failure (no keep-going).
    Stopped,
}

/// Where a node stands.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeState {
    /// Waiting for this many dependencies.
    Waiting(usize),
    Ready,
    Running {
        machine: MachineId,
        expected_end: f64,
    },
    Done {
        machine: MachineId,
        seconds: f64,
    },
    Failed(Failure),
}
