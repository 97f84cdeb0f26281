//! Sessions with one machine share one ssh connection (`offload_driver::ssh::master`),
//! counted on real sshd hosts by the connections their listening sshd has forked.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use offload_driver::{Endpoint, Pool, Traffic};
use offload_test_support::{require_sshd_fleet_with, HostOptions, SshFleet};

/// One fleet for the test binary, each test on hosts of its own. Hosts 0 and 2 are
/// plain; host 1 lets a connection carry one session (`MaxSessions 1`).
fn fleet() -> Option<&'static SshFleet> {
    static FLEET: OnceLock<Option<SshFleet>> = OnceLock::new();
    FLEET
        .get_or_init(|| {
            let one_session = HostOptions {
                max_sessions: Some(1),
                ..HostOptions::default()
            };
            let fleet = require_sshd_fleet_with(&[
                HostOptions::default(),
                one_session,
                HostOptions::default(),
            ])?;
            // The client under test finds the hosts' aliases through NIX_SSHOPTS.
            let (k, v) = fleet.ssh_opts();
            std::env::set_var(k, v);
            Some(fleet)
        })
        .as_ref()
}

/// This process's shared ssh connections to `alias` (its `ssh -M` children), by pid.
fn masters(alias: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_master = args.first() == Some(&&b"ssh"[..])
            && args.contains(&&b"-M"[..])
            && args.contains(&alias.as_bytes());
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if is_master && parent == Some(me.as_str()) {
            pids.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    pids
}

/// Kills this process's shared ssh connection to `alias` (its `ssh -M`).
fn kill_master(alias: &str) -> bool {
    let mut killed = false;
    for pid in masters(alias) {
        killed |= std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success();
    }
    killed
}

/// Waits (a little) until host `i` has `n` connections; returns how many it has.
fn connections_settle(fleet: &SshFleet, i: usize, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = fleet.connections(i);
        if now == n || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens three sessions with different cores settings at once (none can serve for
/// another) and has each answer a query.
async fn three_sessions(pool: &Pool) -> Vec<offload_driver::ServeConn> {
    let (a, b, c) = tokio::join!(
        pool.get_with_cores(None),
        pool.get_with_cores(Some(1)),
        pool.get_with_cores(Some(2)),
    );
    let mut conns = vec![a.unwrap(), b.unwrap(), c.unwrap()];
    for conn in &mut conns {
        let missing = "/nix/store/00000000000000000000000000000000-not-there".to_string();
        let valid = conn.query_valid_paths(&[missing], false, false).await;
        assert_eq!(valid.unwrap(), Vec::<String>::new());
    }
    conns
}

#[tokio::test]
async fn sessions_share_one_connection_and_go_on_their_own_where_the_builder_says_no() {
    let Some(fleet) = fleet() else { return };
    assert_eq!(fleet.connections(0), 0);

    // Three sessions, one connection; each copy session goes over one of its own, so
    // that a build's few bytes never queue behind a NAR's and copies run side by side.
    // They end with the pool.
    let pool = Pool::new(Endpoint::parse(&fleet.store_uri(0)).unwrap());
    let mut conns = three_sessions(&pool).await;
    assert_eq!(connections_settle(fleet, 0, 1), 1);
    for traffic in [Traffic::ToMachine, Traffic::ToMachine, Traffic::FromMachine] {
        conns.push(pool.get_for(traffic).await.unwrap());
    }
    assert_eq!(connections_settle(fleet, 0, 4), 4);
    for conn in conns {
        pool.put(conn);
    }
    // An idle session serves its own traffic only.
    let conn = pool.get_for(Traffic::FromMachine).await.unwrap();
    assert_eq!(conn.traffic(), Traffic::FromMachine);
    pool.put(conn);
    pool.close().await;
    assert_eq!(connections_settle(fleet, 0, 0), 0);

    // A builder that lets a connection carry one session: the others connect on their
    // own, and every session works.
    let pool = Pool::new(Endpoint::parse(&fleet.store_uri(1)).unwrap());
    let conns = three_sessions(&pool).await;
    assert_eq!(connections_settle(fleet, 1, 3), 3);
    drop(conns);
    pool.close().await;
    assert_eq!(connections_settle(fleet, 1, 0), 0);
}

#[tokio::test]
async fn a_shared_connection_that_ended_is_opened_again() {
    let Some(fleet) = fleet() else { return };
    let pool = Pool::new(Endpoint::parse(&fleet.store_uri(2)).unwrap());
    let conn = pool.get().await.unwrap();
    drop(conn);
    assert_eq!(connections_settle(fleet, 2, 1), 1);
    // The connection dies under the pool (the network dropped it, say).
    assert!(
        kill_master(fleet.alias(2)),
        "no ssh master for {}",
        fleet.alias(2)
    );
    assert_eq!(connections_settle(fleet, 2, 0), 0);
    let conns = three_sessions(&pool).await;
    // A new master carries them. Not reopened, each session would connect on its own
    // (three); on a loaded machine one of them at times goes on its own all the same
    // (ssh with ControlMaster=no does when the master does not answer it), so two.
    assert_eq!(masters(fleet.alias(2)).len(), 1, "no new ssh master");
    let n = connections_settle(fleet, 2, 1);
    assert!(
        n < 3,
        "{n} connections: the sessions did not share a new one"
    );
    drop(conns);
    pool.close().await;
    assert_eq!(connections_settle(fleet, 2, 0), 0);
}
