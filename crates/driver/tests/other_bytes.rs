//! One store path, other bytes in another store: a derivation that is not reproducible,
//! built by this run on one machine while another client built it into this machine's
//! store. What the run then sends from this machine's store must go under that store's
//! own info (NAR hash and size), not the one the run learned from its builder, or the
//! receiving Nix refuses it ("hash mismatch importing path"). Real chroot stores, the
//! transfer engine as a run uses it.

use std::path::Path;
use std::sync::Arc;

use offload_driver::transfer::TransferEngine;
use offload_driver::{Endpoint, Pool, ServeConn};
use offload_sched::MachineSpec;
use offload_test_support::{nix_command, nix_system, require_nix, run_ok, salt};

/// Builds the derivation of `file` into the chroot store `store`; its output path.
fn build(store: &Path, file: &Path) -> String {
    run_ok(
        nix_command("nix-build")
            .arg("--store")
            .arg(store)
            .args(["--option", "extra-sandbox-paths", "/bin /lib /lib64 /usr"])
            .arg("--no-out-link")
            .arg(file),
    )
    .trim()
    .to_string()
}

fn store(dir: &Path) -> Endpoint {
    Endpoint::local(dir.display().to_string(), Some(dir.display().to_string()))
}

async fn nar_hash(dir: &Path, path: &str) -> String {
    let mut conn = ServeConn::open(&store(dir)).await.unwrap();
    let infos = conn.query_path_infos(&[path.to_string()]).await.unwrap();
    infos[0].nar_hash.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_this_machine_holds_with_other_bytes_is_sent_as_it_holds_it() {
    if !require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (here, builder, next) = (
        tmp.path().join("here"),
        tmp.path().join("builder"),
        tmp.path().join("next"),
    );
    // Not reproducible: each build writes its own nanoseconds.
    let file = tmp.path().join("n.nix");
    std::fs::write(
        &file,
        format!(
            r#"derivation {{
                 name = "not-reproducible"; system = "{}"; builder = "/bin/sh";
                 PATH = "/bin:/usr/bin"; salt = "{}";
                 args = [ "-c" "date +%s%N > $out" ];
               }}"#,
            nix_system(),
            salt("other-bytes")
        ),
    )
    .unwrap();
    let path = build(&builder, &file);
    assert_eq!(build(&here, &file), path);
    let (held_here, built) = (
        nar_hash(&here, &path).await,
        nar_hash(&builder, &path).await,
    );
    assert_ne!(held_here, built, "the two builds wrote the same bytes");

    // This machine (0), the builder that built it for this run (1), a next builder (2).
    // The builder's link is slow, so the path goes to the next builder from here.
    let mut specs = vec![
        MachineSpec::local(nix_system(), 1),
        MachineSpec::new("builder", nix_system(), 1, 1.0),
        MachineSpec::new("next", nix_system(), 1, 1.0),
    ];
    specs[1].bandwidth = 1e5;
    let pools = [&here, &builder, &next]
        .iter()
        .map(|d| Pool::new(store(d)))
        .collect();
    let engine = Arc::new(TransferEngine::new(pools, specs, 1));
    // The run learns the path from its builder; then finds it already valid here (the
    // other client's copy), as it does when it brings an output home.
    engine
        .learn_closure(1, std::slice::from_ref(&path))
        .await
        .unwrap();
    engine
        .ensure_on(0, std::slice::from_ref(&path), None, false)
        .await
        .unwrap();
    assert!(engine.registry().unverified_on(&path, 0));
    // The next builder gets it, from here: under this store's own hash.
    engine
        .ensure_on(2, std::slice::from_ref(&path), None, false)
        .await
        .unwrap_or_else(|e| panic!("sending {path} on: {e}"));
    assert_eq!(nar_hash(&next, &path).await, held_here);
    run_ok(
        nix_command("nix-store")
            .arg("--store")
            .arg(&next)
            .args(["--verify-path", &path]),
    );
    engine.close().await;
}
