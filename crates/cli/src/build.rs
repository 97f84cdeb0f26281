//! `offload build`: evaluate with Nix, plan the whole graph over the fleet and the local
//! machine, build, link the results like nix-build.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use offload_driver::build::{self, BuildOptions, LogDestination, NodeResult, Reliability};
use offload_driver::fleet::build_fleet;
use offload_driver::fleet::nixconf::NixSettings;
use offload_driver::plan::dry_run::dry_run;
use offload_driver::plan::{build_nodes, output_path, read_drv_closure};
use offload_driver::process;
use offload_driver::shutdown::Shutdown;
use offload_driver::state::Knowledge;
use offload_driver::trust::LocalAccess;
use offload_driver::{DriverError, StateDb};
use offload_nix::serve::BuildSettings;
use offload_nix::store_path::StorePath;

use crate::args::BuildArgs;
use crate::evaluate::evaluate;
use crate::progress::Progress;
use crate::report::{ReportMachine, RunReport};
use crate::Failure;

pub async fn run(args: BuildArgs, quiet: bool) -> Result<(), Failure> {
    // From here SIGINT and SIGTERM stop the run cleanly instead of killing offload.
    let shutdown = Shutdown::on_signals()
        .context("cannot watch for SIGINT and SIGTERM")
        .map_err(Failure::usage)?;
    let settings = NixSettings::load()
        .context("reading Nix's settings")
        .map_err(Failure::usage)?;
    let mut choice = args.machines.choice();
    if args.through_daemon {
        // The hosts are the daemon's builders, which the hook checks them against.
        choice.on.clear();
        choice.exclude.clear();
    }
    let machines = build_fleet(&choice, &settings).map_err(Failure::usage)?;
    let mut options = BuildOptions {
        keep_going: args.keep_going,
        builders_use_substitutes: args.builders_use_substitutes
            || settings.builders_use_substitutes,
        settings: BuildSettings {
            max_silent_time: args.max_silent_time,
            build_timeout: args.timeout,
            keep_failed: args.keep_failed,
            ..BuildSettings::default()
        },
        local_access: LocalAccess::default(),
        logs: LogDestination::Nowhere,
        session_options: Vec::new(),
        check: Default::default(),
        reliability: Reliability {
            backoff: Duration::from_secs(args.retry_backoff),
            quarantine_after: args.quarantine_after,
            quarantine_for: Duration::from_secs(args.quarantine),
            stall_timeout: Duration::from_secs(args.stall_timeout),
            ..Reliability::default()
        },
        knowledge: Knowledge::default(),
    };
    for pair in args.option.chunks(2) {
        if let [name, value] = pair {
            options
                .set_nix_option(name, value)
                .map_err(|e| Failure::usage(anyhow!(e)))?;
        }
    }
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
    if args.check {
        options.check = root_args.iter().cloned().collect();
    }
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
        process::run(
            Command::new("nix-store")
                .arg("--realise")
                .args(&plan.will_fetch),
        )
        .with_context(|| format!("substituting {} paths failed", plan.will_fetch.len()))
        .map_err(Failure::work)?;
    }
    let mut will_build: Vec<StorePath> = plan
        .will_build
        .iter()
        .filter_map(|p| StorePath::from_absolute_path(p).ok())
        .collect();
    if args.check {
        // Checked targets are built again wherever the plan puts them, valid or not.
        will_build.extend(roots.iter().cloned());
    }
    let history_path = args
        .history
        .clone()
        .unwrap_or_else(offload_driver::env::state_db_path);
    let history = match StateDb::open(&history_path) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("{e}; planning with default estimates");
            None
        }
    };
    if let Some(h) = &history {
        match h.knowledge(&settings.system) {
            Ok(k) => options.knowledge = k,
            Err(e) => tracing::warn!("{e}; planning with default estimates"),
        }
    }
    let nodes = build_nodes(&drvs, &will_build, &options.knowledge).map_err(Failure::work)?;

    let mut wanted = Vec::new();
    let mut links = Vec::new();
    for t in &targets {
        let drv = &drvs[&t.drv];
        let outputs: Vec<String> = match &t.outputs {
            Some(o) => o.clone(),
            None => drv.outputs.keys().cloned().collect(),
        };
        for o in outputs {
            let path = output_path(&t.drv, drv, &o).map_err(Failure::work)?;
            let mut link = format!("{}{}", args.out_link, t.link_suffix);
            if o != "out" {
                link.push_str(&format!("-{o}"));
            }
            wanted.push(path.clone());
            links.push((link, path));
        }
    }

    if args.through_daemon {
        through_daemon(&args, &plan.will_build, &root_args).await?;
        return link_results(&args, &links);
    }
    if args.fetch_all_outputs {
        wanted.extend(
            nodes
                .iter()
                .flat_map(|n| n.outputs.iter().map(|(_, p)| p.clone())),
        );
    }
    let mut machines = machines;
    options.local_access = if will_build.is_empty() && options.check.is_empty() {
        LocalAccess::default()
    } else {
        crate::access::check(&args, &mut machines).await?
    };
    options.logs = log_destination(&options.local_access, &history_path);
    let reporter = Arc::new(Progress::new(quiet, !args.no_build_output, args.json));
    let work: f64 = nodes.iter().map(|n| n.estimate).sum();
    reporter.planned(nodes.len(), work, &machines);
    let names: Vec<String> = nodes.iter().map(|n| n.drv_path.clone()).collect();
    let deps: Vec<Vec<usize>> = nodes.iter().map(|n| n.deps.clone()).collect();
    let fleet: Vec<ReportMachine> = machines
        .iter()
        .map(|m| ReportMachine {
            name: m.spec.name.clone(),
            slots: m.spec.slots,
        })
        .collect();
    let report = build::run(
        nodes,
        machines,
        wanted,
        history.as_ref(),
        &options,
        reporter.clone(),
        shutdown.token(),
    )
    .await
    .map_err(|e| match (&e, shutdown.signal()) {
        (DriverError::Interrupted { .. }, Some(signal)) => Failure {
            error: e.into(),
            code: signal.exit_code(),
        },
        _ => Failure::work(e),
    })?;

    let mut run = RunReport::from_build(&names, &deps, fleet, &report);
    run.transfers = reporter.transfers();
    if let Some(path) = &args.trace {
        crate::report::write_trace(path, &run)?;
    }
    if let Some(path) = &args.report {
        crate::report::write_html(path, &run)?;
    }
    if let Some(h) = &history {
        crate::report::record(h, &run);
    }
    let wanted_links: Vec<String> = links.iter().map(|(_, p)| p.clone()).collect();
    reporter.summary(&report, &names, &wanted_links);
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
        // Nothing built, or builds too short to measure: no ratio worth printing.
        let ratio = if report.measured_lower_bound > 0.001 {
            format!(
                " ({:.2}x)",
                report.wall_seconds / report.measured_lower_bound
            )
        } else {
            String::new()
        };
        eprintln!(
            "built {built} derivations in {:.2} s; lower bound {:.2} s by the measured build times\
             {ratio}; offload's own CPU {:.0} ms ({:.1} ms per build)\nbuilds per machine: {}",
            report.wall_seconds,
            report.measured_lower_bound,
            cpu * 1e3,
            cpu * 1e3 / built.max(1) as f64,
            if used.is_empty() {
                "none".to_string()
            } else {
                used.join(", ")
            }
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

    if args.repair {
        repair(&root_args).map_err(Failure::work)?;
    }
    link_results(&args, &links)
}

/// The result links (GC roots) and the output paths on stdout, as nix-build does.
fn link_results(args: &BuildArgs, links: &[(String, String)]) -> Result<(), Failure> {
    let mut stdout = String::new();
    for (link, path) in links {
        if !args.no_out_link {
            add_root(link, path).map_err(Failure::work)?;
        }
        stdout.push_str(path);
        stdout.push('\n');
    }
    // With --json the summary carried the paths: stdout holds nothing but events.
    if !args.json {
        crate::output::stdout(&stdout);
    }
    Ok(())
}

/// `--through-daemon`: the nix-daemon builds, handing derivations to its `offload
/// hook`; the user's choice of hosts reaches the hook through the agent, since the
/// daemon passes an untrusted client's `builders` on to nobody.
async fn through_daemon(
    args: &BuildArgs,
    will_build: &[String],
    roots: &[String],
) -> Result<(), Failure> {
    let socket = offload_driver::env::agent_socket();
    let choice = offload_driver::agent::HostChoice {
        on: args.machines.on.clone(),
        exclude: args.machines.exclude.clone(),
    };
    if choice != offload_driver::agent::HostChoice::default() {
        let client = offload_driver::agent::AgentClient::connect(&socket)
            .await
            .map_err(|e| {
                Failure::usage(anyhow!(e).context(
                    "--through-daemon with --on/--exclude tells the nix-daemon's offload hook \
                     your hosts through the offload agent: run `offload agent --group GROUP` as \
                     root (the daemon's hook finds it at the same socket, OFFLOAD_AGENT_SOCKET) \
                     and be in GROUP",
                ))
            })?;
        client
            .prefer(will_build.to_vec(), choice)
            .await
            .map_err(Failure::work)?;
    }
    tokio::task::block_in_place(|| {
        process::run_showing_progress(Command::new("nix-store").arg("--realise").args(roots))
    })
    .context("the nix-daemon's build failed")
    .map_err(Failure::work)
}

/// `--repair`: Nix repairs the closures of `drvs` in the local store, rebuilding
/// here what it cannot substitute. It runs on this machine because the store it repairs
/// is this one: a path rebuilt elsewhere would not replace the corrupted copy here.
fn repair(drvs: &[String]) -> anyhow::Result<()> {
    process::run(
        Command::new("nix-store")
            .args(["--realise", "--repair"])
            .args(drvs),
    )
    .context("repairing the requested derivations' closures failed")?;
    Ok(())
}

/// `link` → `path`, registered as a GC root the way nix-build does it.
fn add_root(link: &str, path: &str) -> anyhow::Result<()> {
    process::run(Command::new("nix-store").args([
        "--add-root",
        link,
        "--indirect",
        "--realise",
        path,
    ]))
    .with_context(|| format!("cannot create the output link {link}"))?;
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

/// Where build logs go: Nix's log directory, where `nix log` finds them, when this user
/// may write there; else, for a user the daemon trusts, the daemon; else offload's own
/// state directory, said once.
fn log_destination(access: &LocalAccess, history: &Path) -> LogDestination {
    let nix = Path::new(NIX_LOG_DIR);
    if writable(&nix.join("drvs")) {
        return LogDestination::Dir(nix.to_path_buf());
    }
    if access.trusted {
        return LogDestination::Daemon(offload_driver::env::daemon_socket());
    }
    // Beside the history: the state directory.
    match history.parent() {
        Some(state) => {
            let own = state.join("log");
            eprintln!(
                "note: logs of builds on other machines are kept in {} (only users the \
                 nix-daemon trusts can add logs where `nix log` looks)",
                own.display()
            );
            LogDestination::Dir(own)
        }
        None => LogDestination::Nowhere,
    }
}

/// Nix's log directory on every install.
const NIX_LOG_DIR: &str = "/nix/var/log/nix";

/// Whether this process may create files in `dir` (which need not exist yet).
fn writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".offload-write-probe-{}", std::process::id()));
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}
