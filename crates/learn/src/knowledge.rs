//! Everything learned, ready for planning: each derivation's work and outputs' size,
//! each machine's speeds, costs per build and link.

use std::collections::HashMap;

use offload_sched::MachineSpec;

use crate::estimate::{package_name, EstimateSource, DEFAULT_SECONDS};
use crate::links::{link_figures, LinkFigures, Transfer};
use crate::speeds::{fit_calibrated, Learned};
use crate::stats::median;
use crate::{moved, BuildRow};

/// Everything learned, ready for planning.
#[derive(Debug, Clone, Default)]
pub struct Knowledge {
    /// Seconds at speed 1, per derivation name, and per package name (no version).
    work: HashMap<String, f64>,
    package_work: HashMap<String, f64>,
    output_bytes: HashMap<String, u64>,
    speeds: HashMap<(String, String), Learned>,
    links: HashMap<String, LinkFigures>,
    /// Per machine: seconds a build costs there besides its own time, and the builds
    /// that says.
    per_build: HashMap<String, (f64, usize)>,
    /// Per system: what the machines file's speed factor 1 is worth here (see
    /// [`fit`](crate::fit)'s calibration), for builders nothing was learned of.
    scales: HashMap<String, f64>,
    /// Build rows the fit read.
    rows: usize,
}

impl Knowledge {
    /// What `rows` (newest first) say of each derivation's time and each machine's
    /// speed; nothing of links, sizes or costs per build.
    pub fn from_builds(rows: &[BuildRow], local_system: &str) -> Knowledge {
        let (work, speeds, scales) = fit_calibrated(rows, local_system);
        let mut package_samples: HashMap<String, Vec<f64>> = HashMap::new();
        for (name, &w) in &work {
            package_samples
                .entry(package_name(name).to_string())
                .or_default()
                .push(w);
        }
        let package_work = package_samples
            .into_iter()
            .map(|(p, mut v)| (p, median(&mut v)))
            .collect();
        Knowledge {
            work,
            package_work,
            speeds,
            scales,
            rows: rows.len(),
            ..Knowledge::default()
        }
    }

    /// Build rows the fit read: [`refit_interval`](crate::refit_interval) of the next fit.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Estimated seconds for `name` at speed 1.
    pub fn estimate(&self, name: &str) -> (f64, EstimateSource) {
        if let Some(&w) = self.work.get(name) {
            return (w, EstimateSource::Exact);
        }
        if let Some(&w) = self.package_work.get(package_name(name)) {
            return (w, EstimateSource::OtherVersion);
        }
        (DEFAULT_SECONDS, EstimateSource::Default)
    }

    /// NAR bytes of the outputs of `name`, when measured.
    pub fn output_bytes(&self, name: &str) -> Option<u64> {
        self.output_bytes.get(name).copied()
    }

    /// The learned speed of `machine` (its key) for `system`, when it built any.
    pub fn speed(&self, machine: &str, system: &str) -> Option<Learned> {
        self.speeds
            .get(&(machine.to_string(), system.to_string()))
            .copied()
    }

    /// Seconds a build costs on `machine` besides its own time, and the builds behind it.
    pub fn per_build(&self, machine: &str) -> Option<(f64, usize)> {
        self.per_build.get(machine).copied()
    }

    /// The learned figures of `machine`'s link.
    pub fn link(&self, machine: &str) -> Option<LinkFigures> {
        self.links.get(machine).copied()
    }

    /// The learned speeds of machine `key` for its `systems`: the first system's as
    /// the machine's own, and each system's; `None` when nothing was learned.
    pub fn speeds_of(&self, key: &str, systems: &[String]) -> Option<(f64, Vec<(String, f64)>)> {
        let per_system: Vec<(String, f64)> = systems
            .iter()
            .filter_map(|system| Some((system.clone(), self.speed(key, system)?.speed)))
            .collect();
        let first = systems.first()?;
        let own = per_system.iter().find(|(s, _)| s == first)?.1;
        Some((own, per_system))
    }

    /// The speeds to plan `spec` (machine `key`, declared at speed factor `declared`)
    /// with: those learned, as [`Knowledge::speeds_of`]; for a builder nothing was
    /// learned of, its declared factor on the scale the other builders showed; `None`
    /// when neither says anything.
    pub fn planned_speeds(
        &self,
        key: &str,
        spec: &MachineSpec,
        declared: f64,
    ) -> Option<(f64, Vec<(String, f64)>)> {
        if let Some(learned) = self.speeds_of(key, &spec.systems) {
            return Some(learned);
        }
        if spec.is_local {
            return None;
        }
        let scaled: Vec<(String, f64)> = spec
            .systems
            .iter()
            .filter_map(|s| Some((s.clone(), declared * self.scales.get(s)?)))
            .collect();
        let first = spec.systems.first()?;
        let own = scaled.iter().find(|(s, _)| s == first)?.1;
        Some((own, scaled))
    }

    /// [`Knowledge::planned_speeds`] when they moved by more than a tenth from those
    /// `spec` is planned with now: a fit during a run replaces only those.
    pub fn moved_speeds(
        &self,
        key: &str,
        spec: &MachineSpec,
        declared: f64,
    ) -> Option<(f64, Vec<(String, f64)>)> {
        let (speed, per_system) = self.planned_speeds(key, spec, declared)?;
        let changed = moved(spec.speed, speed)
            || per_system
                .iter()
                .any(|(sys, s)| moved(spec.speed_for(sys), *s));
        changed.then_some((speed, per_system))
    }

    /// Gives machine `key` (in the state) the planning figures learned of it: per
    /// system, the learned speed where there is one (the first system's also becomes
    /// the machine's own); what a build costs there besides its own time; a builder's
    /// link's bandwidth and latency.
    pub fn apply_to(&self, key: &str, spec: &mut MachineSpec) {
        if let Some((speed, per_system)) = self.planned_speeds(key, spec, spec.speed) {
            spec.speed = speed;
            spec.system_speeds = per_system;
        }
        if let Some((seconds, _)) = self.per_build(key) {
            spec.per_build = seconds;
        }
        if !spec.is_local {
            if let Some(link) = self.link(key) {
                spec.bandwidth = link.bandwidth;
                spec.latency = link.latency;
            }
        }
    }

    /// With each derivation's outputs' NAR bytes: the median of `sizes` (per name, its
    /// recent builds' measures).
    pub fn with_output_sizes(self, sizes: HashMap<String, Vec<f64>>) -> Knowledge {
        let output_bytes = sizes
            .into_iter()
            .map(|(n, mut v)| (n, median(&mut v) as u64))
            .collect();
        Knowledge {
            output_bytes,
            ..self
        }
    }

    /// With each machine's link, fitted from `transfers` (per machine key, its recent
    /// copies, at most [`RECENT_TRANSFERS`](crate::RECENT_TRANSFERS) of them).
    pub fn with_transfers(self, transfers: HashMap<String, Vec<Transfer>>) -> Knowledge {
        let links = transfers
            .into_iter()
            .filter_map(|(m, t)| link_figures(&t).map(|f| (m, f)))
            .collect();
        Knowledge { links, ..self }
    }

    /// With what a build costs on each machine besides itself and its inputs' copies
    /// (the links' to learn): the lower quartile of `extra` (per machine key, the
    /// seconds its recent tasks took over their builds' own time).
    pub fn with_costs_per_build(self, extra: HashMap<String, Vec<f64>>) -> Knowledge {
        let per_build = extra
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(m, mut v)| {
                v.sort_by(f64::total_cmp);
                let n = v.len();
                (m, (v[n / 4], n))
            })
            .collect();
        Knowledge { per_build, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit;
    use crate::tests::{row, SYS};

    #[test]
    fn builders_nothing_was_learned_of_start_on_the_scale_the_others_showed() {
        // Declared 1 everywhere; two builders took enough of a run's builds to show
        // they are three times slower than this machine, the third only two.
        let mut rows = Vec::new();
        let times = [1.0, 2.0, 1.5, 2.5, 0.8, 1.2];
        let mut push = |machine: &str, i: usize, t: f64| {
            rows.push(BuildRow {
                run: Some("run-1".into()),
                ..row(&format!("{machine}-{i}"), SYS, machine, t)
            })
        };
        for (i, &t) in times.iter().enumerate() {
            push("local", i, t);
            push("ssh://a", i, 3.0 * t);
            push("ssh://b", i, 3.0 * t);
        }
        push("ssh://c", 0, 3.0);
        push("ssh://c", 1, 6.0);
        let knowledge = Knowledge::from_builds(&rows, SYS);
        let c = knowledge.speed("ssh://c", SYS).unwrap();
        assert_eq!(c.samples, 0);
        assert!((0.25..0.45).contains(&c.speed), "{c:?}");
        // Its two derivations count at that speed.
        assert!(knowledge.estimate("ssh://c-1").0 < 3.0);
        // A builder with no builds at all, declared twice as fast as the others.
        let mut d = MachineSpec::new("ssh://d", SYS, 2, 2.0);
        knowledge.apply_to("ssh://d", &mut d);
        assert!((0.5..0.9).contains(&d.speed), "{d:?}");
        // Without builders to show the scale, declared factors stay as they are.
        let (_, alone) = fit(&rows[rows.len() - 2..], SYS);
        assert_eq!(alone[&("ssh://c".to_string(), SYS.to_string())].speed, 1.0);
    }

    #[test]
    fn what_a_build_costs_besides_itself_is_its_lower_quartile() {
        // Four builds on a builder: 0.4 s around each, and once 3 s of input copies.
        let extra = HashMap::from([("ssh://b".to_string(), vec![0.4, 0.45, 3.0, 0.4])]);
        let k = Knowledge::default().with_costs_per_build(extra);
        let (seconds, samples) = k.per_build("ssh://b").unwrap();
        assert!((seconds - 0.4).abs() < 1e-9, "{seconds}");
        assert_eq!(samples, 4);
        assert_eq!(k.per_build("local"), None);
    }

    #[test]
    fn sizes_and_links_are_kept_per_name_and_machine() {
        let sizes = HashMap::from([("d".to_string(), vec![3.0, 1.0, 2.0])]);
        let copies = vec![Transfer {
            bytes: 16_000_000,
            seconds: 2.005,
            concurrent: 1,
        }];
        let k = Knowledge::default()
            .with_output_sizes(sizes)
            .with_transfers(HashMap::from([("ssh://b".to_string(), copies)]));
        assert_eq!(k.output_bytes("d"), Some(2));
        assert_eq!(k.output_bytes("e"), None);
        let link = k.link("ssh://b").unwrap();
        assert!((link.bandwidth - 8e6).abs() < 1e3, "{link:?}");
        // Planned with: a builder's link, never this machine's.
        let mut b = MachineSpec::new("ssh://b", SYS, 2, 1.0);
        k.apply_to("ssh://b", &mut b);
        assert_eq!(b.bandwidth, link.bandwidth);
    }
}
