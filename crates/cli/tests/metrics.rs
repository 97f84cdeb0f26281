//! Prometheus metrics (`--metrics ADDR`, `metrics` in offload's config): the agent behind
//! `nix-build`'s hook and a running `offload build` on loopback builders, scraped over
//! real HTTP with curl, the numbers held to what ran where; an address that cannot be
//! bound stops the command at once.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use offload_test_support::start_hook_agent;
use offload_test_support::{
    loopback_machine, loopback_serve_program, nix_command, nix_system, require_nix, require_root,
    require_sshd_fleet_with_peers, run_ok, salt, text, write_executable, HostOptions, LinkShape,
    Peers,
};

mod common;

/// One sample of a scrape: its name, labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Scrapes `http://addr/metrics` with curl; the samples, after checking the status and
/// the text format's Content-Type.
fn scrape(addr: &str) -> Vec<Sample> {
    try_scrape(addr).unwrap_or_else(|| panic!("nothing answers at {addr}"))
}

/// [`scrape`], or None when nothing answers (the run ended).
fn try_scrape(addr: &str) -> Option<Vec<Sample>> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-"])
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let out = text(&out.stdout);
    let (head, body) = out.split_once("\r\n\r\n").expect("headers and a body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| parse_sample(l).unwrap_or_else(|| panic!("not a sample: {l:?}\n{body}")))
        .collect();
    Some(samples)
}

/// `name{k="v",…} value` (label values here hold no quotes or backslashes).
fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut map = BTreeMap::new();
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let (value, after) = after.split_once('"')?;
        map.insert(key.to_string(), value.to_string());
        rest = after.strip_prefix(',').unwrap_or(after);
    }
    Some(Sample {
        name: name.to_string(),
        labels: map,
        value: value.parse().ok()?,
    })
}

/// The value of `name` with these labels (among possibly more), 0 when absent.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Leaves that sleep (so that they spread over the slots) under one top that sleeps
/// `top_sleep` seconds after saying it started.
fn graph(salt: &str, leaves: u32, top_sleep: u32) -> String {
    format!(
        r#"let mk = name: deps: script: derivation {{
             inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/bin:/usr/bin"; salt = "{salt}";
             args = [ "-c" "echo $name started; ${{script}}; mkdir $out; echo $name > $out/name" ];
           }};
           leaves = builtins.genList (i: mk "leaf${{toString i}}" [] "sleep 1") {leaves};
         in {{ top = mk "top" leaves "sleep {top_sleep}"; }}"#
    )
}

#[test]
fn the_agent_serves_what_its_builds_did_per_machine() {
    if !require_nix() || !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let program = loopback_serve_program(d);
    let uris: Vec<String> = (1..=2)
        .map(|i| {
            let line = loopback_machine(d, &format!("m{i}"), &program, 2, 4);
            line.split(' ').next().unwrap().to_string()
        })
        .collect();
    let builders = uris
        .iter()
        .map(|u| format!("{u} {} - 2 4", nix_system()))
        .collect::<Vec<_>>()
        .join(";");
    // The hook runs in nix-build's environment: the script points it at this setup.
    write_executable(
        &d.join("hook"),
        &format!(
            "#!/bin/sh\nexport OFFLOAD_HISTORY={d}/history.sqlite OFFLOAD_SLOTS_DIR={d}/slots \
             OFFLOAD_AGENT_SOCKET={d}/agent.sock\nexec {} hook \"$@\"\n",
            env!("CARGO_BIN_EXE_offload"),
            d = d.display()
        ),
    );
    // The address from offload's config, not a flag; port 0: any free one.
    let config = d.join("config.toml");
    std::fs::write(&config, "metrics = \"127.0.0.1:0\"\n").unwrap();
    let offload = Path::new(env!("CARGO_BIN_EXE_offload"));
    let config_env = config.display().to_string();
    let (mut agent, log) = start_hook_agent(offload, d, &[("OFFLOAD_CONFIG", &config_env)]);
    let said = std::fs::read_to_string(&log).unwrap();
    let addr = said
        .lines()
        .find_map(|l| l.strip_prefix("offload agent: metrics at http://"))
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address said: {said}"))
        .to_string();
    // Before any build: nothing running, nothing counted.
    let before = scrape(&addr);
    assert_eq!(value(&before, "offload_builds_finished_total", &[]), 0.0);

    let file = d.join("graph.nix");
    std::fs::write(&file, graph(&salt("metrics-agent"), 4, 0)).unwrap();
    let out = nix_command("nix-build")
        .arg(&file)
        .args([
            "-A",
            "top",
            "--no-out-link",
            "-j",
            "0",
            "--builders",
            &builders,
        ])
        .arg("--option")
        .arg("build-hook")
        .arg(d.join("hook"))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Where Nix says each derivation was built.
    let built_on = |uri: &str| -> Vec<&str> {
        stderr
            .lines()
            .filter(|l| l.starts_with("building '") && l.ends_with(&format!(" on '{uri}'...")))
            .collect()
    };
    let after = scrape(&addr);
    let mut total = 0.0;
    for uri in &uris {
        let here = [("machine", uri.as_str())];
        let ran = built_on(uri);
        let finished = value(&after, "offload_builds_finished_total", &here);
        assert_eq!(finished, ran.len() as f64, "{uri}: {ran:?}\n{stderr}");
        total += finished;
        assert_eq!(value(&after, "offload_builds_failed_total", &here), 0.0);
        assert_eq!(
            value(&after, "offload_build_duration_seconds_count", &here),
            finished
        );
        // All done: nothing running, waiting or holding a slot; the slots it knows.
        assert_eq!(value(&after, "offload_builds_running", &here), 0.0);
        assert_eq!(value(&after, "offload_builds_queued", &here), 0.0);
        assert_eq!(value(&after, "offload_slots_held", &here), 0.0);
        if !ran.is_empty() {
            assert_eq!(value(&after, "offload_slots", &here), 2.0);
            let home = [("route", "machine_to_client"), ("from", uri.as_str())];
            assert!(value(&after, "offload_bytes_total", &home) > 0.0, "{uri}");
        }
        // The top's inputs built on the other machine were sent to its machine.
        let top_here = ran.iter().any(|l| l.contains("-top.drv'"));
        let leaves_elsewhere = uris
            .iter()
            .filter(|u| *u != uri)
            .any(|u| !built_on(u).is_empty());
        if top_here && leaves_elsewhere {
            let sent = [("route", "client_to_machine"), ("to", uri.as_str())];
            assert!(value(&after, "offload_bytes_total", &sent) > 0.0, "{uri}");
        }
    }
    assert_eq!(total, 5.0, "four leaves and the top, all on the builders");
    // Metrics are at /metrics only.
    let other = run_ok(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{addr}/other"),
    ]));
    assert_eq!(other, "404");
    run_ok(Command::new("kill").arg(agent.id().to_string()));
    agent.wait().unwrap();
}

/// What `offload build --json --metrics 127.0.0.1:0` served while a build ran: one
/// scrape, the events until then and all of them, and the store URI of each machine
/// name in them.
struct Scraped {
    samples: Vec<Sample>,
    events: Vec<serde_json::Value>,
    all_events: Vec<serde_json::Value>,
    uris: BTreeMap<String, String>,
}

/// Whether a scrape shows what a test waits for.
type Ready<'a> = dyn Fn(&[Sample]) -> bool + 'a;

/// Runs `cmd` (an `offload build --json`, with `--metrics 127.0.0.1:0` added) and
/// scrapes it once a line of its stderr starts with `marker` (a build saying it
/// started, all its inputs landed), half a second passed and a scrape is `ready` (asked
/// again for up to 10 s); `remotes`: the builders' store URIs in the machines' order.
/// The run must succeed.
fn scraped_while(
    cmd: &mut Command,
    (marker, ready): (&str, &Ready<'_>),
    remotes: &[String],
) -> Scraped {
    let mut child = cmd
        .args(["--metrics", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let events: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let stdout = child.stdout.take().unwrap();
    let reading = events.clone();
    let out_thread = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let event = serde_json::from_str(&line.unwrap()).unwrap();
            reading.lock().unwrap().push(event);
        }
    });
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    let (mut said, mut addr) = (Vec::new(), None);
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        if let Some(rest) = line.strip_prefix("metrics at http://") {
            addr = rest.strip_suffix("/metrics").map(str::to_string);
        }
        let reached = line.starts_with(marker);
        said.push(line);
        if reached {
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no metrics address said: {said:#?}"));
    assert!(said.iter().any(|l| l.starts_with(marker)), "{said:#?}");
    std::thread::sleep(Duration::from_millis(500));
    let mut samples = scrape(&addr);
    let asked = Instant::now();
    while !ready(&samples) && asked.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        match try_scrape(&addr) {
            Some(now) => samples = now,
            None => break,
        }
    }
    let until_then = events.lock().unwrap().clone();
    let status = child.wait().unwrap();
    out_thread.join().unwrap();
    let all_events = events.lock().unwrap().clone();
    let events = until_then;
    err_thread.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "{said:#?}\n{rest:#?}");
    // The events' machine names, by the plan's list of machines (the fleet's order).
    let planned = events.iter().find(|e| e["type"] == "planned").unwrap();
    let mut remotes = remotes.iter();
    let uris = planned["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let name = m["name"].as_str().unwrap().to_string();
            let uri = match name.as_str() {
                "local" => "local".to_string(),
                _ => remotes.next().expect("as many builders as planned").clone(),
            };
            (name, uri)
        })
        .collect();
    Scraped {
        samples,
        events,
        all_events,
        uris,
    }
}

impl Scraped {
    /// Every link the run's transfers used carried what they say, by its store URIs;
    /// returns the links and their bytes.
    fn links_carried_what_the_events_say(&self) -> BTreeMap<(String, String), f64> {
        let mut per_link: BTreeMap<(String, String), f64> = BTreeMap::new();
        for e in self
            .events
            .iter()
            .filter(|e| e["type"] == "transfer_finished" && e["ok"] == true)
        {
            let (from, to) = (e["from"].as_str().unwrap(), e["to"].as_str().unwrap());
            let link = (self.uris[from].clone(), self.uris[to].clone());
            *per_link.entry(link).or_default() += e["bytes"].as_f64().unwrap();
        }
        assert!(!per_link.is_empty(), "no transfers: {:#?}", self.events);
        for ((from, to), bytes) in &per_link {
            let link = [("from", from.as_str()), ("to", to.as_str())];
            let served = value(&self.samples, "offload_bytes_total", &link);
            assert_eq!(served, *bytes, "{from} -> {to}");
        }
        per_link
    }
}

#[test]
fn a_running_build_serves_its_builds_and_bytes_per_machine() {
    if !require_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let program = loopback_serve_program(w);
    // Two loopback builders, and one no name resolves.
    let mut lines: Vec<String> = (1..=2)
        .map(|i| loopback_machine(w, &format!("m{i}"), &program, 2, 1))
        .collect();
    lines.push(format!(
        "ssh://offload-no-such-host.invalid {} - 1 1",
        nix_system()
    ));
    let remotes: Vec<String> = lines
        .iter()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    let file = w.join("graph.nix");
    std::fs::write(&file, graph(&salt("metrics-build"), 6, 4)).unwrap();
    // Once the top says it started, every leaf has finished and every input of the top
    // has landed: nothing moves for four seconds.
    let run = scraped_while(
        common::offload(w)
            .arg("build")
            .arg(&file)
            .args(["-A", "top", "--json", "--no-out-link", "-j", "1"])
            .args(["--builders", &lines.join(";")]),
        ("top> top started", &|_| true),
        &remotes,
    );
    let (samples, seen) = (&run.samples, &run.events);
    assert_eq!(run.uris.len(), 4, "{seen:#?}");
    let top_machine = seen
        .iter()
        .find(|e| e["type"] == "build_started" && e["drv"].as_str().unwrap().ends_with("-top.drv"))
        .and_then(|e| e["machine"].as_str())
        .unwrap_or_else(|| panic!("the top did not start: {seen:#?}"))
        .to_string();
    for (name, uri) in &run.uris {
        let here = [("machine", uri.as_str())];
        let finished = seen
            .iter()
            .filter(|e| e["type"] == "build_finished" && e["machine"] == name.as_str())
            .count();
        let served = value(samples, "offload_builds_finished_total", &here);
        assert_eq!(served, finished as f64, "{name}: {seen:#?}");
        let failures = seen
            .iter()
            .filter(|e| e["type"] == "machine_lost" && e["machine"] == name.as_str())
            .count();
        let served = value(samples, "offload_machine_failures_total", &here);
        assert_eq!(served, failures as f64, "{name}: {seen:#?}");
        assert_eq!(
            failures > 0,
            uri.contains("no-such-host"),
            "{name}: {seen:#?}"
        );
        let running = if *name == top_machine { 1.0 } else { 0.0 };
        assert_eq!(value(samples, "offload_builds_running", &here), running);
        assert_eq!(value(samples, "offload_slots_held", &here), running);
        let slots = match uri.as_str() {
            "local" => 1.0,
            u if u.contains("no-such-host") => 1.0,
            _ => 2.0,
        };
        assert_eq!(value(samples, "offload_slots", &here), slots, "{name}");
    }
    assert_eq!(value(samples, "offload_builds_pending", &[]), 0.0);
    run.links_carried_what_the_events_say();
}

#[test]
fn an_address_that_cannot_be_bound_stops_the_command_naming_it() {
    let work = tempfile::tempdir().unwrap();
    // Held here for the test's length.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let socket = work.path().join("agent.sock");
    let out = common::offload(work.path())
        .args(["agent", "--metrics", &addr, "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve metrics on {addr}")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(!socket.exists(), "the agent listened anyway");
    // The same for a build (its address from the config's `[build]`), before it
    // evaluates anything.
    let config = format!("[build]\nmetrics = \"{addr}\"\n");
    std::fs::write(work.path().join("offload-config.toml"), config).unwrap();
    let out = common::offload(work.path())
        .args(["build", "-E", "throw \"evaluated\""])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve metrics on {addr}")),
        "{stderr}"
    );
    assert!(!stderr.contains("evaluated"), "{stderr}");
}

#[test]
fn bytes_between_builders_are_served_by_their_route() {
    // Two sshd builders that reach each other; this machine behind a slower link. A
    // chain a → b → c goes first builder → second → first (features force it).
    let peers = Peers {
        unreachable: Vec::new(),
        client_link: LinkShape {
            rate: Some(5_000_000),
            delay: Duration::from_millis(5),
        },
    };
    let builder = |feature: &str| HostOptions {
        nix_conf: format!("extra-system-features = {feature}\n"),
        ..HostOptions::default()
    };
    let hosts = [builder("route-a"), builder("route-b")];
    let Some(fleet) = require_sshd_fleet_with_peers(&hosts, &peers) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("chain.nix");
    std::fs::write(
        &file,
        format!(
            r#"let mk = name: feature: script: extra: derivation ({{
                 inherit name; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/bin:/usr/bin"; salt = "{salt}"; requiredSystemFeatures = [ feature ];
                 args = [ "-c" script ];
               }} // extra);
               a = mk "a" "route-a" "mkdir $out; head -c 1048576 /dev/urandom > $out/blob" {{}};
               b = mk "b" "route-b" "mkdir $out; cp $a/blob $out/blob" {{ inherit a; }};
             in mk "c" "route-a" "echo c started; sleep 3; mkdir $out; sha256sum < $b/blob > $out/sum" {{ inherit b; }}"#,
            salt = salt("metrics-peers")
        ),
    )
    .unwrap();
    let remotes = [fleet.store_uri(0), fleet.store_uri(1)];
    let system = nix_system();
    let builders = format!(
        "{} {system} - 1 1 route-a; {} {system} - 1 1 route-b",
        remotes[0], remotes[1]
    );
    let (name, opts) = fleet.ssh_opts();
    let run = scraped_while(
        common::offload(work.path())
            .env(name, opts)
            .arg("build")
            .arg(&file)
            .args(["-j0", "--json", "--no-out-link", "--builders", &builders])
            .args(["--option", "sandbox", "false"]),
        ("c> c started", &|_| true),
        &remotes,
    );
    let links = run.links_carried_what_the_events_say();
    // a went from the first builder to the second and b back, straight between them.
    for (from, to) in [(&remotes[0], &remotes[1]), (&remotes[1], &remotes[0])] {
        let carried = links.get(&(from.clone(), to.clone())).copied();
        assert!(
            carried.unwrap_or(0.0) >= 1048576.0,
            "{from} -> {to}: {links:?}"
        );
        let direct = [("route", "builder_to_builder"), ("from", from), ("to", to)];
        let served = value(&run.samples, "offload_bytes_total", &direct);
        assert_eq!(Some(served), carried, "{from} -> {to}");
    }
}

#[test]
fn bytes_delivered_to_a_target_are_served_as_they_land() {
    let target = HostOptions {
        target: true,
        ..HostOptions::default()
    };
    let builder = HostOptions {
        nix_conf: "extra-system-features = metrics-b\n".into(),
        ..HostOptions::default()
    };
    let hosts = [HostOptions::default(), builder, target];
    let Some(fleet) = require_sshd_fleet_with_peers(&hosts, &Peers::default()) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("pair.nix");
    // c is requested, so it leaves for the target as soon as it is built, while d (on
    // the other builder, after c) sleeps.
    std::fs::write(
        &file,
        format!(
            r#"let c = derivation {{
                 name = "c"; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/bin:/usr/bin"; salt = "{salt}";
                 args = [ "-c" "mkdir $out; head -c 65536 /dev/urandom > $out/blob" ];
               }};
               d = derivation {{
                 name = "d"; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/bin:/usr/bin"; inherit c; requiredSystemFeatures = [ "metrics-b" ];
                 args = [ "-c" "echo d started; sleep 4; mkdir $out; cp $c/blob $out/" ];
               }};
             in {{ inherit c d; }}"#,
            salt = salt("metrics-to")
        ),
    )
    .unwrap();
    let remotes = [fleet.store_uri(0), fleet.store_uri(1)];
    let to = fleet.store_uri(2);
    let system = nix_system();
    let builders = format!(
        "{} {system} - 1 1; {} {system} - 1 1 metrics-b",
        remotes[0], remotes[1]
    );
    let delivered = |samples: &[Sample]| -> f64 {
        value(
            samples,
            "offload_bytes_total",
            &[("route", "to_target"), ("to", &to)],
        )
    };
    let (name, opts) = fleet.ssh_opts();
    let run = scraped_while(
        common::offload(work.path())
            .env(name, opts)
            .arg("build")
            .arg(&file)
            .args(["-A", "c", "-A", "d", "-j0", "--json", "--to", &to])
            .args(["--builders", &builders, "--option", "sandbox", "false"]),
        ("d> d started", &|samples| delivered(samples) > 0.0),
        &remotes,
    );
    // c's share, while d still ran: no more than the run's whole delivery, at least c.
    let served = delivered(&run.samples);
    let summary = run.all_events.iter().find(|e| e["type"] == "summary");
    let summary = summary.unwrap_or_else(|| panic!("no summary: {:#?}", run.all_events));
    let whole = summary["bytes"]["to_target"].as_f64().unwrap();
    assert!(
        served >= 65536.0 && served <= whole,
        "{served} of {whole}: {summary}"
    );
}
