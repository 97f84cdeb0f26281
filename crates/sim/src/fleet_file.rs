//! `offload simulate --fleet FILE`: what the machines file cannot say of a simulated
//! fleet: each link's bandwidth and latency, speeds per system (e.g. a system a machine
//! builds by emulation) and machine failures during the run.

use std::collections::HashMap;

use offload_learn::{DEFAULT_BANDWIDTH, DEFAULT_LATENCY};
use offload_sched::{MachineId, MachineSpec};
use serde::Deserialize;
use thiserror::Error;

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
}
