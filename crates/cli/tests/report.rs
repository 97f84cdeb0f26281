//! `offload build --report`: the HTML report rendered by a real browser (headless
//! Chromium), and the chart checked in the screenshot's pixels.

use std::process::Command;

use offload_test_support::{nix_command, require_nix, run_ok, salt, text};

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

/// Builds `expr` in `dir` with `args`, writing the report; its HTML and the output path.
fn build_with_report(dir: &std::path::Path, expr: &str, args: &[&str]) -> (String, String) {
    std::fs::write(dir.join("graph.nix"), expr).unwrap();
    let page = dir.join("report.html");
    let out = common::offload(dir)
        .args(["build", "graph.nix", "--no-out-link"])
        .args(args)
        .arg("--report")
        .arg(&page)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    (html, text(&out.stdout).trim().to_string())
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
    let (html, _) = build_with_report(dir, &graph(&salt("report")), &["--local-only", "-j2"]);
    let page = dir.join("report.html");
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

#[test]
fn every_run_is_recorded_and_offload_report_renders_it_again() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::write(dir.join("graph.nix"), graph(&salt("recorded"))).unwrap();
    let out = common::offload(dir)
        .args(["build", "graph.nix", "--local-only", "-j2", "--no-out-link"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let list = common::offload(dir)
        .args(["report", "--list"])
        .output()
        .unwrap();
    let listed = text(&list.stdout);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let id = listed.split_whitespace().next().unwrap().to_string();

    let summary = common::offload(dir).arg("report").output().unwrap();
    let shown = text(&summary.stdout);
    assert!(shown.starts_with(&format!("run {id} at ")), "{shown}");
    assert!(shown.contains("4 builds in"), "{shown}");
    assert!(shown.contains("builds per machine: local 4"), "{shown}");

    let out = common::offload(dir)
        .args([
            "report",
            &id,
            "--html",
            "again.html",
            "--trace",
            "again.json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(dir.join("again.html")).unwrap();
    assert!(html.contains("Critical path (2 builds, in red)"), "{html}");
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("again.json")).unwrap()).unwrap();
    let builds = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X")
        .count();
    assert_eq!(builds, 4);

    let missing = common::offload(dir)
        .args(["report", "999"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).contains("no run 999"),
        "{}",
        text(&missing.stderr)
    );
}

#[test]
fn the_report_shows_what_each_link_carried() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let program = offload_test_support::loopback_serve_program(dir);
    let builder = offload_test_support::loopback_machine(dir, "m1", &program, 4, 1);
    // Everything builds on m1; only the top's output, 200 KiB and a little, comes home.
    let expr = format!(
        r#"let mk = name: deps: script: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{}"; args = [ "-c" script ];
           }};
           leaves = builtins.genList (i: mk "leaf${{toString i}}" [] "mkdir $out") 3;
         in mk "top" leaves "mkdir $out; head -c 204800 /dev/zero > $out/blob""#,
        salt("links")
    );
    let (html, top) = build_with_report(dir, &expr, &["-j0", "--builders", &builder]);
    let nar_size: u64 = run_ok(nix_command("nix-store").args(["-q", "--size", &top]))
        .trim()
        .parse()
        .unwrap();
    assert!((204_800..1 << 20).contains(&nar_size), "{nar_size}");
    let carried = format!("{:.1} KiB", nar_size as f64 / 1024.0);
    let machine = format!("localhost:{}/m1", dir.display());
    // Its lane in the chart, the transfer drawn on it with its route and size…
    assert!(html.contains(&format!("{machine} link</text>")), "{html}");
    assert!(
        html.contains(&format!("<title>{machine} → local: {carried} in ")),
        "{html}"
    );
    // …and its row in the table: one transfer, the output's NAR size.
    let table = &html[html.find("Bytes moved per link").unwrap()..];
    assert!(
        table.contains(&format!(
            "<tr><td>{machine}</td><td>1</td><td>{carried}</td></tr>"
        )),
        "{table}"
    );
}
