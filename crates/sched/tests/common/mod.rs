//! What the scheduler tests share.

use offload_sched::Action;

/// The (node, machine) of each start among `actions`.
pub fn starts(actions: &[Action]) -> Vec<(usize, usize)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { node, machine } => Some((*node, *machine)),
            _ => None,
        })
        .collect()
}
