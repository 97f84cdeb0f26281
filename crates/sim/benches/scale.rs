//! Planning cost at scale: offload's scheduler on generated graphs and fleets, simulated.
//! `cargo bench -p offload-sim` prints the CPU seconds of each run and per build, for
//! fleets of growing size: the cost per decision must grow slower than the fleet.

use std::time::Instant;

use offload_sched::MachineSpec;
use offload_sim::dag::{generate, generate_fleet};
use offload_sim::run_policy;

/// The generated mixed fleet plus the client's own 8 slots.
fn fleet(n: usize) -> Vec<MachineSpec> {
    let mut machines = vec![MachineSpec::local("x86_64-linux", 8)];
    machines.extend(generate_fleet("mixed", n, 5, 100e6, 0.005).expect("mixed fleet"));
    machines
}

#[expect(
    clippy::disallowed_methods,
    reason = "a benchmark measures time; the crate itself never reads a clock"
)]
fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut sizes: Vec<(&str, usize, usize)> = vec![
        ("nixpkgs-mixed", 10_000, 100),
        ("nixpkgs-mixed", 10_000, 1_000),
        ("nixpkgs-mixed", 10_000, 10_000),
        ("layered", 10_000, 100),
        ("layered", 10_000, 1_000),
        ("layered", 10_000, 10_000),
    ];
    if !quick {
        sizes.extend([
            ("nixpkgs-mixed", 100_000, 1_000),
            ("layered", 100_000, 1_000),
        ]);
    }
    println!("shape             nodes  machines   seconds   µs per build   makespan / bound");
    for (shape, n, m) in sizes {
        let graph = generate(shape, n, 1)
            .and_then(|d| d.to_graph())
            .expect("generated graph");
        let machines = fleet(m);
        let started = Instant::now();
        let report = run_policy("offload", &graph, &machines, None, None, &[], false, false)
            .expect("policy");
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(report.built, n);
        println!(
            "{shape:<14} {n:>8} {m:>9} {secs:>9.2} {:>14.1} {:>18.2}",
            secs * 1e6 / n as f64,
            report.ratio
        );
    }
}
