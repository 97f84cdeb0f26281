//! What the state database teaches about the fleet: how fast each machine builds each
//! system, how long each derivation takes, how big its outputs are, and how fast each
//! link is. The planner uses all of it ([`Knowledge::apply`]).
//!
//! Machines are keyed by their store URI as written (`local` for this machine), so a
//! host reached with two stores, or with other parameters, is two machines.
//!
//! Speeds are fitted, not taken from the machines file: a build's duration is modelled
//! as `work(name) / speed(machine, system)`, with this machine's native system as the
//! unit. Alternating medians fit both sides over the recent builds (the median of each
//! derivation's last builds on each machine), so one slow build on a loaded machine
//! moves nothing. A machine or system with few comparisons stays near its declared
//! speed factor: one comparison moves it 80 % of the way, in log space.

use std::collections::HashMap;

use offload_sched::MachineSpec;
use rusqlite::params;

use crate::fleet::{MachineConfig, DEFAULT_BANDWIDTH, DEFAULT_LATENCY};
use crate::state::{package_name, EstimateSource, StateDb, StateError, DEFAULT_SECONDS};

/// Seconds between fits of the machines' speeds during a run, when a fit reads all of
/// [`ROWS_READ`] (see [`refit_interval`]).
pub const REFIT_INTERVAL: f64 = 2.0;
/// A fitted speed that moved by more than this fraction replaces the planned one.
const REFIT_CHANGE: f64 = 0.1;

/// Whether a fitted figure moved far enough from the planned one to replace it.
pub fn moved(old: f64, new: f64) -> bool {
    (new / old.max(1e-9) - 1.0).abs() > REFIT_CHANGE
}

/// What `machines` tables and the planner call this machine in the state.
pub const LOCAL_KEY: &str = "local";
/// Builds of one derivation on one machine that count (the most recent).
const RECENT_PER_CELL: usize = 5;
/// Build rows read for a fit (the most recent).
pub const ROWS_READ: usize = 20_000;

/// Seconds to wait after a fit over `rows` build rows before the next during a run. A
/// fit's cost grows with the rows it reads, so a small state is fitted again at every
/// build's end: the plan then acts on a build that showed its machine slower than
/// planned before it places the next one. On the first run over three builders 3×
/// slower than declared, a 2-s wait let the critical derivation go to one of them
/// 0.6 s after the build that showed it (8.5 s for 2.8 s of work) had ended.
pub fn refit_interval(rows: usize) -> f64 {
    REFIT_INTERVAL * (rows as f64 / ROWS_READ as f64).min(1.0)
}
/// Transfers per machine that count for its link (the most recent).
pub const RECENT_TRANSFERS: usize = 100;
/// Transfers below this size time the link's latency; from [`BIG_TRANSFER`] on, its
/// throughput.
const SMALL_TRANSFER: u64 = 64 * 1024;
const BIG_TRANSFER: u64 = 1 << 20;
/// Rounds of the alternating fit; each halves what is left to settle, or better.
const FIT_ROUNDS: usize = 16;
/// How much a machine's declared speed factor weighs against one comparison.
const PRIOR_WEIGHT: f64 = 0.25;
/// How much one build of a run weighs against one comparison, for a machine's speed
/// from its run's population of builds.
const POPULATION_WEIGHT: f64 = 1.0;
/// Builds of a run on each side before its population says anything.
const MIN_POPULATION: usize = 3;

/// One recorded build, as the fit reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRow {
    pub name: String,
    pub system: String,
    pub machine: String,
    pub seconds: f64,
    /// The speed factor the machines file gave the machine then.
    pub declared_speed: f64,
    /// The run it was part of, when recorded.
    pub run: Option<String>,
}

/// A learned speed and how many derivations it rests on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learned {
    pub speed: f64,
    /// Derivations that machine and system built that some other machine built too.
    pub samples: usize,
}

/// A link's figures, from the transfers over it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkFigures {
    /// Bytes per second.
    pub bandwidth: f64,
    /// Seconds of fixed cost per transfer.
    pub latency: f64,
    /// Transfers they rest on.
    pub samples: usize,
}

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
    /// [`fit`]'s calibration), for builders nothing was learned of.
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

    /// Build rows the fit read: [`refit_interval`] of the next fit.
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

    /// Gives the fleet's planning figures what was learned: per system, the learned
    /// speed where there is one (the first system's also becomes the machine's own);
    /// each remote link's bandwidth and latency.
    pub fn apply(&self, fleet: &mut [MachineConfig]) {
        for m in fleet {
            self.apply_to(&m.endpoint.name, &mut m.spec);
        }
    }

    /// [`Knowledge::apply`] for one machine, `key` in the state.
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
}

impl StateDb {
    /// Fits what the recorded builds and transfers say; `local_system` is this
    /// machine's native system, the unit of speed.
    pub fn knowledge(&self, local_system: &str) -> Result<Knowledge, StateError> {
        let err = || self.error("reading what was learned");
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT name, system, machine, seconds, speed, run FROM builds
                 ORDER BY rowid DESC LIMIT ?1",
            )
            .map_err(err())?;
        let rows: Vec<BuildRow> = stmt
            .query_map(params![ROWS_READ as i64], |r| {
                Ok(BuildRow {
                    name: r.get(0)?,
                    system: r.get(1)?,
                    machine: r.get(2)?,
                    seconds: r.get(3)?,
                    declared_speed: r.get(4)?,
                    run: r.get(5)?,
                })
            })
            .map_err(err())?
            .collect::<Result<_, _>>()
            .map_err(err())?;
        let from_builds = Knowledge::from_builds(&rows, local_system);

        let sizes: HashMap<String, Vec<f64>> = self.recent_by_key(
            "SELECT name, output_bytes FROM builds WHERE output_bytes IS NOT NULL
             ORDER BY rowid DESC LIMIT ?1",
            RECENT_PER_CELL,
            |r| Ok(r.get::<_, i64>(1)?.max(0) as f64),
        )?;
        let output_bytes = sizes
            .into_iter()
            .map(|(n, mut v)| (n, median(&mut v) as u64))
            .collect();

        let per_machine: HashMap<String, Vec<Transfer>> = self.recent_by_key(
            "SELECT machine, bytes, seconds, concurrent FROM transfers
             ORDER BY rowid DESC LIMIT ?1",
            RECENT_TRANSFERS,
            |r| {
                Ok(Transfer {
                    bytes: r.get::<_, i64>(1)?.max(0) as u64,
                    seconds: r.get(2)?,
                    concurrent: r.get::<_, i64>(3)?.max(1) as u32,
                })
            },
        )?;
        let links = per_machine
            .into_iter()
            .filter_map(|(m, t)| link_figures(&t).map(|f| (m, f)))
            .collect();

        // What a build costs besides itself and its inputs' copies (the links' to
        // learn): the task's time over the build's own, the lower quartile of recent
        // builds.
        let extra: HashMap<String, Vec<f64>> = self.recent_by_key(
            "SELECT machine, task_seconds - seconds FROM builds
             WHERE task_seconds IS NOT NULL ORDER BY rowid DESC LIMIT ?1",
            RECENT_TRANSFERS,
            |r| Ok(r.get::<_, f64>(1)?.max(0.0)),
        )?;
        let per_build = extra
            .into_iter()
            .map(|(m, mut v)| {
                v.sort_by(f64::total_cmp);
                let n = v.len();
                (m, (v[n / 4], n))
            })
            .collect();
        Ok(Knowledge {
            output_bytes,
            links,
            per_build,
            ..from_builds
        })
    }

    /// Runs `sql` (newest rows first, `?1` the row limit; column 0 a key) and keeps, per
    /// key, the values `value` reads from its `per_key` newest rows.
    fn recent_by_key<T>(
        &self,
        sql: &str,
        per_key: usize,
        value: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<HashMap<String, Vec<T>>, StateError> {
        let err = || self.error("reading what was learned");
        let mut stmt = self.conn().prepare(sql).map_err(err())?;
        let rows = stmt
            .query_map(params![ROWS_READ as i64], |r| {
                Ok((r.get::<_, String>(0)?, value(r)?))
            })
            .map_err(err())?;
        let mut by_key: HashMap<String, Vec<T>> = HashMap::new();
        for row in rows {
            let (key, v) = row.map_err(err())?;
            let cell = by_key.entry(key).or_default();
            if cell.len() < per_key {
                cell.push(v);
            }
        }
        Ok(by_key)
    }

    /// Records a copy of `bytes` between this machine and `machine` (its key) that took
    /// `seconds`, `concurrent` copies sharing that link when it started.
    pub fn record_transfer(
        &self,
        machine: &str,
        to_machine: bool,
        bytes: u64,
        seconds: f64,
        concurrent: u32,
    ) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT INTO transfers (machine, direction, bytes, seconds, concurrent, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    machine,
                    if to_machine { "to" } else { "from" },
                    bytes as i64,
                    seconds,
                    concurrent.max(1),
                    crate::state::unix_now()
                ],
            )
            .map(|_| ())
            .map_err(self.error("recording a transfer"))
    }

    /// The CPU cores of `machine` (its key), when learned.
    pub fn cores(&self, machine: &str) -> Result<Option<u32>, StateError> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row(
                "SELECT cores FROM machine_cores WHERE machine = ?1",
                params![machine],
                |r| r.get::<_, u32>(0),
            )
            .optional()
            .map_err(self.error("reading a machine's cores"))
    }

    pub fn set_cores(&self, machine: &str, cores: u32) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT INTO machine_cores (machine, cores, learned_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (machine) DO UPDATE SET cores = ?2, learned_at = ?3",
                params![machine, cores, crate::state::unix_now()],
            )
            .map(|_| ())
            .map_err(self.error("recording a machine's cores"))
    }
}

/// Seconds a machine gets to say how many cores it has.
const CORES_QUESTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Gives each builder of `fleet` its CPU cores, so that builds there share them as they
/// do here (a build alone gets all). Learned once per machine, by running `nproc`
/// there the way its sessions run, and kept in the state database; a machine that
/// cannot say keeps its own `cores` setting.
pub async fn learn_cores(fleet: &mut [MachineConfig], history: Option<&StateDb>) {
    let mut asking = tokio::task::JoinSet::new();
    for (i, m) in fleet.iter_mut().enumerate() {
        if m.cores.is_some() || m.spec.is_local || m.spec.slots == 0 {
            continue;
        }
        let key = &m.endpoint.name;
        if let Some(cores) = history.and_then(|h| h.cores(key).ok().flatten()) {
            m.cores = Some(cores);
            continue;
        }
        let Ok((mut cmd, known_hosts)) = m.endpoint.command("nproc") else {
            continue;
        };
        asking.spawn(async move {
            let asked = tokio::task::spawn_blocking(move || {
                let _known_hosts = known_hosts;
                crate::process::run(&mut cmd)
            });
            let answer = match tokio::time::timeout(CORES_QUESTION_TIMEOUT, asked).await {
                Ok(Ok(Ok(out))) => String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok(),
                _ => None,
            };
            (i, answer)
        });
    }
    while let Some(joined) = asking.join_next().await {
        let Ok((i, answer)) = joined else { continue };
        match answer.filter(|&n| n > 0) {
            Some(cores) => {
                fleet[i].cores = Some(cores);
                if let Some(h) = history {
                    if let Err(e) = h.set_cores(&fleet[i].endpoint.name, cores) {
                        tracing::debug!("{e}");
                    }
                }
            }
            None => tracing::debug!(
                machine = %fleet[i].spec.name,
                "its cores are unknown (nproc gave no answer): its own setting stays"
            ),
        }
    }
}

/// One timed copy over a link.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: u64,
    pub seconds: f64,
    /// Copies sharing the link when it started, itself included.
    pub concurrent: u32,
}

/// A link's latency (median time of small copies) and bandwidth (median rate of big
/// ones, each counted at the share of the link it had).
pub fn link_figures(transfers: &[Transfer]) -> Option<LinkFigures> {
    let mut small: Vec<f64> = transfers
        .iter()
        .filter(|t| t.bytes < SMALL_TRANSFER)
        .map(|t| t.seconds)
        .collect();
    let latency = if small.is_empty() {
        DEFAULT_LATENCY
    } else {
        median(&mut small)
    };
    let mut rates: Vec<f64> = transfers
        .iter()
        .filter(|t| t.bytes >= BIG_TRANSFER)
        .map(|t| t.bytes as f64 * f64::from(t.concurrent) / (t.seconds - latency).max(1e-3))
        .collect();
    if small.is_empty() && rates.is_empty() {
        return None;
    }
    let bandwidth = if rates.is_empty() {
        DEFAULT_BANDWIDTH
    } else {
        median(&mut rates)
    };
    Some(LinkFigures {
        bandwidth,
        latency,
        samples: small.len() + rates.len(),
    })
}

/// How many times slower than planned the copies under way must show a link before it
/// is planned at what they show: a wave of copies slows each a little on any link.
pub const SLOWER_UNDER_WAY: f64 = 2.0;
/// Seconds a copy must have run before its not having landed says anything of its link
/// (shorter, and the session's own start-up would count as slowness).
const UNDER_WAY_EVIDENCE: f64 = 0.5;

/// The most a link carries by the copies crossing it now, each `(seconds it has run,
/// its bytes)`: one that has sent for `e` seconds (latency left out) without landing
/// its `b` bytes while `n` copies share the link says the link carries under
/// `b × n / e`. A slow link is thus known while its first copy is under way, not only
/// once it lands. None when no copy has run long enough to say.
pub fn bound_under_way(copies: &[(f64, u64)], latency: f64) -> Option<f64> {
    let n = copies.len() as f64;
    copies
        .iter()
        .filter_map(|&(running, bytes)| {
            let sending = running - latency;
            (sending >= UNDER_WAY_EVIDENCE).then(|| bytes as f64 * n / sending)
        })
        .min_by(f64::total_cmp)
}

/// The median of `v` (sorted in place); 0 for none.
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
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
fn fit_calibrated(
    rows: &[BuildRow],
    local_system: &str,
) -> (
    HashMap<String, f64>,
    HashMap<Key, Learned>,
    HashMap<String, f64>,
) {
    let mut declared = declared_speeds(rows);
    let (work, speeds) = fit_with(rows, local_system, &declared);
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
    let rescaled: HashMap<Key, f64> = speeds
        .iter()
        .filter(|((machine, _), l)| machine != LOCAL_KEY && l.samples == 0)
        .filter_map(|(key, _)| Some((key.clone(), declared[key] * scales.get(&key.1)?)))
        .collect();
    if rescaled.is_empty() {
        return (work, speeds, scales);
    }
    declared.extend(rescaled);
    let (work, speeds) = fit_with(rows, local_system, &declared);
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

/// [`fit`] with `declared` as each machine and system's speed before any comparison.
fn fit_with(
    rows: &[BuildRow],
    local_system: &str,
    declared: &HashMap<Key, f64>,
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
    let anchor: Key = (LOCAL_KEY.to_string(), local_system.to_string());
    let anchored = declared.contains_key(&anchor);
    // Before any comparison, a run's own builds say something: its derivations on
    // each machine against those on this one.
    let population = population_speeds(rows, &anchor);
    let prior: HashMap<Key, f64> = declared
        .iter()
        .map(|(key, &d)| {
            let p = match population.get(key) {
                Some(&(speed, n)) => shrink(speed, n as f64 * POPULATION_WEIGHT, d),
                None => d,
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
                .filter(|(_, key, _)| *key == anchor)
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
            if !(anchored && *key == anchor) {
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
            let from_runs = population.get(&key).map_or(0, |&(_, n)| n);
            let speed = if anchored && key == anchor {
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
fn population_speeds(
    rows: &[BuildRow],
    anchor: &(String, String),
) -> HashMap<(String, String), (f64, usize)> {
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
    let mut sums: HashMap<(String, String), (f64, f64, usize)> = HashMap::new();
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
        .filter_map(|(key, (weighted, weights, n))| {
            let d = weighted / weights;
            let se = (1.0 / weights).sqrt();
            (d.abs() > 2.0 * se).then(|| (key, (d.exp(), n)))
        })
        .collect()
}

/// The variance within groups, over all `groups` (each group's squares about its own
/// mean, over the degrees of freedom of all): what one value varies by, whichever
/// group it is in.
fn pooled_variance<'a>(groups: impl Iterator<Item = &'a Vec<f64>>) -> f64 {
    let (mut squares, mut freedom) = (0.0, 0usize);
    for g in groups.filter(|g| g.len() >= 2) {
        squares += variance(g) * (g.len() - 1) as f64;
        freedom += g.len() - 1;
    }
    if freedom == 0 {
        0.0
    } else {
        squares / freedom as f64
    }
}

/// The sample variance of `v` (0 for fewer than two).
fn variance(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64
}

/// The mean of `v` without its lowest and highest fifth (sorted in place).
fn trimmed_mean(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let cut = v.len() / 5;
    let kept = &v[cut..v.len() - cut];
    if kept.is_empty() {
        0.0
    } else {
        kept.iter().sum::<f64>() / kept.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYS: &str = "x86_64-linux";

    fn row(name: &str, system: &str, machine: &str, seconds: f64) -> BuildRow {
        BuildRow {
            name: name.into(),
            system: system.into(),
            machine: machine.into(),
            seconds,
            declared_speed: 1.0,
            run: None,
        }
    }

    #[test]
    fn copies_under_way_bound_their_link() {
        // 16 MiB sent for 2.9 s without landing, alone on the link: under 5.8 MB/s.
        let bound = bound_under_way(&[(2.9 + 0.005, 16 << 20)], 0.005).unwrap();
        assert!((bound - 5.785e6).abs() < 1e4, "{bound}");
        // Two sharing it: each had half.
        let shared = bound_under_way(&[(2.905, 16 << 20), (0.3, 16 << 20)], 0.005).unwrap();
        assert!((shared - 2.0 * bound).abs() < 1e4, "{shared}");
        // Copies too young to say anything.
        assert_eq!(bound_under_way(&[(0.2, 16 << 20)], 0.005), None);
        assert_eq!(bound_under_way(&[], 0.005), None);
    }

    #[test]
    fn a_small_state_is_fitted_again_at_every_builds_end() {
        // A first run's few builds: no wait at all between fits.
        let rows: Vec<BuildRow> = (0..30)
            .map(|i| row(&format!("d{i}"), SYS, "ssh://b1", 3.0))
            .collect();
        let wait = refit_interval(Knowledge::from_builds(&rows, SYS).rows());
        assert!(wait < 0.01, "{wait}");
        // A fit of everything it may read waits the whole interval.
        assert_eq!(refit_interval(ROWS_READ), REFIT_INTERVAL);
        assert_eq!(refit_interval(10 * ROWS_READ), REFIT_INTERVAL);
    }

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
    fn what_a_build_costs_besides_itself_is_kept_per_machine() {
        let dir = tempfile::tempdir().unwrap();
        let h = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
        // Four builds on a builder: 0.4 s around each, and once 3 s of input copies.
        for (i, extra) in [0.4, 0.45, 3.0, 0.4].iter().enumerate() {
            let name = format!("d{i}");
            h.record_build(&crate::state::BuildRecord {
                name: &name,
                system: SYS,
                machine: "ssh://b",
                seconds: 1.0,
                declared_speed: 1.0,
                output_bytes: None,
                run: None,
                task_seconds: Some(1.0 + extra),
            })
            .unwrap();
        }
        let k = h.knowledge(SYS).unwrap();
        let (seconds, samples) = k.per_build("ssh://b").unwrap();
        assert!((seconds - 0.4).abs() < 1e-9, "{seconds}");
        assert_eq!(samples, 4);
        assert_eq!(k.per_build("local"), None);
    }

    #[test]
    fn links_from_transfers() {
        let t = |bytes: u64, seconds: f64, concurrent: u32| Transfer {
            bytes,
            seconds,
            concurrent,
        };
        // 20 ms latency; 2.5 MB/s, once measured while two copies shared the link.
        let figures = link_figures(&[
            t(1000, 0.02, 1),
            t(2000, 0.02, 1),
            t(16_000_000, 6.42, 1),
            t(16_000_000, 12.82, 2),
            t(16_000_000, 6.42, 1),
        ])
        .unwrap();
        assert!((figures.latency - 0.02).abs() < 1e-9);
        assert!((figures.bandwidth - 2.5e6).abs() < 1e4, "{figures:?}");
        assert_eq!(link_figures(&[]), None);
    }
}
