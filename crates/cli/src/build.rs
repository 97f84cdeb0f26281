//! `offload build`: the flags and the config file become a [`BuildRequest`]; the
//! driver's job ([`offload_driver::job`]) evaluates, plans, builds and links, showing its
//! events through [`Progress`]; what it returns is printed and mapped to an exit code.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use offload_driver::build::Reliability;
use offload_driver::config::{ConfigError, Loaded};
use offload_driver::fleet::MachineConfig;
use offload_driver::job::{self, BuildRequest, Evaluation, Outcome};
use offload_driver::shutdown::Shutdown;
use offload_nix::serve::BuildSettings;

use crate::args::BuildArgs;
use crate::progress::Progress;
use crate::report::{html_file, trace_file};
use crate::Failure;

/// `offload build` with `args` and the config file `loaded`; `quiet` keeps stderr to
/// errors and warnings.
pub async fn run(args: BuildArgs, loaded: &Loaded, quiet: bool) -> Result<(), Failure> {
    let (logs, json) = (!args.no_build_output, args.json);
    let request = request(args, loaded).map_err(Failure::usage)?;
    // From here SIGINT and SIGTERM stop the run cleanly instead of killing offload.
    let shutdown = Shutdown::on_signals()
        .context("cannot watch for SIGINT and SIGTERM")
        .map_err(Failure::usage)?;
    let progress = Arc::new(Progress::new(quiet, logs, json));
    match job::run(&request, progress, shutdown.token()).await {
        Ok(Outcome::DryRun {
            plan,
            machines,
            routes,
        }) => {
            eprint!(
                "{}{}",
                dry_run_text(&plan.will_build, &plan.will_fetch, &machines),
                routes.describe(machines.iter().filter(|m| !m.spec.is_local).count())
            );
            Ok(())
        }
        Ok(Outcome::Built { outputs }) => {
            // With --json the summary carried the paths: stdout holds nothing but events.
            if !json {
                crate::output::stdout(
                    &outputs.iter().map(|p| format!("{p}\n")).collect::<String>(),
                );
            }
            Ok(())
        }
        Err(e) => {
            let code = match shutdown.signal() {
                Some(signal) if e.is_interrupted() => signal.exit_code(),
                _ if e.is_usage() => 2,
                _ => 1,
            };
            Err(Failure {
                error: e.into(),
                code,
            })
        }
    }
}

/// The request `args` make, with the config file's build defaults where no flag was
/// given.
fn request(args: BuildArgs, loaded: &Loaded) -> Result<BuildRequest, ConfigError> {
    let defaults = &loaded.config.build;
    let pairs = |flat: &[String]| -> Vec<(String, String)> {
        flat.chunks(2)
            .filter_map(|pair| match pair {
                [a, b] => Some((a.clone(), b.clone())),
                _ => None,
            })
            .collect()
    };
    // The trace first, then the report.
    let files = [args.trace.map(trace_file), args.report.map(html_file)];
    Ok(BuildRequest {
        evaluation: Evaluation {
            targets: args.targets,
            attrs: args.attrs,
            expr: args.expr,
            args: pairs(&args.arg),
            argstrs: pairs(&args.argstr),
            include: args.include,
            options: pairs(&args.option),
            override_inputs: pairs(&args.override_input),
            show_trace: args.show_trace,
        },
        machines: loaded.build_machines(args.machines.choice())?,
        keep_going: args.keep_going || defaults.keep_going == Some(true),
        settings: BuildSettings {
            max_silent_time: args.max_silent_time,
            build_timeout: args.timeout,
            keep_failed: args.keep_failed,
            ..BuildSettings::default()
        },
        reliability: Reliability {
            backoff: Duration::from_secs(args.retry_backoff),
            quarantine_after: args.quarantine_after,
            quarantine_for: Duration::from_secs(args.quarantine),
            stall_timeout: Duration::from_secs(args.stall_timeout),
            ..Reliability::default()
        },
        builders_use_substitutes: args.builders_use_substitutes,
        check: args.check,
        repair: args.repair,
        fetch_all_outputs: args.fetch_all_outputs,
        dry_run: args.dry_run,
        sign_key: args.sign_key.or_else(|| defaults.sign_key.clone()),
        no_local_fallback: args.no_local_fallback,
        through_daemon: args.through_daemon,
        out_link: (!args.no_out_link).then_some(args.out_link),
        deliver_to: args.to,
        relay: args.relay || defaults.relay == Some(true),
        forward_agent: args.forward_agent || defaults.forward_agent == Some(true),
        state: loaded.state_db(args.history),
        files: files.into_iter().flatten().collect(),
        metrics: args.metrics.or(defaults.metrics),
    })
}

/// `--dry-run`'s answer: what Nix would build and fetch, and the machines.
fn dry_run_text(build: &[String], fetch: &[String], machines: &[MachineConfig]) -> String {
    let mut text = format!(
        "{} derivations to build, {} paths to fetch\nmachines:\n",
        build.len(),
        fetch.len()
    );
    for m in machines {
        text.push_str(&format!(
            "  {} ({} slots, speed {}, {})\n",
            m.spec.name,
            m.spec.slots,
            m.spec.speed,
            m.spec.systems.join(",")
        ));
    }
    for d in build {
        text.push_str(&format!("  build {d}\n"));
    }
    for p in fetch {
        text.push_str(&format!("  fetch {p}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::args::{Cli, Command};

    #[test]
    fn flags_become_the_request() {
        let cli = Cli::try_parse_from([
            "offload",
            "build",
            "f.nix",
            "--arg",
            "a",
            "1",
            "--argstr",
            "b",
            "two",
            "--option",
            "sandbox",
            "false",
            "--report",
            "r.html",
            "--trace",
            "t.json",
            "--no-out-link",
            "--history",
            "h.sqlite",
            "-k",
        ])
        .unwrap();
        let Command::Build(args) = cli.command else {
            panic!("not a build");
        };
        let r = request(*args, &Loaded::default()).unwrap();
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(r.evaluation.targets, ["f.nix"]);
        assert_eq!(r.evaluation.args, [pair("a", "1")]);
        assert_eq!(r.evaluation.argstrs, [pair("b", "two")]);
        assert_eq!(r.evaluation.options, [pair("sandbox", "false")]);
        // The trace is written before the report, as before.
        let files: Vec<&str> = r.files.iter().map(|f| f.what).collect();
        assert_eq!(files, ["trace", "report"]);
        assert_eq!(r.out_link, None);
        assert_eq!(r.state, std::path::Path::new("h.sqlite"));
        assert!(r.keep_going && !r.dry_run);
    }
}
