//! The two-view fleet: hosts reach each other by the client's names, the client reaches
//! them through counting proxies, one pair kept apart; and the shaping proxy carries
//! every byte, counted, both ways.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener};
use std::path::Path;
use std::time::Duration;

use offload_test_support::{
    require_sshd_fleet_with_peers, CountingProxy, HostOptions, LinkShape, Peers,
};

#[test]
fn hosts_reach_each_other_by_the_clients_names_and_the_client_goes_through_proxies() {
    let real_root_ssh = Path::new("/root/.ssh").exists();
    let target = HostOptions {
        target: true,
        ..HostOptions::default()
    };
    let peers = Peers {
        unreachable: vec![(0, 2)],
        ..Peers::default()
    };
    let Some(fleet) = require_sshd_fleet_with_peers(
        &[HostOptions::default(), HostOptions::default(), target],
        &peers,
    ) else {
        return;
    };
    // Each host's own ssh: by the client's aliases, to the right host (only h3 is the
    // target).
    let is_target = |from: usize, to: usize| {
        fleet.ssh(
            from,
            &format!(
                "ssh {} cat /etc/nix/nix.conf | grep -c max-jobs.=.0 || true",
                fleet.alias(to)
            ),
        )
    };
    assert_eq!(is_target(0, 1).unwrap().trim(), "0");
    assert_eq!(is_target(1, 2).unwrap().trim(), "1", "h3 is the target");
    assert_eq!(is_target(2, 0).unwrap().trim(), "0");
    // A copy from one host to another with stock Nix, by the alias.
    let path = fleet
        .ssh(0, "echo peer > /tmp/f && nix-store --add /tmp/f")
        .unwrap();
    let path = path.trim();
    fleet
        .ssh(
            0,
            &format!("nix-copy-closure --to {} {path}", fleet.alias(1)),
        )
        .unwrap();
    assert!(fleet.is_valid(1, path));
    // The one pair kept apart, one way only.
    let err = fleet
        .ssh(0, &format!("ssh {} true", fleet.alias(2)))
        .unwrap_err();
    assert!(err.contains("refused"), "{err}");
    fleet
        .ssh(2, &format!("ssh {} true", fleet.alias(0)))
        .unwrap();
    // Nothing of that crossed the client's proxies.
    for i in 0..3 {
        assert_eq!(fleet.bytes_through(i), (0, 0), "host {i}");
    }
    // The client reaches every host through its proxy, counted both ways.
    let (name, opts) = fleet.ssh_opts();
    for i in 0..3 {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ssh $NIX_SSHOPTS {} head -c 100000 /dev/zero | wc -c",
                fleet.alias(i)
            ))
            .env(name, &opts)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
        let (to, from) = fleet.bytes_through(i);
        assert!(to > 0 && from > 100_000, "host {i}: {to} {from}");
    }
    assert_eq!(
        Path::new("/root/.ssh").exists(),
        real_root_ssh,
        "/root/.ssh untouched"
    );
    // A host runs none of this machine's shell set-up.
    let bashrc = fleet.ssh(0, "cat /root/.bashrc").unwrap();
    assert!(bashrc.contains("no shell set-up"), "{bashrc}");
}

#[test]
fn a_shaped_proxy_carries_every_byte_both_ways_and_counts_them() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // An echo server that also says how many bytes it read.
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&got).unwrap();
        s.write_all(&got).unwrap();
        got.len()
    });
    let shape = LinkShape {
        rate: Some(8 << 20),
        delay: Duration::from_millis(5),
    };
    let proxy = CountingProxy::start(port, shape).unwrap();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    let sent: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    c.write_all(&sent).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(echo.join().unwrap(), sent.len());
    assert_eq!(back.len(), 2 * sent.len());
    assert!(back[..sent.len()] == sent[..] && back[sent.len()..] == sent[..]);
    assert_eq!(proxy.bytes(), (300_000, 600_000));
}
