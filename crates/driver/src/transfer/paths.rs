//! Which machine holds which store path, and each path's metadata: what the driver
//! consults to ship a machine only the inputs it lacks, from the cheapest holder.

use std::collections::{HashMap, HashSet};

use offload_nix::serve::PathInfo;
use offload_sched::MachineId;

/// Known store paths: their infos (references, NAR size and hash) and holders.
#[derive(Debug, Default)]
pub struct PathRegistry {
    infos: HashMap<String, PathInfo>,
    holders: HashMap<String, HashSet<MachineId>>,
}

impl PathRegistry {
    /// Records `info`, valid on `machine`.
    pub fn insert(&mut self, info: PathInfo, machine: MachineId) {
        self.holders
            .entry(info.path.clone())
            .or_default()
            .insert(machine);
        self.infos.insert(info.path.clone(), info);
    }

    /// Records that `path` (already known) is valid on `machine` too.
    pub fn add_holder(&mut self, path: &str, machine: MachineId) {
        self.holders
            .entry(path.to_string())
            .or_default()
            .insert(machine);
    }

    /// Records that `path` is no longer valid on `machine` (its garbage collector took it).
    pub fn remove_holder(&mut self, path: &str, machine: MachineId) {
        if let Some(h) = self.holders.get_mut(path) {
            h.remove(&machine);
        }
    }

    /// Forgets everything a lost machine held.
    pub fn remove_machine(&mut self, machine: MachineId) {
        for h in self.holders.values_mut() {
            h.remove(&machine);
        }
    }

    /// Some path it knows (for the store directory they live in).
    pub fn any_path(&self) -> Option<&str> {
        self.infos.keys().next().map(String::as_str)
    }

    pub fn info(&self, path: &str) -> Option<&PathInfo> {
        self.infos.get(path)
    }

    pub fn holders(&self, path: &str) -> impl Iterator<Item = MachineId> + '_ {
        self.holders.get(path).into_iter().flatten().copied()
    }

    pub fn is_on(&self, path: &str, machine: MachineId) -> bool {
        self.holders.get(path).is_some_and(|h| h.contains(&machine))
    }

    /// The closure of `roots` through known references, dependencies first. Paths
    /// without a known info are returned too (the caller must learn them first).
    pub fn closure(&self, roots: &[String]) -> Vec<String> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        // Iterative post-order DFS: references before referrers.
        let mut stack: Vec<(String, bool)> =
            roots.iter().rev().map(|r| (r.clone(), false)).collect();
        while let Some((path, expanded)) = stack.pop() {
            if expanded {
                order.push(path);
                continue;
            }
            if !seen.insert(path.clone()) {
                continue;
            }
            stack.push((path.clone(), true));
            if let Some(info) = self.infos.get(&path) {
                for r in info.references.iter().rev() {
                    if *r != path && !seen.contains(r) {
                        stack.push((r.clone(), false));
                    }
                }
            }
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: path.into(),
            references: refs.iter().map(|r| r.to_string()).collect(),
            nar_size: 1,
            ..PathInfo::default()
        }
    }

    #[test]
    fn closure_lists_references_first() {
        let mut r = PathRegistry::default();
        r.insert(info("/a", &["/b", "/c", "/a"]), 0);
        r.insert(info("/b", &["/c"]), 0);
        r.insert(info("/c", &[]), 1);
        assert_eq!(r.closure(&["/a".into()]), ["/c", "/b", "/a"]);
        assert!(r.is_on("/c", 1) && !r.is_on("/c", 0));
        r.remove_machine(1);
        assert_eq!(r.holders("/c").count(), 0);
    }
}
