//! `offload build --check`: a derivation built again on a machine given the outputs
//! valid here, which Nix's own `nix-store --realise --check` compares the new build with.

use offload_sched::{MachineId, Outcome};

use super::{lost, ServeTransport};
use crate::build::log::BuildLog;
use crate::build::BuildNode;
use crate::error::DriverError;
use crate::fleet::LOCAL;
use crate::process;
use crate::ssh::{shell_quote, Endpoint};

impl ServeTransport {
    /// `--check` for one derivation on `machine`: ships it the `.drv` closure, the
    /// inputs and the outputs valid here (Nix compares the new build with those), then
    /// runs `nix-store --realise --check` there by the session's route. A difference
    /// fails with Nix's own "may not be deterministic"; outputs valid nowhere get Nix's
    /// "checking is not possible".
    pub(super) async fn check_on(
        &self,
        node: usize,
        machine: MachineId,
        log: &mut BuildLog<'_>,
    ) -> (Outcome, bool) {
        let n = &self.nodes[node];
        let outputs: Vec<String> = n.outputs.iter().map(|(_, p)| p.clone()).collect();
        let mut wanted = match self.learn_local_closure(&n.drv_path, &outputs).await {
            Ok(paths) => paths,
            Err(e) => return (lost(e), false),
        };
        wanted.extend(n.inputs.iter().cloned());
        if let Err(e) = self.engine.ensure_on(machine, &wanted, None, false).await {
            return (lost(e), false);
        }
        let endpoint = self.pool(machine).endpoint().clone();
        let (mut cmd, known_hosts) = match endpoint.command(&self.check_command(&endpoint, n)) {
            Ok(c) => c,
            Err(e) => return (lost(e), true),
        };
        let checked = tokio::task::spawn_blocking(move || {
            let _known_hosts = known_hosts;
            process::run(&mut cmd)
        })
        .await;
        let output = match checked {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => {
                let mut reason = e.to_string();
                for line in reason.lines().skip(1) {
                    log.push(line.to_string());
                }
                reason.push_str(&log.kept_note());
                return (Outcome::Failed { reason }, false);
            }
            Err(e) => {
                let reason = format!("the check of {} did not finish: {e}", n.drv_path);
                return (Outcome::Failed { reason }, false);
            }
        };
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            log.push(line.to_string());
        }
        let infos = async {
            let mut conn = self.pool(machine).get().await?;
            let infos = conn.query_path_infos(&outputs).await?;
            self.pool(machine).put(conn);
            Ok::<_, DriverError>(infos)
        };
        match infos.await {
            Ok(infos) => {
                let mut registry = self.engine.registry();
                for info in infos {
                    registry.insert(info, machine);
                }
                (Outcome::Built, false)
            }
            Err(e) => (lost(e), true),
        }
    }

    /// Learns the local infos of the closure of `drv_path` and of those `outputs` valid
    /// here; returns the roots it learned (the `.drv` and the valid outputs).
    async fn learn_local_closure(
        &self,
        drv_path: &str,
        outputs: &[String],
    ) -> Result<Vec<String>, DriverError> {
        let mut conn = self.pool(LOCAL).get().await?;
        let mut roots = conn.query_valid_paths(outputs, false, false).await?;
        self.pool(LOCAL).put(conn);
        roots.push(drv_path.to_string());
        self.learn_local_closure_of(&roots).await?;
        Ok(roots)
    }

    /// The shell command that checks `node` on the machine behind `endpoint`, with the
    /// run's build settings as `nix-store` flags.
    fn check_command(&self, endpoint: &Endpoint, node: &BuildNode) -> String {
        let mut words = vec![endpoint.remote_program.clone()];
        if let Some(store) = &endpoint.remote_store {
            words.extend(["--store".into(), store.clone()]);
        }
        words.extend(endpoint.extra_args.iter().cloned());
        let s = &self.settings;
        words.extend([
            "--max-silent-time".into(),
            s.max_silent_time.to_string(),
            "--timeout".into(),
            s.build_timeout.to_string(),
            "--option".into(),
            "max-build-log-size".into(),
            s.max_log_size.to_string(),
        ]);
        if s.keep_failed {
            words.push("--keep-failed".into());
        }
        words.extend(["--realise".into(), "--check".into(), node.drv_path.clone()]);
        words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
