//! Replacing the replicas of a node that stays down (Longhorn's replica
//! replenishment, LINSTOR's auto-evict, Ceph marking an OSD out): once a
//! node has been down for `serve --replace-after`, each volume with a
//! replica there gets one on another node, and when that one is in sync
//! the dead node's is removed. Redundancy comes back without an operator.
//!
//! The decision is a plain function over what etcd says, so that every
//! node's sweep reaches the same one: a volume's replacement is run by
//! its attached node, or, attached nowhere, by the first in-sync replica's
//! live node (as [`super::Behind::runner`]). The volume's record keeps
//! which replica replaces which (`VolumeRecord::replacing`), so a step
//! interrupted by a crash is finished, not repeated.

use crate::replication::ReplicaState;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// When this node first saw each member down (and not up since). Kept in
/// memory: a restarted node waits the whole time again, which only
/// delays a replacement.
#[derive(Debug, Default)]
pub struct DownClock {
    since: BTreeMap<String, Instant>,
}

impl DownClock {
    /// Note the members down now (`known` minus `up`) and forget those up.
    pub fn observe<'a>(
        &mut self,
        known: impl IntoIterator<Item = &'a str>,
        up: &BTreeSet<String>,
        now: Instant,
    ) {
        let down: BTreeSet<&str> = known.into_iter().filter(|n| !up.contains(*n)).collect();
        self.since.retain(|n, _| down.contains(n.as_str()));
        for n in down {
            self.since.entry(n.to_string()).or_insert(now);
        }
    }

    /// The nodes seen down for at least `after`, continuously.
    pub fn down_for(&self, after: Duration, now: Instant) -> BTreeSet<String> {
        self.since
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= after)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// A volume as the sweep reads it from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeReplicas {
    pub name: String,
    pub id: String,
    /// Its replicas' nodes, in the record's order.
    pub replicas: Vec<String>,
    /// Replacements under way: the replaced node → the replacing one.
    pub replacing: BTreeMap<String, String>,
    /// Stored states by node; a node without one counts as not in sync.
    pub states: BTreeMap<String, ReplicaState>,
    /// The node holding an attach (not a background resync), if any.
    pub attached_on: Option<String>,
}

/// Every volume's replicas and the members, as one etcd revision shows them.
#[derive(Debug, Clone, Default)]
pub struct ReplicaMap {
    pub volumes: Vec<VolumeReplicas>,
    /// Every node that ever joined (and was not forgotten).
    pub known: BTreeSet<String>,
    /// The live members.
    pub up: BTreeSet<String>,
    /// Members cordoned by hand (`node cordon`, `node evacuate`): their
    /// replicas are the operator's to move, not replaced.
    pub cordoned: BTreeSet<String>,
}

/// What the sweep does next about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Add a replica where placement puts it, replacing `replaces`'s.
    Add { replaces: String },
    /// The replacement of `node`'s replica is in sync: remove `node`'s.
    Drop { node: String },
}

impl VolumeReplicas {
    fn in_sync(&self, node: &str) -> bool {
        self.states.get(node) == Some(&ReplicaState::InSync)
    }

    /// Whether `me` runs this volume's replacements: its attached node, or
    /// attached nowhere, the first in-sync replica's live node.
    pub fn runs_here(&self, me: &str, up: &BTreeSet<String>) -> bool {
        match &self.attached_on {
            Some(node) => node == me,
            None => self
                .replicas
                .iter()
                .find(|n| self.in_sync(n) && up.contains(*n))
                .is_some_and(|n| n == me),
        }
    }

    /// The next step, one at a time: finish a replacement under way (drop
    /// the replaced replica once its replacement is in sync on a live
    /// node; until then nothing else), else start one for the first
    /// replica on a node in `gone` (down for longer than allowed), if
    /// another replica in sync on a live node can feed the new one.
    pub fn next_step(&self, up: &BTreeSet<String>, gone: &BTreeSet<String>) -> Option<Step> {
        let mut pending = false;
        for (old, new) in &self.replacing {
            if !self.replicas.contains(new) || !self.replicas.contains(old) {
                continue; // finished, or undone by hand
            }
            if self.in_sync(new) && up.contains(new) {
                return Some(Step::Drop { node: old.clone() });
            }
            pending = true;
        }
        if pending {
            return None;
        }
        let dead = self.replicas.iter().find(|n| gone.contains(*n))?;
        let fed = self
            .replicas
            .iter()
            .any(|n| n != dead && self.in_sync(n) && up.contains(n));
        fed.then(|| Step::Add {
            replaces: dead.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicaState::{InSync, Outdated};

    fn set(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    fn volume(states: &[(&str, ReplicaState)], attached_on: Option<&str>) -> VolumeReplicas {
        VolumeReplicas {
            name: "v".into(),
            id: "id".into(),
            replicas: states.iter().map(|(n, _)| n.to_string()).collect(),
            replacing: BTreeMap::new(),
            states: states.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            attached_on: attached_on.map(str::to_string),
        }
    }

    #[test]
    fn the_clock_counts_only_an_unbroken_time_down() {
        let t0 = Instant::now();
        let mut clock = DownClock::default();
        let known = ["n1", "n2", "n3"];
        clock.observe(known, &set(&["n1", "n3"]), t0);
        let ten = Duration::from_secs(10);
        assert!(clock.down_for(ten, t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(clock.down_for(ten, t0 + ten), set(&["n2"]));
        // Back up for one sweep: the count starts over.
        clock.observe(known, &set(&["n1", "n2", "n3"]), t0 + ten);
        clock.observe(known, &set(&["n1", "n3"]), t0 + Duration::from_secs(15));
        assert!(clock.down_for(ten, t0 + Duration::from_secs(20)).is_empty());
        assert_eq!(
            clock.down_for(ten, t0 + Duration::from_secs(25)),
            set(&["n2"])
        );
        // A node forgotten (`node rm`) is no longer counted.
        clock.observe(
            ["n1", "n3"],
            &set(&["n1", "n3"]),
            t0 + Duration::from_secs(30),
        );
        assert!(clock.down_for(ten, t0 + Duration::from_secs(40)).is_empty());
    }

    #[test]
    fn the_attached_node_or_the_first_live_in_sync_one_runs_it() {
        let up = set(&["n1", "n3"]);
        let v = volume(&[("n2", InSync), ("n3", InSync), ("n1", Outdated)], None);
        assert!(v.runs_here("n3", &up), "n2 is down, n1 not in sync");
        assert!(!v.runs_here("n1", &up) && !v.runs_here("n2", &up));
        let v = volume(&[("n2", InSync), ("n3", InSync)], Some("n1"));
        assert!(v.runs_here("n1", &up), "a diskless attach too");
        assert!(!v.runs_here("n3", &up));
    }

    #[test]
    fn a_replica_gone_too_long_is_replaced_then_dropped_once_its_replacement_is_in_sync() {
        let up = set(&["n1", "n3"]);
        let gone = set(&["n2"]);
        let mut v = volume(&[("n1", InSync), ("n2", InSync)], Some("n1"));
        assert_eq!(
            v.next_step(&up, &BTreeSet::new()),
            None,
            "not gone long enough"
        );
        assert_eq!(
            v.next_step(&up, &gone),
            Some(Step::Add {
                replaces: "n2".into()
            })
        );
        // Added: resyncing. Nothing more until it is in sync, not even
        // another replacement (a crash here must not add a second one).
        v.replicas.push("n3".into());
        v.states.insert("n3".into(), Outdated);
        v.replacing.insert("n2".into(), "n3".into());
        assert_eq!(v.next_step(&up, &gone), None);
        v.states.insert("n3".into(), InSync);
        assert_eq!(
            v.next_step(&up, &gone),
            Some(Step::Drop { node: "n2".into() })
        );
        // Decided: it is finished even if n2 came back meanwhile.
        assert_eq!(
            v.next_step(&set(&["n1", "n2", "n3"]), &BTreeSet::new()),
            Some(Step::Drop { node: "n2".into() })
        );
        v.replicas.retain(|n| n != "n2");
        v.replacing.clear();
        assert_eq!(v.next_step(&up, &gone), None, "done");
    }

    #[test]
    fn nothing_is_replaced_without_a_live_in_sync_replica_to_copy_from() {
        let up = set(&["n1", "n3"]);
        let gone = set(&["n2"]);
        // n1 is behind: n2 (gone) may hold writes n1 lacks.
        let v = volume(&[("n1", Outdated), ("n2", InSync)], Some("n1"));
        assert_eq!(v.next_step(&up, &gone), None);
        // A replacement whose new replica was removed by hand is over.
        let mut v = volume(&[("n1", InSync), ("n2", Outdated)], None);
        v.replacing.insert("n2".into(), "n3".into());
        assert_eq!(
            v.next_step(&up, &gone),
            Some(Step::Add {
                replaces: "n2".into()
            })
        );
    }
}
