//! One build on one machine: shipping the inputs it lacks, running BuildDerivation on
//! a pooled session while its log streams, learning its outputs.

use std::sync::Arc;
use std::time::Instant;

use offload_sched::{MachineId, Outcome};
use tokio::sync::mpsc;

use super::{Shared, TaskDone, LOG_TAIL_LINES};
use crate::error::DriverError;
use crate::session::ServeConn;

/// Learns the infos of every input that is no node's output: they are in the local
/// store (evaluation put them there, or Nix fetched them).
pub(super) async fn learn_local_inputs(
    shared: &Shared,
    local: MachineId,
) -> Result<(), DriverError> {
    let outputs: std::collections::HashSet<&str> = shared
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(|(_, p)| p.as_str()))
        .collect();
    let mut roots: Vec<String> = shared
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter())
        .filter(|p| !outputs.contains(p.as_str()))
        .cloned()
        .collect();
    roots.sort();
    roots.dedup();
    if roots.is_empty() {
        return Ok(());
    }
    let mut conn = shared.pools[local].get().await?;
    let closure = conn.query_closure(&roots, false).await?;
    let infos = conn.query_path_infos(&closure).await?;
    shared.pools[local].put(conn);
    let mut registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
    for info in infos {
        registry.insert(info, local);
    }
    Ok(())
}

/// Makes the closure of `paths` valid on `machine`, copying what it lacks from a holder
/// (the local store first). A path built on another builder and needed by more than one
/// build comes to the local store on the way, so that later copies cross one link, not
/// two, and the builder that made it serves it once. `conn`, when given, is a session
/// with `machine` to use.
pub(super) async fn ensure_on(
    shared: &Shared,
    machine: MachineId,
    paths: &[String],
    conn: Option<&mut ServeConn>,
) -> Result<(), DriverError> {
    let _upload = shared.upload_locks[machine].lock().await;
    let closure = shared
        .registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .closure(paths);
    let unknown: Vec<String> = {
        let registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
        closure
            .iter()
            .filter(|p| !registry.is_on(p, machine))
            .cloned()
            .collect()
    };
    if unknown.is_empty() {
        return Ok(());
    }
    let mut own = None;
    let target: &mut ServeConn = match conn {
        Some(c) => c,
        None => own.insert(shared.pools[machine].get().await?),
    };
    // The machine may have some already (an earlier run), or fetch them from its own
    // substituters when allowed.
    let substitute = shared.builders_use_substitutes && machine != shared.local;
    let present = target
        .query_valid_paths(&unknown, false, substitute)
        .await?;
    {
        let mut registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
        for p in &present {
            registry.add_holder(p, machine);
        }
    }
    for path in unknown.iter().filter(|p| !present.contains(p)) {
        let (info, source) = {
            let registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
            let info = registry.info(path).cloned();
            let holders: Vec<MachineId> = registry.holders(path).collect();
            (info, holders.into_iter().min_by_key(|&h| h != shared.local))
        };
        let (Some(info), Some(mut source)) = (info, source) else {
            return Err(DriverError::NotValid {
                machine: "any machine of the fleet".into(),
                path: path.clone(),
            });
        };
        let shared_input = shared.consumers.get(path).is_some_and(|&n| n > 1);
        if source != shared.local && machine != shared.local && shared_input {
            Box::pin(ensure_on(
                shared,
                shared.local,
                std::slice::from_ref(path),
                None,
            ))
            .await?;
            source = shared.local;
        }
        let mut from = shared.pools[source].get().await?;
        let result = target.add_to_store_nar_from(&info, &mut from).await;
        shared.pools[source].put(from);
        result?;
        shared
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_holder(path, machine);
    }
    if let Some(conn) = own {
        shared.pools[machine].put(conn);
    }
    Ok(())
}

pub(super) async fn build_task(
    shared: Arc<Shared>,
    node: usize,
    machine: MachineId,
    cores: Option<u32>,
) -> TaskDone {
    let started = Instant::now();
    let mut log = BuildLog::new(&shared, node, machine);
    let (outcome, machine_down) = build_on(&shared, node, machine, cores, &mut log).await;
    TaskDone {
        node,
        machine,
        outcome,
        log_tail: log.tail.into_iter().collect(),
        seconds: started.elapsed().as_secs_f64(),
        machine_down,
    }
}

fn lost(e: DriverError) -> Outcome {
    Outcome::Lost {
        reason: e.to_string(),
    }
}

/// Ships the inputs, builds, and learns the outputs. Returns the outcome and whether
/// the machine is to be taken out of the run: as for Nix's build hook, a machine whose
/// session breaks (it cannot be reached, or the connection dies mid-operation) gets no
/// more work, and what it was doing runs elsewhere.
async fn build_on(
    shared: &Shared,
    node: usize,
    machine: MachineId,
    cores: Option<u32>,
    log: &mut BuildLog<'_>,
) -> (Outcome, bool) {
    let mut conn = match shared.pools[machine].get_with_cores(cores).await {
        Ok(c) => c,
        Err(e) => return (lost(e), true),
    };
    let n = &shared.nodes[node];
    if let Err(e) = ensure_on(shared, machine, &n.inputs, Some(&mut conn)).await {
        let down = conn.is_broken();
        return (lost(e), down);
    }
    // As Nix's build hook does: the inputs are the whole shipped closure, as sources.
    let mut drv = n.drv.clone();
    drv.input_srcs = shared
        .registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .closure(&n.inputs);
    drv.input_srcs.sort();

    let (tx, mut rx) = mpsc::unbounded_channel();
    conn.set_log_sink(Some(tx));
    let result = {
        let build = conn.build_derivation(&n.drv_path, &drv, &shared.settings);
        tokio::pin!(build);
        loop {
            tokio::select! {
                r = &mut build => break r,
                Some(line) = rx.recv() => log.push(line),
            }
        }
    };
    conn.set_log_sink(None);
    while let Ok(line) = rx.try_recv() {
        log.push(line);
    }
    let result = match result {
        Ok(r) => r,
        Err(e) => return (lost(e), true),
    };
    if !result.status.is_success() {
        shared.pools[machine].put(conn);
        let reason = if result.error_msg.is_empty() {
            format!("build of {} failed: {:?}", n.drv_path, result.status)
        } else {
            result.error_msg
        };
        return (Outcome::Failed { reason }, false);
    }
    let outputs: Vec<String> = n.outputs.iter().map(|(_, p)| p.clone()).collect();
    let infos = match conn.query_path_infos(&outputs).await {
        Ok(infos) => infos,
        Err(e) => return (lost(e), true),
    };
    shared.pools[machine].put(conn);
    if infos.len() < outputs.len() {
        let reason = format!(
            "{} reported success but not all of its outputs are valid there",
            n.drv_path
        );
        return (Outcome::Failed { reason }, false);
    }
    let mut registry = shared.registry.lock().unwrap_or_else(|p| p.into_inner());
    for info in infos {
        registry.insert(info, machine);
    }
    (Outcome::Built, false)
}

/// Where a build's log lines go: the reporter, the file Nix would keep
/// (`drvs/XX/REST` under the log directory, where `nix log` finds it), and the last
/// [`LOG_TAIL_LINES`] lines for an error message.
struct BuildLog<'a> {
    shared: &'a Shared,
    node: usize,
    machine: MachineId,
    file: Option<std::fs::File>,
    tail: std::collections::VecDeque<String>,
}

impl<'a> BuildLog<'a> {
    fn new(shared: &'a Shared, node: usize, machine: MachineId) -> Self {
        let drv_path = &shared.nodes[node].drv_path;
        BuildLog {
            shared,
            node,
            machine,
            file: shared
                .log_dir
                .as_deref()
                .and_then(|dir| open_log(dir, drv_path)),
            tail: std::collections::VecDeque::new(),
        }
    }

    fn push(&mut self, line: String) {
        use std::io::Write as _;
        let drv = &self.shared.nodes[self.node].drv_path;
        self.shared
            .reporter
            .build_log(drv, &self.shared.names[self.machine], &line);
        if let Some(f) = &mut self.file {
            if writeln!(f, "{line}").is_err() {
                self.file = None;
            }
        }
        self.tail.push_back(line);
        if self.tail.len() > LOG_TAIL_LINES {
            self.tail.pop_front();
        }
    }
}

/// Opens the log file for `drv_path`. A log that cannot be written is not worth
/// failing a build over: it is reported and skipped.
fn open_log(dir: &std::path::Path, drv_path: &str) -> Option<std::fs::File> {
    let base = drv_path.rsplit('/').next()?;
    let (head, rest) = (base.get(..2)?, base.get(2..)?);
    let sub = dir.join("drvs").join(head);
    if let Err(e) = std::fs::create_dir_all(&sub) {
        tracing::warn!(
            "cannot keep the build log of {drv_path} in {}: {e}",
            sub.display()
        );
        return None;
    }
    std::fs::File::create(sub.join(rest))
        .map_err(|e| tracing::warn!("cannot keep the build log of {drv_path}: {e}"))
        .ok()
}
