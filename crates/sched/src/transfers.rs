//! How store paths travel between machines: the one model of transfers that the
//! scheduler plans with, the simulator simulates and the live driver follows.
//!
//! Every copy passes through the client (the machine offload runs on), since the serve
//! sessions start there. A path on the client's store crosses the target's link; a path
//! built on builder A goes to builder B streamed through the client, over both links at
//! once; a path that several builds need stops in the client's store on the way, so
//! that later copies cross one link and A serves it once. A link carries one transfer's
//! bytes at a time (transfers queue on it); latency delays a transfer without holding
//! the link.

use crate::fleet::{MachineId, MachineSpec};

/// The way one path goes to one machine: hops in order, each over the links it uses at
/// once (a machine's link is the one between it and the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The machine it is copied from; `None` for the client's own store.
    pub from: Option<MachineId>,
    pub hops: Vec<Vec<MachineId>>,
    /// The path is kept in the client's store on the way (it becomes valid there).
    pub keeps_in_client: bool,
}

impl Route {
    /// No copy: the target has the path.
    pub fn present() -> Route {
        Route {
            from: None,
            hops: Vec::new(),
            keeps_in_client: false,
        }
    }

    pub fn is_present(&self) -> bool {
        self.hops.is_empty()
    }
}

/// The route of a path to `target`.
///
/// `holders` are the fleet machines that have it, `at_client` whether the client's store
/// does (the client may be a fleet machine, the one with `is_local`, or not in the
/// fleet), and `consumers` how many builds take it as an input. The source is the
/// client when it has the path, else the holder whose link is quickest for `bytes`
/// (the lower index at a tie). `None` when nothing holds the path.
pub fn route(
    machines: &[MachineSpec],
    holders: &[MachineId],
    at_client: bool,
    target: MachineId,
    consumers: usize,
    bytes: u64,
) -> Option<Route> {
    let target_is_client = machines[target].is_local;
    if holders.contains(&target) || (target_is_client && at_client) {
        return Some(Route::present());
    }
    let client_holds = at_client || holders.iter().any(|&h| machines[h].is_local);
    if client_holds {
        return Some(Route {
            from: None,
            hops: vec![vec![target]],
            keeps_in_client: false,
        });
    }
    let from = holders.iter().copied().min_by(|&a, &b| {
        machines[a]
            .transfer_time(bytes)
            .total_cmp(&machines[b].transfer_time(bytes))
            .then(a.cmp(&b))
    })?;
    let (hops, keeps_in_client) = if target_is_client {
        (vec![vec![from]], true)
    } else if consumers > 1 {
        (vec![vec![from], vec![target]], true)
    } else {
        (vec![vec![from, target]], false)
    };
    Some(Route {
        from: Some(from),
        hops,
        keeps_in_client,
    })
}

/// When each machine's link is next free, and the bytes each has carried.
#[derive(Debug, Clone)]
pub struct Links {
    free_at: Vec<f64>,
    bytes: Vec<u64>,
}

impl Links {
    pub fn new(machines: usize) -> Links {
        Links {
            free_at: vec![0.0; machines],
            bytes: vec![0; machines],
        }
    }

    /// When `bytes` sent along `route`, starting no earlier than `ready`, would arrive,
    /// behind what the links already carry; nothing is booked.
    pub fn arrival(&self, machines: &[MachineSpec], route: &Route, bytes: u64, ready: f64) -> f64 {
        let mut at = ready;
        for hop in &route.hops {
            at = self.hop(machines, hop, bytes, at).1;
        }
        at
    }

    /// Sends `bytes` along `route` from `ready` on: books the links, returns the arrival.
    pub fn send(&mut self, machines: &[MachineSpec], route: &Route, bytes: u64, ready: f64) -> f64 {
        let mut at = ready;
        for hop in &route.hops {
            let (busy_until, arrival) = self.hop(machines, hop, bytes, at);
            for &l in hop {
                self.free_at[l] = busy_until;
                self.bytes[l] += bytes;
            }
            at = arrival;
        }
        at
    }

    /// One hop: (when its links are free again, when the bytes arrive). Several links
    /// together go at the slowest one's rate and add their latencies.
    fn hop(
        &self,
        machines: &[MachineSpec],
        links: &[MachineId],
        bytes: u64,
        ready: f64,
    ) -> (f64, f64) {
        if bytes == 0 {
            return (ready, ready);
        }
        let mut start = ready;
        let (mut rate, mut latency) = (f64::INFINITY, 0.0);
        for &l in links {
            if machines[l].is_local {
                continue;
            }
            start = start.max(self.free_at[l]);
            rate = rate.min(machines[l].bandwidth.max(1.0));
            latency += machines[l].latency;
        }
        let sending = if rate.is_finite() {
            bytes as f64 / rate
        } else {
            0.0
        };
        (start + sending, start + latency + sending)
    }

    /// Bytes each machine's link has carried.
    pub fn bytes(&self) -> &[u64] {
        &self.bytes
    }

    /// When `machine`'s link is next free.
    pub fn free_at(&self, machine: MachineId) -> f64 {
        self.free_at[machine]
    }

    /// Books `machine`'s link until `until` at least (a copy the caller times itself).
    pub fn book(&mut self, machine: MachineId, until: f64, bytes: u64) {
        self.free_at[machine] = self.free_at[machine].max(until);
        self.bytes[machine] += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Vec<MachineSpec> {
        let remote = |name: &str, bandwidth: f64| MachineSpec {
            bandwidth,
            latency: 0.01,
            ..MachineSpec::new(name, "x86_64-linux", 2, 1.0)
        };
        vec![
            MachineSpec::local("x86_64-linux", 2),
            remote("fast", 100e6),
            remote("slow", 1e6),
            remote("other", 100e6),
        ]
    }

    #[test]
    fn routes_follow_the_client() {
        let m = fleet();
        assert!(route(&m, &[1], false, 1, 1, 10).unwrap().is_present());
        assert!(route(&m, &[], true, 0, 1, 10).unwrap().is_present());
        // From the client's store: the target's link only.
        let r = route(&m, &[0, 2], false, 3, 1, 10).unwrap();
        assert_eq!((r.from, r.hops.clone()), (None, vec![vec![3]]));
        // From a builder: streamed over both links, or kept on the way when shared.
        let r = route(&m, &[2, 1], false, 3, 1, 1 << 20).unwrap();
        assert_eq!(
            (r.from, r.hops.clone(), r.keeps_in_client),
            (Some(1), vec![vec![1, 3]], false)
        );
        let r = route(&m, &[1], false, 3, 2, 10).unwrap();
        assert_eq!(
            (r.hops.clone(), r.keeps_in_client),
            (vec![vec![1], vec![3]], true)
        );
        // Home to the client: the source's link, and the client keeps it.
        let r = route(&m, &[2], false, 0, 1, 10).unwrap();
        assert_eq!((r.hops.clone(), r.keeps_in_client), (vec![vec![2]], true));
        assert_eq!(route(&m, &[], false, 1, 1, 10), None);
    }

    #[test]
    fn transfers_queue_on_a_link() {
        let m = fleet();
        let mut links = Links::new(m.len());
        let to_slow = route(&m, &[0], false, 2, 1, 1_000_000).unwrap();
        // 1 MB at 1 MB/s plus 10 ms.
        assert!((links.arrival(&m, &to_slow, 1_000_000, 0.0) - 1.01).abs() < 1e-9);
        assert!((links.send(&m, &to_slow, 1_000_000, 0.0) - 1.01).abs() < 1e-9);
        // The second waits for the first to be sent.
        assert!((links.send(&m, &to_slow, 1_000_000, 0.5) - 2.01).abs() < 1e-9);
        // Another link is not held up; a relay goes at the slower link's rate.
        let to_fast = route(&m, &[0], false, 1, 1, 1_000_000).unwrap();
        assert!((links.arrival(&m, &to_fast, 1_000_000, 0.0) - 0.02).abs() < 1e-9);
        let relay = route(&m, &[2], false, 1, 1, 1_000_000).unwrap();
        assert!((links.arrival(&m, &relay, 1_000_000, 0.0) - 3.02).abs() < 1e-9);
        assert_eq!(links.bytes(), &[0, 0, 2_000_000, 0]);
    }
}
