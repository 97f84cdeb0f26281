//! The live view of `offload build` on a terminal: a line with the overall counts, then
//! a line per machine with its running builds and how long each has run; build logs
//! scroll above them. Redrawn a few times a second by indicatif; where stderr is not a
//! terminal the calm line-per-event output is used instead (see `progress.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often elapsed times are redrawn.
const TICK: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Counts {
    total: usize,
    done: usize,
    failed: usize,
    /// Per machine (in fleet order), its running builds: name, start, estimate there.
    running: BTreeMap<usize, Vec<(String, Instant, Option<f64>)>>,
    /// The plan's work (seconds at speed 1), what finished builds were estimated at, and
    /// the fleet's capacity (slots times speed), for the ETA.
    work: f64,
    finished_work: f64,
    capacity: f64,
    /// Per remote machine, bytes moved over its link, and recent transfers (when, bytes)
    /// for the current rate.
    moved: BTreeMap<usize, u64>,
    recent: BTreeMap<usize, Vec<(Instant, u64)>>,
    machine_index: BTreeMap<String, usize>,
}

/// How far back the current rate of a link looks.
const RATE_WINDOW: Duration = Duration::from_secs(3);

impl Counts {
    fn moved(&mut self, machine: &str, bytes: u64) {
        if let Some(&i) = self.machine_index.get(machine) {
            *self.moved.entry(i).or_default() += bytes;
            self.recent
                .entry(i)
                .or_default()
                .push((Instant::now(), bytes));
        }
    }

    /// Bytes moved over machine `i`'s link, and bytes per second lately.
    fn link(&mut self, i: usize) -> Option<(u64, f64)> {
        let total = *self.moved.get(&i)?;
        let recent = self.recent.entry(i).or_default();
        recent.retain(|(at, _)| at.elapsed() < RATE_WINDOW);
        let lately: u64 = recent.iter().map(|(_, b)| b).sum();
        Some((total, lately as f64 / RATE_WINDOW.as_secs_f64()))
    }

    fn start(&mut self, name: &str, machine: &str, estimate: Option<f64>) {
        // A build lost with its machine starts again elsewhere: it runs in one place.
        for list in self.running.values_mut() {
            list.retain(|(n, _, _)| n != name);
        }
        if let Some(&i) = self.machine_index.get(machine) {
            self.running
                .entry(i)
                .or_default()
                .push((name.to_string(), Instant::now(), estimate));
        }
    }

    /// Seconds until the plan's remaining work is done at the fleet's capacity, and no
    /// sooner than the running build expected to end last.
    fn eta(&self) -> Option<f64> {
        if self.work <= 0.0 || self.capacity <= 0.0 {
            return None;
        }
        let running = self.running.values().flatten();
        let in_flight: f64 = running
            .clone()
            .map(|(_, t, e)| t.elapsed().as_secs_f64().min(e.unwrap_or(0.0)))
            .sum();
        let left = (self.work - self.finished_work - in_flight).max(0.0) / self.capacity;
        let longest = running
            .map(|(_, t, e)| e.unwrap_or(0.0) - t.elapsed().as_secs_f64())
            .fold(0.0, f64::max);
        Some(left.max(longest))
    }

    fn finish(&mut self, name: &str, machine: &str, ok: bool) {
        if let Some(&i) = self.machine_index.get(machine) {
            if let Some(list) = self.running.get_mut(&i) {
                if let Some(pos) = list.iter().position(|(n, _, _)| n == name) {
                    let (_, _, estimate) = list.remove(pos);
                    self.finished_work += estimate.unwrap_or(0.0);
                }
            }
        }
        if ok {
            self.done += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// The bars and the thread that redraws them.
pub struct Live {
    multi: MultiProgress,
    header: ProgressBar,
    machines: Vec<(String, ProgressBar)>,
    counts: Arc<Mutex<Counts>>,
    started: Instant,
    stop: Arc<AtomicBool>,
}

impl Live {
    /// A view for `total` builds on `machines` (their names, in fleet order).
    pub fn new(total: usize, machines: &[String], work: f64, capacity: f64) -> Arc<Live> {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
        let style =
            ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
        let header = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
        let width = machines.iter().map(String::len).max().unwrap_or(0);
        let bars = machines
            .iter()
            .map(|m| {
                let bar = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
                (format!("{m:<width$}"), bar)
            })
            .collect();
        let counts = Counts {
            total,
            work,
            capacity,
            machine_index: machines
                .iter()
                .enumerate()
                .map(|(i, m)| (m.clone(), i))
                .collect(),
            ..Counts::default()
        };
        let live = Arc::new(Live {
            multi,
            header,
            machines: bars,
            counts: Arc::new(Mutex::new(counts)),
            started: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
        });
        let ticker = live.clone();
        std::thread::spawn(move || {
            while !ticker.stop.load(Ordering::Relaxed) {
                ticker.redraw();
                std::thread::sleep(TICK);
            }
        });
        live.redraw();
        live
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn started(&self, name: &str, machine: &str, estimate: Option<f64>) {
        self.update(|c| c.start(name, machine, estimate));
    }

    pub fn finished(&self, name: &str, machine: &str, ok: bool) {
        self.update(|c| c.finish(name, machine, ok));
    }

    /// Changes the counts, then redraws at once: the view never lags an event.
    fn update(&self, change: impl FnOnce(&mut Counts)) {
        change(&mut self.counts());
        self.redraw();
    }

    /// A transfer between `from` and `to` ended: it counts for the link of the machine
    /// that is not this one.
    pub fn moved(&self, from: &str, to: &str, bytes: u64) {
        self.update(|c| {
            let remote = if from == "local" { to } else { from };
            c.moved(remote, bytes);
        });
    }

    /// A line above the bars (a build's log).
    pub fn println(&self, line: &str) {
        let _ = self.multi.println(line);
    }

    fn redraw(&self) {
        let mut c = self.counts();
        let running: usize = c.running.values().map(Vec::len).sum();
        let queued = c.total.saturating_sub(c.done + c.failed + running);
        let eta = c
            .eta()
            .map(|s| format!(", about {s:.0} s to go"))
            .unwrap_or_default();
        self.header.set_message(format!(
            "{}/{} built, {running} running, {queued} queued, {} failed  [{:.0} s{eta}]",
            c.done,
            c.total,
            c.failed,
            self.started.elapsed().as_secs_f64()
        ));
        for (i, (name, bar)) in self.machines.iter().enumerate() {
            let builds = c.running.get(&i).map(Vec::as_slice).unwrap_or_default();
            let text = if builds.is_empty() {
                "idle".to_string()
            } else {
                let each: Vec<String> = builds
                    .iter()
                    .map(|(n, t, e)| match e {
                        Some(e) => format!("{n} {:.1}/{e:.1} s", t.elapsed().as_secs_f64()),
                        None => format!("{n} {:.1} s", t.elapsed().as_secs_f64()),
                    })
                    .collect();
                format!("{} running: {}", builds.len(), each.join(", "))
            };
            let link = match c.link(i) {
                Some((total, rate)) => format!("  [{} moved, {}/s]", mib(total as f64), mib(rate)),
                None => String::new(),
            };
            bar.set_message(format!("  {name}  {text}{link}"));
        }
    }

    /// Stops redrawing and takes the bars off the screen.
    pub fn finish(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.multi.clear();
    }
}

/// Bytes in MiB, one decimal.
fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / 1048576.0)
}
