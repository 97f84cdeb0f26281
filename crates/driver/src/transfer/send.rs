//! Sending: NARs stream from the source's DumpStorePath into the target's
//! AddToStoreNar, timed per path for learning the link, and the paths that landed are
//! recorded.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use offload_sched::MachineId;

use super::{TransferEngine, TransferRecord};
use crate::error::DriverError;
use crate::reporter::ByteRoute;
use crate::session::{ChainProgress, Traffic};

impl TransferEngine {
    /// Sends `infos` (in order; their references are on `machine` or earlier in the
    /// list) from `source` to `machine` on one pair of pooled sessions, and records
    /// each path as it lands.
    pub(super) async fn send_in_order(
        self: &Arc<Self>,
        machine: MachineId,
        source: MachineId,
        mut infos: Vec<offload_nix::serve::PathInfo>,
    ) -> Result<(), DriverError> {
        let _lane = self.lanes[machine]
            .acquire()
            .await
            .map_err(|_| DriverError::NotValid {
                machine: self.pools[machine].endpoint().name.clone(),
                path: infos.first().map(|i| i.path.clone()).unwrap_or_default(),
            })?;
        let mut from = self.pools[source].get_for(Traffic::FromMachine).await?;
        // What the source holds goes under its own info: the same path may hold other
        // bytes there than where it was first learned (a build that is not reproducible,
        // made there by someone else).
        if let Err(e) = self.as_held_on(source, &mut from, &mut infos).await {
            self.pools[source].put(from);
            return Err(e);
        }
        if Some(machine) == self.client {
            if let Some(signer) = &self.signer {
                // The builder's own signatures stay; this one is for a daemon that
                // trusts the user's key rather than the user.
                for info in &mut infos {
                    signer.sign(info);
                }
            }
        }
        let mut to = match self.pools[machine].get_for(Traffic::ToMachine).await {
            Ok(to) => to,
            Err(e) => {
                self.pools[source].put(from);
                return Err(e);
            }
        };
        let (links, from_name, to_name, route) = {
            let specs = self.specs();
            let route = match (specs[source].is_local, specs[machine].is_local) {
                (true, _) => ByteRoute::ClientToMachine,
                (_, true) => ByteRoute::MachineToClient,
                _ => ByteRoute::Relayed,
            };
            let links: Vec<MachineId> = [source, machine]
                .into_iter()
                .filter(|&m| !specs[m].is_local)
                .collect();
            (
                links,
                specs[source].name.clone(),
                specs[machine].name.clone(),
                route,
            )
        };
        let (from_name, to_name) = (&from_name, &to_name);
        let concurrent = links
            .iter()
            .map(|&l| self.on_link[l].fetch_add(1, Ordering::Relaxed) + 1)
            .max()
            .unwrap_or(1);
        let started: Vec<Mutex<Option<Instant>>> = infos.iter().map(|_| Mutex::new(None)).collect();
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let progress = |event: ChainProgress| match event {
            ChainProgress::Sending(i) => {
                let now = Instant::now();
                *Self::lock(&started[i]) = Some(now);
                // A relay goes at its slower link's pace: what it shows bounds each of
                // its links, the faster one too (planned no faster than seen, which
                // only favours the routes that spare this machine's links).
                let mut crossing = Self::lock(&self.crossing);
                for &l in &links {
                    crossing[l].insert((call, i), (now, infos[i].nar_size));
                }
                if let Some(r) = &self.reporter {
                    r.transfer_started(&infos[i].path, from_name, to_name, infos[i].nar_size);
                }
            }
            ChainProgress::Registered(i) => {
                let mut crossing = Self::lock(&self.crossing);
                for &l in &links {
                    crossing[l].remove(&(call, i));
                }
                drop(crossing);
                let seconds = Self::lock(&started[i]).map_or(0.0, |t| t.elapsed().as_secs_f64());
                self.landed(&infos[i], source, machine, seconds, concurrent);
                let crossed = infos[i].nar_size * links.len() as u64;
                self.client_bytes.fetch_add(crossed, Ordering::Relaxed);
                if let Some(r) = &self.reporter {
                    r.bytes_moved(route, from_name, to_name, infos[i].nar_size);
                }
            }
        };
        let result = to
            .add_to_store_nars_from(&infos, &mut from, &progress)
            .await;
        for &l in &links {
            self.on_link[l].fetch_sub(1, Ordering::Relaxed);
            Self::lock(&self.crossing)[l].retain(|&(c, _), _| c != call);
        }
        self.pools[source].put(from);
        self.pools[machine].put(to);
        if let Err(e) = result {
            // The path that was on its way when the copy broke.
            let registry = self.registry();
            let failed = infos.iter().find(|i| !registry.is_on(&i.path, machine));
            drop(registry);
            let path = failed.map_or("", |i| i.path.as_str());
            if let (Some(r), Some(info)) = (&self.reporter, failed) {
                r.transfer_finished(path, from_name, to_name, info.nar_size, 0.0, false);
            }
            return Err(self.blame(e, source, machine, path));
        }
        Ok(())
    }

    /// Replaces each of `infos` by the info of what `source` holds at that path: asked
    /// of it (on `conn`) where the run knows the path there only from a validity
    /// answer, else as the registry keeps it for that holder.
    async fn as_held_on(
        &self,
        source: MachineId,
        conn: &mut crate::session::ServeConn,
        infos: &mut [offload_nix::serve::PathInfo],
    ) -> Result<(), DriverError> {
        let unverified: Vec<String> = {
            let registry = self.registry();
            infos
                .iter()
                .filter(|i| registry.unverified_on(&i.path, source))
                .map(|i| i.path.clone())
                .collect()
        };
        if !unverified.is_empty() {
            let held = conn.query_path_infos(&unverified).await?;
            let mut registry = self.registry();
            for info in held {
                registry.insert(info, source);
            }
        }
        let registry = self.registry();
        for info in infos.iter_mut() {
            if registry.unverified_on(&info.path, source) {
                // Asked, and not there any more: its garbage collector took it.
                return Err(DriverError::NotValid {
                    machine: self.pools[source].endpoint().name.clone(),
                    path: info.path.clone(),
                });
            }
            if let Some(held) = registry.info_on(&info.path, source) {
                *info = held.clone();
            }
        }
        Ok(())
    }

    /// Records that `info.path` landed on `machine`, copied from `source` in `seconds`.
    fn landed(
        &self,
        info: &offload_nix::serve::PathInfo,
        source: MachineId,
        machine: MachineId,
        seconds: f64,
        concurrent: u32,
    ) {
        let path = &info.path;
        if let Some(r) = &self.reporter {
            let specs = self.specs();
            let (from_name, to_name) = (&specs[source].name, &specs[machine].name);
            r.transfer_finished(path, from_name, to_name, info.nar_size, seconds, true);
        }
        self.registry().add_holder_as(info, machine);
        self.copied.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(info.nar_size, Ordering::Relaxed);
        let mut news = Self::lock(&self.news);
        news.landed.push((path.to_string(), machine));
        // A copy with this machine on one end times the other's link alone; a relay
        // times both of its links at the slower one's pace, a bound for each.
        let timed: Vec<(MachineId, bool)> = match self.client {
            Some(c) if source == c && machine != c => vec![(machine, true)],
            Some(c) if machine == c && source != c => vec![(source, false)],
            Some(_) => vec![(source, false), (machine, true)],
            None => Vec::new(),
        };
        for (other, to_machine) in timed {
            news.transfers.push(TransferRecord {
                machine: other,
                to_machine,
                bytes: info.nar_size,
                seconds,
                concurrent,
            });
        }
    }

    /// A pipe that broke while the source's NAR went to `target` broke on the target's
    /// side: the error names the target, so that it is the one taken out.
    fn blame(
        &self,
        e: DriverError,
        source: MachineId,
        target: MachineId,
        path: &str,
    ) -> DriverError {
        match e {
            DriverError::Io {
                machine,
                source: io,
                ..
            } if machine == self.pools[source].endpoint().name
                && io.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                DriverError::Io {
                    machine: self.pools[target].endpoint().name.clone(),
                    op: "AddToStoreNar",
                    source: std::io::Error::new(
                        io.kind(),
                        format!("the connection broke while {path} was sent to it ({io})"),
                    ),
                }
            }
            e => e,
        }
    }
}
