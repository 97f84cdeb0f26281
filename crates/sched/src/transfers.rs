//! How store paths travel between machines: the one model of transfers that the
//! scheduler plans with, the simulator simulates and the live driver follows.
//!
//! A path on the client's store (the machine offload runs on) crosses the target's link.
//! A path built on builder A goes to builder B by the quickest of the ways there are:
//! - directly, when A sends to B over the pair's own link ([`MachineSpec::peers`]: A
//!   runs `nix-store --export … | ssh B nix-store --import`); the client carries
//!   nothing;
//! - relayed through the client: streamed over both machines' links at once, or, when
//!   several builds need the path, stopping in the client's store on the way, so that
//!   later copies cross one link and A serves it once.
//!
//! A link carries one transfer's bytes at a time in each direction (transfers queue on
//! it: inputs going to a machine queue apart from outputs coming from it; a pair link
//! carries one transfer at a time from A to B); latency delays a transfer without
//! holding the link.

use std::collections::HashMap;

use crate::fleet::{MachineId, MachineSpec};
use crate::holding::nearest_holder;

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
    /// From one builder straight to another over the pair's own link
    /// ([`MachineSpec::peer_link`]); the client carries nothing.
    Peer,
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
            (RouteKind::Streamed | RouteKind::ViaClient | RouteKind::Peer, None) => {
                f(&[(self.to, ToMachine)])
            }
            // Over no client link: the pair's own, booked apart.
            (RouteKind::Peer, Some(_)) => {}
        }
    }

    /// The builder this route sends from directly to another, over the pair's link.
    fn pair(&self) -> Option<(MachineId, MachineId)> {
        match (self.kind, self.from) {
            (RouteKind::Peer, Some(from)) => Some((from, self.to)),
            _ => None,
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
            RouteKind::Present | RouteKind::Streamed | RouteKind::Peer => false,
        }
    }
}

/// The route of a path to `target`.
///
/// `holders` are the fleet machines that have it, `at_client` whether the client's store
/// does (the client may be a fleet machine, the one with `is_local`, or not in the
/// fleet), and `consumers` how many builds take it as an input. The way is the quickest
/// for `bytes` over idle links among: from the client's store over the target's link
/// (when the client has the path); directly from a holder that reaches the target over
/// a pair link; relayed through the client from the holder whose link is quickest (the
/// lower index at a tie). At a tie a direct pair goes first, then the client's store,
/// then the lower machine. To the client itself, a path crosses its source's link.
/// `None` when nothing holds the path.
pub fn route(
    machines: &[MachineSpec],
    holders: &[MachineId],
    at_client: bool,
    target: MachineId,
    consumers: usize,
    bytes: u64,
) -> Option<Route> {
    let pairs = has_pair_links(machines);
    route_in(
        machines, pairs, holders, at_client, target, consumers, bytes,
    )
}

/// Whether any machine of `machines` sends to another directly.
pub fn has_pair_links(machines: &[MachineSpec]) -> bool {
    machines.iter().any(|m| !m.peers.is_empty())
}

/// [`route`] on a fleet known to have pair links or not ([`has_pair_links`]), for
/// callers that route many paths: without them, no holder's pair links are looked at,
/// and a path costs what it did before there were any.
#[inline]
pub fn route_in(
    machines: &[MachineSpec],
    pairs: bool,
    holders: &[MachineId],
    at_client: bool,
    target: MachineId,
    consumers: usize,
    bytes: u64,
) -> Option<Route> {
    let held_by_target = holders.contains(&target);
    let local = holders.iter().any(|&h| machines[h].is_local);
    // The relay's source matters only when neither the target nor the client holds it.
    let nearest = if held_by_target || local || at_client {
        None
    } else {
        nearest_holder(machines, holders, bytes)
    };
    let held = HeldBy {
        machines: holders,
        target: held_by_target,
        local,
        nearest,
    };
    route_from(machines, pairs, &held, at_client, target, consumers, bytes)
}

/// What routing a path to one target asks of its holders: who they are, whether the
/// target or a local machine is one of them, and the holder whose own link sends the
/// path quickest (the lower index at a tie). The scheduler keeps these up to date as
/// holders change, so that a path held everywhere costs no scan of the fleet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeldBy<'a> {
    pub(crate) machines: &'a [MachineId],
    pub(crate) target: bool,
    pub(crate) local: bool,
    pub(crate) nearest: Option<MachineId>,
}

/// [`route_in`] with its holders worked out ([`HeldBy`]).
pub(crate) fn route_from(
    machines: &[MachineSpec],
    pairs: bool,
    held: &HeldBy,
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
    if held.target || (target_is_client && at_client) {
        return Some(on(None, RouteKind::Present));
    }
    let client_holds = at_client || held.local;
    // The quickest pair link from a holder to the target (the lower holder at a tie).
    let mut peer: Option<(f64, MachineId)> = None;
    if pairs && !target_is_client {
        for &h in held.machines {
            if let Some(link) = machines[h].peer_link(target) {
                let t = link.transfer_time(bytes);
                if peer.is_none_or(|(best, b)| t < best || (t == best && h < b)) {
                    peer = Some((t, h));
                }
            }
        }
    }
    if client_holds {
        return Some(match peer {
            Some((t, h)) if t <= machines[target].transfer_time(bytes) => {
                on(Some(h), RouteKind::Peer)
            }
            _ => on(None, RouteKind::Direct),
        });
    }
    let from = held.nearest?;
    let kind = if target_is_client {
        RouteKind::Direct
    } else if consumers > 1 {
        RouteKind::ViaClient
    } else {
        RouteKind::Streamed
    };
    let relay = on(Some(from), kind);
    Some(match peer {
        Some((t, h)) if t <= relay_time(machines, &relay, bytes) => on(Some(h), RouteKind::Peer),
        _ => relay,
    })
}

/// Seconds `bytes` take along a relay over idle links: streamed at the slower link's
/// rate after both latencies, or one link after the other when kept on the way.
fn relay_time(machines: &[MachineSpec], relay: &Route, bytes: u64) -> f64 {
    let mut total = 0.0;
    relay.each_hop(|links| {
        let (rate, latency) = links.iter().fold((f64::INFINITY, 0.0), |(r, l), &(m, _)| {
            let spec = &machines[m];
            if spec.is_local {
                (r, l)
            } else {
                (r.min(spec.bandwidth.max(1.0)), l + spec.latency)
            }
        });
        if bytes > 0 {
            total += latency
                + if rate.is_finite() {
                    bytes as f64 / rate
                } else {
                    0.0
                };
        }
    });
    total
}

/// Which way bytes cross a machine's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToMachine = 0,
    FromMachine = 1,
}

/// When each machine's link is next free in each direction, and when each pair link
/// that carried something is; the bytes each machine's link has carried, and those the
/// pair links have.
#[derive(Debug, Clone)]
pub struct Links {
    free_at: Vec<[f64; 2]>,
    bytes: Vec<u64>,
    /// Pair links by (from, to): only those that carried something.
    pair_free_at: HashMap<(MachineId, MachineId), f64>,
    peer_bytes: u64,
}

impl Links {
    pub fn new(machines: usize) -> Links {
        Links {
            free_at: vec![[0.0; 2]; machines],
            bytes: vec![0; machines],
            pair_free_at: HashMap::new(),
            peer_bytes: 0,
        }
    }

    /// When `bytes` sent along `route`, starting no earlier than `ready`, would arrive,
    /// behind what the links already carry; nothing is booked.
    pub fn arrival(&self, machines: &[MachineSpec], route: &Route, bytes: u64, ready: f64) -> f64 {
        if let Some(pair) = route.pair() {
            return self.pair_hop(machines, pair, bytes, ready).1;
        }
        let mut at = ready;
        route.each_hop(|links| at = self.hop(machines, links, bytes, at).1);
        at
    }

    /// Sends `bytes` along `route` from `ready` on: books the links, returns the arrival.
    pub fn send(&mut self, machines: &[MachineSpec], route: &Route, bytes: u64, ready: f64) -> f64 {
        if let Some(pair) = route.pair() {
            let (busy_until, arrival) = self.pair_hop(machines, pair, bytes, ready);
            if bytes > 0 {
                self.pair_free_at.insert(pair, busy_until);
                self.peer_bytes += bytes;
            }
            return arrival;
        }
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

    /// A direct copy from one builder to another: (when the pair link is free again,
    /// when the bytes arrive). A pair with no link of its own (the route was made for
    /// another fleet) goes at the source's link.
    fn pair_hop(
        &self,
        machines: &[MachineSpec],
        (from, to): (MachineId, MachineId),
        bytes: u64,
        ready: f64,
    ) -> (f64, f64) {
        if bytes == 0 {
            return (ready, ready);
        }
        let link = machines[from]
            .peer_link(to)
            .copied()
            .unwrap_or_else(|| machines[from].link());
        let start = ready.max(self.pair_free_at(from, to));
        let sending = bytes as f64 / link.bandwidth.max(1.0);
        (start + sending, start + link.latency + sending)
    }

    /// When the pair link from `from` to `to` is next free.
    pub fn pair_free_at(&self, from: MachineId, to: MachineId) -> f64 {
        self.pair_free_at.get(&(from, to)).copied().unwrap_or(0.0)
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

    /// Bytes each machine's link (to the client) has carried.
    pub fn bytes(&self) -> &[u64] {
        &self.bytes
    }

    /// Bytes the pair links have carried, all together.
    pub fn peer_bytes(&self) -> u64 {
        self.peer_bytes
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
    use crate::Link;

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

    /// The fleet with pair links: 1 → 3 fast, 2 → 3 as slow as the client's link to 3,
    /// 3 → 1 slower than the relay; 1 and 2 do not reach each other.
    fn mesh() -> Vec<MachineSpec> {
        let mut m = fleet();
        let link = |bandwidth, latency| Link { bandwidth, latency };
        m[1].set_peer_link(3, Some(link(1e9, 0.001)));
        m[2].set_peer_link(3, Some(link(100e6, 0.01)));
        m[3].set_peer_link(1, Some(link(1e6, 0.001)));
        m
    }

    #[test]
    fn routes_take_the_quickest_way() {
        let m = mesh();
        let way = |holders: &[MachineId], at_client, target, consumers, bytes| {
            let r = route(&m, holders, at_client, target, consumers, bytes).unwrap();
            (r.from, r.kind, r.keeps_in_client())
        };
        let mb = 1 << 20;
        // A pair link quicker than the relay: straight there, nothing kept.
        assert_eq!(
            way(&[1], false, 3, 2, mb),
            (Some(1), RouteKind::Peer, false)
        );
        // Quicker than the client's store too.
        assert_eq!(way(&[1], true, 3, 1, mb), (Some(1), RouteKind::Peer, false));
        // A slow pair link loses to the relay (3 → 1 at 1 MB/s, the relay at 100 MB/s).
        assert_eq!(
            way(&[3], false, 1, 1, mb),
            (Some(3), RouteKind::Streamed, false)
        );
        // And to the client's store.
        assert_eq!(way(&[3], true, 1, 1, mb), (None, RouteKind::Direct, false));
        // A pair that does not reach each other relays.
        assert_eq!(
            way(&[1], false, 2, 1, mb),
            (Some(1), RouteKind::Streamed, false)
        );
        assert_eq!(
            way(&[1], false, 2, 2, mb),
            (Some(1), RouteKind::ViaClient, true)
        );
        // Of two holders, the one with the quicker pair link.
        assert_eq!(
            way(&[2, 1], false, 3, 1, mb),
            (Some(1), RouteKind::Peer, false)
        );
        // Home to the client: the source's link, whatever pair links there are.
        assert_eq!(
            way(&[1], false, 0, 1, mb),
            (Some(1), RouteKind::Direct, true)
        );
    }

    #[test]
    fn ties_prefer_the_pair_then_the_client_then_the_lower_machine() {
        let mut m = mesh();
        // 2 → 3 takes exactly what the client's store → 3 takes: the pair goes.
        assert_eq!(
            route(&m, &[2], true, 3, 1, 1 << 20).map(|r| (r.from, r.kind)),
            Some((Some(2), RouteKind::Peer))
        );
        // Two holders whose pair links tie: the lower.
        let link = m[1].peer_link(3).copied();
        m[2].set_peer_link(3, link);
        assert_eq!(
            route(&m, &[2, 1], false, 3, 1, 1 << 20).map(|r| (r.from, r.kind)),
            Some((Some(1), RouteKind::Peer))
        );
        // No bytes: every way is free, the pair goes.
        assert_eq!(
            route(&m, &[2], true, 3, 1, 0).map(|r| r.kind),
            Some(RouteKind::Peer)
        );
        // A pair link as quick as the relay (10 ms each way, then 1 MB at 100 MB/s):
        // the pair.
        let mut m = fleet();
        m[1].set_peer_link(
            3,
            Some(Link {
                bandwidth: 100e6,
                latency: 0.02,
            }),
        );
        let relay = Route {
            kind: RouteKind::Streamed,
            ..route(&m, &[1], false, 3, 1, 1_000_000).unwrap()
        };
        assert_eq!(
            relay_time(&m, &relay, 1_000_000),
            m[1].peer_link(3).unwrap().transfer_time(1_000_000)
        );
        assert_eq!(
            route(&m, &[1], false, 3, 1, 1_000_000).map(|r| (r.from, r.kind)),
            Some((Some(1), RouteKind::Peer))
        );
    }

    #[test]
    fn pair_links_queue_apart_from_the_client_links() {
        let m = mesh();
        let mut links = Links::new(m.len());
        let direct = route(&m, &[2], false, 3, 1, 1_000_000).unwrap();
        assert_eq!(direct.kind, RouteKind::Peer);
        // 1 MB at 100 MB/s plus 10 ms.
        assert!((links.send(&m, &direct, 1_000_000, 0.0) - 0.02).abs() < 1e-9);
        // The second waits for the first to be sent, not for its latency.
        assert!((links.arrival(&m, &direct, 1_000_000, 0.0) - 0.03).abs() < 1e-9);
        assert!((links.send(&m, &direct, 1_000_000, 0.0) - 0.03).abs() < 1e-9);
        assert!((links.pair_free_at(2, 3) - 0.02).abs() < 1e-9);
        // The other direction, another pair and the machines' own links are free.
        assert_eq!(links.pair_free_at(3, 2), 0.0);
        let other = route(&m, &[1], false, 3, 1, 1_000_000).unwrap();
        assert!((links.arrival(&m, &other, 1_000_000, 0.0) - 0.002).abs() < 1e-9);
        assert_eq!(links.free_at(2, Direction::FromMachine), 0.0);
        assert_eq!(links.free_at(3, Direction::ToMachine), 0.0);
        // Bytes per route: the pair links' apart from each machine's.
        let relay = route(&m, &[1], false, 2, 1, 500).unwrap();
        links.send(&m, &relay, 500, 0.0);
        assert_eq!(links.peer_bytes(), 2_000_000);
        assert_eq!(links.bytes(), &[0, 500, 500, 0]);
    }
}
