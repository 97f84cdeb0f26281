//! How fast each machine builds each system: `seconds = work(name) / speed(machine,
//! system)` fitted by alternating medians over the recent builds, with this machine's
//! native system as the unit, shrunk towards each machine's declared speed factor when
//! few comparisons say anything, and helped by what a run's population of builds says.

use std::collections::HashMap;

use crate::stats::{median, pooled_variance, trimmed_mean};
use crate::{BuildRow, LOCAL_KEY};

/// Builds of one derivation on one machine that count (the most recent).
pub const RECENT_PER_CELL: usize = 5;
/// Rounds of the alternating fit; each halves what is left to settle, or better.
const FIT_ROUNDS: usize = 16;
/// How much a machine's declared speed factor weighs against one comparison.
const PRIOR_WEIGHT: f64 = 0.25;
/// How much one build of a run weighs against one comparison, for a machine's speed
/// from its run's population of builds.
const POPULATION_WEIGHT: f64 = 1.0;
/// Builds of a run on each side before its population says anything.
const MIN_POPULATION: usize = 3;

/// A learned speed and how many derivations it rests on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learned {
    pub speed: f64,
    /// Derivations that machine and system built that some other machine built too.
    pub samples: usize,
}

type Key = (String, String);

/// Fits `seconds = work(name) / speed(machine, system)` to `rows` (newest first):
/// returns the work per name at speed 1 and the speed per (machine, system). This
/// machine's `local_system` is the unit; other machines and systems start from their
/// declared speed and move as far as their comparisons say.
pub fn fit(
    rows: &[BuildRow],
    local_system: &str,
) -> (HashMap<String, f64>, HashMap<(String, String), Learned>) {
    let (work, speeds, _) = fit_calibrated(rows, local_system);
    (work, speeds)
}

/// [`fit`], and per system the scale of the machines file's speed factors against this
/// machine. Speed factors rank builders among themselves (this machine has none), so
/// the builders a fit could say something of tell that scale, the median of their
/// learned speed over their declared one; a builder nothing was learned of yet starts
/// from its declared factor on that scale. A fleet declared all at 1 whose first two
/// builders proved three times slower than this machine then plans its third, which
/// took only two builds, as slow too, not as fast as this one.
pub(crate) fn fit_calibrated(
    rows: &[BuildRow],
    local_system: &str,
) -> (
    HashMap<String, f64>,
    HashMap<Key, Learned>,
    HashMap<String, f64>,
) {
    let mut declared = declared_speeds(rows);
    let anchor: Key = (LOCAL_KEY.to_string(), local_system.to_string());
    let population = population_speeds(rows, &anchor);
    let (work, speeds) = fit_with(rows, &anchor, &declared, &population);
    let mut ratios: HashMap<&str, Vec<f64>> = HashMap::new();
    for ((machine, system), l) in &speeds {
        if machine != LOCAL_KEY && l.samples > 0 {
            let d = declared[&(machine.clone(), system.clone())];
            ratios.entry(system).or_default().push((l.speed / d).ln());
        }
    }
    let scales: HashMap<String, f64> = ratios
        .into_iter()
        .map(|(system, mut v)| (system.to_string(), median(&mut v).exp()))
        .collect();
    // A builder its runs showed alike this machine keeps its declared speed when that
    // scale is more than its runs allow (one builder that stood out slow says little
    // of the others).
    let rescaled: HashMap<Key, f64> = speeds
        .iter()
        .filter(|((machine, _), l)| machine != LOCAL_KEY && l.samples == 0)
        .filter_map(|(key, _)| Some((key, declared[key] * scales.get(&key.1)?)))
        .filter(|(key, speed)| population.get(*key).is_none_or(|p| p.admits(*speed)))
        .map(|(key, speed)| (key.clone(), speed))
        .collect();
    if rescaled.is_empty() {
        return (work, speeds, scales);
    }
    declared.extend(rescaled);
    let (work, speeds) = fit_with(rows, &anchor, &declared, &population);
    (work, speeds, scales)
}

/// Each machine and system's declared speed, as its newest row says (1 here).
fn declared_speeds(rows: &[BuildRow]) -> HashMap<Key, f64> {
    let mut declared: HashMap<Key, f64> = HashMap::new();
    for r in rows {
        declared
            .entry((r.machine.clone(), r.system.clone()))
            .or_insert(if r.machine == LOCAL_KEY {
                1.0
            } else {
                r.declared_speed.max(1e-3)
            });
    }
    declared
}

/// [`fit`] with `declared` as each machine and system's speed before any comparison,
/// `anchor` (this machine's native system) the unit, and what the runs' `population`
/// of builds said.
fn fit_with(
    rows: &[BuildRow],
    anchor: &Key,
    declared: &HashMap<Key, f64>,
    population: &HashMap<Key, Population>,
) -> (HashMap<String, f64>, HashMap<Key, Learned>) {
    // Each (name, machine+system) cell: the median of its recent builds.
    let mut cells: HashMap<(String, Key), Vec<f64>> = HashMap::new();
    for r in rows {
        let key = (r.machine.clone(), r.system.clone());
        let cell = cells.entry((r.name.clone(), key)).or_default();
        if cell.len() < RECENT_PER_CELL {
            cell.push(r.seconds.max(0.01));
        }
    }
    let cells: Vec<(String, Key, f64)> = cells
        .into_iter()
        .map(|((name, key), mut v)| (name, key, median(&mut v)))
        .collect();
    let anchored = declared.contains_key(anchor);
    // Before any comparison, a run's own builds say something: its derivations on
    // each machine against those on this one, when they stand out of the noise.
    let prior: HashMap<Key, f64> = declared
        .iter()
        .map(|(key, &d)| {
            let p = match population.get(key) {
                Some(p) if p.stands_out() => {
                    shrink(p.speed(), p.builds as f64 * POPULATION_WEIGHT, d)
                }
                _ => d,
            };
            (key.clone(), p)
        })
        .collect();
    let mut speed: HashMap<Key, f64> = prior.clone();
    // Names built on more than one machine or system: only they compare speeds.
    let mut keys_per_name: HashMap<&str, usize> = HashMap::new();
    for (name, _, _) in &cells {
        *keys_per_name.entry(name).or_default() += 1;
    }
    let mut work: HashMap<String, f64> = HashMap::new();
    let mut samples: HashMap<Key, usize> = HashMap::new();
    for _ in 0..FIT_ROUNDS {
        let mut per_name: HashMap<&str, Vec<f64>> = HashMap::new();
        for (name, key, t) in &cells {
            per_name.entry(name).or_default().push(t * speed[key]);
        }
        work = per_name
            .into_iter()
            .map(|(n, mut v)| (n.to_string(), median(&mut v)))
            .collect();
        // The medians float with the other machines' votes: scale them back so that
        // this machine's own builds take their work's time.
        if anchored {
            let mut scale: Vec<f64> = cells
                .iter()
                .filter(|(_, key, _)| key == anchor)
                .map(|(name, _, t)| t / work[name].max(1e-9))
                .collect();
            let c = median(&mut scale);
            if c > 0.0 {
                for w in work.values_mut() {
                    *w *= c;
                }
            }
        }
        let mut ratios: HashMap<&Key, Vec<f64>> = HashMap::new();
        for (name, key, t) in &cells {
            if keys_per_name[name.as_str()] > 1 {
                ratios.entry(key).or_default().push(work[name] / t);
            }
        }
        samples.clear();
        for (key, mut v) in ratios {
            samples.insert(key.clone(), v.len());
            if !(anchored && key == anchor) {
                speed.insert(key.clone(), median(&mut v).max(1e-6));
            }
        }
    }
    // Few comparisons: stay near the prior (the declaration, or what the runs'
    // populations said).
    let learned = speed
        .into_iter()
        .map(|(key, fitted)| {
            let compared = samples.get(&key).copied().unwrap_or(0);
            let from_runs = population
                .get(&key)
                .filter(|p| p.stands_out())
                .map_or(0, |p| p.builds);
            let speed = if anchored && &key == anchor {
                1.0
            } else if compared == 0 {
                prior[&key]
            } else {
                shrink(fitted, compared as f64, prior[&key])
            };
            let samples = compared.max(from_runs);
            (key, Learned { speed, samples })
        })
        .collect();
    (work, learned)
}

/// `measured` with `weight` comparisons behind it, pulled towards `prior` (which weighs
/// [`PRIOR_WEIGHT`]), in log space.
fn shrink(measured: f64, weight: f64, prior: f64) -> f64 {
    ((weight * measured.max(1e-6).ln() + PRIOR_WEIGHT * prior.ln()) / (weight + PRIOR_WEIGHT)).exp()
}

/// Per machine and system, its speed from the runs in which it and this machine's
/// native system (`anchor`) both built: the typical time of the run's derivations here
/// over there (a trimmed mean of log times), runs weighted by how sure each is, with the
/// number of builds behind it. A run spreads one graph's derivations over its machines,
/// so their times are comparable in the mass even with no derivation built twice; but
/// derivations differ, so a difference counts only when it stands out of the noise (two
/// standard errors): machines alike stay at their declared speeds. The noise is how
/// much the run's derivations differ, measured over all its builds wherever they ran
/// (a pooled variance), so a machine that took only three builds is judged by the
/// spread of thirty, not of its three.
fn population_speeds(rows: &[BuildRow], anchor: &Key) -> HashMap<Key, Population> {
    let mut per_run: HashMap<&str, HashMap<(String, String), Vec<f64>>> = HashMap::new();
    for r in rows {
        if let Some(run) = &r.run {
            per_run
                .entry(run)
                .or_default()
                .entry((r.machine.clone(), r.system.clone()))
                .or_default()
                .push(r.seconds.max(0.01).ln());
        }
    }
    // Per key: sum of d / se², sum of 1 / se², builds.
    let mut sums: HashMap<Key, (f64, f64, usize)> = HashMap::new();
    for keys in per_run.values_mut() {
        let Some(mut here) = keys.remove(anchor) else {
            continue;
        };
        if here.len() < MIN_POPULATION {
            continue;
        }
        let here_typical = trimmed_mean(&mut here);
        let spread = pooled_variance(keys.values().chain([&here]));
        for (key, mut there) in keys.drain() {
            if there.len() < MIN_POPULATION {
                continue;
            }
            let d = here_typical - trimmed_mean(&mut there);
            let se2 = (spread * (1.0 / here.len() as f64 + 1.0 / there.len() as f64)).max(1e-6);
            let entry = sums.entry(key).or_insert((0.0, 0.0, 0));
            entry.0 += d / se2;
            entry.1 += 1.0 / se2;
            entry.2 += here.len().min(there.len());
        }
    }
    sums.into_iter()
        .map(|(key, (weighted, weights, builds))| {
            let population = Population {
                log_speed: weighted / weights,
                se: (1.0 / weights).sqrt(),
                builds,
            };
            (key, population)
        })
        .collect()
}

/// What a machine's builds in runs beside this machine's say of its speed.
#[derive(Debug, Clone, Copy)]
struct Population {
    /// Its speed's logarithm, against this machine's.
    log_speed: f64,
    /// The standard error of that.
    se: f64,
    /// The builds behind it.
    builds: usize,
}

impl Population {
    /// Its speed.
    fn speed(&self) -> f64 {
        self.log_speed.exp()
    }

    /// Whether it differs from this machine beyond the noise (two standard errors).
    fn stands_out(&self) -> bool {
        self.log_speed.abs() > 2.0 * self.se
    }

    /// Whether `speed` is within the noise of what it says.
    fn admits(&self, speed: f64) -> bool {
        (speed.max(1e-9).ln() - self.log_speed).abs() <= 2.0 * self.se
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{row, SYS};

    #[test]
    fn speeds_per_machine_and_system_come_from_shared_derivations() {
        let mut rows = Vec::new();
        for i in 0..8 {
            let w = 1.0 + i as f64;
            let name = format!("d{i}");
            rows.push(row(&name, SYS, "local", w));
            // Three times slower than this machine.
            rows.push(row(&name, SYS, "ssh://slow", 3.0 * w));
            // Twice as fast, but once on a loaded machine: the median shrugs it off.
            rows.push(row(
                &name,
                SYS,
                "ssh://fast",
                if i == 3 { 40.0 } else { w / 2.0 },
            ));
            // The same derivation names for an emulated system, five times slower
            // than that machine's native one.
            rows.push(row(&name, "aarch64-linux", "ssh://slow", 15.0 * w));
        }
        let (work, speeds) = fit(&rows, SYS);
        let s = |m: &str, sys: &str| speeds[&(m.to_string(), sys.to_string())];
        assert_eq!(s("local", SYS).speed, 1.0);
        // Eight comparisons against the declared 1: within 15 % of the truth.
        let near = |got: f64, want: f64| (got / want - 1.0).abs() < 0.15;
        assert!(
            near(s("ssh://slow", SYS).speed, 1.0 / 3.0),
            "{:?}",
            s("ssh://slow", SYS)
        );
        assert!(
            near(s("ssh://fast", SYS).speed, 2.0),
            "{:?}",
            s("ssh://fast", SYS)
        );
        assert!(
            near(s("ssh://slow", "aarch64-linux").speed, 1.0 / 15.0),
            "{:?}",
            s("ssh://slow", "aarch64-linux")
        );
        assert_eq!(s("ssh://slow", SYS).samples, 8);
        assert!(near(work["d4"], 5.0), "{}", work["d4"]);
    }

    #[test]
    fn a_machine_without_comparisons_keeps_its_declared_speed() {
        let rows = vec![
            BuildRow {
                declared_speed: 4.0,
                ..row("only-there", SYS, "ssh://big", 2.0)
            },
            row("only-here", SYS, "local", 3.0),
        ];
        let (work, speeds) = fit(&rows, SYS);
        let big = speeds[&("ssh://big".to_string(), SYS.to_string())];
        assert_eq!((big.speed, big.samples), (4.0, 0));
        // Its build counts at its declared speed.
        assert_eq!(work["only-there"], 8.0);
    }

    #[test]
    fn one_comparison_moves_a_machine_most_of_the_way() {
        let rows = vec![row("a", SYS, "local", 4.0), row("a", SYS, "ssh://b", 1.0)];
        let (work, speeds) = fit(&rows, SYS);
        let b = speeds[&("ssh://b".to_string(), SYS.to_string())];
        // From the declared 1 to the measured 4, 80 % of the way in log space.
        assert!((b.speed - 4f64.powf(0.8)).abs() < 0.01, "{b:?}");
        assert!((work["a"] - 4.0).abs() < 0.01, "{}", work["a"]);
    }

    #[test]
    fn one_run_with_no_derivation_built_twice_still_tells_speeds() {
        // One graph spread over this machine and a builder three times slower, whose
        // aarch64-linux builds are five times slower again; each derivation built once.
        let mut rows = Vec::new();
        let typical = [1.0, 2.0, 3.0, 4.0, 5.0, 0.5];
        let similar = [1.1, 1.9, 3.2, 3.9, 5.1, 0.6];
        for (i, (&a, &b)) in typical.iter().zip(&similar).enumerate() {
            let run = Some("run-1".to_string());
            rows.push(BuildRow {
                run: run.clone(),
                ..row(&format!("here-{i}"), SYS, "local", a)
            });
            rows.push(BuildRow {
                run: run.clone(),
                ..row(&format!("there-{i}"), SYS, "ssh://slow", 3.0 * b)
            });
            rows.push(BuildRow {
                run,
                ..row(&format!("arm-{i}"), "aarch64-linux", "ssh://slow", 15.0 * a)
            });
        }
        let (work, speeds) = fit(&rows, SYS);
        let s = |sys: &str| speeds[&("ssh://slow".to_string(), sys.to_string())];
        let near = |got: f64, want: f64| (got / want - 1.0).abs() < 0.2;
        assert!(near(s(SYS).speed, 1.0 / 3.0), "{:?}", s(SYS));
        assert!(
            near(s("aarch64-linux").speed, 1.0 / 15.0),
            "{:?}",
            s("aarch64-linux")
        );
        assert_eq!(s(SYS).samples, 6);
        // Their derivations' work is counted at that speed.
        assert!(near(work["there-3"], 3.9), "{}", work["there-3"]);
        // Machines alike whose derivations merely differ say nothing.
        let alike: Vec<BuildRow> = typical
            .iter()
            .zip(&similar)
            .enumerate()
            .flat_map(|(i, (&a, &b))| {
                let run = Some("run-2".to_string());
                [
                    BuildRow {
                        run: run.clone(),
                        ..row(&format!("x-{i}"), SYS, "local", a)
                    },
                    BuildRow {
                        run,
                        ..row(&format!("y-{i}"), SYS, "ssh://same", 1.3 * b)
                    },
                ]
            })
            .collect();
        let same = fit(&alike, SYS).1[&("ssh://same".to_string(), SYS.to_string())];
        assert_eq!(same.speed, 1.0, "{same:?}");
        // Without a run to compare in, nothing is said.
        let lone: Vec<BuildRow> = rows
            .iter()
            .cloned()
            .map(|r| BuildRow { run: None, ..r })
            .collect();
        assert_eq!(
            fit(&lone, SYS).1[&("ssh://slow".to_string(), SYS.to_string())].speed,
            1.0
        );
    }

    #[test]
    fn one_builder_standing_out_slow_leaves_those_measured_alike_at_their_speed() {
        // A first run where fleet3 was six times slower and fleet1 and fleet2 were like
        // this machine (scripts/bench-fleet.sh's turned-slow case, after it turned):
        // fleet3's speed must not become the scale of the others, as it did for a
        // builder nothing was learned of.
        let times = [0.6, 0.9, 2.3, 1.6, 2.2, 0.3, 2.1, 2.8, 2.3, 2.6];
        let mut rows = Vec::new();
        for (machine, factor) in [
            ("local", 1.0),
            ("ssh://fleet1", 1.0),
            ("ssh://fleet2", 1.0),
            ("ssh://fleet3", 6.0),
        ] {
            for (i, t) in times.iter().enumerate() {
                // Each derivation built once: names differ per machine.
                let t = t * factor * if i % 2 == 0 { 1.1 } else { 0.9 };
                rows.push(BuildRow {
                    run: Some("run-1".into()),
                    ..row(&format!("{machine}-{i}"), SYS, machine, t)
                });
            }
        }
        let speeds = fit(&rows, SYS).1;
        let speed = |m: &str| speeds[&(m.to_string(), SYS.to_string())].speed;
        for m in ["ssh://fleet1", "ssh://fleet2"] {
            assert!((0.8..1.25).contains(&speed(m)), "{m}: {}", speed(m));
        }
        assert!(speed("ssh://fleet3") < 0.5, "{}", speed("ssh://fleet3"));
    }

    #[test]
    fn a_machine_that_took_three_builds_of_a_run_is_judged_by_the_whole_runs_spread() {
        // A first run on this machine and three builders three times slower, as
        // scripts/bench-fleet.sh measured it: fleet3 took only three of the thirty
        // builds, one of them a short one. Judged by the spread of its three alone it
        // looked like this machine and kept its declared 1; the next run then gave it
        // the critical path.
        let run: &[(&str, &[f64])] = &[
            (
                "local",
                &[
                    0.98, 2.41, 2.85, 2.57, 1.56, 1.25, 2.57, 1.53, 1.84, 0.86, 2.8, 1.76, 1.65,
                    1.39, 1.16, 0.72, 1.76,
                ],
            ),
            ("ssh://fleet1", &[1.75, 6.38, 7.02, 3.17, 6.2]),
            ("ssh://fleet2", &[4.73, 6.48, 8.96, 3.41, 4.19]),
            ("ssh://fleet3", &[0.9, 8.64, 5.43]),
        ];
        let rows: Vec<BuildRow> = run
            .iter()
            .flat_map(|&(machine, times)| {
                times.iter().enumerate().map(move |(i, &t)| BuildRow {
                    run: Some("run-1".into()),
                    ..row(&format!("{machine}-{i}"), SYS, machine, t)
                })
            })
            .collect();
        let speeds = fit(&rows, SYS).1;
        for m in ["ssh://fleet1", "ssh://fleet2", "ssh://fleet3"] {
            let s = speeds[&(m.to_string(), SYS.to_string())].speed;
            assert!((0.25..0.6).contains(&s), "{m}: {s}");
        }
    }
}
