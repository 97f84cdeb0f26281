//! The serve client against real `nix-store --serve --write` processes on chroot stores:
//! every command, the failure modes a user meets, and closure copies between stores.

use std::path::Path;
use std::process::Command;

use offload_driver::{copy_closure, CopyOptions, DriverError, Endpoint, ServeConn};
use offload_nix::serve::{BasicDerivation, BuildSettings, BuildStatus, WireOutput};
use offload_test_support::{nix_command, nix_system, require_nix, run_ok};

fn nix(args: &[&str]) -> String {
    run_ok(nix_command(args[0]).args(&args[1..]))
}

/// Builds `expr` into the chroot store `store` and returns the output paths.
fn build(store: &Path, expr: &str) -> Vec<String> {
    let file = store.with_extension("nix");
    std::fs::write(&file, expr).expect("write expr");
    let store = store.to_str().expect("utf-8 path");
    nix(&[
        "nix-build",
        "--store",
        store,
        "--option",
        "extra-sandbox-paths",
        "/bin /lib /lib64 /usr",
        "--no-out-link",
        file.to_str().expect("utf-8"),
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

fn chain_expr(salt: &str, n: usize) -> String {
    format!(
        r#"let mk = name: dep: derivation {{
             inherit name dep; system = "{system}"; builder = "/bin/sh"; PATH = "/bin:/usr/bin";
             salt = "{salt}";
             args = [ "-c" "mkdir -p $out/sub; echo $dep > $out/dep; head -c 70000 /dev/zero > $out/sub/zeros; ln -s dep $out/link" ];
           }};
           go = i: if i == 0 then mk "leaf" "" else mk "node${{toString i}}" (go (i - 1));
         in go {n}"#,
        n = n - 1,
        system = nix_system(),
    )
}

fn local(dir: &Path) -> Endpoint {
    Endpoint::local(
        format!("{}", dir.display()),
        Some(dir.to_str().expect("utf-8").into()),
    )
}

#[tokio::test]
async fn queries_and_dump_match_nix() {
    if !require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("s");
    let out = build(&store, &chain_expr("queries", 3)).remove(0);
    let mut conn = ServeConn::open(&local(&store)).await.unwrap();
    assert_eq!(conn.server_version(), 0x207);

    let missing = "/nix/store/00000000000000000000000000000000-missing".to_string();
    let valid = conn
        .query_valid_paths(&[out.clone(), missing.clone()], false, false)
        .await
        .unwrap();
    assert_eq!(valid, std::slice::from_ref(&out));

    let closure = conn
        .query_closure(std::slice::from_ref(&out), false)
        .await
        .unwrap();
    assert_eq!(closure.len(), 3);
    let expected = nix(&["nix-store", "--store", store.to_str().unwrap(), "-qR", &out]);
    let mut expected: Vec<_> = expected.lines().map(str::to_string).collect();
    expected.sort();
    let mut got = closure.clone();
    got.sort();
    assert_eq!(got, expected);

    let infos = conn.query_path_infos(&closure).await.unwrap();
    assert_eq!(infos.len(), 3);
    let info = infos.iter().find(|i| i.path == out).unwrap();
    let hash = nix(&[
        "nix-store",
        "--store",
        store.to_str().unwrap(),
        "-q",
        "--hash",
        &out,
    ]);
    assert_eq!(info.nar_hash, hash.trim());
    assert!(info.deriver.as_deref().unwrap().ends_with(".drv"));
    assert_eq!(info.references.len(), 1);

    // The NAR DumpStorePath sends is the one `nix-store --dump` writes.
    let mut nar = Vec::new();
    let summary = conn.dump_store_path(&out, &mut nar).await.unwrap();
    assert_eq!(summary.size, info.nar_size);
    // `--dump` takes a file system path: the chroot store keeps it under its directory.
    let real = store.join(out.trim_start_matches('/'));
    let dumped = Command::new("nix-store")
        .arg("--dump")
        .arg(&real)
        .output()
        .unwrap();
    assert!(dumped.status.success());
    assert!(
        nar == dumped.stdout,
        "DumpStorePath and nix-store --dump differ"
    );

    // ExportPaths gives the bytes `nix-store --export` writes.
    let mut exported = Vec::new();
    let entries = conn
        .export_paths(std::slice::from_ref(&out), &mut exported)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].nar.size, info.nar_size);
    let theirs = nix_command("nix-store")
        .args(["--store", store.to_str().unwrap(), "--export", &out])
        .output()
        .unwrap();
    assert!(theirs.status.success());
    assert!(
        exported == theirs.stdout,
        "ExportPaths and nix-store --export differ"
    );

    // The session is still in step after a streamed NAR.
    assert_eq!(
        conn.query_valid_paths(std::slice::from_ref(&out), false, false)
            .await
            .unwrap(),
        std::slice::from_ref(&out)
    );
    conn.close().await.unwrap();
}

#[tokio::test]
async fn dumping_an_invalid_path_reports_nix_message() {
    if !require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut conn = ServeConn::open(&local(tmp.path())).await.unwrap();
    let err = conn
        .dump_store_path(
            "/nix/store/00000000000000000000000000000000-missing",
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("is not valid"), "{text}");
    assert!(conn.is_broken());
}

#[tokio::test]
async fn copy_closure_between_stores_verifies_clean() {
    if !require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    let out = build(&src, &chain_expr("copy", 12)).remove(0);

    let opts = CopyOptions {
        jobs: 3,
        ..Default::default()
    };
    let stats = copy_closure(
        &local(&src),
        &local(&dst),
        std::slice::from_ref(&out),
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(
        (stats.closure, stats.already_present, stats.copied),
        (12, 0, 12)
    );
    assert!(stats.bytes > 12 * 70_000);
    let verify = nix_command("nix-store")
        .args([
            "--store",
            dst.to_str().unwrap(),
            "--verify",
            "--check-contents",
        ])
        .output()
        .unwrap();
    assert!(verify.status.success());
    assert!(
        !String::from_utf8_lossy(&verify.stderr).contains("error"),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let q = nix(&["nix-store", "--store", dst.to_str().unwrap(), "-qR", &out]);
    assert_eq!(q.lines().count(), 12);

    // A second copy finds everything there.
    let again = copy_closure(&local(&src), &local(&dst), &[out], &opts)
        .await
        .unwrap();
    assert_eq!((again.already_present, again.copied), (12, 0));
}

#[tokio::test]
async fn a_chain_whose_nar_breaks_midway_keeps_what_landed_and_registers_nothing_bad() {
    if !require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    // Twelve paths, each referring to the one before: they go down one session pair.
    let out = build(&src, &chain_expr("chain-break", 12)).remove(0);
    // The source's server flips one byte past 500 kB of its output: a NAR well into
    // the chain arrives corrupted.
    let flip = tmp.path().join("flip.py");
    std::fs::write(
        &flip,
        "import sys\nseen = 0\nwhile True:\n    b = sys.stdin.buffer.read1(65536)\n    if not b:\n        break\n    if seen <= 500000 < seen + len(b):\n        i = 500000 - seen\n        b = b[:i] + bytes([b[i] ^ 0x55]) + b[i + 1:]\n    seen += len(b)\n    sys.stdout.buffer.write(b)\n    sys.stdout.buffer.flush()\n",
    )
    .unwrap();
    let program = tmp.path().join("nix-store-flip");
    offload_test_support::write_executable(
        &program,
        &format!("#!/bin/sh\nnix-store \"$@\" | python3 {}\n", flip.display()),
    );
    let mut source = local(&src);
    source.remote_program = program.display().to_string();
    let err = copy_closure(
        &source,
        &local(&dst),
        std::slice::from_ref(&out),
        &CopyOptions {
            jobs: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err.error,
            DriverError::NarMismatch { .. } | DriverError::Nar { .. }
        ),
        "{err:?}"
    );
    // What landed before the bad NAR is valid and whole; the rest is not there at all.
    let chain: Vec<String> = nix(&["nix-store", "--store", src.to_str().unwrap(), "-qR", &out])
        .lines()
        .map(str::to_string)
        .collect();
    let valid = |path: &str| {
        nix_command("nix-store")
            .args(["--store", dst.to_str().unwrap(), "--check-validity", path])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let landed = chain.iter().filter(|p| valid(p)).count();
    assert!(
        landed >= 1 && landed < chain.len(),
        "{landed} of {} landed",
        chain.len()
    );
    for path in &chain {
        let on_disk = dst.join(path.trim_start_matches('/')).exists();
        assert_eq!(
            on_disk,
            valid(path),
            "{path}: on disk but not valid, or the reverse"
        );
    }
    let verify = nix_command("nix-store")
        .args([
            "--store",
            dst.to_str().unwrap(),
            "--verify",
            "--check-contents",
        ])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[tokio::test]
async fn copy_of_a_path_the_source_lacks_fails_clearly() {
    if !require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let missing = "/nix/store/00000000000000000000000000000000-missing".to_string();
    let err = copy_closure(
        &local(&tmp.path().join("a")),
        &local(&tmp.path().join("b")),
        &[missing],
        &CopyOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err.error, DriverError::NotValid { .. }), "{err:?}");
    assert!(err.error.to_string().contains("-missing is not valid"));
}

#[tokio::test]
async fn build_derivation_builds_and_reports_failures() {
    if !require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("b");
    let mut endpoint = local(&store);
    // Chroot-store builds need the host's /bin and libraries inside the build.
    endpoint.extra_args = vec![
        "--option".into(),
        "extra-sandbox-paths".into(),
        "/bin /lib /lib64 /usr".into(),
        "--option".into(),
        "substituters".into(),
        String::new(),
    ];
    let mut conn = ServeConn::open(&endpoint).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    conn.set_log_sink(Some(tx));

    // hi.drv from Nix 2.8 (facts §4.1); its output path is what nix-instantiate prints.
    let out = "/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi";
    let drv = |args: &str| BasicDerivation {
        outputs: vec![WireOutput {
            name: "out".into(),
            path: out.into(),
            hash_algo: String::new(),
            hash: String::new(),
        }],
        input_srcs: vec![],
        platform: nix_system().into(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), args.as_bytes().to_vec()],
        env: [
            ("PATH", "/bin:/usr/bin"),
            ("builder", "/bin/sh"),
            ("name", "hi"),
            ("out", out),
            ("system", nix_system()),
        ]
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect(),
    };
    // Many lines, so that some are still in the pipe when the result arrives.
    let failing = drv(
        "i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done; echo about to fail; exit 3",
    );
    let result = conn
        .build_derivation(
            "/nix/store/8pql3j9cyj94hnchzwcidj1jj3pqhbf8-hi.drv",
            &failing,
            &BuildSettings::default(),
        )
        .await
        .unwrap();
    assert_eq!(result.status, BuildStatus::PermanentFailure);
    assert!(
        result.error_msg.contains("failed with exit code 3"),
        "{}",
        result.error_msg
    );
    // Read to the end of the log, however far the pump had got when the result came.
    conn.finish_log_sink().await;
    let mut log = Vec::new();
    while let Some(line) = rx.recv().await {
        log.push(line);
    }
    assert!(
        log.iter().any(|l| l == "line 2999"),
        "{:?}",
        &log[log.len().saturating_sub(5)..]
    );
    assert!(log.iter().any(|l| l.contains("about to fail")), "{log:?}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    conn.set_log_sink(Some(tx));

    let ok = drv("echo hello from builder; echo hi > $out");
    let result = conn
        .build_derivation(
            "/nix/store/8pql3j9cyj94hnchzwcidj1jj3pqhbf8-hi.drv",
            &ok,
            &BuildSettings::default(),
        )
        .await
        .unwrap();
    assert_eq!(result.status, BuildStatus::Built, "{}", result.error_msg);
    assert_eq!(result.built_outputs.len(), 1);
    let infos = conn.query_path_infos(&[out.to_string()]).await.unwrap();
    assert_eq!(
        infos[0].nar_hash,
        "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"
    );
    conn.finish_log_sink().await;
    let mut log = Vec::new();
    while let Some(line) = rx.recv().await {
        log.push(line);
    }
    assert!(
        log.iter().any(|l| l.contains("hello from builder")),
        "{log:?}"
    );
}

#[tokio::test]
async fn banner_before_handshake_is_named() {
    if !require_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut endpoint = local(tmp.path());
    // A login script that prints to stdout, as in the NixOS wiki's "too big" case.
    let program = tmp.path().join("nix-store-with-banner");
    offload_test_support::write_executable(
        &program,
        "#!/bin/sh\necho 'Welcome to fleet1!'\nexec nix-store \"$@\"\n",
    );
    endpoint.remote_program = program.display().to_string();
    let err = ServeConn::open(&endpoint).await.err().unwrap();
    assert!(
        matches!(err, DriverError::NotServeProtocol { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("Welcome to fleet1!"), "{err}");
    assert!(err.hint().unwrap().contains("interactive"));
}

#[tokio::test]
async fn missing_remote_program_names_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let mut endpoint = local(tmp.path());
    endpoint.remote_program = "/nonexistent/nix-store".into();
    let err = ServeConn::open(&endpoint).await.err().unwrap();
    let text = err.to_string();
    assert!(matches!(err, DriverError::Exited { .. }), "{err:?}");
    assert!(text.contains("not found"), "{text}");
    assert!(err.hint().unwrap().contains("remote-program"));
}
