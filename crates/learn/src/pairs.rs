//! How fast each direct link between two builders is: the copies one builder sends
//! straight to another (`nix-store --export … | ssh B nix-store --import` run on A) are
//! timed like those over a machine's link to the client, and fitted by the same
//! estimator ([`link_figures`]: latency the median time of small copies, bandwidth the
//! median rate of big ones), per ordered pair (from, to).
//!
//! A pair known to reach each other but not yet measured is planned at the better of
//! the two machines' links to the client ([`pair_prior`]): a direct copy is then never
//! planned slower than the relay through the client, which crosses both of them. A
//! run plans a pair at what its copies showed only once both machines' links to the
//! client are measured too ([`moved_pair`]).

use std::collections::HashMap;
use std::hash::Hash;

use offload_sched::{Link, MachineSpec};

use crate::links::{link_figures, LinkFigures, Transfer, RECENT_TRANSFERS};

/// The timed direct copies per ordered pair of machines (keyed as the caller keys
/// machines: store URIs in the state, indices in a run), the most recent
/// [`RECENT_TRANSFERS`] of each.
#[derive(Debug, Clone)]
pub struct PairLinks<K> {
    copies: HashMap<(K, K), Vec<Transfer>>,
}

impl<K> Default for PairLinks<K> {
    fn default() -> Self {
        PairLinks {
            copies: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> PairLinks<K> {
    /// One direct copy from `from` to `to`: `bytes` in `seconds`, with `concurrent`
    /// copies (itself included) sharing that pair's link when it started.
    pub fn record(&mut self, from: K, to: K, bytes: u64, seconds: f64, concurrent: u32) {
        let copies = self.copies.entry((from, to)).or_default();
        copies.push(Transfer {
            bytes,
            seconds,
            concurrent: concurrent.max(1),
        });
        if copies.len() > RECENT_TRANSFERS {
            copies.remove(0);
        }
    }

    /// The figures of the link from `from` to `to`, from its copies; None before any.
    pub fn figures(&self, from: &K, to: &K) -> Option<LinkFigures> {
        let copies = self.copies.get(&(from.clone(), to.clone()))?;
        link_figures(copies)
    }

    /// The link from `from` to `to` as the planner should take it: as measured, else
    /// `prior` (for a pair that reaches each other: [`pair_prior`]).
    pub fn link(&self, from: &K, to: &K, prior: Link) -> Link {
        self.figures(from, to).map_or(prior, |f| Link {
            bandwidth: f.bandwidth,
            latency: f.latency,
        })
    }

    /// The pairs with timed copies.
    pub fn pairs(&self) -> impl Iterator<Item = &(K, K)> {
        self.copies.keys()
    }
}

/// The link a pair that reaches each other is planned at before a copy between them
/// was timed: the better of the two machines' links to the client (the one with more
/// bandwidth, the lower latency at a tie), never slower than the relay over both.
pub fn pair_prior(from: &MachineSpec, to: &MachineSpec) -> Link {
    let (a, b) = (from.link(), to.link());
    let b_better =
        b.bandwidth > a.bandwidth || (b.bandwidth == a.bandwidth && b.latency < a.latency);
    if b_better {
        b
    } else {
        a
    }
}

/// The link a run plans the pair at from now on, if it should change from `planned`:
/// what the pair's copies showed (`learned`), once both machines' links to the client
/// are measured (`links_measured`), and when it moved ([`crate::moved`]: bandwidth or
/// latency). Before the client links are measured, a pair at its measured figures
/// would be weighed against a client link merely assumed and lose to the assumption,
/// while the worst a direct copy risks is its fixed cost and the worst a relay risks is
/// twice its bytes over a link that may be slow.
pub fn moved_pair(planned: Link, learned: Option<Link>, links_measured: bool) -> Option<Link> {
    let learned = learned.filter(|_| links_measured)?;
    (crate::moved(planned.bandwidth, learned.bandwidth)
        || crate::moved(planned.latency, learned.latency))
    .then_some(learned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_learned_apart_and_by_direction() {
        let mut pairs: PairLinks<&str> = PairLinks::default();
        // a → b: 2 ms latency, 200 MB/s; b → a never timed.
        for _ in 0..3 {
            pairs.record("a", "b", 1000, 0.002, 1);
            pairs.record("a", "b", 20_000_000, 0.102, 1);
        }
        let f = pairs.figures(&"a", &"b").unwrap();
        assert!((f.latency - 0.002).abs() < 1e-9);
        assert!((f.bandwidth - 200e6).abs() < 1e3, "{f:?}");
        assert_eq!(pairs.figures(&"b", &"a"), None);
        let prior = Link {
            bandwidth: 1e6,
            latency: 0.05,
        };
        assert_eq!(pairs.link(&"b", &"a", prior), prior);
        assert_eq!(pairs.link(&"a", &"b", prior).bandwidth, f.bandwidth);
        assert_eq!(pairs.pairs().count(), 1);
        // Only the most recent copies count: the small ones gone, the latency is the
        // default (5 ms) and the bandwidth that of the new copies.
        for _ in 0..RECENT_TRANSFERS {
            pairs.record("a", "b", 20_000_000, 0.205, 1);
        }
        let f = pairs.figures(&"a", &"b").unwrap();
        assert!((f.latency - 0.005).abs() < 1e-12);
        assert!((f.bandwidth - 100e6).abs() < 1e3, "{f:?}");
    }

    #[test]
    fn a_pair_is_planned_anew_once_both_client_links_are_measured_and_it_moved() {
        let link = |bandwidth, latency| Link { bandwidth, latency };
        let planned = link(2.5e6, 0.02);
        let seen = Some(link(200e6, 0.25));
        assert_eq!(moved_pair(planned, seen, false), None);
        assert_eq!(moved_pair(planned, seen, true), seen);
        assert_eq!(moved_pair(planned, None, true), None);
        // Close to what is planned: kept.
        assert_eq!(moved_pair(planned, Some(link(2.6e6, 0.021)), true), None);
        // The latency alone moved.
        assert_eq!(
            moved_pair(planned, Some(link(2.5e6, 0.3)), true),
            Some(link(2.5e6, 0.3))
        );
    }

    #[test]
    fn an_unmeasured_pair_is_never_planned_slower_than_the_relay() {
        let machine = |bandwidth, latency| MachineSpec {
            bandwidth,
            latency,
            ..MachineSpec::new("m", "x86_64-linux", 1, 1.0)
        };
        let (slow, fast) = (machine(2.5e6, 0.02), machine(100e6, 0.005));
        let prior = pair_prior(&slow, &fast);
        assert_eq!(prior, fast.link());
        assert_eq!(pair_prior(&fast, &slow), fast.link());
        let bytes = 8 << 20;
        let relay = slow.latency + fast.latency + bytes as f64 / slow.bandwidth;
        assert!(prior.transfer_time(bytes) <= relay);
    }
}
