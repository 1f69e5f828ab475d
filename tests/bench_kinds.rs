//! Runs the unit tests of the fio bench's target selection
//! (benches/fio/kind.rs): the bench is built without a test harness.

#[allow(dead_code)]
#[path = "../benches/fio/kind.rs"]
mod kind;

use kind::{Kind, Server, UBLK_CONTROL};

/// Every name `--only` knows, as its error lists them.
fn all_names() -> Vec<&'static str> {
    Kind::ALL.iter().map(|k| k.name()).collect()
}

#[test]
fn only_gives_the_named_targets_in_run_order_each_once() {
    assert_eq!(
        Kind::parse_list("dunnage-repl2,limit,dunnage-repl2", false),
        Ok(vec![Kind::Limit, Kind::DunnageRepl2])
    );
    assert_eq!(
        Kind::parse_list(" dunnage-engine , dunnage ,", false),
        Ok(vec![Kind::Dunnage, Kind::DunnageEngine])
    );
    assert_eq!(
        Kind::parse_list("dunnage-10snaps", false),
        Ok(vec![Kind::DunnageSnaps])
    );
    // Every name of the full run, in any order, gives the full run.
    for ublk in [false, true] {
        let mut names: Vec<&str> = Kind::selected(ublk).iter().map(|k| k.name()).collect();
        names.reverse();
        assert_eq!(
            Kind::parse_list(&names.join(","), ublk),
            Ok(Kind::selected(ublk))
        );
    }
}

#[test]
fn only_refuses_unknown_names_and_lists_the_valid_ones() {
    for list in ["dunnage,dunage-engine", "Limit", "repl2", "limit peer"] {
        let err = Kind::parse_list(list, true).unwrap_err();
        assert!(err.contains("unknown target"), "{list}: {err}");
        for name in all_names() {
            assert!(err.contains(name), "{list}: {err} lacks {name}");
        }
    }
    let err = Kind::parse_list("limit,nope", true).unwrap_err();
    assert!(err.contains("\"nope\""), "{err}");
}

#[test]
fn only_refuses_an_empty_list() {
    for list in ["", ",", " , ,", "  "] {
        let err = Kind::parse_list(list, false).unwrap_err();
        assert!(err.contains("at least one"), "{list:?}: {err}");
        assert!(err.contains("dunnage-engine"), "{list:?}: {err}");
    }
}

#[test]
fn only_refuses_dunnage_ublk_without_ublk() {
    let err = Kind::parse_list("limit,dunnage-ublk", false).unwrap_err();
    assert!(err.contains("dunnage-ublk"), "{err}");
    assert!(err.contains(UBLK_CONTROL), "{err}");
    assert!(!err.contains("unknown"), "{err}");
    assert_eq!(
        Kind::parse_list("limit,dunnage-ublk", true),
        Ok(vec![Kind::Limit, Kind::DunnageUblk])
    );
}

#[test]
fn only_starts_just_the_servers_of_its_targets() {
    let servers = [
        Server::Kernel,
        Server::QemuStorageDaemon,
        Server::Passthrough,
        Server::Engine,
        Server::Features,
        Server::Cluster,
        Server::Ublk,
    ];
    let started = |list: &str| -> Vec<Server> {
        let kinds = Kind::parse_list(list, true).unwrap();
        servers
            .into_iter()
            .filter(|&s| Kind::need(&kinds, s))
            .collect()
    };
    assert_eq!(started("dunnage-repl2"), [Server::Cluster]);
    assert_eq!(started("dunnage-repl3,dunnage-repl2"), [Server::Cluster]);
    assert_eq!(
        started("dunnage-engine,dunnage-repl2"),
        [Server::Engine, Server::Cluster]
    );
    assert_eq!(started("dunnage-secure"), [Server::Features]);
    assert_eq!(started("dunnage-10snaps"), [Server::Features]);
    assert_eq!(
        started("limit,peer"),
        [Server::Kernel, Server::QemuStorageDaemon]
    );
    assert_eq!(started("dunnage-ublk"), [Server::Ublk]);
    // Without --only every server runs, the passthrough daemon (control
    // plane, memory) among them.
    for ublk in [false, true] {
        let kinds = Kind::selected(ublk);
        for s in servers {
            assert_eq!(Kind::need(&kinds, s), s != Server::Ublk || ublk, "{s:?}");
        }
    }
}

#[test]
fn only_sizes_the_tmpfs_and_the_work_for_its_targets() {
    let space = |kinds: &[Kind]| kinds.iter().map(|k| k.space_in_devices()).sum::<u64>();
    let writes = |kinds: &[Kind]| kinds.iter().map(|k| k.device_writes()).sum::<u64>();
    let only = |list: &str| Kind::parse_list(list, false).unwrap();
    assert_eq!(space(&only("dunnage-repl2")), 2);
    assert_eq!(space(&only("limit,dunnage-engine")), 2);
    assert_eq!(space(&only("dunnage-10snaps,dunnage-repl3")), 7);
    assert_eq!(writes(&only("limit,dunnage-engine")), 2);
    assert_eq!(writes(&only("dunnage-10snaps")), 2);
    // The full run: a write-through per target, and two for the snapshot
    // volume's setup in place of its own.
    for ublk in [false, true] {
        let kinds = Kind::selected(ublk);
        assert_eq!(writes(&kinds), kinds.len() as u64 + 1);
        assert_eq!(space(&kinds), kinds.len() as u64 + 3 + 1 + 2);
    }
}
