//! `offload build`: evaluate with Nix, plan the whole graph over the fleet and the local
//! machine, build, link the results like nix-build.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use offload_driver::build::{self, BuildOptions, BuildReport, MachineConfig, NodeResult, Reporter};
use offload_driver::dry_run::dry_run;
use offload_driver::nixconf::NixSettings;
use offload_driver::plan::{build_nodes, output_path, read_drv_closure};
use offload_driver::{Endpoint, History, Route};
use offload_nix::machines::{parse_builders, Machine};
use offload_nix::serve::BuildSettings;
use offload_nix::store_path::StorePath;
use offload_sched::MachineSpec;
use offload_sim::report::{chrome_trace, TraceEvent};

use crate::args::BuildArgs;
use crate::Failure;

/// Assumed link to a remote machine until measured: 100 MB/s, 5 ms.
const DEFAULT_BANDWIDTH: f64 = 100e6;
const DEFAULT_LATENCY: f64 = 0.005;

struct Progress {
    quiet: bool,
    logs: bool,
}

impl Reporter for Progress {
    fn build_started(&self, drv: &str, machine: &str) {
        if !self.quiet {
            eprintln!("building '{drv}' on '{machine}'...");
        }
    }

    fn build_log(&self, drv: &str, _machine: &str, line: &str) {
        if self.logs && !self.quiet {
            eprintln!("{}> {line}", drv_name(drv));
        }
    }

    fn build_finished(&self, _drv: &str, _machine: &str, _ok: bool, _seconds: f64) {}
}

fn drv_name(drv: &str) -> &str {
    let base = drv.rsplit('/').next().unwrap_or(drv);
    let name = base.get(33..).unwrap_or(base);
    name.strip_suffix(".drv").unwrap_or(name)
}

/// A target: a `.drv` and the outputs wanted from it (all when `None`).
struct Target {
    drv: StorePath,
    outputs: Option<Vec<String>>,
}

fn evaluate(args: &BuildArgs) -> Result<Vec<Target>, Failure> {
    let mut drv_args = Vec::new();
    let mut files = Vec::new();
    for t in &args.targets {
        if t.ends_with(".drv") || t.contains(".drv!") {
            drv_args.push(t.clone());
        } else {
            files.push(t.clone());
        }
    }
    let mut lines: Vec<String> = drv_args;
    if args.expr.is_some() || !files.is_empty() || lines.is_empty() {
        let mut cmd = Command::new("nix-instantiate");
        if let Some(expr) = &args.expr {
            cmd.args(["-E", expr]);
        } else if files.is_empty() {
            cmd.arg("./default.nix");
        } else {
            cmd.args(&files);
        }
        for a in &args.attrs {
            cmd.args(["-A", a]);
        }
        for pair in args.arg.chunks(2) {
            cmd.arg("--arg").args(pair);
        }
        for pair in args.argstr.chunks(2) {
            cmd.arg("--argstr").args(pair);
        }
        let out = cmd
            .output()
            .map_err(|e| Failure::usage(anyhow!("cannot run nix-instantiate: {e}")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(Failure::work(anyhow!(
                "evaluation failed (nix-instantiate {}):\n{}",
                out.status,
                stderr.trim()
            )));
        }
        lines.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string),
        );
    }
    lines
        .iter()
        .map(|line| {
            let (drv, outputs) = match line.split_once('!') {
                Some((d, o)) => (d, Some(o.split(',').map(str::to_string).collect())),
                None => (line.as_str(), None),
            };
            let drv = StorePath::from_absolute_path(drv.trim())
                .map_err(|e| Failure::usage(anyhow!("{e}")))?;
            Ok(Target { drv, outputs })
        })
        .collect()
}

fn machine_matches(m: &Machine, wanted: &str) -> bool {
    let host = m
        .uri
        .strip_prefix("ssh://")
        .map(|h| h.split('?').next().unwrap_or(h));
    m.uri == wanted
        || host == Some(wanted)
        || host.is_some_and(|h| h.rsplit('@').next() == Some(wanted))
}

fn fleet(args: &BuildArgs, settings: &NixSettings) -> Result<(Vec<MachineConfig>, usize), Failure> {
    let (spec, origin) = match &args.builders {
        Some(s) => (s.clone(), "--builders"),
        None => (settings.builders.clone(), "builders setting"),
    };
    let mut machines = if args.local_only {
        Vec::new()
    } else {
        parse_builders(&spec, origin, &settings.system).map_err(Failure::usage)?
    };
    if !args.on.is_empty() {
        for wanted in &args.on {
            if wanted != "local" && !machines.iter().any(|m| machine_matches(m, wanted)) {
                let known: Vec<&str> = machines.iter().map(|m| m.uri.as_str()).collect();
                return Err(Failure::usage(anyhow!(
                    "--on {wanted}: no such machine; the machines are: local, {}",
                    known.join(", ")
                )));
            }
        }
        machines.retain(|m| args.on.iter().any(|w| machine_matches(m, w)));
    }
    machines.retain(|m| !args.exclude.iter().any(|w| machine_matches(m, w)));
    let local_excluded = args.exclude.iter().any(|w| w == "local")
        || (!args.on.is_empty() && !args.on.iter().any(|w| w == "local"));
    let local_slots = if local_excluded {
        0
    } else {
        args.max_jobs.unwrap_or(settings.max_jobs)
    };
    let mut configs = vec![MachineConfig {
        endpoint: Endpoint::local("local", None),
        spec: MachineSpec {
            name: "local".into(),
            systems: settings.local_systems(),
            supported_features: settings.system_features.clone(),
            mandatory_features: Vec::new(),
            slots: local_slots,
            speed: 1.0,
            is_local: true,
            bandwidth: f64::INFINITY,
            latency: 0.0,
        },
        cores: Some(local_cores(settings)),
    }];
    for m in machines {
        let mut endpoint = Endpoint::parse(&m.uri).map_err(Failure::usage)?;
        if let Route::Ssh {
            ssh_key,
            host_public_key,
            ..
        } = &mut endpoint.route
        {
            if let Some(key) = &m.ssh_key {
                *ssh_key = Some(key.into());
            }
            if m.public_host_key.is_some() {
                *host_public_key = m.host_key_line();
            }
        }
        let mut name = short_name(&m);
        if configs.iter().any(|c| c.spec.name == name) {
            name = m.uri.clone();
        }
        configs.push(MachineConfig {
            endpoint,
            spec: MachineSpec {
                name,
                systems: m.systems.clone(),
                supported_features: m.supported_features.iter().cloned().collect(),
                mandatory_features: m.mandatory_features.iter().cloned().collect(),
                slots: m.max_jobs,
                speed: f64::from(m.speed_factor),
                is_local: false,
                bandwidth: DEFAULT_BANDWIDTH,
                latency: DEFAULT_LATENCY,
            },
            // A remote's core count is not in the machines file; its own setting stays.
            cores: None,
        });
    }
    Ok((configs, 0))
}

/// Cores of this machine: Nix's `cores` when set, else all of them.
fn local_cores(settings: &NixSettings) -> u32 {
    if settings.cores > 0 {
        settings.cores
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    }
}

/// What reports call a machine: `host`, or `host:STORE` with a remote store.
fn short_name(m: &Machine) -> String {
    match m.store_uri() {
        Ok(u) if u.is_ssh() => match u.remote_store() {
            Some(store) => format!("{}:{store}", u.authority),
            None => u.authority.clone(),
        },
        _ => m.uri.clone(),
    }
}

pub async fn run(args: BuildArgs, quiet: bool) -> Result<(), Failure> {
    let settings = NixSettings::load()
        .context("reading Nix's settings")
        .map_err(Failure::usage)?;
    let (machines, local) = fleet(&args, &settings)?;
    let targets = evaluate(&args)?;
    let roots: Vec<StorePath> = targets.iter().map(|t| t.drv.clone()).collect();
    let read_started = std::time::Instant::now();
    let drvs = tokio::task::block_in_place(|| read_drv_closure(Path::new("/"), &roots))
        .map_err(Failure::work)?;
    tracing::info!(
        "read {} derivations in {:.0} ms",
        drvs.len(),
        read_started.elapsed().as_secs_f64() * 1e3
    );

    // Nix decides what must be built and what it can fetch; offload builds the first.
    let root_args: Vec<String> = roots.iter().map(StorePath::to_absolute).collect();
    let plan = dry_run(None, &root_args).map_err(Failure::work)?;
    if args.dry_run {
        let mut text = format!(
            "{} derivations to build, {} paths to fetch\nmachines:\n",
            plan.will_build.len(),
            plan.will_fetch.len()
        );
        for m in &machines {
            text.push_str(&format!(
                "  {} ({} slots, speed {}, {})\n",
                m.spec.name,
                m.spec.slots,
                m.spec.speed,
                m.spec.systems.join(",")
            ));
        }
        for d in &plan.will_build {
            text.push_str(&format!("  build {d}\n"));
        }
        for p in &plan.will_fetch {
            text.push_str(&format!("  fetch {p}\n"));
        }
        eprint!("{text}");
        return Ok(());
    }
    if !plan.will_fetch.is_empty() {
        if !quiet {
            eprintln!("fetching {} paths from substituters", plan.will_fetch.len());
        }
        let status = Command::new("nix-store")
            .arg("--realise")
            .args(&plan.will_fetch)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| Failure::usage(anyhow!("cannot run nix-store: {e}")))?;
        if !status.success() {
            return Err(Failure::work(anyhow!(
                "substituting {} paths failed ({status})",
                plan.will_fetch.len()
            )));
        }
    }
    let will_build: Vec<StorePath> = plan
        .will_build
        .iter()
        .filter_map(|p| StorePath::from_absolute_path(p).ok())
        .collect();
    let history_path = args.history.clone().unwrap_or_else(History::default_path);
    let history = match History::open(&history_path) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("{e}; planning with default estimates");
            None
        }
    };
    let nodes = build_nodes(&drvs, &will_build, history.as_ref()).map_err(Failure::work)?;

    let mut wanted = Vec::new();
    let mut links = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let drv = &drvs[&t.drv];
        let outputs: Vec<String> = match &t.outputs {
            Some(o) => o.clone(),
            None => drv.outputs.keys().cloned().collect(),
        };
        for o in outputs {
            let path = output_path(&t.drv, drv, &o).map_err(Failure::work)?;
            let mut link = args.out_link.clone();
            if i > 0 {
                link.push_str(&format!("-{}", i + 1));
            }
            if o != "out" {
                link.push_str(&format!("-{o}"));
            }
            wanted.push(path.clone());
            links.push((link, path));
        }
    }

    if args.fetch_all_outputs {
        wanted.extend(
            nodes
                .iter()
                .flat_map(|n| n.outputs.iter().map(|(_, p)| p.clone())),
        );
    }
    let options = BuildOptions {
        keep_going: args.keep_going,
        builders_use_substitutes: args.builders_use_substitutes
            || settings.builders_use_substitutes,
        settings: BuildSettings {
            max_silent_time: args.max_silent_time,
            build_timeout: args.timeout,
            ..BuildSettings::default()
        },
        log_dir: Some("/nix/var/log/nix".into()),
    };
    let reporter = Arc::new(Progress {
        quiet,
        logs: !args.no_build_output,
    });
    let names: Vec<String> = nodes.iter().map(|n| n.drv_path.clone()).collect();
    let report = build::run(
        nodes,
        machines,
        local,
        wanted,
        history.as_ref(),
        &options,
        reporter,
    )
    .await
    .map_err(Failure::work)?;

    if let Some(path) = &args.trace {
        write_trace(path, &names, &report)?;
    }
    let failures: Vec<(usize, &NodeResult)> = report
        .results
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, NodeResult::Failed { .. }))
        .collect();
    if !quiet {
        let used: Vec<String> = report
            .builds_per_machine
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(m, n)| format!("{m} {n}"))
            .collect();
        let built = report
            .builds_per_machine
            .iter()
            .map(|(_, n)| n)
            .sum::<usize>();
        let cpu = own_cpu_seconds();
        eprintln!(
            "built {built} derivations in {:.2} s; lower bound {:.2} s by the measured build times \
             ({:.2}x); offload's own CPU {:.0} ms ({:.1} ms per build)\nbuilds per machine: {}",
            report.wall_seconds,
            report.measured_lower_bound,
            report.wall_seconds / report.measured_lower_bound.max(1e-9),
            cpu * 1e3,
            cpu * 1e3 / built.max(1) as f64,
            if used.is_empty() { "none".to_string() } else { used.join(", ") }
        );
    }
    if !failures.is_empty() || report.copy_back_error.is_some() {
        let mut text = String::new();
        for (i, r) in &failures {
            if let NodeResult::Failed { failure, log_tail } = r {
                text.push_str(&format!("\n  {}: {failure}", names[*i]));
                if !log_tail.is_empty() {
                    text.push_str(&format!("\n    last {} log lines:", log_tail.len()));
                    for l in log_tail {
                        text.push_str(&format!("\n    > {l}"));
                    }
                }
            }
        }
        if let Some(e) = &report.copy_back_error {
            text.push_str(&format!("\n  copying the results back failed: {e}"));
        }
        return Err(Failure::work(anyhow!(
            "{} of {} derivations failed:{text}",
            failures.len(),
            report.results.len()
        )));
    }

    let mut stdout = String::new();
    for (link, path) in &links {
        if !args.no_out_link {
            add_root(link, path).map_err(Failure::work)?;
        }
        stdout.push_str(path);
        stdout.push('\n');
    }
    crate::output::stdout(&stdout);
    Ok(())
}

/// `link` → `path`, registered as a GC root the way nix-build does it.
fn add_root(link: &str, path: &str) -> anyhow::Result<()> {
    let out = Command::new("nix-store")
        .args(["--add-root", link, "--indirect", "--realise", path])
        .output()
        .context("running nix-store --add-root")?;
    if !out.status.success() {
        anyhow::bail!(
            "cannot create the output link {link}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// CPU seconds this process used (user + system), from /proc; 0 where unavailable.
/// Children (the serve processes, Nix) are not counted.
fn own_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // Linux reports these in USER_HZ, 100 on every architecture it supports.
    ticks / 100.0
}

/// The run as Chrome trace events: a process per machine, an event per build task.
fn write_trace(path: &Path, drv_paths: &[String], report: &BuildReport) -> Result<(), Failure> {
    let machines: Vec<String> = report
        .builds_per_machine
        .iter()
        .map(|(m, _)| m.clone())
        .collect();
    let builds: Vec<TraceEvent> = drv_paths
        .iter()
        .zip(&report.results)
        .filter_map(|(drv, r)| match r {
            NodeResult::Built {
                machine,
                started,
                seconds,
            } => Some(TraceEvent {
                name: drv.clone(),
                machine: machines.iter().position(|m| m == machine)?,
                start: *started,
                duration: *seconds,
            }),
            NodeResult::Failed { .. } => None,
        })
        .collect();
    std::fs::write(path, chrome_trace(&machines, &builds).to_string())
        .with_context(|| format!("writing the trace to {}", path.display()))
        .map_err(Failure::usage)
}
