//! Planning cost at scale: simulated runs of generated graphs on large fleets, offload's
//! scheduler only. `cargo bench -p offload-sim` prints seconds per run and per decision.

use std::time::Instant;

use offload_sched::MachineSpec;
use offload_sim::dag::generate;
use offload_sim::run_policy;

fn fleet(n: usize) -> Vec<MachineSpec> {
    (0..n)
        .map(|i| MachineSpec {
            name: format!("b{i}"),
            systems: vec!["x86_64-linux".into()],
            supported_features: vec![],
            mandatory_features: vec![],
            slots: 4,
            speed: 1.0 + (i % 3) as f64,
            is_local: i == 0,
            bandwidth: 1e8,
            latency: 0.005,
        })
        .collect()
}

#[expect(
    clippy::disallowed_methods,
    reason = "a benchmark measures time; the crate itself never reads a clock"
)]
fn main() {
    let sizes: &[(&str, usize, usize)] = &[
        ("nixpkgs", 10_000, 100),
        ("layered", 10_000, 100),
        ("nixpkgs", 100_000, 1_000),
    ];
    println!("shape      nodes  machines   seconds   µs per build");
    for &(shape, n, m) in sizes {
        let graph = generate(shape, n, 1)
            .and_then(|d| d.to_graph())
            .expect("generated graph");
        let machines = fleet(m);
        let started = Instant::now();
        let report = run_policy("offload", &graph, &machines, &[], false, false).expect("policy");
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(report.built, n);
        println!(
            "{shape:<9} {n:>6} {m:>9} {secs:>9.2} {:>14.1}",
            secs * 1e6 / n as f64
        );
    }
}
