//! The machines a plan may use: what each can build, how many builds at once, how fast,
//! how far its link is from the client (where offload runs), and which other machines it
//! sends to directly over links of its own ([`MachineSpec::peers`]).

use crate::graph::NodeSpec;

/// Index of a machine in the fleet.
pub type MachineId = usize;

/// One machine, local or remote.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineSpec {
    /// What messages call it (its store URI, or `local`).
    pub name: String,
    /// Systems it builds for, including emulated ones.
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    /// Features a derivation must require to be built here.
    pub mandatory_features: Vec<String>,
    /// Builds at once (`max-jobs`, machines-file field 4).
    pub slots: u32,
    /// Relative speed (machines-file field 5, or learned); durations divide by it.
    pub speed: f64,
    /// Speeds for particular systems, where they differ from `speed`: an emulated
    /// system builds many times slower than the machine's native one.
    pub system_speeds: Vec<(String, f64)>,
    /// The machine offload runs on: inputs and outputs need no transfer to the client.
    pub is_local: bool,
    /// Bytes per second between the client and this machine.
    pub bandwidth: f64,
    /// Seconds of fixed cost per transfer or build round trip.
    pub latency: f64,
    /// Seconds each build costs here besides its own time: a session's round trips,
    /// asking what is there, learning the outputs.
    pub per_build: f64,
    /// Seconds the run's first build here waits for its session: an ssh handshake and
    /// the remote Nix starting, until the driver says a session is open
    /// ([`crate::Scheduler::session_open`]).
    pub session_setup: f64,
    /// The machines this one sends store paths to directly, over the pair's own link
    /// (the client carries nothing), sorted by machine. A machine absent here is not
    /// reached that way: copies from this one to it relay through the client. Sparse:
    /// empty for a fleet without direct routes, which then costs nothing extra.
    pub peers: Vec<(MachineId, Link)>,
}

/// A link between two places: the client and a machine, or two machines.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Bytes per second.
    pub bandwidth: f64,
    /// Seconds of fixed cost per transfer.
    pub latency: f64,
}

impl Link {
    /// Seconds to move `bytes` over this link when it is idle: its latency plus the
    /// bytes at its bandwidth; nothing for no bytes.
    pub fn transfer_time(&self, bytes: u64) -> f64 {
        if bytes == 0 {
            0.0
        } else {
            self.latency + bytes as f64 / self.bandwidth.max(1.0)
        }
    }
}

impl MachineSpec {
    /// A remote machine building `system`, without features, on an ideal link; set the
    /// other fields as needed.
    pub fn new(name: impl Into<String>, system: &str, slots: u32, speed: f64) -> MachineSpec {
        MachineSpec {
            name: name.into(),
            systems: vec![system.to_string()],
            supported_features: Vec::new(),
            mandatory_features: Vec::new(),
            slots,
            speed,
            system_speeds: Vec::new(),
            is_local: false,
            bandwidth: f64::INFINITY,
            latency: 0.0,
            per_build: 0.0,
            session_setup: 0.0,
            peers: Vec::new(),
        }
    }

    /// The machine offload runs on, called `local`.
    pub fn local(system: &str, slots: u32) -> MachineSpec {
        MachineSpec {
            is_local: true,
            ..MachineSpec::new("local", system, slots, 1.0)
        }
    }

    /// Whether this machine can build `node`, by Nix's rule: the system is one of its
    /// systems (or `builtin`), every required feature is supported or mandatory here,
    /// and every mandatory feature is required.
    pub fn can_build(&self, node: &NodeSpec) -> bool {
        (node.system == "builtin" || self.systems.contains(&node.system))
            && node
                .required_features
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self
                .mandatory_features
                .iter()
                .all(|f| node.required_features.contains(f))
    }

    /// Relative speed for derivations of `system`.
    pub fn speed_for(&self, system: &str) -> f64 {
        self.system_speeds
            .iter()
            .find(|(s, _)| s == system)
            .map_or(self.speed, |&(_, speed)| speed)
    }

    /// Seconds to build `node` here.
    pub fn build_time(&self, node: &NodeSpec) -> f64 {
        node.duration.max(0.0) / self.speed_for(&node.system).max(1e-6)
    }

    /// Seconds to move `bytes` between the client and this machine.
    pub fn transfer_time(&self, bytes: u64) -> f64 {
        if self.is_local || bytes == 0 {
            0.0
        } else {
            self.latency + bytes as f64 / self.bandwidth.max(1.0)
        }
    }

    /// This machine's link to the client.
    pub fn link(&self) -> Link {
        Link {
            bandwidth: self.bandwidth,
            latency: self.latency,
        }
    }

    /// The link this machine sends to `to` over directly, if it has one.
    pub fn peer_link(&self, to: MachineId) -> Option<&Link> {
        self.peers
            .binary_search_by_key(&to, |&(m, _)| m)
            .ok()
            .map(|i| &self.peers[i].1)
    }

    /// Sets (or, with `None`, removes) the direct link from this machine to `to`,
    /// keeping [`MachineSpec::peers`] sorted.
    pub fn set_peer_link(&mut self, to: MachineId, link: Option<Link>) {
        match (self.peers.binary_search_by_key(&to, |&(m, _)| m), link) {
            (Ok(i), Some(link)) => self.peers[i].1 = link,
            (Ok(i), None) => {
                self.peers.remove(i);
            }
            (Err(i), Some(link)) => self.peers.insert(i, (to, link)),
            (Err(_), None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(systems: &[&str], supported: &[&str], mandatory: &[&str]) -> MachineSpec {
        MachineSpec {
            name: "m".into(),
            systems: systems.iter().map(|s| s.to_string()).collect(),
            supported_features: supported.iter().map(|s| s.to_string()).collect(),
            mandatory_features: mandatory.iter().map(|s| s.to_string()).collect(),
            slots: 1,
            speed: 1.0,
            system_speeds: Vec::new(),
            is_local: false,
            bandwidth: 1e8,
            latency: 0.001,
            per_build: 0.0,
            session_setup: 0.0,
            peers: Vec::new(),
        }
    }

    fn node(system: &str, features: &[&str]) -> NodeSpec {
        NodeSpec {
            required_features: features.iter().map(|s| s.to_string()).collect(),
            ..NodeSpec::new("n", system, Vec::new(), 1.0)
        }
    }

    #[test]
    fn matching_follows_nix() {
        let m = machine(
            &["x86_64-linux", "aarch64-linux"],
            &["kvm"],
            &["big-parallel"],
        );
        assert!(m.can_build(&node("aarch64-linux", &["big-parallel"])));
        assert!(m.can_build(&node("x86_64-linux", &["big-parallel", "kvm"])));
        // Mandatory features must be asked for.
        assert!(!m.can_build(&node("x86_64-linux", &[])));
        assert!(!m.can_build(&node("x86_64-darwin", &["big-parallel"])));
        assert!(!m.can_build(&node("x86_64-linux", &["big-parallel", "cuda"])));
        assert!(m.can_build(&node("builtin", &["big-parallel"])));
        let plain = machine(&["x86_64-linux"], &[], &[]);
        assert!(plain.can_build(&node("x86_64-linux", &[])));
    }

    #[test]
    fn peer_links_stay_sorted() {
        let mut m = machine(&["x86_64-linux"], &[], &[]);
        let link = |bandwidth| Link {
            bandwidth,
            latency: 0.001,
        };
        m.set_peer_link(5, Some(link(1e9)));
        m.set_peer_link(2, Some(link(2e9)));
        m.set_peer_link(9, Some(link(3e9)));
        m.set_peer_link(5, Some(link(4e9)));
        let to: Vec<MachineId> = m.peers.iter().map(|&(t, _)| t).collect();
        assert_eq!(to, vec![2, 5, 9]);
        assert_eq!(m.peer_link(5), Some(&link(4e9)));
        assert_eq!(m.peer_link(3), None);
        m.set_peer_link(2, None);
        assert_eq!(m.peer_link(2), None);
        assert_eq!(m.peers.len(), 2);
        assert_eq!(link(1e6).transfer_time(0), 0.0);
        assert!((link(1e6).transfer_time(1_000_000) - 1.001).abs() < 1e-12);
    }
}
