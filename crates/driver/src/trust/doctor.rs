//! `offload doctor`: what stands between a machine and a build, checked for real, each
//! problem with what to change and where. Per machine: whether a serve session opens
//! (ssh, host key, login scripts that print, Nix on the PATH) and its round trip; the
//! remote Nix version; whether its store takes imports from this user; whether the
//! local store takes its outputs (the same check `offload build` runs up front); and
//! whether each system it declares really builds, and how fast.

use std::time::Instant;

use offload_nix::serve::BuildSettings;

use super::signing::PathSigner;
use crate::error::DriverError;
use crate::fleet::{MachineConfig, LOCAL};
use crate::process;
use crate::session::ServeConn;
use crate::ssh::Route;
use crate::trust;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Ok,
    /// Works, but worth changing (a slow link, an old Nix).
    Warning,
    /// The machine cannot build.
    Broken,
}

/// One check of one machine.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Short name of the check (`session`, `nix`, `imports`, `outputs`, `system …`).
    pub check: String,
    pub severity: Severity,
    pub detail: String,
    /// What to change, and where.
    pub fix: Option<String>,
}

/// Everything found about one machine.
#[derive(Debug, Clone)]
pub struct MachineReport {
    pub machine: String,
    pub findings: Vec<Finding>,
}

impl MachineReport {
    /// The worst finding.
    pub fn severity(&self) -> Severity {
        self.findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Ok)
    }

    fn add(&mut self, check: impl Into<String>, severity: Severity, detail: impl Into<String>) {
        self.findings.push(Finding {
            check: check.into(),
            severity,
            detail: detail.into(),
            fix: None,
        });
    }

    fn problem(&mut self, check: impl Into<String>, severity: Severity, e: &DriverError) {
        self.findings.push(Finding {
            check: check.into(),
            severity,
            detail: e.to_string(),
            fix: e.hint(),
        });
    }
}

/// A serve session slower to open than this gets a warning.
const SLOW_SESSION_MS: f64 = 2000.0;
/// Nix older than this is warned about: it lacks AddToStoreNar (serve protocol 2.5).
const OLDEST_QUIET_NIX: (u32, u32) = (2, 3);

/// Examines machine `m` of `fleet` (the local machine at [`LOCAL`]).
pub async fn examine(
    fleet: &[MachineConfig],
    m: usize,
    signer: Option<&PathSigner>,
) -> MachineReport {
    let machine = &fleet[m];
    let mut report = MachineReport {
        machine: machine.spec.name.clone(),
        findings: Vec::new(),
    };
    let route = match &machine.endpoint.route {
        Route::LocalProcess => "a local process, no ssh".to_string(),
        Route::Ssh {
            host,
            host_public_key,
            ..
        } => format!(
            "ssh to {host}, host key {}",
            if host_public_key.is_some() {
                "from the machines file"
            } else {
                "from known_hosts"
            }
        ),
    };
    let opened = Instant::now();
    let mut conn = match ServeConn::open(&machine.endpoint).await {
        Ok(conn) => conn,
        Err(e) => {
            report.problem("session", Severity::Broken, &e);
            return report;
        }
    };
    let open_ms = opened.elapsed().as_secs_f64() * 1e3;
    let asked = Instant::now();
    let round_trip = conn.query_valid_paths(&[], false, false).await;
    let rtt_ms = asked.elapsed().as_secs_f64() * 1e3;
    if let Err(e) = round_trip {
        report.problem("session", Severity::Broken, &e);
        return report;
    }
    report.add(
        "session",
        if open_ms > SLOW_SESSION_MS {
            Severity::Warning
        } else {
            Severity::Ok
        },
        format!(
            "{route}; {} opened in {open_ms:.0} ms, round trip {rtt_ms:.1} ms",
            conn.protocol_version()
        ),
    );
    nix_version(machine, &mut report);
    if m != LOCAL {
        match trust::import_probe(&mut conn, None).await {
            Ok(()) => report.add(
                "imports",
                Severity::Ok,
                "its store takes what offload sends",
            ),
            Err(e) => report.problem("imports", Severity::Broken, &e),
        }
    }
    local_takes_outputs(fleet, m, signer, &mut report).await;
    for system in &machine.spec.systems {
        builds(machine, system, &mut report).await;
    }
    report
}

/// The remote Nix version, from the serve program itself.
fn nix_version(machine: &MachineConfig, report: &mut MachineReport) {
    let command = format!("{} --version", machine.endpoint.remote_program);
    let output = tokio::task::block_in_place(|| {
        machine
            .endpoint
            .command(&command)
            .map_err(|e| e.to_string())
            .and_then(|(mut cmd, _guard)| process::run(&mut cmd).map_err(|e| e.to_string()))
    });
    match output {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let version = text.rsplit(' ').next().unwrap_or("");
            let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            if (major, minor) < OLDEST_QUIET_NIX {
                report.findings.push(Finding {
                    check: "nix".into(),
                    severity: Severity::Warning,
                    detail: format!("{text}: older than Nix 2.3, copies use ImportPaths"),
                    fix: Some("upgrade Nix on that machine".into()),
                });
            } else {
                report.add("nix", Severity::Ok, text);
            }
        }
        Err(e) => report.add(
            "nix",
            Severity::Warning,
            format!("cannot ask its version: {e}"),
        ),
    }
}

/// Whether outputs built on machine `m` can enter the local store.
async fn local_takes_outputs(
    fleet: &[MachineConfig],
    m: usize,
    signer: Option<&PathSigner>,
    report: &mut MachineReport,
) {
    let pair: Vec<MachineConfig> = [LOCAL, m]
        .iter()
        .map(|&i| MachineConfig {
            endpoint: fleet[i].endpoint.clone(),
            spec: fleet[i].spec.clone(),
            cores: fleet[i].cores,
        })
        .collect();
    match trust::check(&pair, signer.cloned()).await {
        Err(e) => report.problem("outputs", Severity::Broken, &e),
        Ok(check) if m == LOCAL => report.add(
            "outputs",
            Severity::Ok,
            if check.local.trusted {
                "this store trusts you: builds of any derivation and unsigned imports"
            } else {
                "the nix-daemon does not trust you: local builds by .drv path, imports only \
                 with a signature it trusts"
            },
        ),
        Ok(check) => match check.refused.into_iter().next() {
            None => report.add(
                "outputs",
                Severity::Ok,
                "the local store takes what it builds",
            ),
            Some((_, why)) => report.findings.push(Finding {
                check: "outputs".into(),
                severity: Severity::Broken,
                detail: why,
                fix: None,
            }),
        },
    }
}

/// Builds a tiny derivation for `system` on the machine and times it.
async fn builds(machine: &MachineConfig, system: &str, report: &mut MachineReport) {
    let check = format!("system {system}");
    let probe = trust::probe_derivation(system);
    let (drv_path, drv) = match probe {
        Ok(p) => p,
        Err(e) => return report.problem(check, Severity::Broken, &e),
    };
    let started = Instant::now();
    let built = async {
        let mut conn = ServeConn::open(&machine.endpoint).await?;
        conn.build_derivation(&drv_path, &drv, &BuildSettings::default())
            .await
    };
    match built.await {
        Ok(r) if r.status.is_success() => report.add(
            check,
            Severity::Ok,
            format!(
                "built a probe derivation in {:.2} s",
                started.elapsed().as_secs_f64()
            ),
        ),
        Ok(r) => report.findings.push(Finding {
            check,
            severity: Severity::Broken,
            detail: format!("a probe derivation failed: {}", r.error_msg.trim()),
            fix: Some(format!(
                "make the machine build {system} (for an emulated system, binfmt and \
                 `extra-platforms`), or remove it from the machine's systems"
            )),
        }),
        Err(e) if e.to_string().contains("not privileged") => report.add(
            check,
            Severity::Ok,
            "not probed: the nix-daemon builds only derivations it holds for you",
        ),
        Err(e) => report.problem(check, Severity::Broken, &e),
    }
}
