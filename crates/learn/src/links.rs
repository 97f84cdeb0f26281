//! How fast each link is: latency and bandwidth from the copies that landed over it,
//! and, before the first lands, the most its copies under way show it carries.

use offload_sched::MachineSpec;

use crate::stats::median;

/// Assumed link to a remote machine until measured: 100 MB/s.
pub const DEFAULT_BANDWIDTH: f64 = 100e6;
/// Assumed fixed cost of a transfer to a remote machine: 5 ms.
pub const DEFAULT_LATENCY: f64 = 0.005;
/// Transfers per machine that count for its link (the most recent).
pub const RECENT_TRANSFERS: usize = 100;
/// Transfers below this size time the link's latency; from [`BIG_TRANSFER`] on, its
/// throughput.
const SMALL_TRANSFER: u64 = 64 * 1024;
const BIG_TRANSFER: u64 = 1 << 20;

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

/// Whether copies under way that show `spec`'s link carrying at most `bound` bytes per
/// second say it is [`SLOWER_UNDER_WAY`] times slower than planned, so that it is
/// planned at `bound` from now on (never this machine's, which has no link).
pub fn slower_under_way(spec: &MachineSpec, bound: f64) -> bool {
    !spec.is_local && bound * SLOWER_UNDER_WAY < spec.bandwidth
}

/// `learned`, when it is the figures of a builder's link (this machine has none) whose
/// bandwidth [`moved`](crate::moved) from the one `spec` is planned with: a fit during
/// a run replaces only those.
pub fn moved_link(spec: &MachineSpec, learned: Option<LinkFigures>) -> Option<LinkFigures> {
    learned.filter(|link| !spec.is_local && crate::moved(spec.bandwidth, link.bandwidth))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    #[test]
    fn only_a_builders_link_that_moved_is_planned_anew() {
        let mut spec = MachineSpec::new("ssh://b", "x86_64-linux", 2, 1.0);
        spec.bandwidth = 10e6;
        let link = |bandwidth| {
            Some(LinkFigures {
                bandwidth,
                latency: 0.01,
                samples: 3,
            })
        };
        assert_eq!(moved_link(&spec, link(10.5e6)), None);
        assert_eq!(moved_link(&spec, link(5e6)), link(5e6));
        assert_eq!(moved_link(&spec, None), None);
        // Copies under way: more than twice slower than planned, or nothing.
        assert!(slower_under_way(&spec, 4e6));
        assert!(!slower_under_way(&spec, 6e6));
        let local = MachineSpec::local("x86_64-linux", 4);
        assert_eq!(moved_link(&local, link(1.0)), None);
        assert!(!slower_under_way(&local, 1.0));
    }
}
