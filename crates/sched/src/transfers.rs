//! How store paths travel between machines: the one model of transfers that the
//! scheduler plans with, the simulator simulates and the live driver follows.
//!
//! Every copy passes through the client (the machine offload runs on), since the serve
//! sessions start there. A path on the client's store crosses the target's link; a path
//! built on builder A goes to builder B streamed through the client, over both links at
//! once; a path that several builds need stops in the client's store on the way, so
//! that later copies cross one link and A serves it once. A link carries one transfer's
//! bytes at a time in each direction (transfers queue on it: inputs going to a machine
//! queue apart from outputs coming from it); latency delays a transfer without holding
//! the link.

use crate::fleet::{MachineId, MachineSpec};

/// The way one path goes to one machine (a machine's link is the one between it and
/// the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The machine it is copied from; `None` for the client's own store.
    pub from: Option<MachineId>,
    pub to: MachineId,
    pub kind: RouteKind,
}

/// The hops of a [`Route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// No copy: the target has the path.
    Present,
    /// Over one link: from the client's store to a builder, or from a builder home.
    Direct,
    /// From one builder to another through the client, over both links at once.
    Streamed,
    /// From one builder into the client's store, then on to another builder.
    ViaClient,
}

impl Route {
    /// Calls `f` with the links of each hop, in order: each machine's link with the
    /// direction the bytes take over it.
    fn each_hop(&self, mut f: impl FnMut(&[(MachineId, Direction)])) {
        use Direction::{FromMachine, ToMachine};
        match (self.kind, self.from) {
            (RouteKind::Present, _) => {}
            (RouteKind::Direct, None) => f(&[(self.to, ToMachine)]),
            (RouteKind::Direct, Some(from)) => f(&[(from, FromMachine)]),
            (RouteKind::Streamed, Some(from)) => f(&[(from, FromMachine), (self.to, ToMachine)]),
            (RouteKind::ViaClient, Some(from)) => {
                f(&[(from, FromMachine)]);
                f(&[(self.to, ToMachine)]);
            }
            (RouteKind::Streamed | RouteKind::ViaClient, None) => f(&[(self.to, ToMachine)]),
        }
    }

    /// A builder's outputs going home to the client.
    pub fn home(from: MachineId, client: MachineId) -> Route {
        Route {
            from: Some(from),
            to: client,
            kind: RouteKind::Direct,
        }
    }

    pub fn is_present(&self) -> bool {
        self.kind == RouteKind::Present
    }

    /// The path is kept in the client's store on the way (it becomes valid there).
    pub fn keeps_in_client(&self) -> bool {
        match self.kind {
            RouteKind::ViaClient => true,
            RouteKind::Direct => self.from.is_some(),
            RouteKind::Present | RouteKind::Streamed => false,
        }
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
    let on = |from, kind| Route {
        from,
        to: target,
        kind,
    };
    if holders.contains(&target) || (target_is_client && at_client) {
        return Some(on(None, RouteKind::Present));
    }
    let client_holds = at_client || holders.iter().any(|&h| machines[h].is_local);
    if client_holds {
        return Some(on(None, RouteKind::Direct));
    }
    let from = holders.iter().copied().min_by(|&a, &b| {
        machines[a]
            .transfer_time(bytes)
            .total_cmp(&machines[b].transfer_time(bytes))
            .then(a.cmp(&b))
    })?;
    let kind = if target_is_client {
        RouteKind::Direct
    } else if consumers > 1 {
        RouteKind::ViaClient
    } else {
        RouteKind::Streamed
    };
    Some(on(Some(from), kind))
}

/// Which way bytes cross a machine's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToMachine = 0,
    FromMachine = 1,
}

/// When each machine's link is next free in each direction, and the bytes each has
/// carried.
#[derive(Debug, Clone)]
pub struct Links {
    free_at: Vec<[f64; 2]>,
    bytes: Vec<u64>,
}

impl Links {
    pub fn new(machines: usize) -> Links {
        Links {
            free_at: vec![[0.0; 2]; machines],
            bytes: vec![0; machines],
        }
    }

    /// When `bytes` sent along `route`, starting no earlier than `ready`, would arrive,
    /// behind what the links already carry; nothing is booked.
    pub fn arrival(&self, machines: &[MachineSpec], route: &Route, bytes: u64, ready: f64) -> f64 {
        let mut at = ready;
        route.each_hop(|links| at = self.hop(machines, links, bytes, at).1);
        at
    }

    /// Sends `bytes` along `route` from `ready` on: books the links, returns the arrival.
    pub fn send(&mut self, machines: &[MachineSpec], route: &Route, bytes: u64, ready: f64) -> f64 {
        let mut at = ready;
        route.each_hop(|links| {
            let (busy_until, arrival) = self.hop(machines, links, bytes, at);
            for &(l, d) in links {
                if !machines[l].is_local {
                    self.free_at[l][d as usize] = busy_until;
                    self.bytes[l] += bytes;
                }
            }
            at = arrival;
        });
        at
    }

    /// One hop: (when its links are free again, when the bytes arrive). Several links
    /// together go at the slowest one's rate and add their latencies.
    fn hop(
        &self,
        machines: &[MachineSpec],
        links: &[(MachineId, Direction)],
        bytes: u64,
        ready: f64,
    ) -> (f64, f64) {
        if bytes == 0 {
            return (ready, ready);
        }
        let mut start = ready;
        let (mut rate, mut latency) = (f64::INFINITY, 0.0);
        for &(l, d) in links {
            if machines[l].is_local {
                continue;
            }
            start = start.max(self.free_at[l][d as usize]);
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

    /// When `machine`'s link is next free in direction `d`.
    pub fn free_at(&self, machine: MachineId, d: Direction) -> f64 {
        self.free_at[machine][d as usize]
    }

    /// Counts `bytes` on `machine`'s link for a copy the caller times itself.
    pub fn count(&mut self, machine: MachineId, bytes: u64) {
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
        let way = |holders: &[MachineId], at_client, target, consumers, bytes| {
            let r = route(&m, holders, at_client, target, consumers, bytes).unwrap();
            (r.from, r.kind, r.keeps_in_client())
        };
        assert_eq!(way(&[1], false, 1, 1, 10).1, RouteKind::Present);
        assert_eq!(way(&[], true, 0, 1, 10).1, RouteKind::Present);
        // From the client's store: the target's link only.
        assert_eq!(
            way(&[0, 2], false, 3, 1, 10),
            (None, RouteKind::Direct, false)
        );
        // From a builder (the quickest link): streamed over both links, or kept on the
        // way when shared.
        assert_eq!(
            way(&[2, 1], false, 3, 1, 1 << 20),
            (Some(1), RouteKind::Streamed, false)
        );
        assert_eq!(
            way(&[1], false, 3, 2, 10),
            (Some(1), RouteKind::ViaClient, true)
        );
        // Home to the client: the source's link, and the client keeps it.
        assert_eq!(
            way(&[2], false, 0, 1, 10),
            (Some(2), RouteKind::Direct, true)
        );
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
        // Bytes coming from a machine queue apart from those going to it; a relay goes
        // at the slower link's rate.
        let relay = route(&m, &[2], false, 1, 1, 1_000_000).unwrap();
        assert!((links.arrival(&m, &relay, 1_000_000, 0.0) - 1.02).abs() < 1e-9);
        assert!((links.send(&m, &relay, 1_000_000, 0.0) - 1.02).abs() < 1e-9);
        assert!((links.arrival(&m, &relay, 1_000_000, 0.0) - 2.02).abs() < 1e-9);
        assert_eq!(links.free_at(2, Direction::ToMachine), 2.0);
        assert_eq!(links.free_at(2, Direction::FromMachine), 1.0);
        assert_eq!(links.bytes(), &[0, 1_000_000, 3_000_000, 0]);
    }
}
