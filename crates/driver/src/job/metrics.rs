//! A run's metrics (`offload build --metrics`): [`MetricEvents`] stands between the run
//! and the events it tells its user, counting them into [`Metrics`] as they pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Events, Summary};
use crate::fleet::MachineConfig;
use crate::metrics::Metrics;
use crate::reporter::{ByteRoute, Placement, Reporter};

/// The events of a run, counted into [`Metrics`] and passed on to `inner`.
pub struct MetricEvents {
    inner: Arc<dyn Events>,
    metrics: Arc<Metrics>,
    seen: Mutex<Seen>,
}

/// What the counting needs to remember.
#[derive(Default)]
struct Seen {
    /// Store URIs by the short names the run's events use.
    uris: HashMap<String, String>,
    /// Per running derivation, the machines it runs on (two while it is hedged).
    running: HashMap<String, Vec<String>>,
    planned: usize,
    ended: usize,
}

impl MetricEvents {
    pub fn new(inner: Arc<dyn Events>, metrics: Arc<Metrics>) -> MetricEvents {
        MetricEvents {
            inner,
            metrics,
            seen: Mutex::default(),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `machine` (a short name) as its store URI.
    fn uri(&self, machine: &str) -> String {
        self.seen()
            .uris
            .get(machine)
            .cloned()
            .unwrap_or_else(|| machine.to_string())
    }

    /// `drv` runs on `machine` too.
    fn runs(&self, drv: &str, machine: &str) {
        let uri = self.uri(machine);
        self.metrics.running(&uri, 1);
        let mut seen = self.seen();
        let on = seen.running.entry(drv.to_string()).or_default();
        on.push(uri);
        self.pending(&seen);
    }

    /// Takes `machines` off the running gauges.
    fn stopped(&self, machines: &[String]) {
        for uri in machines {
            self.metrics.running(uri, -1);
        }
    }

    fn pending(&self, seen: &Seen) {
        let waiting = seen.planned.saturating_sub(seen.ended + seen.running.len());
        self.metrics.set_pending(waiting);
    }
}

impl Reporter for MetricEvents {
    fn build_started(&self, drv: &str, machine: &str) {
        self.runs(drv, machine);
        self.inner.build_started(drv, machine);
    }

    fn build_placed(&self, drv: &str, machine: &str, placement: Placement) {
        self.runs(drv, machine);
        self.inner.build_placed(drv, machine, placement);
    }

    fn build_log(&self, drv: &str, machine: &str, line: &str) {
        self.inner.build_log(drv, machine, line);
    }

    fn build_finished(&self, drv: &str, machine: &str, ok: bool, seconds: f64) {
        let uri = self.uri(machine);
        let on = {
            let mut seen = self.seen();
            let on = seen.running.remove(drv).unwrap_or_default();
            seen.ended += 1;
            self.pending(&seen);
            on
        };
        self.stopped(&on);
        self.metrics.ended(&uri, ok, seconds);
        self.inner.build_finished(drv, machine, ok, seconds);
    }

    fn build_hedged(&self, drv: &str, from: &str, machine: &str) {
        self.metrics.hedge_started();
        self.runs(drv, machine);
        self.inner.build_hedged(drv, from, machine);
    }

    fn machine_warning(&self, message: &str) {
        self.inner.machine_warning(message);
    }

    fn machine_event(&self, kind: &str, machine: &str, why: &str) {
        let uri = self.uri(machine);
        let m = &self.metrics;
        match kind {
            "machine_lost" => m.machine_failed(&uri),
            "machine_quarantined" => {
                m.machine_failed(&uri);
                m.quarantined(&uri, true);
            }
            "machine_skipped" => m.quarantined(&uri, false),
            _ => {}
        }
        // Its builds stopped with it; they start again elsewhere.
        let stopped: Vec<_> = {
            let mut seen = self.seen();
            let mut stopped = Vec::new();
            for on in seen.running.values_mut() {
                let before = on.len();
                on.retain(|m| *m != uri);
                stopped.extend(std::iter::repeat_n(uri.clone(), before - on.len()));
            }
            seen.running.retain(|_, on| !on.is_empty());
            self.pending(&seen);
            stopped
        };
        self.stopped(&stopped);
        self.inner.machine_event(kind, machine, why);
    }

    fn transfer_started(&self, path: &str, from: &str, to: &str, bytes: u64) {
        self.inner.transfer_started(path, from, to, bytes);
    }

    fn transfer_finished(
        &self,
        path: &str,
        from: &str,
        to: &str,
        bytes: u64,
        seconds: f64,
        ok: bool,
    ) {
        self.inner
            .transfer_finished(path, from, to, bytes, seconds, ok);
    }

    fn bytes_moved(&self, route: ByteRoute, from: &str, to: &str, bytes: u64) {
        let (from_uri, to_uri) = (self.uri(from), self.uri(to));
        self.metrics.bytes(route, &from_uri, &to_uri, bytes);
        self.inner.bytes_moved(route, from, to, bytes);
    }
}

impl Events for MetricEvents {
    fn fetching(&self, paths: usize) {
        self.inner.fetching(paths);
    }

    fn notice(&self, text: &str) {
        self.inner.notice(text);
    }

    fn planned(&self, derivations: usize, work: f64, machines: &[MachineConfig]) {
        {
            let mut seen = self.seen();
            for m in machines {
                let uri = m.endpoint.name.clone();
                self.metrics.set_slots(&uri, m.spec.slots);
                seen.uris.insert(m.spec.name.clone(), uri);
            }
            seen.planned = derivations;
            self.pending(&seen);
        }
        self.inner.planned(derivations, work, machines);
    }

    fn summary(&self, summary: &Summary<'_>) {
        // Which duplicate won, and the slot time the others cost, are known at the end.
        let hedges = &summary.report.hedges;
        self.metrics.hedges_ended(hedges.wins, hedges.waste_seconds);
        self.inner.summary(summary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Serving;

    /// Events that go nowhere.
    struct Nowhere;

    impl Reporter for Nowhere {
        fn build_started(&self, _: &str, _: &str) {}
        fn build_log(&self, _: &str, _: &str, _: &str) {}
        fn build_finished(&self, _: &str, _: &str, _: bool, _: f64) {}
        fn machine_warning(&self, _: &str) {}
    }

    impl Events for Nowhere {
        fn fetching(&self, _: usize) {}
        fn notice(&self, _: &str) {}
        fn planned(&self, _: usize, _: f64, _: &[MachineConfig]) {}
        fn summary(&self, _: &Summary<'_>) {}
    }

    /// The value of the sample written exactly `series` in `text`.
    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    #[test]
    fn hedged_and_lost_builds_leave_the_running_gauges_when_they_stop() {
        let metrics = Arc::new(Metrics::new(Serving::Run));
        let events = MetricEvents::new(Arc::new(Nowhere), metrics.clone());
        let placement = Placement {
            estimate_seconds: 1.0,
            cores: None,
        };
        let running = |m: &str| {
            let series = format!("offload_builds_running{{machine=\"{m}\"}}");
            sample(&metrics.encode(), &series)
        };
        // A duplicate runs on b while the first copy still runs on a; b wins.
        events.build_placed("d1", "a", placement);
        events.build_hedged("d1", "a", "b");
        assert_eq!((running("a"), running("b")), (1.0, 1.0));
        events.build_finished("d1", "b", true, 2.0);
        assert_eq!((running("a"), running("b")), (0.0, 0.0));
        // A build whose machine is lost starts again elsewhere.
        events.build_placed("d2", "a", placement);
        events.machine_event("machine_lost", "a", "gone");
        assert_eq!(running("a"), 0.0);
        events.build_placed("d2", "b", placement);
        events.build_finished("d2", "b", false, 1.0);
        let text = metrics.encode();
        assert_eq!(running("b"), 0.0);
        assert_eq!(sample(&text, "offload_hedges_started_total"), 1.0);
        let at = |name: &str, m: &str| sample(&text, &format!("{name}{{machine=\"{m}\"}}"));
        assert_eq!(at("offload_builds_finished_total", "b"), 1.0);
        assert_eq!(at("offload_builds_failed_total", "b"), 1.0);
        assert_eq!(at("offload_machine_failures_total", "a"), 1.0);
        assert_eq!(at("offload_slots_held", "a"), 0.0);
    }
}
