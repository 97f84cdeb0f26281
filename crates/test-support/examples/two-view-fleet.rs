//! A two-view fleet ([`Peers`]) for benchmark scripts, kept up until its standard input
//! ends (`scripts/bench-routes.sh`).
//!
//! ```text
//! two-view-fleet INFO [--hosts N] [--target I] [--mbit M] [--delay-ms D] [--unreachable I,J]
//! ```
//!
//! Starts N sshd hosts (`offload-test-h1`…; I and J are 1-based) whose own ssh reaches
//! each other directly, host I a plain target store (`max-jobs = 0`), the client reaching
//! each through a counting proxy shaped to M Mbit/s and D ms one-way delay each way.
//! Writes INFO as shell assignments (`SSH_CONFIG`, `DIRECT_CONFIG`, `FLEET_DIR`), then
//! every 100 ms INFO.bytes: one line per host, `ALIAS TO_HOST FROM_HOST` bytes through
//! its proxy. When standard input ends, stops the hosts, removes the fleet's directory
//! and exits; killed, its hosts stop within a second (the fleet's watcher).

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use offload_test_support::{require_sshd_fleet_with_peers, HostOptions, LinkShape, Peers};

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let info = PathBuf::from(args.next().ok_or("usage: two-view-fleet INFO [OPTIONS]")?);
    let (mut hosts, mut target, mut mbit, mut delay_ms) = (4usize, None, None, 0.0);
    let mut unreachable = Vec::new();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<f64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--hosts" => hosts = number(&value)? as usize,
            "--target" => target = Some(number(&value)? as usize),
            "--mbit" => mbit = Some(number(&value)?),
            "--delay-ms" => delay_ms = number(&value)?,
            "--unreachable" => {
                let (i, j) = value.split_once(',').ok_or("--unreachable I,J")?;
                unreachable.push((number(i)? as usize - 1, number(j)? as usize - 1));
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    let options: Vec<HostOptions> = (1..=hosts)
        .map(|i| HostOptions {
            target: target == Some(i),
            ..HostOptions::default()
        })
        .collect();
    let peers = Peers {
        client_link: LinkShape {
            rate: mbit.map(|m| (m * 1e6 / 8.0) as u64),
            delay: Duration::from_secs_f64(delay_ms / 1000.0),
        },
        unreachable,
    };
    let fleet = require_sshd_fleet_with_peers(&options, &peers).ok_or("the fleet did not start")?;
    let config = fleet.ssh_config();
    let dir = config.parent().ok_or("the fleet has no directory")?;
    write(
        &info,
        &format!(
            "SSH_CONFIG='{}'\nDIRECT_CONFIG='{}'\nFLEET_DIR='{}'\n",
            config.display(),
            dir.join("direct_config").display(),
            dir.display()
        ),
    )?;
    let done = Arc::new(AtomicBool::new(false));
    let stdin_done = done.clone();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        stdin_done.store(true, Ordering::SeqCst);
    });
    let bytes_file = PathBuf::from(format!("{}.bytes", info.display()));
    loop {
        let counts: String = (0..hosts)
            .map(|i| {
                let (to, from) = fleet.bytes_through(i);
                format!("{} {to} {from}\n", fleet.alias(i))
            })
            .collect();
        write(&bytes_file, &counts)?;
        if done.load(Ordering::SeqCst) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `text` to `path` whole: readers see the old file or the new one.
fn write(path: &std::path::Path, text: &str) -> Result<(), String> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}
