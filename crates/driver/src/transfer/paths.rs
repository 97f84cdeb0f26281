//! Which machine holds which store path, and each path's metadata: what the driver
//! consults to ship a machine only the inputs it lacks, from the cheapest holder.
//!
//! One store path can hold different bytes on different machines: a derivation that
//! is not reproducible, built by this run on one machine and by another client into
//! another store at the same time. So a path's info (NAR hash and size, references) is
//! kept per holder where it differs, and a holder known only from a validity answer
//! (the path was there already) is unverified: its info is asked of it before anything
//! is sent from it ([`PathRegistry::unverified_on`]).

use std::collections::{HashMap, HashSet};

use offload_nix::serve::PathInfo;
use offload_sched::MachineId;

/// Known store paths: their infos (references, NAR size and hash) and holders.
#[derive(Debug, Default)]
pub struct PathRegistry {
    /// The info of each path as first learned.
    infos: HashMap<String, PathInfo>,
    holders: HashMap<String, HashSet<MachineId>>,
    /// Holders whose copy differs from `infos`: their own info.
    variants: HashMap<(String, MachineId), PathInfo>,
    /// Holders known only from a validity answer, whose info is not known.
    unverified: HashSet<(String, MachineId)>,
}

impl PathRegistry {
    /// Records `info`, valid on `machine` as that machine described it.
    pub fn insert(&mut self, info: PathInfo, machine: MachineId) {
        let key = (info.path.clone(), machine);
        self.unverified.remove(&key);
        self.holders
            .entry(info.path.clone())
            .or_default()
            .insert(machine);
        match self.infos.get(&info.path) {
            Some(known) if known.nar_hash != info.nar_hash => {
                self.variants.insert(key, info);
            }
            Some(_) => {
                self.variants.remove(&key);
            }
            None => {
                self.infos.insert(info.path.clone(), info);
            }
        }
    }

    /// Records that `path` (already known) landed on `machine` as `info` says (the
    /// info it was sent under).
    pub fn add_holder_as(&mut self, info: &PathInfo, machine: MachineId) {
        self.insert(info.clone(), machine);
    }

    /// Records that `path` is valid on `machine`, as a validity answer says: what it
    /// holds there is not known until asked, unless it was known already.
    pub fn add_found_holder(&mut self, path: &str, machine: MachineId) {
        let newly = self
            .holders
            .entry(path.to_string())
            .or_default()
            .insert(machine);
        if newly {
            self.unverified.insert((path.to_string(), machine));
        }
    }

    /// Records that `path` landed on `machine` by a copy from `from` that took its
    /// info from the source itself (`nix copy`): it holds what `from` holds.
    pub fn add_holder_like(&mut self, path: &str, machine: MachineId, from: MachineId) {
        self.holders
            .entry(path.to_string())
            .or_default()
            .insert(machine);
        let key = (path.to_string(), machine);
        self.variants.remove(&key);
        self.unverified.remove(&key);
        let source = (path.to_string(), from);
        if let Some(v) = self.variants.get(&source).cloned() {
            self.variants.insert(key.clone(), v);
        }
        if self.unverified.contains(&source) {
            self.unverified.insert(key);
        }
    }

    /// Records that `path` is no longer valid on `machine` (its garbage collector took it).
    pub fn remove_holder(&mut self, path: &str, machine: MachineId) {
        if let Some(h) = self.holders.get_mut(path) {
            h.remove(&machine);
        }
        let key = (path.to_string(), machine);
        self.variants.remove(&key);
        self.unverified.remove(&key);
    }

    /// Forgets everything a lost machine held.
    pub fn remove_machine(&mut self, machine: MachineId) {
        for h in self.holders.values_mut() {
            h.remove(&machine);
        }
        self.variants.retain(|(_, m), _| *m != machine);
        self.unverified.retain(|(_, m)| *m != machine);
    }

    /// Whether what `machine` holds at `path` is known only from a validity answer.
    pub fn unverified_on(&self, path: &str, machine: MachineId) -> bool {
        self.unverified.contains(&(path.to_string(), machine))
    }

    /// The info of `path` as `machine` holds it (as first learned, unless it holds a
    /// copy that differs).
    pub fn info_on(&self, path: &str, machine: MachineId) -> Option<&PathInfo> {
        self.variants
            .get(&(path.to_string(), machine))
            .or_else(|| self.infos.get(path))
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

    #[test]
    fn a_path_held_with_other_bytes_keeps_each_holders_info() {
        let with_hash = |hash: &str| PathInfo {
            nar_hash: hash.into(),
            ..info("/n", &[])
        };
        let mut r = PathRegistry::default();
        r.insert(with_hash("sha256:built-here"), 1);
        // Found valid on machine 0: what it holds there is not known yet.
        r.add_found_holder("/n", 0);
        assert!(r.unverified_on("/n", 0) && !r.unverified_on("/n", 1));
        // Asked: another build's bytes.
        r.insert(with_hash("sha256:built-elsewhere"), 0);
        assert!(!r.unverified_on("/n", 0));
        assert_eq!(
            r.info_on("/n", 0).unwrap().nar_hash,
            "sha256:built-elsewhere"
        );
        assert_eq!(r.info_on("/n", 1).unwrap().nar_hash, "sha256:built-here");
        // Copied on from 0 by a copy that took 0's info: 2 holds 0's bytes.
        r.add_holder_like("/n", 2, 0);
        assert_eq!(
            r.info_on("/n", 2).unwrap().nar_hash,
            "sha256:built-elsewhere"
        );
        // A holder found again keeps what is known of it.
        r.add_found_holder("/n", 1);
        assert!(!r.unverified_on("/n", 1));
        r.remove_machine(0);
        assert_eq!(r.info_on("/n", 0).unwrap().nar_hash, "sha256:built-here");
    }
}
