//! Direct routes between builders and delivery targets in the simulator: on builders
//! behind a slow client link that reach each other fast, offload's run with pair links
//! ends far sooner than relayed, and nothing but the requested outputs crosses the
//! client's links (nothing at all with a target); Nix's hook still relays everything;
//! a first run learns a pair link from the copies over it once the client links of both
//! machines are measured.

use offload_sched::{Graph, Link, MachineSpec, NodeSpec};
use offload_sim::dag::generate;
use offload_sim::policy::learning::LearningPolicy;
use offload_sim::{run_policy, simulate, Delivery, Report};

const SYS: &str = "x86_64-linux";
const MIB8: u64 = 8 << 20;

/// A layered graph of 30 with 8 MiB outputs.
fn graph() -> Graph {
    let g = generate("layered", 30, 1).unwrap().to_graph().unwrap();
    Graph::new(
        g.nodes()
            .iter()
            .map(|n| NodeSpec {
                output_bytes: MIB8,
                ..n.clone()
            })
            .collect(),
    )
    .unwrap()
}

/// This machine with no slots, three builders × 2 slots behind 20 Mbit/s, and with
/// `target` a store beside them; every builder sends to the others (and the target)
/// at `pair` when given.
fn fleet(pair: Option<Link>, target: bool) -> (Vec<MachineSpec>, Option<Delivery>) {
    let remote = |name: &str, slots| MachineSpec {
        bandwidth: 2.5e6,
        latency: 0.02,
        ..MachineSpec::new(name, SYS, slots, 1.0)
    };
    let mut machines = vec![MachineSpec::local(SYS, 0)];
    machines.extend(["b1", "b2", "b3"].map(|b| remote(b, 2)));
    let delivery = target.then(|| {
        machines.push(MachineSpec {
            systems: Vec::new(),
            ..remote("ssh://target", 0)
        });
        Delivery {
            target: 4,
            closure: true,
        }
    });
    if let Some(link) = pair {
        for from in 1..=3 {
            for to in (1..machines.len()).filter(|&t| t != from) {
                machines[from].set_peer_link(to, Some(link));
            }
        }
    }
    (machines, delivery)
}

const FAST: Link = Link {
    bandwidth: 1e9,
    latency: 0.01,
};

fn run(policy: &str, machines: &[MachineSpec], delivery: Option<Delivery>) -> Report {
    let r = run_policy(
        policy,
        &graph(),
        machines,
        None,
        delivery,
        &[],
        false,
        false,
    )
    .unwrap();
    assert_eq!(r.built, 30, "{policy}");
    r
}

fn sinks_bytes(graph: &Graph) -> u64 {
    (0..graph.len())
        .filter(|&i| graph.dependents(i).is_empty())
        .map(|i| graph.node(i).output_bytes)
        .sum()
}

#[test]
fn with_pair_links_only_the_requested_outputs_cross_the_client_link() {
    let (direct, _) = fleet(Some(FAST), false);
    let (relayed, _) = fleet(None, false);
    let d = run("offload", &direct, None);
    let r = run("offload", &relayed, None);
    // The requested outputs (13 of 8 MiB) still come home over the slow links.
    assert!(
        d.makespan_s * 1.5 < r.makespan_s,
        "direct {} s against relayed {} s",
        d.makespan_s,
        r.makespan_s
    );
    let routes = d.bytes_by_route.unwrap();
    // Only the requested outputs come home; every intermediate one went builder to
    // builder.
    assert_eq!(routes.client_links, sinks_bytes(&graph()));
    assert!(routes.builder_to_builder >= MIB8);
    assert_eq!(routes.to_target, 0);
    // A fleet without pair links reports no routes.
    assert_eq!(r.bytes_by_route, None);
    let moved: u64 = r.bytes_per_link.iter().map(|(_, b)| b).sum();
    // Relayed, intermediate outputs cross the client's links too.
    assert!(moved >= routes.client_links + 4 * MIB8, "{moved}");
}

#[test]
fn with_a_target_nothing_crosses_the_client_link() {
    let g = graph();
    let all: u64 = (0..g.len()).map(|i| g.node(i).output_bytes).sum();
    let (direct, delivery) = fleet(Some(FAST), true);
    let (relayed, _) = fleet(None, true);
    let d = run("offload", &direct, delivery);
    let r = run("offload", &relayed, delivery);
    let (dr, rr) = (d.bytes_by_route.unwrap(), r.bytes_by_route.unwrap());
    // Every output of the layered graph is in the requested outputs' closure.
    assert_eq!((dr.to_target, rr.to_target), (all, all));
    assert_eq!(dr.client_links, 0);
    assert_eq!(rr.builder_to_builder, 0);
    // Relayed, each delivery crosses its builder's link and the target's.
    assert!(rr.client_links >= 2 * all, "{rr:?}");
    assert!(
        d.makespan_s * 5.0 < r.makespan_s,
        "{} vs {}",
        d.makespan_s,
        r.makespan_s
    );
    // The run ends once the last output has crossed to the target: 240 MiB at
    // 2.5 MB/s over the target's link alone take 100 s.
    assert!(r.makespan_s > all as f64 / 2.5e6);
    // Nix's hook copies everything back and then to the target from the client,
    // whatever the pair links.
    let nix = run("nix", &direct, delivery);
    let nr = nix.bytes_by_route.unwrap();
    assert_eq!((nr.builder_to_builder, nr.to_target), (0, all));
    assert!(nr.client_links >= 2 * all, "{nr:?}");
}

#[test]
fn inputs_that_refer_to_theirs_travel_with_their_closures() {
    let (machines, delivery) = fleet(Some(FAST), true);
    let alone = delivery.map(|d| Delivery {
        closure: false,
        ..d
    });
    let with = run("offload", &machines, delivery).bytes_by_route.unwrap();
    let without = run("offload", &machines, alone).bytes_by_route.unwrap();
    // The requested outputs alone go to the target; with closures, everything.
    assert!(without.to_target < with.to_target, "{without:?} {with:?}");
    // A build of the third layer needs the first layer's outputs too.
    assert!(
        without.builder_to_builder < with.builder_to_builder,
        "{without:?} {with:?}"
    );
}

#[test]
fn a_pair_that_cannot_reach_relays() {
    let (mut machines, _) = fleet(Some(FAST), false);
    // b1 and b2 reach no one directly; b3 reaches everyone.
    machines[1].peers.clear();
    machines[2].peers.clear();
    let some = run("offload", &machines, None).bytes_by_route.unwrap();
    let (all, _) = fleet(Some(FAST), false);
    let every = run("offload", &all, None).bytes_by_route.unwrap();
    assert!(
        some.client_links > every.client_links,
        "{some:?} vs {every:?}"
    );
}

#[test]
fn a_first_run_learns_a_pair_link_from_its_copies() {
    let g = graph();
    // Pair links are really 50 MB/s; a first run knows the client links only as
    // declared (the default 100 MB/s) and plans the pairs at the prior (the better of
    // the two, 100 MB/s).
    let slow_pair = Link {
        bandwidth: 50e6,
        latency: 0.01,
    };
    let (mut truth, delivery) = fleet(Some(slow_pair), true);
    // Builds here send their outputs over the client links, which measures them: a
    // pair goes by its copies only once both its machines' client links are measured.
    truth[0].slots = 2;
    let mut declared = truth.clone();
    for m in &mut declared[1..] {
        (m.bandwidth, m.latency) = (100e6, 0.005);
    }
    offload_sim::fleet_file::declared_peers(&truth, &mut declared);
    assert_eq!(declared[1].peer_link(2).unwrap().bandwidth, 100e6);
    let all: Vec<usize> = (0..g.len()).collect();
    let mut policy = LearningPolicy::new(
        (&truth, &declared),
        &g,
        g.clone(),
        &all,
        declared.clone(),
        Vec::new(),
        "first",
    );
    policy.outputs_stay_away(true);
    let report = simulate(&g, &truth, delivery, &[], &mut policy, false);
    assert_eq!(report.built, 30);
    let learned: Vec<f64> = (1..=3)
        .flat_map(|from| {
            let planned = &policy.planned()[from];
            planned
                .peers
                .iter()
                .map(|(_, l)| l.bandwidth)
                .collect::<Vec<_>>()
        })
        .filter(|&b| b != 100e6)
        .collect();
    assert!(!learned.is_empty(), "no pair link was learned");
    for b in learned {
        assert!((b - 50e6).abs() < 0.05 * 50e6, "learned {b}");
    }
}
