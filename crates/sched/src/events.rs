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
    /// The machine is gone: its running builds and the outputs only it held are lost.
    MachineLost { machine: MachineId },
    /// The node's outputs are now also valid on `machine` (e.g. copied to the client).
    OutputsAt { node: NodeId, machine: MachineId },
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Built,
    /// The build itself failed (builder exit code, timeout, …): not retried.
    Failed {
        reason: String,
    },
    /// The connection broke: the build runs again elsewhere.
    Lost {
        reason: String,
    },
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
    /// Lost with its machine too often.
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
