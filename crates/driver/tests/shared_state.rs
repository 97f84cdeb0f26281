//! The state in a real PostgreSQL server (a private one, `offload_test_support::postgres`):
//! what one client records another reads, clients that start at once upgrade the schema
//! once, a newer schema and a bad URI are refused with the fix, and a database that
//! cannot be reached or is lost leaves the state in the local file, nothing lost.

use offload_driver::state::EstimateSource;
use offload_driver::StateDb;
use offload_test_support::require_postgres;

const SYS: &str = "x86_64-linux";

#[test]
fn two_clients_share_what_either_records() {
    let Some(pg) = require_postgres() else { return };
    let homes = tempfile::tempdir().unwrap();
    let a = StateDb::open_shared(&pg.uri(), &homes.path().join("a.sqlite")).unwrap();
    let b = StateDb::open_shared(&pg.uri(), &homes.path().join("b.sqlite")).unwrap();
    assert!(a.is_shared() && b.is_shared());
    assert!(
        a.place().starts_with("postgresql:///offload?host="),
        "{}",
        a.place()
    );

    a.record("hello-1.0", SYS, "ssh://b1", 4.0, 1.0, Some(1 << 20))
        .unwrap();
    a.record_transfer("ssh://b1", true, 8 << 20, 0.5, 1)
        .unwrap();
    a.set_cores("ssh://b1", 8).unwrap();
    a.set_cores("ssh://b1", 16).unwrap();
    assert_eq!(a.machine_failed("ssh://b2", "refused", 10).unwrap(), 1);
    assert_eq!(b.machine_failed("ssh://b2", "timed out", 20).unwrap(), 2);
    a.quarantine("ssh://b2", 600).unwrap();
    a.record_peer_probe("ssh://b1", "ssh://b2", true, "")
        .unwrap();
    a.record_peer_transfer("ssh://b1", "ssh://b2", 8 << 20, 0.1, 1)
        .unwrap();
    let first = a.record_run(100, "{\"a\":1}").unwrap();
    let second = b.record_run(200, "{\"a\":2}").unwrap();

    // The other client reads all of it.
    let k = b.knowledge(SYS).unwrap();
    assert_eq!(k.estimate("hello-1.0"), (4.0, EstimateSource::Exact));
    assert_eq!(k.estimate("hello-1.1"), (4.0, EstimateSource::OtherVersion));
    assert_eq!(b.cores("ssh://b1").unwrap(), Some(16));
    assert_eq!(b.cores("ssh://b9").unwrap(), None);
    let m = b.machine("ssh://b2").unwrap().unwrap();
    assert_eq!(
        (m.failures, m.last_failure.as_str(), m.quarantined_until),
        (2, "timed out", 600)
    );
    let pairs = b.peer_reach().unwrap();
    assert_eq!(pairs.len(), 1);
    assert!(pairs[0].reachable && pairs[0].link.is_some());
    assert!(second > first);
    assert_eq!(b.run(None).unwrap().unwrap().report, "{\"a\":2}");
    assert_eq!(a.run(Some(first)).unwrap().unwrap().started_at, 100);
    assert_eq!(a.runs(10).unwrap(), [(second, 200), (first, 100)]);
    b.machine_ok("ssh://b2").unwrap();
    assert_eq!(a.machine("ssh://b2").unwrap(), None);
    // Nothing went to the local files.
    assert!(!homes.path().join("a.sqlite").exists());
}

#[test]
fn clients_that_start_at_once_upgrade_the_schema_once() {
    let Some(pg) = require_postgres() else { return };
    let homes = tempfile::tempdir().unwrap();
    let opened: Vec<_> = (0..12)
        .map(|i| {
            let (uri, local) = (pg.uri(), homes.path().join(format!("{i}.sqlite")));
            std::thread::spawn(move || StateDb::open_shared(&uri, &local).map(|s| s.is_shared()))
        })
        .collect();
    for client in opened {
        assert!(client.join().unwrap().expect("every client opens it"));
    }
    let versions = pg
        .psql("SELECT count(*), max(version) FROM offload_schema")
        .unwrap();
    let tables = pg
        .psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .unwrap();
    assert_eq!(versions.trim(), "1|6", "one row, every migration");
    assert_eq!(tables.trim(), "9", "eight tables and offload_schema");
}

#[test]
fn a_database_of_a_newer_offload_is_refused_with_the_fix() {
    let Some(pg) = require_postgres() else { return };
    let home = tempfile::tempdir().unwrap();
    let local = home.path().join("state.sqlite");
    drop(StateDb::open_shared(&pg.uri(), &local).unwrap());
    pg.psql("UPDATE offload_schema SET version = version + 1")
        .unwrap();
    let e = StateDb::open_shared(&pg.uri(), &local)
        .err()
        .expect("a newer schema is refused");
    let said = e.to_string();
    assert!(e.refuses(), "{said}");
    assert!(said.contains(&pg.uri()), "names the database: {said}");
    assert!(
        said.contains("newer than this offload's 6") && said.contains("upgrade offload"),
        "{said}"
    );
}

#[test]
fn a_uri_that_does_not_parse_is_named_with_the_fix() {
    let home = tempfile::tempdir().unwrap();
    let e = StateDb::open_shared(
        "postgresql://ann:pw@host:notaport/offload",
        &home.path().join("s.sqlite"),
    )
    .err()
    .expect("refused");
    let said = e.to_string();
    assert!(e.refuses(), "{said}");
    assert!(
        said.contains("postgresql://ann:***@host:notaport/offload"),
        "{said}"
    );
    assert!(
        said.contains("fix `state`") && said.contains("OFFLOAD_STATE"),
        "{said}"
    );
}

#[test]
fn a_database_that_cannot_be_reached_leaves_the_local_state() {
    let home = tempfile::tempdir().unwrap();
    let local = home.path().join("s.sqlite");
    let uri = format!(
        "postgresql:///offload?host={}&port=5439&user=offload",
        home.path().join("no-server").display()
    );
    let state = StateDb::open_shared(&uri, &local).unwrap();
    assert!(!state.is_shared());
    assert_eq!(state.place(), local.display().to_string());
    state.record("x-1", SYS, "local", 1.0, 1.0, None).unwrap();
    assert!(local.exists());
}

#[test]
fn a_lost_database_hands_over_to_the_local_state_and_loses_nothing() {
    let Some(mut pg) = require_postgres() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let local = home.path().join("s.sqlite");
    let state = StateDb::open_shared(&pg.uri(), &local).unwrap();
    state
        .record("before-1", SYS, "ssh://b1", 2.0, 1.0, None)
        .unwrap();
    pg.stop_immediate().unwrap();
    state
        .record("after-1", SYS, "ssh://b1", 3.0, 1.0, None)
        .unwrap();
    state.record_run(300, "{}").unwrap();
    assert!(!state.is_shared());
    // What came after the loss is in the local file.
    let file = StateDb::open_file(&local).unwrap();
    let k = file.knowledge(SYS).unwrap();
    assert_eq!(k.estimate("after-1"), (3.0, EstimateSource::Exact));
    assert_eq!(file.runs(5).unwrap().len(), 1);
    // And what came before stayed in the database.
    pg.start_again().unwrap();
    let again = StateDb::open_shared(&pg.uri(), &home.path().join("t.sqlite")).unwrap();
    assert!(again.is_shared());
    assert_eq!(
        again.knowledge(SYS).unwrap().estimate("before-1").1,
        EstimateSource::Exact
    );
}
