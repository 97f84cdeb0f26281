//! Machine classes: machines interchangeable for planning, grouped by a [`ClassKey`],
//! and per class a queue of its live machines ordered by their first slot. A decision
//! weighs the head of each class's queue rather than every machine of the fleet.

use std::collections::HashMap;

use crate::events::NodeState;
use crate::fleet::{MachineId, MachineSpec};
use crate::graph::NodeId;
use crate::scheduler::Scheduler;

/// A machine's first slot, ordered: free ones first (their time is minus infinity),
/// then by when the slot frees, then by machine index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotKey {
    pub(crate) time: f64,
    pub(crate) busy: bool,
    pub(crate) machine: MachineId,
}

impl SlotKey {
    pub(crate) fn new(time: f64, free: bool, machine: MachineId) -> Self {
        SlotKey {
            time: if free { f64::NEG_INFINITY } else { time },
            busy: !free,
            machine,
        }
    }
}

impl PartialEq for SlotKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for SlotKey {}

impl PartialOrd for SlotKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SlotKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.busy
            .cmp(&other.busy)
            .then(self.time.total_cmp(&other.time))
            .then(self.machine.cmp(&other.machine))
    }
}

/// What makes machines interchangeable for planning: everything of their spec but the
/// name, and of their pair links the figures. Floats compare by their bits, so equal
/// keys mean identical specs.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ClassKey<'a> {
    systems: &'a [String],
    supported_features: &'a [String],
    mandatory_features: &'a [String],
    slots: u32,
    speed_bits: u64,
    system_speeds: Vec<(&'a str, u64)>,
    is_local: bool,
    bandwidth_bits: u64,
    latency_bits: u64,
    per_build_bits: u64,
    session_setup_bits: u64,
    peers: PeerKey,
}

/// A machine's pair links as classes tell them apart: how many machines it sends to
/// directly and is sent to from, and the distinct figures of those links. Which
/// machines they are is left out (every machine of a full mesh has other peers), so two
/// machines of a class may differ in which holder reaches them directly; the holders of
/// a derivation's inputs are weighed one by one anyway.
#[derive(Debug, Default, PartialEq, Eq, Hash)]
struct PeerKey {
    out: usize,
    into: usize,
    out_links: Vec<(u64, u64)>,
    in_links: Vec<(u64, u64)>,
}

impl PeerKey {
    /// Each machine's key; all empty for a fleet without pair links.
    fn of_fleet(machines: &[MachineSpec]) -> Vec<PeerKey> {
        let mut keys: Vec<PeerKey> = machines.iter().map(|_| PeerKey::default()).collect();
        if machines.iter().all(|m| m.peers.is_empty()) {
            return keys;
        }
        for (from, spec) in machines.iter().enumerate() {
            for &(to, link) in &spec.peers {
                let bits = (link.bandwidth.to_bits(), link.latency.to_bits());
                keys[from].out += 1;
                keys[from].out_links.push(bits);
                if let Some(k) = keys.get_mut(to) {
                    k.into += 1;
                    k.in_links.push(bits);
                }
            }
        }
        for k in &mut keys {
            for links in [&mut k.out_links, &mut k.in_links] {
                links.sort_unstable();
                links.dedup();
            }
        }
        keys
    }
}

impl<'a> ClassKey<'a> {
    fn of(spec: &'a MachineSpec, peers: PeerKey) -> Self {
        // Taken apart in full: a field added to `MachineSpec` must be placed in the key
        // or left out here on purpose, never forgotten.
        let MachineSpec {
            name: _,
            systems,
            supported_features,
            mandatory_features,
            slots,
            speed,
            system_speeds,
            is_local,
            bandwidth,
            latency,
            per_build,
            session_setup,
            peers: _,
        } = spec;
        ClassKey {
            systems,
            supported_features,
            mandatory_features,
            slots: *slots,
            speed_bits: speed.to_bits(),
            system_speeds: system_speeds
                .iter()
                .map(|(s, v)| (s.as_str(), v.to_bits()))
                .collect(),
            is_local: *is_local,
            bandwidth_bits: bandwidth.to_bits(),
            latency_bits: latency.to_bits(),
            per_build_bits: per_build.to_bits(),
            session_setup_bits: session_setup.to_bits(),
            peers,
        }
    }
}

/// Groups machines that are interchangeable for planning (same systems, features,
/// slots, speed and links): a decision weighs one machine per group, plus those that
/// hold inputs. Returns the classes, numbered in the order they first appear in the
/// fleet, and each machine's class.
pub(crate) fn machine_classes(machines: &[MachineSpec]) -> (Vec<Vec<MachineId>>, Vec<usize>) {
    let mut classes: Vec<Vec<MachineId>> = Vec::new();
    let mut class_of = vec![0; machines.len()];
    let mut index: HashMap<ClassKey, usize> = HashMap::new();
    let peers = PeerKey::of_fleet(machines);
    for ((m, spec), peers) in machines.iter().enumerate().zip(peers) {
        let c = *index.entry(ClassKey::of(spec, peers)).or_insert_with(|| {
            classes.push(Vec::new());
            classes.len() - 1
        });
        classes[c].push(m);
        class_of[m] = c;
    }
    (classes, class_of)
}

/// Free slots first; then by when the slot frees.
pub(crate) fn slot_order(a: &(f64, bool), b: &(f64, bool)) -> std::cmp::Ordering {
    b.1.cmp(&a.1).then(a.0.total_cmp(&b.0))
}

impl Scheduler {
    /// Free slots of a live machine.
    pub(crate) fn free_on(&self, m: MachineId) -> usize {
        (self.machines[m].slots as usize)
            .saturating_sub(self.running[m].len() + self.held_elsewhere[m] as usize)
    }

    /// A live machine's first slot: a free one, else the build expected to end first.
    pub(crate) fn first_slot(&self, m: MachineId) -> Option<SlotKey> {
        if !self.alive[m] || self.machines[m].slots == 0 {
            return None;
        }
        if self.free_on(m) > 0 {
            return Some(SlotKey::new(f64::NEG_INFINITY, true, m));
        }
        let end = self.running[m]
            .iter()
            .map(|&n| self.expected_end(n))
            .fold(f64::INFINITY, f64::min);
        Some(SlotKey::new(end, false, m))
    }

    fn expected_end(&self, node: NodeId) -> f64 {
        match self.state[node] {
            NodeState::Running { expected_end, .. } => expected_end,
            _ => f64::NEG_INFINITY,
        }
    }

    /// All slots of a live machine: (when it is expected free, whether it is free now).
    pub(crate) fn slot_list(&self, m: MachineId) -> Vec<(f64, bool)> {
        let mut slots: Vec<(f64, bool)> = self.running[m]
            .iter()
            .map(|&n| (self.expected_end(n), false))
            .collect();
        slots.extend(std::iter::repeat_n(
            (f64::NEG_INFINITY, true),
            self.free_on(m),
        ));
        slots.sort_unstable_by(slot_order);
        slots
    }

    /// Puts `machine`'s current first slot in its class queue in place of the key it
    /// had there.
    pub(crate) fn replace_queue_key(&mut self, machine: MachineId) {
        let class = self.class_of[machine];
        if let Some(old) = self.queued[machine].take() {
            self.queues[class].remove(&old);
        }
        let new = self.first_slot(machine);
        if let Some(new) = new {
            self.queues[class].insert(new);
        }
        self.queued[machine] = new;
        self.head_moved(class);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(name: &str) -> MachineSpec {
        MachineSpec {
            bandwidth: 1e8,
            latency: 0.001,
            ..MachineSpec::new(name, "x86_64-linux", 4, 2.0)
        }
    }

    #[test]
    fn only_identical_specs_share_a_class() {
        let far = MachineSpec {
            latency: 0.002,
            ..builder("far")
        };
        let kvm = MachineSpec {
            supported_features: vec!["kvm".into()],
            ..builder("kvm")
        };
        // The name is not part of the class: a and b are interchangeable.
        let fleet = vec![builder("a"), far, builder("b"), kvm];
        let (classes, class_of) = machine_classes(&fleet);
        assert_eq!(classes, vec![vec![0, 2], vec![1], vec![3]]);
        assert_eq!(class_of, vec![0, 1, 0, 2]);
    }

    #[test]
    fn pair_links_part_classes() {
        let link = crate::Link {
            bandwidth: 1e9,
            latency: 0.0001,
        };
        // A full mesh of four keeps them one class; a pair that cannot reach each
        // other sets its two machines apart.
        let mesh = |missing: Option<(MachineId, MachineId)>| {
            let mut fleet: Vec<MachineSpec> = (0..4).map(|i| builder(&format!("b{i}"))).collect();
            for (from, spec) in fleet.iter_mut().enumerate() {
                for to in (0..4).filter(|&t| t != from && Some((from, t)) != missing) {
                    spec.set_peer_link(to, Some(link));
                }
            }
            machine_classes(&fleet).1
        };
        assert_eq!(mesh(None), vec![0, 0, 0, 0]);
        assert_eq!(mesh(Some((1, 2))), vec![0, 1, 2, 0]);
    }
}
