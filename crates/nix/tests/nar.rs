//! NAR and export formats against golden bytes from Nix 2.8 and against the real
//! `nix-store --dump` / `--restore` / `--export`.

use std::fs;
use std::io::{BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use offload_nix::export::{put_trailer, read_export, EXPORT_MAGIC};
use offload_nix::nar::{copy_nar, dump_path, restore, NarDecoder, NarError, NarEvent};
use offload_nix::nixbase32;
use offload_test_support::require_nix;
use proptest::prelude::*;

/// `nix-store --dump` of a file containing "hi\n" (120 bytes), from Nix 2.8.
const HI_NAR: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/nar/hi.nar"
));

/// The bytes of `fixtures/<name>`, captured from Nix 2.8 (see fixtures/README.md).
fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn nix_dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("nix-store");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A tree with every kind of node: executable, symlink, empty file, empty directory,
/// nested directories, a unicode name, and a large file.
fn rich_tree(root: &Path, large: usize) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("share/empty")).unwrap();
    fs::create_dir_all(root.join("share/doc/ünïcødé")).unwrap();
    fs::write(root.join("bin/run"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("empty"), "").unwrap();
    fs::write(root.join("share/doc/ünïcødé/README"), "read me\n").unwrap();
    std::os::unix::fs::symlink("bin/run", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    let mut data = Vec::with_capacity(large);
    let mut x: u32 = 12345;
    while data.len() < large {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(large);
    fs::write(root.join("large.bin"), &data).unwrap();
    fs::write(root.join("Zcase"), "upper case sorts before lower case\n").unwrap();
}

#[test]
fn hi_nar_matches_golden_bytes() {
    let golden = HI_NAR.to_vec();
    assert_eq!(golden.len(), 120);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hi");
    fs::write(&file, "hi\n").unwrap();
    let mut nar = Vec::new();
    assert_eq!(dump_path(&file, &mut nar).unwrap(), 120);
    assert_eq!(nar, golden);
    // The same file built in memory.
    assert_eq!(offload_nix::nar::regular_file_nar(b"hi\n", false), golden);
    let summary = copy_nar(&mut &golden[..], &mut Vec::new()).unwrap();
    assert_eq!(
        nixbase32::encode(&summary.sha256),
        "1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"
    );
}

#[test]
fn export_of_one_path_matches_nix() {
    // ExportPaths of `hi` over the serve protocol: the same bytes as `nix-store --export`.
    let stream = &fixture("serve/10-export-paths.server.bin")[..];
    let mut ours = 1u64.to_le_bytes().to_vec();
    ours.extend(HI_NAR);
    put_trailer(
        &mut ours,
        "/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi",
        &[],
        Some("/nix/store/8pql3j9cyj94hnchzwcidj1jj3pqhbf8-hi.drv"),
    );
    ours.extend(0u64.to_le_bytes());
    assert_eq!(ours, stream);
    assert_eq!(&stream[0x80..0x88], &EXPORT_MAGIC.to_le_bytes());
    let mut nars = Vec::new();
    let paths = read_export(&mut &stream[..], &mut nars).unwrap();
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0].nar.size, 120);
    assert_eq!(nars, HI_NAR);
}

#[test]
fn export_of_a_closure_matches_nix() {
    let stream = &fixture("export/top-closure.export")[..];
    let listed = fixture("export/top-closure.paths");
    let listed = std::str::from_utf8(&listed).unwrap();
    let mut nars = Vec::new();
    let paths = read_export(&mut &stream[..], &mut nars).unwrap();
    // Dependencies come first, as `nix-store -qR` lists them.
    let names: Vec<&str> = paths.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(names, listed.lines().collect::<Vec<_>>());
    let top = &paths[2];
    assert_eq!(top.references, names[..2]);
    assert!(top.deriver.as_deref().unwrap().ends_with("-top.drv"));
    // Writing it back with our trailer gives Nix's bytes.
    let mut ours = Vec::new();
    let mut nar_bytes = &nars[..];
    for p in &paths {
        ours.extend(1u64.to_le_bytes());
        let (nar, rest) = nar_bytes.split_at(p.nar.size as usize);
        ours.extend(nar);
        nar_bytes = rest;
        put_trailer(&mut ours, &p.path, &p.references, p.deriver.as_deref());
    }
    ours.extend(0u64.to_le_bytes());
    assert_eq!(ours, stream);
}

#[test]
fn tree_nar_matches_nix() {
    // The tree scripts/capture-fixtures.sh dumps: a file, an executable, a symlink and
    // an empty directory.
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::create_dir_all(tree.join("share/empty")).unwrap();
    fs::write(tree.join("a.txt"), "hello\n").unwrap();
    fs::write(tree.join("bin/run"), "#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(tree.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a.txt", tree.join("link")).unwrap();
    let golden = &fixture("nar/tree.nar")[..];
    let mut nar = Vec::new();
    dump_path(&tree, &mut nar).unwrap();
    assert_eq!(nar, golden);
    let mut out = Vec::new();
    let mut r = golden;
    let summary = copy_nar(&mut r, &mut out).unwrap();
    assert_eq!(
        (summary.size as usize, out.as_slice()),
        (golden.len(), golden)
    );
}

#[cfg(feature = "async")]
#[tokio::test]
async fn async_copy_and_trailer_read_match_sync() {
    let stream = &fixture("export/top-closure.export")[..];
    let (mut sync_nars, mut async_nars) = (Vec::new(), Vec::new());
    let paths = read_export(&mut &stream[..], &mut sync_nars).unwrap();
    let mut r = stream;
    for p in &paths {
        assert_eq!(
            offload_nix::wire::tokio_io::read_u64(&mut r, "marker")
                .await
                .unwrap(),
            1
        );
        let nar = offload_nix::nar::tokio_io::copy_nar(&mut r, &mut async_nars)
            .await
            .unwrap();
        assert_eq!(nar, p.nar);
        let trailer = offload_nix::export::tokio_io::read_trailer(&mut r)
            .await
            .unwrap();
        assert_eq!(
            (&trailer.path, &trailer.references, &trailer.deriver),
            (&p.path, &p.references, &p.deriver)
        );
    }
    assert_eq!(r, 0u64.to_le_bytes());
    assert_eq!(async_nars, sync_nars);
}

#[test]
fn trailer_with_wrong_magic_is_refused() {
    let mut stream = fixture("serve/10-export-paths.server.bin");
    stream[0x80] ^= 1;
    let err = read_export(&mut &stream[..], &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("export magic"), "{err}");
}

#[test]
fn dump_matches_nix_store_dump_and_restores() {
    if !require_nix() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    rich_tree(&tree, 3 << 20);
    let ours = {
        let mut v = Vec::new();
        dump_path(&tree, &mut v).unwrap();
        v
    };
    let theirs = nix_dump(&tree);
    assert_eq!(ours.len(), theirs.len());
    assert!(ours == theirs, "NAR differs from nix-store --dump");

    // Our restore of Nix's NAR dumps back to the same bytes.
    let back = dir.path().join("back");
    assert_eq!(
        restore(&mut &theirs[..], &back).unwrap(),
        theirs.len() as u64
    );
    assert!(nix_dump(&back) == theirs);
    assert!(
        fs::metadata(back.join("bin/run"))
            .unwrap()
            .permissions()
            .mode()
            & 0o111
            != 0
    );

    // Nix restores our NAR.
    let nix_back = dir.path().join("nix-back");
    let mut child = Command::new("nix-store")
        .arg("--restore")
        .arg(&nix_back)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&ours).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(nix_dump(&nix_back) == theirs);
}

#[test]
fn export_reads_nix_store_export() {
    if !require_nix() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let tree = dir.path().join("payload");
    rich_tree(&tree, 100_000);
    let add = Command::new("nix-store")
        .env("NIX_CONFIG", "substituters =")
        .args(["--store", store.to_str().unwrap(), "--add"])
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let path = String::from_utf8(add.stdout).unwrap().trim().to_string();
    let export = Command::new("nix-store")
        .env("NIX_CONFIG", "substituters =")
        .args(["--store", store.to_str().unwrap(), "--export", &path])
        .output()
        .unwrap();
    assert!(export.status.success());
    let mut nar = Vec::new();
    let paths = read_export(&mut BufReader::new(&export.stdout[..]), &mut nar).unwrap();
    assert_eq!(paths[0].path, path);
    assert_eq!(paths[0].deriver, None);
    assert!(nar == nix_dump(&tree));
}

#[test]
fn decoder_stops_at_the_end_and_reports_errors() {
    let mut stream = HI_NAR.to_vec();
    stream.extend_from_slice(b"TRAILING");
    let mut r = &stream[..];
    let mut out = Vec::new();
    copy_nar(&mut r, &mut out).unwrap();
    assert_eq!(r, b"TRAILING");
    assert_eq!(out.len(), 120);

    // Truncated.
    let golden = HI_NAR.to_vec();
    let err = copy_nar(&mut &golden[..100], &mut Vec::new()).unwrap_err();
    assert!(err.is_eof(), "{err}");
    // A length prefix of 2^60 is refused, not allocated.
    let mut huge = golden[..16].to_vec();
    huge.splice(0..8, (1u64 << 60).to_le_bytes());
    assert!(matches!(
        copy_nar(&mut &huge[..], &mut Vec::new()),
        Err(NarError::TooLong { .. })
    ));
    // Non-zero padding.
    let mut bad = golden.clone();
    bad[0x63] = 1;
    assert!(matches!(
        copy_nar(&mut &bad[..], &mut Vec::new()),
        Err(NarError::BadPadding { .. })
    ));
}

#[test]
fn unsorted_or_duplicate_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("t");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("a"), "1").unwrap();
    fs::write(tree.join("b"), "2").unwrap();
    let mut nar = Vec::new();
    dump_path(&tree, &mut nar).unwrap();
    // Swap the names "a" and "b" (same lengths, so the framing stays valid).
    let a = nar
        .windows(9)
        .position(|w| w == b"\x01\0\0\0\0\0\0\0a")
        .unwrap();
    let b = nar
        .windows(9)
        .position(|w| w == b"\x01\0\0\0\0\0\0\0b")
        .unwrap();
    nar[a + 8] = b'b';
    nar[b + 8] = b'a';
    let err = copy_nar(&mut &nar[..], &mut Vec::new()).unwrap_err();
    assert!(matches!(err, NarError::Unsorted { .. }), "{err}");
    nar[b + 8] = b'b';
    assert!(matches!(
        copy_nar(&mut &nar[..], &mut Vec::new()),
        Err(NarError::Unsorted { .. })
    ));
}

fn events(nar: &[u8], step: usize) -> Vec<String> {
    let mut d = NarDecoder::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut contents = Vec::new();
    while !d.is_done() {
        let end = (pos + step).min(nar.len());
        let (n, ev) = d.feed(&nar[pos..end]).unwrap();
        pos += n;
        match ev {
            Some(NarEvent::Contents(c)) => contents.extend_from_slice(c),
            Some(other) => {
                if !contents.is_empty() {
                    out.push(format!("{:?}", String::from_utf8_lossy(&contents)));
                    contents.clear();
                }
                out.push(format!("{other:?}"));
            }
            None => assert!(n > 0 || d.is_done()),
        }
    }
    assert_eq!(pos, nar.len());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_trees_roundtrip(files in proptest::collection::btree_map("[a-zA-Z0-9._-]{1,12}", (proptest::collection::vec(any::<u8>(), 0..300), any::<bool>(), 0u8..4), 0..12)) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        fs::create_dir(&root).unwrap();
        for (name, (data, exec, kind)) in &files {
            if name == "." || name == ".." { continue; }
            let p = root.join(name);
            match kind {
                0 => { fs::create_dir(&p).unwrap(); fs::write(p.join("inner"), data).unwrap(); }
                1 => std::os::unix::fs::symlink(String::from_utf8_lossy(data).replace(['\0', '/'], "_") + "x", &p).unwrap(),
                _ => {
                    fs::write(&p, data).unwrap();
                    if *exec { fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap(); }
                }
            }
        }
        let mut nar = Vec::new();
        dump_path(&root, &mut nar).unwrap();
        // Fed in one piece or byte by byte, the decoder sees the same events.
        prop_assert_eq!(events(&nar, nar.len()), events(&nar, 1));
        let back = dir.path().join("back");
        restore(&mut &nar[..], &back).unwrap();
        let mut again = Vec::new();
        dump_path(&back, &mut again).unwrap();
        prop_assert!(again == nar);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400), cut in 0usize..200) {
        let _ = copy_nar(&mut &data[..], &mut Vec::new());
        // A valid prefix followed by garbage.
        let mut nar = HI_NAR.to_vec();
        let cut = cut.min(nar.len());
        nar.truncate(cut);
        nar.extend_from_slice(&data);
        let _ = copy_nar(&mut &nar[..], &mut Vec::new());
    }
}
