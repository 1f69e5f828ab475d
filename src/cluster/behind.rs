//! Volumes attached nowhere whose replicas fell behind, and which node
//! resyncs each: every node's sweep reads the same etcd state and makes the
//! same choice, so one of them starts the job (the attach, taken as a
//! resync, settles any race).

use crate::replication::ReplicaState;
use std::collections::{BTreeMap, BTreeSet};

/// A volume nobody holds (no attach, no resync) with a replica not in sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    pub name: String,
    pub id: String,
    /// Its replicas' nodes, in the record's order.
    pub replicas: Vec<String>,
    /// Stored states by node; a node without one counts as behind.
    pub states: BTreeMap<String, ReplicaState>,
}

impl Behind {
    fn in_sync(&self, node: &str) -> bool {
        self.states.get(node) == Some(&ReplicaState::InSync)
    }

    /// Whether some replica is not in sync.
    pub fn is_behind(&self) -> bool {
        self.replicas.iter().any(|n| !self.in_sync(n))
    }

    /// The node that should resync it now: the first in-sync replica's
    /// that is up, in the record's order. None while no replica behind is
    /// on a live node (a job could only wait for it: the node's return
    /// starts one), or no replica on a live node is in sync (nothing holds
    /// the current data for sure: the next attach sorts it out). A replica
    /// whose node is down does not stop the others' resync.
    pub fn runner<'a>(&'a self, up: &BTreeSet<String>) -> Option<&'a str> {
        let live_behind = self
            .replicas
            .iter()
            .any(|n| !self.in_sync(n) && up.contains(n));
        if !live_behind {
            return None;
        }
        self.replicas
            .iter()
            .find(|n| self.in_sync(n) && up.contains(*n))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicaState::{InSync, Outdated};

    fn behind(states: &[(&str, ReplicaState)]) -> Behind {
        Behind {
            name: "v".into(),
            id: "id".into(),
            replicas: states.iter().map(|(n, _)| n.to_string()).collect(),
            states: states.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
        }
    }

    fn up(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_first_in_sync_replica_resyncs_the_others() {
        let b = behind(&[("n3", Outdated), ("n2", InSync), ("n1", InSync)]);
        assert_eq!(b.runner(&up(&["n1", "n2", "n3"])), Some("n2"));
    }

    #[test]
    fn nothing_runs_while_all_are_in_sync() {
        let b = behind(&[("n1", InSync), ("n2", InSync)]);
        assert!(!b.is_behind());
        assert_eq!(b.runner(&up(&["n1", "n2"])), None);
    }

    #[test]
    fn nothing_runs_while_only_a_down_node_is_behind() {
        let b = behind(&[("n1", InSync), ("n2", Outdated), ("n3", InSync)]);
        assert_eq!(b.runner(&up(&["n1", "n3"])), None, "n2 is down");
    }

    #[test]
    fn a_down_node_does_not_stop_the_others_resync() {
        // n3 (down) holds the data too; n2 catches up from n1 meanwhile.
        let b = behind(&[("n1", InSync), ("n2", Outdated), ("n3", InSync)]);
        assert_eq!(b.runner(&up(&["n1", "n2"])), Some("n1"));
        // The first in-sync replica's node is down: the next one runs it.
        let b = behind(&[("n3", InSync), ("n2", Outdated), ("n1", InSync)]);
        assert_eq!(b.runner(&up(&["n1", "n2"])), Some("n1"));
    }

    #[test]
    fn nothing_runs_without_an_in_sync_replica() {
        let b = behind(&[("n1", Outdated), ("n2", Outdated)]);
        assert_eq!(b.runner(&up(&["n1", "n2"])), None);
    }

    #[test]
    fn a_replica_without_a_stored_state_is_behind() {
        let mut b = behind(&[("n1", InSync), ("n2", InSync)]);
        b.states.remove("n2");
        assert!(b.is_behind());
        assert_eq!(b.runner(&up(&["n1", "n2"])), Some("n1"));
    }
}
