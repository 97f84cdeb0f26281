//! Hedged stragglers on real sshd builders: one builder turns many times slower after
//! the history was recorded. Its builds overrun their plan, get a duplicate on the
//! other builder (a `build_hedged` event), the duplicate wins, the loser's build process
//! is gone from the slow builder at once, nothing of it comes home, and the outputs
//! verify. Derivations marked `offloadNoHedge` are never duplicated, however late.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use offload_test_support::{
    nix_command, require_sshd_fleet_with, run_ok, salt, text, write_executable, HostOptions,
    SshFleet,
};
use serde_json::Value;

/// Builds of the graph: six of 2 s each at speed 1.
const BUILDS: usize = 6;
/// How many times slower the slow builder turns.
const SLOW: u32 = 10;

/// A scratch directory outside `/tmp` (the hosts have their own `/tmp`), where the slow
/// builder's `remote-program` and speed file live.
struct Work {
    dir: tempfile::TempDir,
    file: PathBuf,
    speed: PathBuf,
    program: PathBuf,
    /// Unique text in each build's shell command line: its marker process.
    tag: String,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        let tag = salt("hedge").replace(|c: char| !c.is_ascii_alphanumeric(), "");
        // Each build sleeps 2 s times the number in /speed (the slow builder's sandbox
        // has one), and writes that number into its output: which copy came home shows.
        let expr = format!(
            r#"{{ salt }}:
               let mk = prefix: i: derivation ({{
                     name = "${{prefix}}-${{toString i}}"; system = builtins.currentSystem;
                     builder = "/bin/sh"; PATH = "/bin:/usr/bin"; inherit salt;
                     args = [ "-c" ": marker-{tag}-${{prefix}}-${{toString i}}; f=1; if [ -r /speed ]; then read f < /speed; fi; n=$((f * 4)); while [ $n -gt 0 ]; do sleep 0.5; n=$((n - 1)); done; mkdir $out; echo $f > $out/speed" ];
                   }} // (if prefix == "marked" then {{ offloadNoHedge = true; }} else {{}}));
               in {{
                 hedged = builtins.genList (mk "hedged") {BUILDS};
                 marked = builtins.genList (mk "marked") {BUILDS};
               }}"#
        );
        let file = dir.path().join("default.nix");
        std::fs::write(&file, expr).unwrap();
        let speed = dir.path().join("speed");
        std::fs::write(&speed, "1\n").unwrap();
        let program = dir.path().join("nix-store-speed");
        write_executable(
            &program,
            &format!(
                "#!/bin/sh\nexec nix-store --option extra-sandbox-paths /speed={} \"$@\"\n",
                speed.display()
            ),
        );
        Work {
            dir,
            file,
            speed,
            program,
            tag,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Builder 0 with four slots, builder 1 (the one that turns slow) with two.
    fn builders(&self, fleet: &SshFleet) -> String {
        format!(
            "ssh://{} - - 4 1; ssh://{}?remote-program={} - - 2 1",
            fleet.alias(0),
            fleet.alias(1),
            self.program.display()
        )
    }

    /// `offload build -A attr --json` on the builders alone, with the history `history`
    /// and a fresh salt: its events, each also given to `seen` as it comes.
    fn build(
        &self,
        fleet: &SshFleet,
        attr: &str,
        history: &str,
        mut seen: impl FnMut(&Value),
    ) -> Vec<Value> {
        let (name, opts) = fleet.ssh_opts();
        let mut child = common::offload(self.path())
            .env(name, opts)
            .arg("build")
            .arg(&self.file)
            .args(["-A", attr, "-j0", "--json", "--no-out-link"])
            .args(["--argstr", "salt", &salt("hedge-run")])
            .args(["--builders", &self.builders(fleet)])
            .arg("--history")
            .arg(self.path().join(history))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut events = Vec::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
            seen(&event);
            events.push(event);
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "offload build failed: {}",
            text(&out.stderr)
        );
        events
    }

    /// Whether a process whose command line holds the marker of `drv`'s build runs on
    /// this machine (the hosts' processes are this machine's, in other mount
    /// namespaces).
    fn marker_runs(&self, drv: &str) -> bool {
        // `/nix/store/HASH-hedged-3.drv` → `hedged-3`.
        let name = drv
            .rsplit('/')
            .next()
            .and_then(|f| f.split_once('-'))
            .map(|(_, n)| n.trim_end_matches(".drv"))
            .unwrap();
        let marker = format!("marker-{}-{name};", self.tag);
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| String::from_utf8_lossy(&c).contains(&marker))
    }
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

fn field<'a>(e: &'a Value, key: &str) -> &'a str {
    e[key].as_str().unwrap_or_default()
}

fn fleet() -> Option<SshFleet> {
    require_sshd_fleet_with(&[HostOptions::default(), HostOptions::default()])
}

#[test]
fn a_builder_turned_slow_loses_its_builds_to_duplicates() {
    let Some(fleet) = fleet() else { return };
    let work = Work::new();
    // The history: both builders at their usual speed.
    let first = work.build(&fleet, "hedged", "history.sqlite", |_| {});
    assert!(of_type(&first, "build_hedged").is_empty(), "{first:?}");
    std::fs::write(&work.speed, format!("{SLOW}\n")).unwrap();
    let slow = fleet.alias(1).to_string();
    let started = Instant::now();
    // Each duplicate started (drv → its machine), and the losers seen stopped while the
    // run went on.
    let mut duplicates: Vec<(String, String)> = Vec::new();
    let mut stopped = 0;
    let events = work.build(&fleet, "hedged", "history.sqlite", |e| {
        if e["type"] == "build_hedged" {
            duplicates.push((field(e, "drv").into(), field(e, "machine").into()));
        }
        let won = duplicates
            .iter()
            .any(|(d, m)| e["type"] == "build_finished" && e["drv"] == **d && e["machine"] == **m);
        if won {
            // The loser would sleep on for many seconds on the slow builder: its build
            // process is gone within moments, while the run goes on.
            let drv = field(e, "drv");
            let deadline = Instant::now() + Duration::from_secs(3);
            while work.marker_runs(drv) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                !work.marker_runs(drv),
                "the cancelled build of {drv} still runs on the slow builder"
            );
            stopped += 1;
        }
    });
    let wall = started.elapsed();
    let hedged = of_type(&events, "build_hedged");
    assert!(!hedged.is_empty(), "no duplicate started: {events:?}");
    let finished = of_type(&events, "build_finished");
    assert_eq!(finished.len(), BUILDS, "one end per derivation: {events:?}");
    let mut won = 0;
    for h in &hedged {
        assert!(field(h, "from").starts_with(&slow), "{h}");
        assert!(!field(h, "machine").starts_with(&slow), "{h}");
        // Not a second start.
        let starts = of_type(&events, "build_started");
        assert_eq!(
            starts.iter().filter(|s| s["drv"] == h["drv"]).count(),
            1,
            "{events:?}"
        );
        let end = finished.iter().find(|f| f["drv"] == h["drv"]).unwrap();
        if end["machine"] == h["machine"] {
            won += 1;
        }
    }
    assert_eq!(stopped, won);
    assert!(won > 0, "no duplicate finished first: {events:?}");
    // Every output came from a builder at speed 1: nothing of a slow copy came home.
    let summary = of_type(&events, "summary")[0];
    let outputs: Vec<&str> = summary["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(outputs.len(), BUILDS, "{summary}");
    for out in outputs {
        let speed = std::fs::read_to_string(Path::new(out).join("speed")).unwrap();
        let builds_on_slow = finished
            .iter()
            .any(|f| field(f, "machine").starts_with(&slow) && summary_holds(f, out));
        if !builds_on_slow {
            assert_eq!(speed.trim(), "1", "{out} came from the slow builder");
        }
        run_ok(nix_command("nix-store").args(["--verify-path", out]));
    }
    assert!(
        summary["hedges"]["duplicates"].as_u64() >= Some(1),
        "{summary}"
    );
    assert_eq!(summary["hedges"]["wins"].as_u64(), Some(won), "{summary}");
    // `offload report` counts them too.
    let report = common::offload(work.path())
        .arg("report")
        .arg("--history")
        .arg(work.path().join("history.sqlite"))
        .output()
        .unwrap();
    let said = text(&report.stdout);
    let line = format!(
        "duplicates of builds that overran their plan: {} started, {won} finished first",
        hedged.len()
    );
    assert!(said.contains(&line), "{said}{}", text(&report.stderr));
    // Without duplicates, the slow builder's two builds alone take 20 s.
    assert!(
        wall < Duration::from_secs(u64::from(SLOW) * 2),
        "the run took {wall:?}"
    );
}

/// Whether the build ended by `end` made output `out`: their store names share the
/// derivation's name.
fn summary_holds(end: &Value, out: &str) -> bool {
    let drv = field(end, "drv");
    let name = |p: &str| {
        p.rsplit('/')
            .next()
            .and_then(|f| f.split_once('-'))
            .map(|(_, n)| n.trim_end_matches(".drv").to_string())
    };
    name(drv) == name(out)
}

#[test]
fn marked_derivations_are_never_duplicated() {
    let Some(fleet) = fleet() else { return };
    let work = Work::new();
    work.build(&fleet, "marked", "history.sqlite", |_| {});
    std::fs::write(&work.speed, format!("{SLOW}\n")).unwrap();
    let events = work.build(&fleet, "marked", "history.sqlite", |_| {});
    assert!(of_type(&events, "build_hedged").is_empty(), "{events:?}");
    // Not for want of a straggler: a build on the slow builder overran its plan by far.
    let slow = fleet.alias(1);
    let overran = of_type(&events, "build_finished")
        .iter()
        .any(|f| field(f, "machine").starts_with(slow) && f["seconds"].as_f64() > Some(10.0));
    assert!(overran, "nothing ran long on the slow builder: {events:?}");
    let summary = of_type(&events, "summary")[0];
    assert_eq!(
        summary["hedges"]["duplicates"].as_u64(),
        Some(0),
        "{summary}"
    );
}
