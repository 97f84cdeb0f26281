//! The serve client over real OpenSSH: sshd hosts on loopback, each with its own store,
//! reached through an ssh config (as `NIX_SSHOPTS=-F …`), with real host-key checks.

use std::sync::OnceLock;

use offload_driver::{copy_closure, CopyOptions, DriverError, Endpoint, Route, ServeConn};
use offload_test_support::{nix_command, require_sshd_fleet, run_ok, SshFleet};

/// One fleet for the whole test binary: hosts take a moment to start.
fn fleet() -> Option<&'static SshFleet> {
    static FLEET: OnceLock<Option<SshFleet>> = OnceLock::new();
    FLEET
        .get_or_init(|| {
            let fleet = require_sshd_fleet(2)?;
            // The client under test finds the hosts' aliases through NIX_SSHOPTS.
            let (k, v) = fleet.ssh_opts();
            std::env::set_var(k, v);
            Some(fleet)
        })
        .as_ref()
}

fn build_locally(tag: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("e.nix");
    std::fs::write(
        &file,
        format!(
            r#"let mk = name: dep: derivation {{ inherit name dep; system = builtins.currentSystem;
                 builder = "/bin/sh"; PATH = "/bin:/usr/bin"; tag = "{tag}";
                 args = [ "-c" "mkdir $out; echo $dep > $out/dep; head -c 50000 /dev/urandom > $out/blob" ]; }};
               in mk "ssh-top" (mk "ssh-mid" (mk "ssh-leaf" ""))"#
        ),
    )
    .unwrap();
    run_ok(nix_command("nix-build").arg("--no-out-link").arg(&file))
        .trim()
        .to_string()
}

#[tokio::test]
async fn copies_over_ssh_and_machine_to_machine() {
    let Some(fleet) = fleet() else { return };
    let out = build_locally(&format!("{:?}", std::time::SystemTime::now()));
    let local = Endpoint::parse("auto").unwrap();
    let h1 = Endpoint::parse(&fleet.store_uri(0)).unwrap();
    let h2 = Endpoint::parse(&fleet.store_uri(1)).unwrap();

    let mut conn = ServeConn::open(&h1).await.unwrap();
    assert_eq!(conn.server_version(), 0x207);
    assert!(conn
        .query_valid_paths(std::slice::from_ref(&out), false, false)
        .await
        .unwrap()
        .is_empty());
    drop(conn);

    let stats = copy_closure(
        &local,
        &h1,
        std::slice::from_ref(&out),
        &CopyOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!((stats.closure, stats.copied), (3, 3));
    assert!(fleet.is_valid(0, &out));
    assert!(
        !fleet.is_valid(1, &out),
        "the hosts must have separate stores"
    );

    let stats = copy_closure(
        &h1,
        &h2,
        std::slice::from_ref(&out),
        &CopyOptions {
            jobs: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(stats.copied, 3);
    assert!(fleet.is_valid(1, &out));
    let verify = fleet
        .ssh(1, "nix-store --verify --check-contents 2>&1")
        .unwrap();
    assert!(!verify.contains("error"), "{verify}");
}

#[tokio::test]
async fn wrong_user_is_an_authentication_error() {
    let Some(fleet) = fleet() else { return };
    let e = Endpoint::parse(&format!("ssh://nobody-here@{}", fleet.alias(0))).unwrap();
    let err = ServeConn::open(&e).await.err().unwrap();
    assert!(matches!(err, DriverError::SshAuth { .. }), "{err:?}");
    assert!(err.hint().unwrap().contains("ssh-key"));
}

#[tokio::test]
async fn a_host_key_that_does_not_match_is_refused() {
    let Some(fleet) = fleet() else { return };
    // A valid key line, but not the host's: ssh must refuse, never connect.
    let other = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUhyZQo=";
    let e = Endpoint::parse(&format!(
        "{}?base64-ssh-public-host-key={other}",
        fleet.store_uri(0)
    ))
    .unwrap();
    let err = ServeConn::open(&e).await.err().unwrap();
    assert!(matches!(err, DriverError::SshHostKey { .. }), "{err:?}");
}

#[tokio::test]
async fn a_refused_connection_is_named() {
    if fleet().is_none() {
        return;
    }
    // A port nothing listens on; ssh takes `ssh://host:port` destinations itself.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut e = Endpoint::parse("ssh://unused").unwrap();
    e.route = Route::Ssh {
        host: format!("ssh://127.0.0.1:{port}"),
        ssh_key: None,
        host_public_key: None,
        compress: false,
    };
    let err = ServeConn::open(&e).await.err().unwrap();
    assert!(matches!(err, DriverError::SshUnreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("Connection refused"), "{err}");
}
