//! `offload simulate --fleet FILE`: what the machines file cannot say of a simulated
//! fleet: each link's bandwidth and latency, speeds per system (e.g. a system a machine
//! builds by emulation), machine failures during the run, the builders' direct links to
//! each other, and a delivery target.
//!
//! ```json
//! {"bandwidth": 2.5e6, "latency": 0.02,
//!  "links": {"b1": {"bandwidth": 1e7, "latency": 0.05}},
//!  "speeds": {"b2": {"aarch64-linux": 0.2}},
//!  "failures": [{"machine": "b1", "at": 30.0}],
//!  "peers": {"bandwidth": 1e9, "latency": 0.3,
//!            "pairs": [{"from": "b1", "to": "b2", "bandwidth": 5e7}],
//!            "unreachable": [{"from": "b1", "to": "b3"}]},
//!  "target": {"name": "ssh://target", "bandwidth": 2.5e6, "latency": 0.02}}
//! ```
//!
//! - `bandwidth`, `latency`: every link between the client and a machine (bytes per
//!   second, seconds per transfer), unless `links` names the machine (by its name or
//!   host).
//! - `peers`: every builder sends to every other (and to the target) directly over a
//!   link of this bandwidth and latency; `pairs` set other figures for some (from one
//!   machine to the other and back, or only that way with `"one_way": true`), and
//!   `unreachable` lists pairs that cannot reach each other (both ways unless
//!   `"one_way": true`): copies between them relay through the client. Without
//!   `peers`, every copy between builders relays.
//! - `target`: where the requested outputs go instead of home (`offload build --to`):
//!   a store that builds nothing, linked to the client by its own `bandwidth` and
//!   `latency` (the defaults above when left out) and to the builders by the peer
//!   links. With `"closure": true` (the default) outputs refer to their inputs (as
//!   those of `scripts/gen-dag.py` do): each requested output goes with every output it
//!   was built from, and a build's inputs reach its machine with their closures; with
//!   `false`, each alone.

use std::collections::HashMap;

use offload_learn::{pair_prior, DEFAULT_BANDWIDTH, DEFAULT_LATENCY};
use offload_sched::{Link, MachineId, MachineSpec};
use serde::Deserialize;
use thiserror::Error;

use crate::Delivery;

/// The fleet file's schema.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// Bytes per second of every link not named in `links`.
    #[serde(default = "default_bandwidth")]
    pub bandwidth: f64,
    /// Seconds of fixed cost per transfer on every link not named in `links`.
    #[serde(default = "default_latency")]
    pub latency: f64,
    /// Per machine (its name, or its host).
    #[serde(default)]
    links: HashMap<String, LinkFigures>,
    /// Per machine (its name, or its host), speeds per system where they differ from
    /// its speed factor, e.g. a system it builds by emulation.
    #[serde(default)]
    speeds: HashMap<String, HashMap<String, f64>>,
    #[serde(default)]
    failures: Vec<MachineFailure>,
    /// The builders' direct links to each other and to the target.
    #[serde(default)]
    peers: Option<PeersFile>,
    /// Where the requested outputs go instead of home.
    #[serde(default)]
    target: Option<TargetFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersFile {
    bandwidth: f64,
    latency: f64,
    #[serde(default)]
    pairs: Vec<PairFigures>,
    #[serde(default)]
    unreachable: Vec<Pair>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PairFigures {
    from: String,
    to: String,
    bandwidth: Option<f64>,
    latency: Option<f64>,
    #[serde(default)]
    one_way: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pair {
    from: String,
    to: String,
    #[serde(default)]
    one_way: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    name: String,
    bandwidth: Option<f64>,
    latency: Option<f64>,
    #[serde(default = "yes")]
    closure: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkFigures {
    bandwidth: Option<f64>,
    latency: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineFailure {
    machine: String,
    /// Seconds into the run.
    at: f64,
}

fn default_bandwidth() -> f64 {
    DEFAULT_BANDWIDTH
}

fn default_latency() -> f64 {
    DEFAULT_LATENCY
}

/// A simulated fleet as a fleet file makes it.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// The machines as they are.
    pub machines: Vec<MachineSpec>,
    /// The machines as their machines file declares them: what a first run knows.
    pub declared: Vec<MachineSpec>,
    /// Where the requested outputs go; home when `None`.
    pub delivery: Option<Delivery>,
    /// Machine failures: (index in `machines`, seconds into the run).
    pub failures: Vec<(MachineId, f64)>,
}

/// A fleet file that names what is not there.
#[derive(Debug, Error, PartialEq)]
pub enum FleetFileError {
    #[error("fleet file: speed {speed} of {machine} for {system} must be above 0")]
    Speed {
        speed: f64,
        machine: String,
        system: String,
    },
    #[error("fleet file: failure of {machine:?}: no such machine; the machines are: {known}")]
    NoSuchMachine { machine: String, known: String },
    #[error(
        "fleet file: peers: {machine:?} in {pair}: no such machine; the machines are: {known}"
    )]
    NoSuchPeer {
        machine: String,
        pair: String,
        known: String,
    },
}

impl Default for FleetFile {
    /// No file: every link at the defaults, no failures.
    fn default() -> Self {
        FleetFile {
            bandwidth: DEFAULT_BANDWIDTH,
            latency: DEFAULT_LATENCY,
            links: HashMap::new(),
            speeds: HashMap::new(),
            failures: Vec::new(),
            peers: None,
            target: None,
        }
    }
}

impl FleetFile {
    /// The machine `declared` (as its machines file says; called `declared.name`, or
    /// `host`) as it is: with the link and speeds per system the file gives it.
    pub fn as_it_is(
        &self,
        declared: &MachineSpec,
        host: &str,
    ) -> Result<MachineSpec, FleetFileError> {
        let (bandwidth, latency) = self.link(&declared.name, host);
        let mut spec = MachineSpec {
            bandwidth,
            latency,
            ..declared.clone()
        };
        self.set_speeds(&mut spec, host)?;
        Ok(spec)
    }

    /// The link of the machine called `name` (or `host`): (bandwidth, latency).
    pub fn link(&self, name: &str, host: &str) -> (f64, f64) {
        let link = self.links.get(name).or_else(|| self.links.get(host));
        (
            link.and_then(|l| l.bandwidth).unwrap_or(self.bandwidth),
            link.and_then(|l| l.latency).unwrap_or(self.latency),
        )
    }

    /// Gives `spec` (called `spec.name`, or `host`) the speeds per system the file
    /// gives it, sorted by system.
    fn set_speeds(&self, spec: &mut MachineSpec, host: &str) -> Result<(), FleetFileError> {
        let Some(speeds) = self
            .speeds
            .get(&spec.name)
            .or_else(|| self.speeds.get(host))
        else {
            return Ok(());
        };
        let mut speeds: Vec<(String, f64)> = speeds.iter().map(|(s, v)| (s.clone(), *v)).collect();
        speeds.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some((system, bad)) = speeds.iter().find(|(_, v)| v.is_nan() || *v <= 0.0) {
            return Err(FleetFileError::Speed {
                speed: *bad,
                machine: spec.name.clone(),
                system: system.clone(),
            });
        }
        spec.system_speeds = speeds;
        Ok(())
    }

    /// The delivery target, as a machine that builds nothing (no system, no slot) on
    /// its own link from the client, and whether each requested output goes with its
    /// closure.
    pub fn target(&self) -> Option<(MachineSpec, bool)> {
        let t = self.target.as_ref()?;
        let spec = MachineSpec {
            systems: Vec::new(),
            bandwidth: t.bandwidth.unwrap_or(self.bandwidth),
            latency: t.latency.unwrap_or(self.latency),
            ..MachineSpec::new(t.name.clone(), "", 0, 1.0)
        };
        Some((spec, t.closure))
    }

    /// The fleet of `machines` (as they are, with the file's links and speeds) and
    /// `declared` (as their machines file says) with the file's routes and failures
    /// (machines named as [`FleetFile::connect`] names them): the delivery target added to
    /// both, the builders' pair links ([`FleetFile::connect`]; none with `relay`, as if
    /// every copy between builders relayed through the client), and the pairs that
    /// reach each other known to a first run at their prior ([`declared_peers`]).
    pub fn fleet(
        &self,
        mut machines: Vec<MachineSpec>,
        mut declared: Vec<MachineSpec>,
        relay: bool,
    ) -> Result<Fleet, FleetFileError> {
        let delivery = self.target().map(|(target, closure)| {
            declared.push(target.clone());
            machines.push(target);
            Delivery {
                target: machines.len() - 1,
                closure,
            }
        });
        if !relay {
            self.connect(&mut machines, delivery.map(|d| d.target))?;
            declared_peers(&machines, &mut declared);
        }
        Ok(Fleet {
            failures: self.failures(&machines)?,
            machines,
            declared,
            delivery,
        })
    }

    /// Gives the builders of `machines` the direct links the file's `peers` gives them:
    /// to every other builder and to the `target`, unless a pair says otherwise. Neither
    /// the client's machine nor the target sends anything directly. A pair names each
    /// machine as reports do (`b1`, `b1:STORE`) or by its URI (`ssh://b1`).
    pub fn connect(
        &self,
        machines: &mut [MachineSpec],
        target: Option<MachineId>,
    ) -> Result<(), FleetFileError> {
        let Some(peers) = &self.peers else {
            return Ok(());
        };
        let default = Link {
            bandwidth: peers.bandwidth,
            latency: peers.latency,
        };
        let senders: Vec<MachineId> = (0..machines.len())
            .filter(|&m| !machines[m].is_local && Some(m) != target)
            .collect();
        let receivers: Vec<MachineId> = (0..machines.len())
            .filter(|&m| !machines[m].is_local)
            .collect();
        for &from in &senders {
            machines[from].peers = receivers
                .iter()
                .filter(|&&to| to != from)
                .map(|&to| (to, default))
                .collect();
        }
        let find = |name: &str, pair: &str, machines: &[MachineSpec]| {
            (0..machines.len())
                .find(|&m| is_called(&machines[m], name))
                .ok_or_else(|| FleetFileError::NoSuchPeer {
                    machine: name.to_string(),
                    pair: pair.to_string(),
                    known: machines
                        .iter()
                        .filter(|m| !m.is_local)
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        // Only from a sender: neither the client's machine nor the target sends.
        let sends = |m: MachineId| senders.binary_search(&m).is_ok();
        for p in &peers.pairs {
            let pair = format!("pairs ({} → {})", p.from, p.to);
            let (a, b) = (
                find(&p.from, &pair, machines)?,
                find(&p.to, &pair, machines)?,
            );
            let link = Link {
                bandwidth: p.bandwidth.unwrap_or(peers.bandwidth),
                latency: p.latency.unwrap_or(peers.latency),
            };
            let ways = if p.one_way {
                vec![(a, b)]
            } else {
                vec![(a, b), (b, a)]
            };
            for (from, to) in ways {
                if from != to && sends(from) && !machines[to].is_local {
                    machines[from].set_peer_link(to, Some(link));
                }
            }
        }
        for p in &peers.unreachable {
            let pair = format!("unreachable ({} → {})", p.from, p.to);
            let (a, b) = (
                find(&p.from, &pair, machines)?,
                find(&p.to, &pair, machines)?,
            );
            machines[a].set_peer_link(b, None);
            if !p.one_way {
                machines[b].set_peer_link(a, None);
            }
        }
        Ok(())
    }

    /// The failures as (index in `machines`, seconds into the run).
    pub fn failures(
        &self,
        machines: &[MachineSpec],
    ) -> Result<Vec<(MachineId, f64)>, FleetFileError> {
        self.failures
            .iter()
            .map(
                |f| match machines.iter().position(|m| m.name == f.machine) {
                    Some(i) => Ok((i, f.at)),
                    None => Err(FleetFileError::NoSuchMachine {
                        machine: f.machine.clone(),
                        known: machines
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }),
                },
            )
            .collect()
    }
}

/// Whether `machine` is called `name`: its name, or that without the URI scheme
/// (`ssh://b1` names the machine called `b1`, and the target called `ssh://t` is `t` too).
fn is_called(machine: &MachineSpec, name: &str) -> bool {
    let bare = |n: &str| -> String {
        ["ssh://", "ssh-ng://"]
            .iter()
            .find_map(|p| n.strip_prefix(p))
            .unwrap_or(n)
            .to_string()
    };
    machine.name == name || bare(&machine.name) == bare(name)
}

/// Gives `declared` (the fleet as a first run knows it) the pairs `truth` reaches
/// directly, as a first run knows them: reachable (offload probes each pair), at the
/// prior of a pair never measured ([`pair_prior`]).
pub fn declared_peers(truth: &[MachineSpec], declared: &mut [MachineSpec]) {
    for from in 0..truth.len().min(declared.len()) {
        let peers = truth[from]
            .peers
            .iter()
            .filter(|&&(to, _)| to < declared.len())
            .map(|&(to, _)| (to, pair_prior(&declared[from], &declared[to])))
            .collect();
        declared[from].peers = peers;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_speeds_and_failures_by_name_or_host() {
        let file: FleetFile = serde_json::from_str(
            r#"{"bandwidth": 5e6, "links": {"b1": {"latency": 0.1}},
                "speeds": {"host2": {"x86_64-linux": 0.5}},
                "failures": [{"machine": "b1", "at": 3}]}"#,
        )
        .unwrap();
        assert_eq!(file.link("b1", "host1"), (5e6, 0.1));
        assert_eq!(file.link("b2", "host2"), (5e6, DEFAULT_LATENCY));
        let b2 = MachineSpec::new("b2", "x86_64-linux", 1, 1.0);
        let b2 = file.as_it_is(&b2, "host2").unwrap();
        assert_eq!(b2.system_speeds, vec![("x86_64-linux".to_string(), 0.5)]);
        assert_eq!((b2.bandwidth, b2.latency), (5e6, DEFAULT_LATENCY));
        let b1 = MachineSpec::new("b1", "x86_64-linux", 1, 1.0);
        assert_eq!(file.failures(&[b2.clone(), b1]).unwrap(), vec![(1, 3.0)]);
        assert!(matches!(
            file.failures(&[b2]),
            Err(FleetFileError::NoSuchMachine { .. })
        ));
        let bad: FleetFile = serde_json::from_str(r#"{"speeds": {"b": {"s": 0}}}"#).unwrap();
        let b = MachineSpec::new("b", "s", 1, 1.0);
        assert!(bad.as_it_is(&b, "b").is_err());
    }

    #[test]
    fn peers_pairs_unreachable_and_target() {
        let file: FleetFile = serde_json::from_str(
            r#"{"bandwidth": 2.5e6, "latency": 0.02,
                "peers": {"bandwidth": 1e9, "latency": 0.3,
                          "pairs": [{"from": "b1", "to": "ssh://b3", "bandwidth": 5e7},
                                    {"from": "b2", "to": "t", "latency": 1, "one_way": true}],
                          "unreachable": [{"from": "b1", "to": "b2"}]},
                "target": {"name": "ssh://t", "latency": 0.04}}"#,
        )
        .unwrap();
        let (target, closure) = file.target().unwrap();
        assert!(closure);
        assert_eq!(
            (target.slots, target.bandwidth, target.latency),
            (0, 2.5e6, 0.04)
        );
        assert!(target.systems.is_empty());
        let mut machines = vec![MachineSpec::local("x86_64-linux", 2)];
        for b in ["b1", "b2", "b3"] {
            machines.push(MachineSpec::new(b, "x86_64-linux", 2, 1.0));
        }
        machines.push(target);
        file.connect(&mut machines, Some(4)).unwrap();
        let to = |m: &MachineSpec| {
            m.peers
                .iter()
                .map(|&(t, l)| (t, l.bandwidth, l.latency))
                .collect::<Vec<_>>()
        };
        // b1: not to b2; to b3 at 50 MB/s both ways; to the target at the default.
        assert_eq!(to(&machines[1]), vec![(3, 5e7, 0.3), (4, 1e9, 0.3)]);
        assert_eq!(to(&machines[2]), vec![(3, 1e9, 0.3), (4, 1e9, 1.0)]);
        assert_eq!(
            to(&machines[3]),
            vec![(1, 5e7, 0.3), (2, 1e9, 0.3), (4, 1e9, 0.3)]
        );
        // Neither the client nor the target sends directly.
        assert!(machines[0].peers.is_empty() && machines[4].peers.is_empty());
        // A first run knows who reaches whom, at the better of the two client links.
        let mut declared = machines.clone();
        (declared[1].bandwidth, declared[1].latency) = (1e6, 0.01);
        (declared[3].bandwidth, declared[3].latency) = (9e6, 0.0);
        declared_peers(&machines, &mut declared);
        assert_eq!(to(&declared[1]), vec![(3, 9e6, 0.0), (4, 2.5e6, 0.04)]);
        let bad: FleetFile = serde_json::from_str(
            r#"{"peers": {"bandwidth": 1, "latency": 1, "unreachable": [{"from": "b9", "to": "b1"}]}}"#,
        )
        .unwrap();
        assert!(matches!(
            bad.connect(&mut machines, Some(4)),
            Err(FleetFileError::NoSuchPeer { .. })
        ));
    }
}
