//! `offload build --report`: the HTML report rendered by a real browser (headless
//! Chromium), and the chart checked in the screenshot's pixels.

use std::process::Command;

use offload_test_support::{require_nix, salt, text};

mod common;

/// Three leaves of 1 s and a top over them.
fn graph(salt: &str) -> String {
    format!(
        r#"let mk = name: deps: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}"; args = [ "-c" "sleep 1; mkdir $out" ];
           }};
           leaves = builtins.genList (i: mk "leaf${{toString i}}" []) 3;
         in mk "top" leaves"#
    )
}

/// Pixels of the screenshot within a small distance of `rgb`.
fn count_colour(png: &[u8], rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = info.color_type.samples();
    buf[..info.buffer_size()]
        .chunks(step)
        .filter(|p| p.iter().zip(rgb).all(|(&a, b)| a.abs_diff(b) <= 8))
        .count()
}

#[test]
fn the_report_draws_the_builds_and_the_critical_path() {
    if !require_nix() {
        return;
    }
    let chromium = Command::new("chromium").arg("--version").output();
    assert!(
        chromium.is_ok_and(|o| o.status.success()),
        "chromium is not installed (scripts/setup.sh installs it)"
    );
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::write(dir.join("graph.nix"), graph(&salt("report"))).unwrap();
    let page = dir.join("report.html");
    let out = common::offload(dir)
        .args([
            "build",
            "graph.nix",
            "--local-only",
            "-j2",
            "--no-out-link",
            "--report",
        ])
        .arg(&page)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(!html.contains("http://") || html.contains("http://www.w3.org/2000/svg"));
    assert!(html.contains("Critical path (2 builds, in red)"), "{html}");
    let shot = dir.join("report.png");
    let browser = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1000,600",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(shot.exists(), "no screenshot: {}", text(&browser.stderr));
    let png = std::fs::read(&shot).unwrap();
    // The local machine's colour and the critical path's red are drawn as bars.
    let machine = count_colour(&png, [0x4e, 0x79, 0xa7]);
    let critical = count_colour(&png, [0xe1, 0x57, 0x59]);
    assert!(machine > 2000, "machine bars: {machine} pixels");
    assert!(critical > 2000, "critical path: {critical} pixels");
}
