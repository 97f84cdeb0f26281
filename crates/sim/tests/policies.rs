//! The simulator and its policies: every policy builds everything, no schedule beats
//! the lower bound, failures are survived (by offload and Hydra; Nix fails the builds
//! it loses), traces are well formed.

use offload_sched::{Graph, MachineSpec};
use offload_sim::dag::generate;
use offload_sim::report::lower_bound;
use offload_sim::run_policy;
use proptest::prelude::*;

fn machine(name: &str, slots: u32, speed: f64, is_local: bool) -> MachineSpec {
    MachineSpec {
        is_local,
        bandwidth: if is_local { f64::INFINITY } else { 1e9 },
        latency: if is_local { 0.0 } else { 0.002 },
        ..MachineSpec::new(name, "x86_64-linux", slots, speed)
    }
}

fn fleet() -> Vec<MachineSpec> {
    vec![
        machine("local", 2, 1.0, true),
        machine("b1", 2, 1.0, false),
        machine("b2", 2, 1.0, false),
        machine("b3", 2, 1.0, false),
    ]
}

#[test]
fn offload_plans_closest_to_the_bound_on_a_layered_graph() {
    let graph = generate("layered", 40, 1).unwrap().to_graph().unwrap();
    let machines = fleet();
    let off = run_policy("offload", &graph, &machines, None, None, &[], false, false).unwrap();
    let nix = run_policy("nix", &graph, &machines, None, None, &[], false, false).unwrap();
    let hydra = run_policy("hydra", &graph, &machines, None, None, &[], false, false).unwrap();
    for r in [&off, &nix, &hydra] {
        assert_eq!(r.built, 40, "{}", r.policy);
        assert!(r.makespan_s >= r.lower_bound_s - 1e-9, "{}", r.policy);
    }
    assert!(
        off.makespan_s < nix.makespan_s,
        "offload {} vs nix {}",
        off.makespan_s,
        nix.makespan_s
    );
    assert!(off.makespan_s <= hydra.makespan_s + 1e-9);
    assert!(off.ratio < 1.15, "offload at {}x the bound", off.ratio);
    assert!(!off.critical_path.is_empty());
}

#[test]
fn a_failing_machine_costs_time_but_no_builds() {
    let graph = generate("wide", 60, 3).unwrap().to_graph().unwrap();
    let machines = fleet();
    for policy in ["offload", "nix", "hydra"] {
        let ok = run_policy(policy, &graph, &machines, None, None, &[], false, false).unwrap();
        let failed = run_policy(
            policy,
            &graph,
            &machines,
            None,
            None,
            &[(1, 1.0), (2, 2.0)],
            false,
            false,
        )
        .unwrap();
        if policy == "nix" {
            // Nix 2.8 does not retry a build whose machine is lost: it fails.
            assert!(failed.built < 60, "{policy}");
        } else {
            assert_eq!(failed.built, 60, "{policy}");
            assert!(failed.makespan_s >= ok.makespan_s - 1e-9, "{policy}");
        }
    }
}

#[test]
fn traces_are_chrome_trace_events() {
    let graph = generate("chain", 5, 1).unwrap().to_graph().unwrap();
    let r = run_policy("offload", &graph, &fleet(), None, None, &[], false, true).unwrap();
    let trace = r.chrome_trace();
    let events = trace["traceEvents"].as_array().unwrap();
    let builds: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(builds.len(), 5);
    assert!(builds.iter().all(|e| e["dur"].as_f64().unwrap() > 0.0));
}

#[test]
fn lower_bound_counts_speed() {
    let graph = Graph::new(
        generate("wide", 8, 1)
            .unwrap()
            .to_graph()
            .unwrap()
            .nodes()
            .to_vec(),
    )
    .unwrap();
    let slow = vec![machine("a", 1, 1.0, false)];
    let fast = vec![machine("a", 1, 2.0, false)];
    assert!((lower_bound(&graph, &slow) - 2.0 * lower_bound(&graph, &fast)).abs() < 1e-9);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn every_policy_finishes_every_graph(shape in prop::sample::select(vec!["layered", "nixpkgs", "wide", "chain"]), n in 1usize..80, seed in any::<u64>(), cold in any::<bool>()) {
        let graph = generate(shape, n, seed).unwrap().to_graph().unwrap();
        let machines = fleet();
        for policy in ["offload", "nix", "hydra"] {
            let mut r = run_policy(policy, &graph, &machines, None, None, &[(2, 1.5)], cold, false).unwrap();
            if policy == "nix" {
                // Builds lost with the machine fail, and so do their dependents.
                prop_assert!(r.built <= n);
                r = run_policy(policy, &graph, &machines, None, None, &[], cold, false).unwrap();
            }
            prop_assert_eq!(r.built, n, "{} did not finish", policy);
            prop_assert!(r.makespan_s + 1e-9 >= r.lower_bound_s, "{} beat the lower bound", policy);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(30))]

    /// Two systems and features on a generated mixed fleet: every policy builds all that
    /// some machine can build (a small fleet may lack a system's big-parallel machine).
    #[test]
    fn every_policy_builds_a_mixed_graph_on_a_mixed_fleet(n in 1usize..300, machines in 10usize..40, seed in any::<u64>(), local in 0u32..3) {
        let graph = generate("nixpkgs-mixed", n, seed).unwrap().to_graph().unwrap();
        let mut fleet = vec![MachineSpec::local("x86_64-linux", local)];
        fleet.extend(offload_sim::dag::generate_fleet("mixed", machines, seed, 1e8, 0.005).unwrap());
        let mut buildable = vec![false; n];
        for &id in graph.topo_order() {
            let node = graph.node(id);
            buildable[id] = fleet.iter().any(|m| m.slots > 0 && m.can_build(node))
                && node.deps.iter().all(|&d| buildable[d]);
        }
        let expected = buildable.iter().filter(|&&b| b).count();
        for policy in ["offload", "nix", "hydra"] {
            let r = run_policy(policy, &graph, &fleet, None, None, &[], false, false).unwrap();
            prop_assert_eq!(r.built, expected, "{} did not finish", policy);
            if expected == n {
                prop_assert!(r.makespan_s + 1e-9 >= r.lower_bound_s, "{} beat the lower bound", policy);
            }
            prop_assert!(r.lower_bound_s.is_finite() && r.lower_bound_s < 1e6);
        }
    }
}
