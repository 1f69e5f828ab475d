//! Where a new volume's replicas go. Pure: the caller passes the live
//! members and the replicas of every other volume, read from etcd.

use std::collections::{BTreeMap, BTreeSet};

/// What the volume asks for.
pub struct PlacementRequest<'a> {
    /// Copies of the data, each on its own node.
    pub repl: usize,
    /// Nodes the user named (`nodes=`), wanted first, in order.
    pub nodes: &'a [String],
    /// Placement group (`group=`).
    pub group: Option<&'a str>,
    /// Keep this volume's replicas off every node that already holds a
    /// replica of another volume of the group: a hard rule, not a preference.
    pub fg: bool,
    /// Nodes that take no new replica (`dunnage node cordon`).
    pub cordoned: &'a [String],
    /// Nodes whose replicas' filesystem had less free space than the
    /// volume's size when they last reported it: chosen only after the
    /// others (a thin volume may still fit, so not refused).
    pub short_of_space: &'a [String],
    /// Each node's failure domain (`serve --zone`); a node without one is
    /// a zone of its own.
    pub zones: &'a BTreeMap<String, String>,
    /// Nodes holding this volume's replicas already (`replica add`):
    /// their zones count as taken.
    pub beside: &'a [String],
}

/// Choose `req.repl` distinct live nodes. `up` is the live members;
/// `existing` the (group, replica nodes) of every other volume.
///
/// Named nodes come first, in the order given. The rest are chosen one at
/// a time, ranked: nodes without a replica of a same-group volume first,
/// then those in a zone no replica of the volume is in yet (named, chosen
/// or `beside`), then those with room for the whole volume, then the least loaded (fewest replicas of any
/// volume), then by name so that the choice is stable (free space is not
/// compared beyond room or no room: nodes sharing a filesystem, or
/// reporting a few bytes apart, must not reorder). With `fg` a node holding a same-group replica is never chosen.
pub fn place(
    req: &PlacementRequest,
    up: &[String],
    existing: &[(Option<String>, Vec<String>)],
) -> Result<Vec<String>, String> {
    if req.repl == 0 {
        return Err("repl must be at least 1".into());
    }
    let cordoned: BTreeSet<&str> = req.cordoned.iter().map(String::as_str).collect();
    let live: BTreeSet<&str> = up
        .iter()
        .map(String::as_str)
        .filter(|n| !cordoned.contains(n))
        .collect();
    let live_list = || list(live.iter().copied());
    // Said where a count falls short.
    let fenced_off = if cordoned.is_empty() {
        String::new()
    } else {
        format!(
            "; cordoned, taking no new replicas: {}",
            list(cordoned.iter().copied())
        )
    };

    let mut named = BTreeSet::new();
    for n in req.nodes {
        if !named.insert(n.as_str()) {
            return Err(format!(
                "node {n} is named twice in nodes=; name each node once"
            ));
        }
    }
    if req.nodes.len() > req.repl {
        return Err(format!(
            "nodes= names {} nodes ({}) but repl={} makes only {} copies; name at most {} nodes or raise repl",
            req.nodes.len(),
            req.nodes.join(", "),
            req.repl,
            req.repl,
            req.repl
        ));
    }
    for n in req.nodes {
        if cordoned.contains(n.as_str()) {
            return Err(format!(
                "node {n} named in nodes= is cordoned (it takes no new replicas): name another node, or `dunnage node uncordon {n}`"
            ));
        }
        if !live.contains(n.as_str()) {
            return Err(format!(
                "node {n} named in nodes= is not a live member of the cluster (live: {}); check the name or start dunnage on that node",
                live_list()
            ));
        }
    }
    if live.len() < req.repl {
        return Err(format!(
            "repl={} needs {} live nodes but only {} {} up ({}){fenced_off}; start more nodes or lower repl",
            req.repl,
            req.repl,
            live.len(),
            if live.len() == 1 { "is" } else { "are" },
            live_list()
        ));
    }

    // Load counts every replica; `taken` is the nodes the group rule avoids.
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    for (group, replicas) in existing {
        let same_group = req.group.is_some() && group.as_deref() == req.group;
        for node in replicas {
            *load.entry(node.as_str()).or_default() += 1;
            if same_group {
                taken.insert(node.as_str());
            }
        }
    }
    let hard = req.fg && req.group.is_some();
    let group = req.group.unwrap_or_default();

    if hard {
        if let Some(n) = req.nodes.iter().find(|n| taken.contains(n.as_str())) {
            return Err(format!(
                "node {n} named in nodes= already holds a replica of another volume of group {group}, and fg=true keeps them apart; name another node or drop fg"
            ));
        }
    }

    let mut chosen: Vec<String> = req.nodes.to_vec();
    let mut rest: Vec<&str> = live
        .iter()
        .copied()
        .filter(|n| !named.contains(n))
        .collect();
    let short: BTreeSet<&str> = req.short_of_space.iter().map(String::as_str).collect();
    // A node without a zone is one of its own.
    let zone_of = |n: &str| -> String {
        req.zones
            .get(n)
            .map_or_else(|| format!("\0{n}"), |z| z.clone())
    };
    let mut zones_used: BTreeSet<String> = req
        .beside
        .iter()
        .chain(&chosen)
        .map(|n| zone_of(n))
        .collect();
    while chosen.len() < req.repl {
        let Some((i, n)) = rest.iter().copied().enumerate().min_by_key(|(_, n)| {
            (
                taken.contains(n),
                zones_used.contains(&zone_of(n)),
                short.contains(n),
                load.get(n).copied().unwrap_or(0),
                *n,
            )
        }) else {
            break;
        };
        if hard && taken.contains(n) {
            break;
        }
        rest.remove(i);
        zones_used.insert(zone_of(n));
        chosen.push(n.to_string());
    }
    if chosen.len() < req.repl {
        let free: Vec<&str> = live
            .iter()
            .copied()
            .filter(|n| !taken.contains(n))
            .collect();
        return Err(format!(
            "fg=true keeps the replicas of group {group} apart: repl={} needs {} live nodes without a replica of another volume of the group, but only {} {} ({}); nodes already holding one: {}{fenced_off}; add nodes, lower repl or drop fg",
            req.repl,
            req.repl,
            free.len(),
            if free.len() == 1 { "is" } else { "are" },
            list(free.iter().copied()),
            list(taken.iter().copied().filter(|n| live.contains(n)))
        ));
    }
    Ok(chosen)
}

/// Each member's zone, for those that have one.
pub fn zones(members: &[super::Member]) -> BTreeMap<String, String> {
    members
        .iter()
        .filter_map(|m| Some((m.name.clone(), m.zone.clone()?)))
        .collect()
}

/// The members whose last reported free space is less than `size`.
pub fn short_of_space(members: &[super::Member], size: u64) -> Vec<String> {
    members
        .iter()
        .filter(|m| m.capacity.is_some_and(|c| c.free_bytes < size))
        .map(|m| m.name.clone())
        .collect()
}

/// The members that take no new replica.
pub fn cordoned(members: &[super::Member]) -> Vec<String> {
    members
        .iter()
        .filter(|m| m.cordoned)
        .map(|m| m.name.clone())
        .collect()
}

fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NO_ZONES: BTreeMap<String, String> = BTreeMap::new();

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn vol(group: Option<&str>, nodes: &[&str]) -> (Option<String>, Vec<String>) {
        (group.map(str::to_string), names(nodes))
    }

    fn req<'a>(repl: usize, nodes: &'a [String]) -> PlacementRequest<'a> {
        PlacementRequest {
            repl,
            nodes,
            group: None,
            fg: false,
            cordoned: &[],
            short_of_space: &[],
            zones: &NO_ZONES,
            beside: &[],
        }
    }

    #[test]
    fn replicas_spread_over_zones_before_anything_but_the_group() {
        let up = names(&["a1", "a2", "b1", "b2", "c1"]);
        let zones: BTreeMap<String, String> = [
            ("a1", "a"),
            ("a2", "a"),
            ("b1", "b"),
            ("b2", "b"),
            ("c1", "c"),
        ]
        .into_iter()
        .map(|(n, z)| (n.to_string(), z.to_string()))
        .collect();
        // c1 is the most loaded, yet zone c is the third zone.
        let existing = vec![vol(None, &["c1"]), vol(None, &["c1"])];
        let r = |repl, nodes| PlacementRequest {
            zones: &zones,
            ..req(repl, nodes)
        };
        assert_eq!(place(&r(2, &[]), &up, &existing).unwrap(), ["a1", "b1"]);
        assert_eq!(
            place(&r(3, &[]), &up, &existing).unwrap(),
            ["a1", "b1", "c1"]
        );
        // More copies than zones: the zones fill up evenly, then repeat.
        assert_eq!(
            place(&r(4, &[]), &up, &existing).unwrap(),
            ["a1", "b1", "c1", "a2"]
        );
        // A named node's zone counts, and so do the volume's other replicas'.
        let named = names(&["a2"]);
        assert_eq!(place(&r(2, &named), &up, &existing).unwrap(), ["a2", "b1"]);
        let beside = names(&["a1", "b1"]);
        let add = PlacementRequest {
            beside: &beside,
            ..r(1, &[])
        };
        let others = names(&["a2", "b2", "c1"]);
        assert_eq!(place(&add, &others, &existing).unwrap(), ["c1"]);
        // Nodes without a zone are a zone each.
        assert_eq!(place(&req(2, &[]), &up, &existing).unwrap(), ["a1", "a2"]);
    }

    #[test]
    fn nodes_without_room_for_the_volume_come_last() {
        let up = names(&["a", "b", "c"]);
        let short = names(&["a"]);
        let r = |repl, nodes| PlacementRequest {
            short_of_space: &short,
            ..req(repl, nodes)
        };
        // a is the least loaded and first by name, but has no room.
        let existing = vec![vol(None, &["b", "c"])];
        assert_eq!(place(&r(2, &[]), &up, &existing).unwrap(), ["b", "c"]);
        // Taken when nothing else is left (a thin volume may fit)...
        assert_eq!(place(&r(3, &[]), &up, &existing).unwrap(), ["b", "c", "a"]);
        // ...or when named.
        let named = names(&["a"]);
        assert_eq!(place(&r(1, &named), &up, &existing).unwrap(), ["a"]);
        // The group rule still comes first.
        let grouped = vec![vol(Some("g"), &["b"])];
        let g = PlacementRequest {
            group: Some("g"),
            ..r(1, &[])
        };
        assert_eq!(place(&g, &up, &grouped).unwrap(), ["c"]);
    }

    #[test]
    fn cordoned_nodes_take_no_new_replica() {
        let up = names(&["a", "b", "c"]);
        let cordoned = names(&["a"]);
        let r = |repl, nodes| PlacementRequest {
            cordoned: &cordoned,
            ..req(repl, nodes)
        };
        // Least loaded would be a.
        let existing = vec![vol(None, &["b", "c"])];
        assert_eq!(place(&r(1, &[]), &up, &existing).unwrap(), ["b"]);
        assert_eq!(place(&r(2, &[]), &up, &existing).unwrap(), ["b", "c"]);
        let err = place(&r(3, &[]), &up, &existing).unwrap_err();
        assert!(
            err.contains("only 2 are up (b, c); cordoned, taking no new replicas: a"),
            "{err}"
        );
        let named = names(&["a"]);
        let err = place(&r(1, &named), &up, &existing).unwrap_err();
        assert!(
            err.contains("node a named in nodes= is cordoned") && err.contains("uncordon a"),
            "{err}"
        );
    }

    #[test]
    fn least_loaded_nodes_are_chosen_then_by_name() {
        let up = names(&["a", "b", "c", "d"]);
        let existing = vec![vol(None, &["a", "b"]), vol(None, &["a", "c"])];
        // Loads: a=2, b=1, c=1, d=0.
        assert_eq!(place(&req(1, &[]), &up, &existing).unwrap(), ["d"]);
        assert_eq!(place(&req(2, &[]), &up, &existing).unwrap(), ["d", "b"]);
        assert_eq!(
            place(&req(3, &[]), &up, &existing).unwrap(),
            ["d", "b", "c"]
        );
        assert_eq!(
            place(&req(4, &[]), &up, &existing).unwrap(),
            ["d", "b", "c", "a"]
        );
        // No load at all: by name.
        assert_eq!(place(&req(2, &[]), &up, &[]).unwrap(), ["a", "b"]);
    }

    #[test]
    fn replicas_are_on_distinct_nodes() {
        // Duplicates in `up` do not make two copies land on one node.
        let up = names(&["a", "a", "b"]);
        assert_eq!(place(&req(2, &[]), &up, &[]).unwrap(), ["a", "b"]);
        let err = place(&req(3, &[]), &up, &[]).unwrap_err();
        assert!(err.contains("only 2 are up (a, b)"), "{err}");
        for repl in 1..=5 {
            let up = names(&["n1", "n2", "n3", "n4", "n5"]);
            let hint = names(&["n4"]);
            let got = place(&req(repl, &hint), &up, &[vol(None, &["n1"])]).unwrap();
            let set: BTreeSet<_> = got.iter().collect();
            assert_eq!(set.len(), repl, "{got:?}");
            assert_eq!(got[0], "n4");
        }
    }

    #[test]
    fn hinted_nodes_come_first_in_order_even_if_loaded() {
        let up = names(&["a", "b", "c"]);
        let existing = vec![vol(None, &["c"]), vol(None, &["c", "b"])];
        let hint = names(&["c", "b"]);
        assert_eq!(
            place(&req(3, &hint), &up, &existing).unwrap(),
            ["c", "b", "a"]
        );
        assert_eq!(place(&req(2, &hint), &up, &existing).unwrap(), ["c", "b"]);
        let hint = names(&["c"]);
        assert_eq!(place(&req(2, &hint), &up, &existing).unwrap(), ["c", "a"]);
    }

    #[test]
    fn a_hinted_node_that_is_down_or_unknown_is_refused_by_name() {
        let up = names(&["a", "b", "c"]);
        let hint = names(&["a", "zed"]);
        let err = place(&req(2, &hint), &up, &[]).unwrap_err();
        assert!(err.contains("node zed"), "{err}");
        assert!(err.contains("live: a, b, c"), "{err}");
    }

    #[test]
    fn hints_named_twice_or_more_than_repl_are_refused() {
        let up = names(&["a", "b", "c"]);
        let hint = names(&["a", "a"]);
        let err = place(&req(2, &hint), &up, &[]).unwrap_err();
        assert!(err.contains("node a is named twice"), "{err}");
        let hint = names(&["a", "b", "c"]);
        let err = place(&req(2, &hint), &up, &[]).unwrap_err();
        assert!(err.contains("names 3 nodes (a, b, c)"), "{err}");
        assert!(err.contains("repl=2"), "{err}");
    }

    #[test]
    fn not_enough_live_nodes() {
        let up = names(&["a", "b"]);
        let err = place(&req(3, &[]), &up, &[]).unwrap_err();
        assert!(err.contains("repl=3 needs 3 live nodes"), "{err}");
        assert!(err.contains("only 2 are up (a, b)"), "{err}");
        let err = place(&req(1, &[]), &[], &[]).unwrap_err();
        assert!(err.contains("only 0 are up (none)"), "{err}");
        let err = place(&req(0, &[]), &up, &[]).unwrap_err();
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn same_group_nodes_are_avoided_before_load_counts() {
        let up = names(&["a", "b", "c", "d"]);
        // Loads: a=2, b=2, c=2, d=1. d is the least loaded but holds a
        // replica of group g, like a; b and c hold other volumes only.
        let existing = vec![
            vol(Some("g"), &["a", "d"]),
            vol(Some("h"), &["b", "c"]),
            vol(None, &["a", "b", "c"]),
        ];
        let r = PlacementRequest {
            repl: 2,
            nodes: &[],
            group: Some("g"),
            fg: false,
            cordoned: &[],
            short_of_space: &[],
            zones: &NO_ZONES,
            beside: &[],
        };
        assert_eq!(place(&r, &up, &existing).unwrap(), ["b", "c"]);
        // Soft rule: with more copies than free nodes, group nodes are used,
        // least loaded first.
        let r = PlacementRequest { repl: 3, ..r };
        assert_eq!(place(&r, &up, &existing).unwrap(), ["b", "c", "d"]);
        // Volumes without a group share no rule with each other.
        let r = PlacementRequest {
            repl: 2,
            nodes: &[],
            group: None,
            fg: false,
            cordoned: &[],
            short_of_space: &[],
            zones: &NO_ZONES,
            beside: &[],
        };
        assert_eq!(place(&r, &up, &existing).unwrap(), ["d", "a"]);
    }

    #[test]
    fn fg_is_a_hard_rule() {
        let up = names(&["a", "b", "c", "d"]);
        let existing = vec![vol(Some("g"), &["a", "b"]), vol(Some("g"), &["b"])];
        let r = PlacementRequest {
            repl: 2,
            nodes: &[],
            group: Some("g"),
            fg: true,
            cordoned: &[],
            short_of_space: &[],
            zones: &NO_ZONES,
            beside: &[],
        };
        assert_eq!(place(&r, &up, &existing).unwrap(), ["c", "d"]);
        let r = PlacementRequest { repl: 3, ..r };
        let err = place(&r, &up, &existing).unwrap_err();
        assert!(err.contains("group g"), "{err}");
        assert!(err.contains("only 2 are (c, d)"), "{err}");
        assert!(err.contains("already holding one: a, b"), "{err}");
        // The same request without fg places a third copy on a group node.
        let soft = PlacementRequest { fg: false, ..r };
        assert_eq!(place(&soft, &up, &existing).unwrap(), ["c", "d", "a"]);
    }

    #[test]
    fn fg_refuses_a_hinted_node_holding_a_group_replica() {
        let up = names(&["a", "b", "c"]);
        let existing = vec![vol(Some("g"), &["a"])];
        let hint = names(&["a"]);
        let r = PlacementRequest {
            repl: 2,
            nodes: &hint,
            group: Some("g"),
            fg: true,
            cordoned: &[],
            short_of_space: &[],
            zones: &NO_ZONES,
            beside: &[],
        };
        let err = place(&r, &up, &existing).unwrap_err();
        assert!(err.contains("node a named in nodes="), "{err}");
        assert!(err.contains("fg=true"), "{err}");
        // Without fg the hint wins over the group preference.
        let r = PlacementRequest { fg: false, ..r };
        assert_eq!(place(&r, &up, &existing).unwrap(), ["a", "b"]);
    }

    #[test]
    fn fg_ignores_other_groups_and_down_nodes() {
        // b holds a replica of group h only; e (down) holds one of group g.
        let up = names(&["a", "b"]);
        let existing = vec![vol(Some("h"), &["b"]), vol(Some("g"), &["e"])];
        let r = PlacementRequest {
            repl: 2,
            nodes: &[],
            group: Some("g"),
            fg: true,
            cordoned: &[],
            short_of_space: &[],
            zones: &NO_ZONES,
            beside: &[],
        };
        assert_eq!(place(&r, &up, &existing).unwrap(), ["a", "b"]);
        // fg without a group has nothing to keep apart.
        let r = PlacementRequest { group: None, ..r };
        assert_eq!(place(&r, &up, &existing).unwrap(), ["a", "b"]);
    }
}
