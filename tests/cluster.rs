//! Replication across nodes with etcd, under faults: a replica killed under
//! fio, the attached node cut off mid-write (fencing), any one of three nodes
//! lost, the attached node's daemon killed and restarted, a diskless attach,
//! a resync that sends only what changed, membership and placement.
//!
//! Every scenario runs twice: on a private veth network, each daemon in a
//! network namespace of its own with etcd in a hub namespace (a cut-off pulls
//! the cable), and on loopback (a cut-off stops the daemon: see
//! tests/common/cluster.rs). `cluster_net_smoke` checks the network harness
//! itself: reachability, both kinds of cut, and a clean teardown.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::{
    block_data, device_sha256, verify_blocks, write_blocks, BlockDev, Cluster, Mode, BLOCK,
    CONVERGE, LEASE_TTL,
};
use common::netns::{self, Etcd, Net, CUT_TABLE};
use common::tmpfs::SmallTmpfs;
use common::{pattern, Daemon, Opts, MIB};
use serde_json::Value;

/// Generous: resync of at most 256 MiB over a loaded 2-core machine.
const RESYNC_TIMEOUT_SECS: u64 = 180;

macro_rules! both_modes {
    ($scenario:ident, $veth:ident, $loopback:ident) => {
        #[test]
        fn $veth() {
            $scenario(Mode::Veth);
        }
        #[test]
        fn $loopback() {
            $scenario(Mode::Loopback);
        }
    };
}

both_modes!(
    fio_survives_replica_kill9,
    fio_survives_replica_kill9_veth,
    fio_survives_replica_kill9_loopback
);
both_modes!(
    cut_off_primary_is_fenced,
    cut_off_primary_is_fenced_veth,
    cut_off_primary_is_fenced_loopback
);
both_modes!(
    repl3_survives_any_one_node,
    repl3_survives_any_one_node_veth,
    repl3_survives_any_one_node_loopback
);
both_modes!(
    resync_sends_only_dirty_blocks,
    resync_sends_only_dirty_blocks_veth,
    resync_sends_only_dirty_blocks_loopback
);
both_modes!(
    membership_and_placement,
    membership_and_placement_veth,
    membership_and_placement_loopback
);

// ---------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------

/// Waits until `volume inspect` on node `on` shows every replica in-sync.
fn wait_all_in_sync(c: &Cluster, on: usize, vol: &str) {
    c.wait_for(&format!("every replica of {vol} in-sync"), || {
        let info = c.cluster_info(on, vol);
        info["replicas"]
            .as_array()
            .map(|rs| rs.iter().all(|r| r["state"] == "in-sync"))
            .unwrap_or(false)
    });
}

/// Asserts that every replica of `vol` (as the attached node `on` sees it) is in-sync.
fn assert_all_in_sync(c: &Cluster, on: usize, vol: &str, context: &str) {
    let info = c.cluster_info(on, vol);
    let states: Vec<(String, String)> = info["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap_or("?").to_string(),
                r["state"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert!(
        states.iter().all(|(_, s)| s == "in-sync"),
        "{context}: replicas of {vol} not all in-sync after `volume resync`: {states:?}\n{info}"
    );
}

/// Waits until, as node `on` sees it, `vol` is neither resynced in the
/// background nor attached: the background resync gave the attach back.
fn wait_resync_gone(c: &Cluster, on: usize, vol: &str) {
    c.wait_for("the background resync to give the attach back", || {
        let info = c.cluster_info(on, vol);
        info["resync_on"].is_null() && info["attached_on"].is_null()
    });
}

/// `n` daemons on loopback, each sweeping every `secs` seconds (3600: no
/// sweep during a test, so no background resync starts by itself).
fn loopback_sweeping_every(n: usize, secs: u64) -> Cluster {
    Cluster::start_with(Mode::Loopback, n, |_| {
        vec!["--sweep-interval".into(), secs.to_string()]
    })
}

/// Checksums of every node's replica of `vol` (which must be detached): all equal.
fn assert_checksums_equal(c: &Cluster, nodes: &[usize], vol: &str) -> String {
    let sums: Vec<(String, String)> = nodes
        .iter()
        .map(|&i| (c.name(i).to_string(), c.checksum_on(i, vol)))
        .collect();
    let first = sums[0].1.clone();
    assert!(
        sums.iter().all(|(_, s)| *s == first),
        "replicas of {vol} differ after resync: {sums:?}"
    );
    first
}

// ---------------------------------------------------------------------------------------
// a. fio with verification while a replica is killed and restarted
// ---------------------------------------------------------------------------------------

fn fio_survives_replica_kill9(mode: Mode) {
    common::require_tools(&["fio"]);
    let mut c = Cluster::start(mode, 2);
    let vol = "fio";
    c.create(0, vol, 2, "256M", &[]);
    let dev = c.attach_on(0, vol);

    // Rate-limited: certainly still writing while the replica is down and
    // when it comes back.
    let mut child = common::fio_verify("cluster", &dev, "64M", &["--rate_iops=2000"])
        .spawn()
        .expect("run fio");
    thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "fio ended before the replica was killed: the test would prove nothing"
    );
    c.kill9(1);
    // Long enough for the primary to give up on the replica and go on alone.
    thread::sleep(Duration::from_secs(common::cluster::REPLICA_TIMEOUT + 1));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "fio ended while the replica was dead (its IO failed, or it never was in flight)"
    );
    c.start_again(1);
    let (ok, out) = common::wait_child(child, "fio", Duration::from_secs(300), || c.logs());
    assert!(
        ok && !out.contains("verify:") && !out.contains("bad magic"),
        "fio on a repl=2 volume failed across a replica's kill -9 and restart:\n{out}\n{}",
        c.logs()
    );

    c.resync_on(0, vol, RESYNC_TIMEOUT_SECS);
    assert_all_in_sync(&c, 0, vol, "after fio");
    // What the device reads now, fio's data, is what each replica holds.
    let seen = device_sha256(&dev);
    c.detach_on(0, vol);
    let sum = assert_checksums_equal(&c, &[0, 1], vol);
    assert_eq!(
        sum, seen,
        "the replicas' checksum is not the sha256 of what the attached device read"
    );
    c.remove(0, vol);
    c.shutdown();
}

// ---------------------------------------------------------------------------------------
// b. the attached node cut off mid-write: acknowledged writes survive, it is fenced
// ---------------------------------------------------------------------------------------

/// Records the writer may write: 64 MiB, far more than it gets to.
const MAX_RECORDS: u64 = 16384;
/// Acknowledged records to wait for before the cut.
const RECORDS_BEFORE_CUT: usize = 64;

struct WriterEnd {
    dev: BlockDev,
    /// Records whose write was attempted (0..attempted).
    attempted: u64,
    error: Option<std::io::Error>,
}

fn cut_off_primary_is_fenced(mode: Mode) {
    let mut c = Cluster::start(mode, 2);
    let vol = "fence";
    c.create(0, vol, 2, "256M", &[]);
    let dev1 = c.attach_on(0, vol);

    // Record k at block k, each one written and fdatasync'ed before the next;
    // `acked` holds exactly those whose write and fdatasync returned success.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        let dev = BlockDev::open(&dev1);
        thread::spawn(move || {
            let mut end = WriterEnd {
                dev,
                attempted: 0,
                error: None,
            };
            for k in 0..MAX_RECORDS {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                end.attempted = k + 1;
                let r = end
                    .dev
                    .write_block(k, &block_data(k, 1))
                    .and_then(|()| end.dev.sync());
                match r {
                    Ok(()) => acked.lock().unwrap().push(k),
                    Err(e) => {
                        end.error = Some(e);
                        break;
                    }
                }
            }
            end
        })
    };
    c.wait_for("the writer's first records", || {
        acked.lock().unwrap().len() >= RECORDS_BEFORE_CUT || writer.is_finished()
    });
    assert!(
        !writer.is_finished(),
        "the writer stopped before the cut: {} records acknowledged",
        acked.lock().unwrap().len()
    );

    c.cut_off(0);
    thread::sleep(Duration::from_secs(LEASE_TTL + 1));
    let dev2 = c.attach_taking_over(1, vol, 0);
    let info = c.cluster_info(1, vol);
    assert_eq!(
        info["attached_on"], "n2",
        "inspect on n2 after taking over: {info}"
    );

    stop.store(true, Ordering::SeqCst);
    c.heal(0);
    // Whatever the writer had in flight must now end: acknowledged only if
    // it is on n2, failed otherwise. A writer stuck for good is a failure.
    let deadline = Instant::now() + CONVERGE;
    while !writer.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the writer on the fenced node n1 is still blocked {CONVERGE:?} after the heal\n{}",
            c.logs()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let end = writer.join().expect("writer thread");
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= RECORDS_BEFORE_CUT,
        "only {} records acknowledged",
        acked.len()
    );
    assert!(
        end.attempted < MAX_RECORDS,
        "the writer wrote all its records: n1 acknowledged writes while cut off"
    );

    // Every acknowledged record is on n2, intact. The one in flight at the
    // cut is either entirely there or not at all; nothing past it exists.
    let d2 = BlockDev::open(&dev2);
    verify_blocks(&d2, acked.iter().copied(), 1);
    let zero = vec![0u8; BLOCK];
    for k in (0..end.attempted).filter(|k| !acked.contains(k)) {
        let got = d2.read_block(k).expect("read on n2");
        assert!(
            got == zero || got == block_data(k, 1),
            "record {k} (unacknowledged) is torn on n2: {:?}",
            &got[..24]
        );
    }
    assert_eq!(
        d2.read_block(end.attempted).expect("read on n2"),
        zero,
        "a block the writer never wrote is not empty on n2"
    );

    // n1, healed, is fenced: writing through its old device fails with EIO
    // and changes nothing on n2 (neither an acknowledged record nor a fresh block).
    let fresh = end.attempted + 100;
    for (k, what) in [(0, "an acknowledged record"), (fresh, "a fresh block")] {
        let r = end
            .dev
            .write_block(k, &block_data(k, 666))
            .and_then(|()| end.dev.sync());
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
            other => panic!(
                "write+fdatasync of {what} (block {k}) on the fenced n1's device {}: {other:?}, expected EIO\n{}",
                end.dev.path,
                c.logs()
            ),
        }
    }
    verify_blocks(&d2, acked.iter().copied(), 1);
    assert_eq!(
        d2.read_block(fresh).expect("read on n2"),
        zero,
        "the fenced n1's write reached n2"
    );
    eprintln!(
        "{mode:?}: {} records acknowledged, {} attempted; the writer ended with {:?}",
        acked.len(),
        end.attempted,
        end.error
    );

    drop(end);
    drop(d2);
    c.detach_on(1, vol);
    // n1 may or may not still count its lost attach; the leak check at
    // shutdown says whether its device is gone.
    let _ = c.cli(0, &["detach", vol]);
    c.remove(1, vol);
    c.shutdown();
}

// ---------------------------------------------------------------------------------------
// c. repl=3 survives the loss of any one node
// ---------------------------------------------------------------------------------------

/// Blocks written per round.
const ROUND_BLOCKS: u64 = 64;

fn repl3_survives_any_one_node(mode: Mode) {
    let mut c = Cluster::start(mode, 3);
    let vol = "three";
    c.create(0, vol, 3, "256M", &[]);
    let placement = c.placement(0, vol);
    assert_eq!(placement, ["n1", "n2", "n3"], "repl=3 on 3 nodes");
    let mut attached = 0;
    let mut dev = c.attach_on(0, vol);
    // Round r writes blocks r*ROUND_BLOCKS.. with seed r, spread over the volume.
    let round_blocks = |r: u64| (0..ROUND_BLOCKS).map(move |b| r * 7919 + b * 97);
    write_blocks(&BlockDev::open(&dev), round_blocks(0), 0);

    // Replicas first (no re-attach), then the attached node itself.
    for (round, k) in [(1u64, 1usize), (2, 2), (3, 0)] {
        c.kill9(k);
        if k == attached {
            let next = (k + 1) % 3;
            dev = c.attach_taking_over(next, vol, k);
            attached = next;
        }
        let d = BlockDev::open(&dev);
        for r in 0..round {
            verify_blocks(&d, round_blocks(r), r);
        }
        write_blocks(&d, round_blocks(round), round);
        verify_blocks(&d, round_blocks(round), round);
        drop(d);

        c.start_again(k);
        if k == 0 {
            // n1 died holding the attach; it may still count it after the restart.
            let _ = c.cli(k, &["detach", vol]);
        }
        c.resync_on(attached, vol, RESYNC_TIMEOUT_SECS);
        assert_all_in_sync(&c, attached, vol, &format!("after {} came back", c.name(k)));
    }

    let d = BlockDev::open(&dev);
    for r in 0..4 {
        verify_blocks(&d, round_blocks(r), r);
    }
    drop(d);
    c.detach_on(attached, vol);
    assert_checksums_equal(&c, &[0, 1, 2], vol);
    c.remove(attached, vol);
    c.shutdown();
}

// ---------------------------------------------------------------------------------------
// c2. the attached node's daemon is killed and started again: the volume stays
// ---------------------------------------------------------------------------------------

/// kill -9 of the daemon that has a repl=2 volume attached, under a writer:
/// the device stays (the FUSE keeper holds it), IO waits for the new daemon,
/// which takes the attach back under a new generation and reopens the
/// replica links. Every acknowledged write is there, on both replicas; the
/// other node still cannot attach the volume. On loopback only: the network
/// plays no part in it.
#[test]
fn attached_daemon_kill9_resumes_in_place() {
    let mut c = Cluster::start(Mode::Loopback, 2);
    let vol = "resume";
    c.create(0, vol, 2, "128M", &[]);
    let dev = c.attach_on(0, vol);
    let info = c.cluster_info(0, vol);
    let generation0 = info["generation"]
        .as_u64()
        .expect("an attached volume shows its generation");
    assert_eq!(info["verification"], Value::Null, "a first attach: {info}");
    write_blocks(&BlockDev::open(&dev), 0..256, 1);

    // A writer across the crash: each write returns only when both replicas
    // hold it (or fails, which the test reports).
    let written = Arc::new(Mutex::new(0u64));
    let writer = {
        let (dev, written) = (dev.clone(), written.clone());
        thread::spawn(move || {
            let d = BlockDev::open(&dev);
            for i in 256..1024u64 {
                d.write_block(i, &block_data(i, 2))
                    .map_err(|e| format!("write block {i}: {e}"))?;
                if i % 32 == 31 {
                    d.sync()
                        .map_err(|e| format!("fdatasync at block {i}: {e}"))?;
                    *written.lock().unwrap() = i + 1;
                }
                // Spread the writes over the crash and the restart.
                thread::sleep(Duration::from_millis(2));
            }
            d.sync().map_err(|e| format!("final fdatasync: {e}"))?;
            Ok::<(), String>(())
        })
    };
    eventually("the writer to get going", || {
        *written.lock().unwrap() >= 320
    });
    c.kill9(0);
    thread::sleep(Duration::from_millis(300));
    c.start_again(0);
    writer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("IO across the daemon's restart failed: {e}\n{}", c.logs()));

    let d = BlockDev::open(&dev);
    verify_blocks(&d, 0..256, 1);
    verify_blocks(&d, 256..1024, 2);
    drop(d);
    let info = c.cluster_info(0, vol);
    assert_eq!(info["attached_on"], "n1", "{info}");
    let generation1 = info["generation"].as_u64().unwrap_or(0);
    assert!(
        generation1 > generation0,
        "the restarted daemon attached under a new generation (was {generation0}): {info}"
    );
    c.resync_on(0, vol, RESYNC_TIMEOUT_SECS);
    assert_all_in_sync(&c, 0, vol, "after the attached daemon's restart");
    // The killed daemon never released its attach: the new one compared
    // the replicas (any write in flight at the kill reached one only).
    c.wait_for("the replicas verified", || {
        c.cluster_info(0, vol)["verification"]["finished"] == true
    });
    let v = &c.cluster_info(0, vol)["verification"];
    // Only what the replicas' activity logs name: blocks 0..1024, the
    // first 4 MiB extent, not the whole 128 MiB.
    assert_eq!(v["total_bytes"], 4 * MIB, "{v}");
    assert_eq!(v["done_bytes"], v["total_bytes"], "{v}");
    let err = c.cli_err(1, &["attach", vol]);
    assert!(
        err.contains("n1"),
        "attach on n2 should name the holder n1: {err}"
    );
    // Each replica's activity log names the written extent until a clean
    // detach clears it (the next unreleased attach compares only what is
    // written from then on).
    let id = c.inspect_on(0, vol)["id"].as_str().unwrap().to_string();
    let active = |c: &Cluster, i: usize| {
        let log = c
            .node(i)
            .data_dir
            .join("volumes")
            .join(&id)
            .join("activity");
        let bytes = std::fs::read(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        // Magic, extent size, last clear's stamp (2 words), then the bits.
        assert_eq!(
            bytes.len(),
            32 + 8,
            "{}: one word for 32 extents",
            log.display()
        );
        u64::from_le_bytes(bytes[32..].try_into().unwrap())
    };
    assert_eq!((active(&c, 0), active(&c, 1)), (1, 1), "extent 0, on both");
    c.detach_on(0, vol);
    assert_eq!(
        (active(&c, 0), active(&c, 1)),
        (0, 0),
        "cleared by the detach"
    );
    assert_checksums_equal(&c, &[0, 1], vol);
    c.remove(0, vol);
    c.shutdown();
}

// ---------------------------------------------------------------------------------------
// c3. diskless attach: a node with no replica serves the volume over the network
// ---------------------------------------------------------------------------------------

/// A repl=2 volume on n1 and n2, attached on n3, which holds no replica (as
/// in LINSTOR): its writes reach both replicas, its reads come back over the
/// network, and the data is the same when the volume moves to n1. On
/// loopback only: the network's kind plays no part in it.
#[test]
fn diskless_attach_reads_and_writes_over_the_network() {
    let c = Cluster::start(Mode::Loopback, 3);
    // Without a cluster key (--secret-file) nothing can be encrypted.
    let err = c.cli_err(
        0,
        &[
            "volume",
            "create",
            "nokey",
            "-o",
            "repl=2",
            "-o",
            "secure=true",
        ],
    );
    assert!(
        err.contains("secure") && err.contains("n1") && err.contains("--secret-file"),
        "secure without a cluster key: {err}"
    );
    let vol = "diskless";
    c.create(0, vol, 2, "128M", &[("nodes", "n1,n2")]);
    assert_eq!(c.placement(2, vol), ["n1", "n2"]);
    let dev = c.attach_on(2, vol);
    wait_all_in_sync(&c, 2, vol);
    let info = c.cluster_info(2, vol);
    assert_eq!(info["attached_on"], "n3", "{info}");
    for r in info["replicas"].as_array().expect("replicas") {
        assert_eq!(r["local"], false, "n3 holds no replica: {r}");
        assert_eq!(r["connected"], true, "{r}");
    }
    // Spread over the volume, with a few multi-block writes.
    let d = BlockDev::open(&dev);
    let blocks = |seed: u64| (0..512u64).map(move |b| (b * 61 + seed) % 32_768);
    write_blocks(&d, blocks(0), 7);
    let run: Vec<u8> = (0..8u64).flat_map(|i| block_data(1000 + i, 8)).collect();
    d.write_at(1000 * BLOCK as u64, &run)
        .expect("a 32 KiB write");
    d.sync().expect("fdatasync");
    verify_blocks(&d, blocks(0), 7);
    assert_eq!(
        d.read_at(1000 * BLOCK as u64, run.len())
            .expect("a 32 KiB read"),
        run
    );
    drop(d);
    c.detach_on(2, vol);
    assert_checksums_equal(&c, &[0, 1], vol);
    let err = c.cli_err(2, &["replica", "checksum", vol]);
    assert!(
        err.contains("holds no replica") && err.contains("n1, n2"),
        "replica checksum on n3: {err}"
    );

    let dev = c.attach_on(0, vol);
    assert_eq!(
        c.cluster_info(0, vol)["verification"],
        Value::Null,
        "n3 released the attach: nothing to verify"
    );
    let d = BlockDev::open(&dev);
    verify_blocks(&d, blocks(0), 7);
    assert_eq!(
        d.read_at(1000 * BLOCK as u64, run.len()).expect("read"),
        run
    );
    drop(d);
    c.detach_on(0, vol);
    c.remove(0, vol);
    c.shutdown();
}

// ---------------------------------------------------------------------------------------
// d. a resync sends only the blocks written while the replica was away
// ---------------------------------------------------------------------------------------

fn resync_sends_only_dirty_blocks(mode: Mode) {
    let mut c = Cluster::start(mode, 2);
    let vol = "dirty";
    c.create(0, vol, 2, "256M", &[]);
    let dev = c.attach_on(0, vol);
    let d = BlockDev::open(&dev);

    // 32 MiB written while both replicas are in sync: a resync must not resend it.
    for m in 0..32u64 {
        d.write_at((96 + m) * MIB, &pattern(MIB as usize, 1000 + m))
            .expect("baseline write");
    }
    d.sync().expect("fdatasync");
    wait_all_in_sync(&c, 0, vol);

    c.kill9(1);
    // D: 2 MiB at 16 MiB and 2 MiB at 200 MiB, written as distinct 4 KiB
    // blocks, on both sides of the baseline data.
    let blocks: Vec<u64> = (0..512u64)
        .map(|b| 16 * MIB / BLOCK as u64 + b)
        .chain((0..512u64).map(|b| 200 * MIB / BLOCK as u64 + b))
        .collect();
    let dirty = (blocks.len() * BLOCK) as u64;
    write_blocks(&d, blocks.iter().copied(), 7);
    c.start_again(1);
    c.resync_on(0, vol, RESYNC_TIMEOUT_SECS);
    assert_all_in_sync(&c, 0, vol, "after the dirty resync");

    let n2 = c.replica_info(0, vol, "n2");
    let sent = n2["resync_sent_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no resync_sent_bytes for n2: {n2}"));
    assert!(
        sent > 0 && sent * 10 <= dirty * 11,
        "resync to n2 sent {sent} bytes for {dirty} bytes written while it was down \
         (32 MiB more were in sync): expected 0 < sent <= 1.1 x {dirty}\n{n2}"
    );

    eprintln!("{mode:?}: resync to n2 sent {sent} bytes for {dirty} dirty bytes");
    verify_blocks(&d, blocks.iter().copied(), 7);
    drop(d);
    c.detach_on(0, vol);
    assert_checksums_equal(&c, &[0, 1], vol);
    c.remove(0, vol);
    c.shutdown();
}

/// A replica that comes back while its volume is attached nowhere is
/// resynced without an attach or a command: the sweep of the node holding
/// the in-sync replica (n1; n3 holds none) starts a background resync,
/// which gives the attach back when done. On loopback only: the network
/// plays no part in who starts it.
#[test]
fn a_replica_back_while_detached_is_resynced_without_asking() {
    let mut c = loopback_sweeping_every(3, 1);
    let vol = "behind";
    c.create(0, vol, 2, "64M", &[("nodes", "n1,n2")]);
    let dev = c.attach_on(0, vol);
    let d = BlockDev::open(&dev);
    write_blocks(&d, 0..256, 1);
    d.sync().expect("fdatasync");
    c.kill9(1);
    // n2 misses these; the volume then goes back to being attached nowhere.
    write_blocks(&d, 4096..4352, 2);
    d.sync().expect("fdatasync");
    drop(d);
    c.wait_node_up(0, 1, false);
    c.detach_on(0, vol);
    // Nothing starts while n2 is down (the job could only wait for it).
    thread::sleep(Duration::from_secs(3));
    assert_ne!(c.replica_info(0, vol, "n2")["state"], "in-sync");
    assert_eq!(c.cluster_info(0, vol)["resync_on"], Value::Null);

    c.start_again(1);
    wait_all_in_sync(&c, 2, vol);
    wait_resync_gone(&c, 2, vol);
    let started = |i: usize| c.node(i).log().contains("resyncing it here");
    assert!(
        started(0) && !started(1) && !started(2),
        "n1, the in-sync replica's node, starts the resync, and only it\n{}",
        c.logs()
    );
    // What n2 missed was read back from n1's activity log (the attach that
    // tracked it is gone): the extents written, 0 and 4, not 64 MiB.
    let log = netns::strip_ansi(&c.node(0).log());
    let narrowed = log
        .lines()
        .find(|l| l.contains("resyncing only that") && l.contains("peer=n2"))
        .unwrap_or_else(|| panic!("n2's resync was not narrowed\n{}", c.logs()));
    assert!(narrowed.contains("bytes=8388608 "), "{narrowed}");
    assert_checksums_equal(&c, &[0, 1], vol);
    let d = BlockDev::open(&c.attach_on(1, vol));
    verify_blocks(&d, 0..256, 1);
    verify_blocks(&d, 4096..4352, 2);
    drop(d);
    c.detach_on(1, vol);

    // n2's files are lost while the volume is attached nowhere, every
    // replica recorded in sync: only n2 can tell, by its image's
    // incarnation against etcd's, and its sweep has it copied whole.
    let id = c.inspect_on(0, vol)["id"].as_str().unwrap().to_string();
    c.kill9(1);
    std::fs::remove_dir_all(c.node(1).data_dir.join("volumes").join(&id))
        .expect("wipe n2's replica");
    c.start_again(1);
    c.wait_for("n2's sweep to find its replica lost", || {
        c.node(1).log().contains("resyncing it from the others")
    });
    wait_all_in_sync(&c, 2, vol);
    wait_resync_gone(&c, 2, vol);
    assert_checksums_equal(&c, &[0, 1], vol);
    c.kill9(0);
    let d = BlockDev::open(&c.attach_on(1, vol));
    verify_blocks(&d, 0..256, 1);
    verify_blocks(&d, 4096..4352, 2);
    drop(d);
    c.detach_on(1, vol);
    c.start_again(0);
    c.remove(0, vol);
    c.shutdown();
}

/// The only in-sync replica is put back from a backup (its node's disk
/// rolled back) while the other is outdated: no other in-sync replica can
/// tell, but etcd records the last attach that reached every in-sync one,
/// so the attach is refused rather than serving data that lacks
/// acknowledged writes, and says how to go on. `replica accept` takes a
/// replica as the data (refused while attached), and the other is copied
/// whole from it.
#[test]
fn a_rolled_back_lone_replica_is_refused_until_one_is_accepted() {
    // No sweeps: the attach, not a background resync, meets the rollback.
    let mut c = loopback_sweeping_every(2, 3600);
    let vol = "rolled";
    c.create(0, vol, 2, "64M", &[("nodes", "n1,n2")]);
    let id = c.inspect_on(0, vol)["id"].as_str().unwrap().to_string();
    let d = BlockDev::open(&c.attach_on(0, vol));
    write_blocks(&d, 0..256, 1);
    drop(d);
    c.detach_on(0, vol);
    let replica = c.node(0).data_dir.join("volumes").join(&id);
    let backup = tempfile::tempdir().unwrap();
    c.kill9(0);
    let cp = |from: &std::path::Path, to: &std::path::Path| {
        let ok = Command::new("cp").arg("-a").arg(from).arg(to).status();
        assert!(ok.unwrap().success(), "cp -a {}", from.display());
    };
    cp(&replica, backup.path());
    c.start_again(0);
    // Taken after the backup: n1's files, put back, will lack it.
    c.cli_ok(0, &["snapshot", "create", vol, "late"]);
    let both = vec!["n1".to_string(), "n2".to_string()];
    assert_eq!(snapshot_names_on(&c, 0, vol), [("late".to_string(), both)]);

    // n2 misses what follows: n1 is the only replica in sync.
    let d = BlockDev::open(&c.attach_on(0, vol));
    c.kill9(1);
    write_blocks(&d, 4096..4352, 2);
    d.sync().expect("fdatasync");
    drop(d);
    c.wait_node_up(0, 1, false);
    c.detach_on(0, vol);
    assert_eq!(c.replica_info(0, vol, "n2")["state"], "outdated");
    // `volume ls` shows it too.
    let ls = c.cli_ok(0, &["volume", "ls"]);
    assert!(
        ls.contains("REPLICAS") && ls.contains("n1 n2(outdated)"),
        "{ls}"
    );

    c.kill9(0);
    std::fs::remove_dir_all(&replica).unwrap();
    cp(&backup.path().join(&id), &replica);
    c.start_again(0);
    c.start_again(1);
    c.wait_node_up(0, 1, true);

    let err = c.cli_err(0, &["attach", vol]);
    for want in [
        "n1: it has seen attach generation",
        "restored from a backup",
        "dunnage replica accept rolled NODE",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    assert_eq!(c.replica_info(0, vol, "n1")["state"], "outdated");
    // Refused again, not served: the refusal is recorded.
    let err = c.cli_err(1, &["attach", vol]);
    assert!(err.contains("every replica is outdated"), "{err}");

    let err = c.cli_err(1, &["replica", "accept", vol, "n3"]);
    assert!(err.contains("node n3 holds no replica"), "{err}");
    let out = c.cli_ok(1, &["replica", "accept", vol, "n1"]);
    assert!(out.contains("n2 resynced whole"), "{out}");
    // The records no longer count on n1 for the snapshot it lacks.
    let n2 = vec!["n2".to_string()];
    assert_eq!(snapshot_names_on(&c, 0, vol), [("late".to_string(), n2)]);
    wait_all_in_sync(&c, 1, vol);
    wait_resync_gone(&c, 1, vol);
    assert_checksums_equal(&c, &[0, 1], vol);

    // The backup's data, on either node; what n1 lost is lost everywhere.
    let d = BlockDev::open(&c.attach_on(1, vol));
    verify_blocks(&d, 0..256, 1);
    for i in 4096..4352 {
        assert_eq!(d.read_block(i).unwrap(), vec![0; BLOCK], "block {i}");
    }
    let err = c.cli_err(0, &["replica", "accept", vol, "n2"]);
    assert!(err.contains("attached on node n2"), "{err}");
    write_blocks(&d, 8192..8200, 3);
    d.sync().expect("fdatasync");
    drop(d);
    c.detach_on(1, vol);

    // Restored from n2's copy of the snapshot; n1's replica, which
    // lacks it, is brought to it by the next attach.
    c.cli_ok(0, &["volume", "restore", vol, "late"]);
    let d = BlockDev::open(&c.attach_on(0, vol));
    wait_all_in_sync(&c, 0, vol);
    verify_blocks(&d, 0..256, 1);
    for i in 8192..8200 {
        assert_eq!(d.read_block(i).unwrap(), vec![0; BLOCK], "block {i}");
    }
    drop(d);
    c.detach_on(0, vol);
    wait_resync_gone(&c, 0, vol);
    assert_checksums_equal(&c, &[0, 1], vol);
    c.remove(0, vol);
    c.shutdown();
}

/// An attach that ended unreleased (its node killed) owes the next one a
/// comparison of the replicas. An attach that then fails to open (every
/// replica's node down) must leave it owed: once the nodes are back, the
/// next attach still compares.
#[test]
fn a_comparison_owed_by_an_unreleased_attach_survives_a_failed_attach() {
    // No sweeps: a background resync would take the comparison over.
    let mut c = loopback_sweeping_every(4, 3600);
    let vol = "owed";
    c.create(0, vol, 2, "64M", &[("nodes", "n1,n2")]);
    let compared = |c: &Cluster, i: usize| {
        c.node(i)
            .log()
            .matches("comparing the replicas in the background")
            .count()
    };
    // n3 writes without a replica of its own, and is killed attached.
    let d = BlockDev::open(&c.attach_on(2, vol));
    write_blocks(&d, 0..64, 1);
    drop(d);
    c.kill9(2);
    c.kill9(0);
    c.kill9(1);
    for i in 0..3 {
        c.wait_node_up(3, i, false);
    }
    let err = c.cli_err(3, &["attach", vol]);
    assert!(
        err.contains("no in-sync replica that can be reached"),
        "{err}"
    );
    assert_eq!(compared(&c, 3), 0, "the failed attach compared nothing");

    c.start_again(0);
    c.start_again(1);
    c.wait_node_up(3, 0, true);
    c.wait_node_up(3, 1, true);
    let d = BlockDev::open(&c.attach_on(3, vol));
    assert_eq!(
        compared(&c, 3),
        1,
        "the attach after the failed one compares the replicas\n{}",
        c.logs()
    );
    verify_blocks(&d, 0..64, 1);
    drop(d);
    c.wait_for("the comparison to finish", || {
        c.cluster_info(3, vol)["verification"]["finished"] == true
    });
    c.detach_on(3, vol);
    assert_checksums_equal(&c, &[0, 1], vol);
    // Back, n3 takes back the attach it had (the volume is free now).
    c.start_again(2);
    c.wait_for("n3 to resume its attach", || {
        c.cluster_info(3, vol)["attached_on"] == "n3"
    });
    c.detach_on(2, vol);
    c.remove(3, vol);
    c.shutdown();
}

// ---------------------------------------------------------------------------------------
// e. node ls and volume inspect
// ---------------------------------------------------------------------------------------

fn membership_and_placement(mode: Mode) {
    let mut c = Cluster::start(mode, 3);
    let names: BTreeSet<String> = (0..3).map(|i| c.name(i).to_string()).collect();
    for i in 0..3 {
        let ls = c.node_ls(i);
        let listed: BTreeSet<String> = ls
            .iter()
            .map(|e| e["name"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(listed, names, "node ls on {}: {ls:?}", c.name(i));
        for e in &ls {
            let j = c.index_of(e["name"].as_str().expect("name"));
            assert_eq!(
                e["addr"].as_str(),
                Some(c.addr(j).to_string().as_str()),
                "node ls on {}: address of {}: {e}",
                c.name(i),
                c.name(j)
            );
            assert_eq!(e["up"], true, "node ls on {}: {e}", c.name(i));
        }
    }

    let vol = "placed";
    c.create(2, vol, 2, "256M", &[]);
    let placement = c.placement(0, vol);
    assert_eq!(placement.len(), 2, "repl=2 has two replicas: {placement:?}");
    assert_ne!(placement[0], placement[1], "replicas on distinct nodes");
    assert!(placement.iter().all(|p| names.contains(p)), "{placement:?}");
    for i in 1..3 {
        assert_eq!(
            c.placement(i, vol),
            placement,
            "placement as {} sees it",
            c.name(i)
        );
    }
    let holder = c.index_of(&placement[0]);
    let other = c.index_of(&placement[1]);
    let third = (0..3).find(|i| *i != holder && *i != other).unwrap();

    let info = c.cluster_info(holder, vol);
    assert_eq!(info["attached_on"], Value::Null, "before attach: {info}");
    let _dev = c.attach_on(holder, vol);
    wait_all_in_sync(&c, holder, vol);
    let info = c.cluster_info(holder, vol);
    assert_eq!(info["attached_on"], c.name(holder), "{info}");
    let generation = info["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation while attached: {info}"));
    for r in info["replicas"].as_array().expect("replicas") {
        let local = r["node"] == c.name(holder);
        assert_eq!(r["local"], local, "replica entry: {r}");
        if !local {
            assert_eq!(r["connected"], true, "peer replica not connected: {r}");
        }
        assert_eq!(r["state"], "in-sync", "{r}");
    }
    for i in [other, third] {
        let info = c.cluster_info(i, vol);
        assert_eq!(
            info["attached_on"],
            c.name(holder),
            "as {} sees it: {info}",
            c.name(i)
        );
        for r in info["replicas"].as_array().expect("replicas") {
            assert!(
                r["node"].is_string() && r["state"].is_string(),
                "as {} sees it: {r}",
                c.name(i)
            );
        }
    }
    let err = c.cli_err(other, &["attach", vol]);
    assert!(
        err.contains(c.name(holder)),
        "attach on {} while attached on {}: the error does not name the holder: {err}",
        c.name(other),
        c.name(holder)
    );

    // A node killed is listed as down once its lease is gone; the rest stay up.
    c.kill9(third);
    c.wait_node_up(holder, third, false);
    for i in [holder, other] {
        let e = c.node_entry(holder, i).expect("listed");
        assert_eq!(e["up"], true, "{e}");
    }
    c.start_again(third);
    c.wait_node_up(holder, third, true);

    // A new attach elsewhere has a newer generation.
    c.detach_on(holder, vol);
    let info = c.cluster_info(third, vol);
    assert_eq!(info["attached_on"], Value::Null, "after detach: {info}");
    let _dev = c.attach_on(other, vol);
    let info = c.cluster_info(other, vol);
    assert_eq!(info["attached_on"], c.name(other), "{info}");
    let newer = info["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation while attached: {info}"));
    assert!(
        newer > generation,
        "attach on {} has generation {newer}, not newer than {generation}",
        c.name(other)
    );
    c.detach_on(other, vol);
    c.remove(0, vol);
    c.shutdown();
}

// ---------------------------------------------------------------------------------------
// The network harness itself
// ---------------------------------------------------------------------------------------

/// Polls `cond` for up to 20 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

fn root_links() -> BTreeSet<String> {
    common::sh("ip", &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn cluster_net_smoke() {
    let links_before = root_links();
    let tables_before = common::sh("nft", &["list", "tables"]);
    let mut net = Net::new(2);
    let etcd = Etcd::start(net.hub_ip(), Some(net.hub_ns()));
    let namespaces = net.namespaces();
    let inodes: Vec<u64> = namespaces
        .iter()
        .map(|ns| netns::ns_inode(&netns::ns_path(ns)).expect("namespace file"))
        .collect();
    assert_eq!(namespaces.len(), 3);

    // Every node reaches etcd; each kind of cut stops exactly that node.
    for i in 0..2 {
        assert!(
            etcd.healthy_from(Some(net.node_ns(i))),
            "etcd not reachable from node {i}\n{}",
            etcd.log_tail()
        );
    }
    let etcd_addr = etcd.client_addr;
    let reach = |net: &Net, i: usize| {
        netns::tcp_reachable(net.node_ns(i), etcd_addr, Duration::from_secs(1))
    };
    net.link_down(0);
    assert!(net.is_cut(0));
    assert!(!reach(&net, 0), "node 0 reaches etcd with its link down");
    assert!(
        !etcd.healthy_from(Some(net.node_ns(0))),
        "etcdctl on node 0 healthy with its link down"
    );
    assert!(
        reach(&net, 1),
        "node 1 lost etcd when node 0's link went down"
    );
    net.link_up(0);
    eventually("node 0 back after link up", || reach(&net, 0));
    assert!(etcd.healthy_from(Some(net.node_ns(0))));

    net.drop_all(1);
    assert!(net.is_cut(1));
    assert_eq!(net.nft_tables(1), [format!("inet {CUT_TABLE}")]);
    assert!(!reach(&net, 1), "node 1 reaches etcd through drop_all");
    assert!(
        !etcd.healthy_from(Some(net.node_ns(1))),
        "etcdctl on node 1 healthy through drop_all"
    );
    assert!(reach(&net, 0), "node 0 lost etcd when node 1 was dropped");
    // Loopback inside the dropped namespace still works.
    let lo_ok = netns::in_ns(net.node_ns(1), || {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind on lo");
        let addr: SocketAddr = l.local_addr().expect("addr");
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    });
    assert!(lo_ok, "drop_all also dropped loopback traffic");
    net.undrop(1);
    assert!(net.nft_tables(1).is_empty(), "{:?}", net.nft_tables(1));
    eventually("node 1 back after undrop", || reach(&net, 1));
    assert!(etcd.healthy_from(Some(net.node_ns(1))));

    // A daemon started with `Opts::netns` lives in that namespace (nsenter
    // execs: the child's pid is the daemon's) while its mounts and devices
    // stay visible here; the O_DIRECT helpers round-trip through its device.
    let d = Daemon::start(Opts {
        netns: Some(net.node_ns(0).to_string()),
        ..Opts::default()
    });
    let link = std::fs::read_link(format!("/proc/{}/ns/net", d.pid())).expect("ns link");
    assert_eq!(link.to_string_lossy(), format!("net:[{}]", inodes[1]));
    let exe = std::fs::read_link(format!("/proc/{}/exe", d.pid())).expect("exe link");
    assert!(exe.ends_with("dunnage"), "the child is {exe:?}");
    d.cli_ok(&[
        "volume", "create", "smoke", "-o", "size=64M", "-o", "fs=none",
    ]);
    let dev = BlockDev::open(d.cli_ok(&["attach", "smoke"]).trim());
    write_blocks(&dev, (0..32).map(|b| b * 13), 5);
    verify_blocks(&dev, (0..32).map(|b| b * 13), 5);
    assert_eq!(dev.read_block(1).expect("read"), vec![0u8; BLOCK]);
    drop(dev);
    d.cli_ok(&["detach", "smoke"]);
    d.cli_ok(&["volume", "rm", "smoke"]);
    let mut d = d;
    d.sigterm_and_wait();
    let l = d.leftovers_stopped();
    assert!(l.is_empty(), "leftovers: {l:?}");
    drop(d);

    // Teardown leaves nothing: cut again so that the drop must undo it.
    net.link_down(0);
    net.drop_all(1);
    let etcd_pid = etcd.pid().expect("etcd pid");
    drop(etcd);
    assert!(
        !std::path::Path::new(&format!("/proc/{etcd_pid}")).exists(),
        "etcd still running after its drop"
    );
    drop(net);
    let left: Vec<String> = netns::netns_names()
        .into_iter()
        .filter(|n| namespaces.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    for ino in inodes {
        let pids = netns::pids_in_netns(ino);
        assert!(
            pids.is_empty(),
            "processes still in a test namespace: {pids:?}"
        );
    }
    assert_eq!(
        root_links(),
        links_before,
        "links in the root namespace changed"
    );
    assert_eq!(
        common::sh("nft", &["list", "tables"]),
        tables_before,
        "nft tables in the root namespace changed"
    );
}

// ---------------------------------------------------------------------------------------
// A disk that fails under the attached node's own replica
// ---------------------------------------------------------------------------------------

#[test]
fn a_full_local_disk_is_detached_and_the_volume_goes_on_with_its_peer() {
    let c = Cluster::start(Mode::Loopback, 2);
    // n1 keeps its replicas on a 24 MiB disk.
    let disk = SmallTmpfs::mount_at(&c.node(0).data_dir.join("volumes"), 24 * MIB);
    let vol = "fills";
    c.create(0, vol, 2, "128M", &[("nodes", "n1,n2")]);
    let dev = c.attach_on(0, vol);
    let d = BlockDev::open(&dev);
    // 64 MiB: n1's own replica runs out of space on the way.
    for m in 0..64u64 {
        d.write_at(m * MIB, &pattern(MIB as usize, 300 + m))
            .unwrap_or_else(|e| panic!("write at {m} MiB: {e}\n{}", c.logs()));
    }
    d.sync().expect("fdatasync");
    let n1 = c.replica_info(0, vol, "n1");
    assert_ne!(n1["state"], "in-sync", "n1's replica was detached: {n1}");
    assert_eq!(c.replica_info(0, vol, "n2")["state"], "in-sync");
    // Everything reads back (from n2, over the network).
    for m in 0..64u64 {
        assert_eq!(
            d.read_at(m * MIB, MIB as usize).expect("read"),
            pattern(MIB as usize, 300 + m),
            "MiB {m}"
        );
    }
    // Room again: n1's replica is reattached and resynced.
    disk.resize(512 * MIB);
    c.resync_on(0, vol, RESYNC_TIMEOUT_SECS);
    assert_all_in_sync(&c, 0, vol, "after the disk grew");
    drop(d);
    c.detach_on(0, vol);
    assert_checksums_equal(&c, &[0, 1], vol);
    c.remove(0, vol);
    c.shutdown();
    drop(disk);
}

/// Placement puts a volume's replicas on nodes with room for it first: n1,
/// first by name and as loaded as the others, has a small disk, so a
/// repl=2 volume larger than its free space goes to n2 and n3; with three
/// copies wanted it takes n1 too (a thin volume may still fit there).
#[test]
fn placement_prefers_nodes_with_room_for_the_volume() {
    let c = loopback_sweeping_every(3, 1);
    let disk = SmallTmpfs::mount_at(&c.node(0).data_dir.join("volumes"), 32 * MIB);
    c.wait_for("n1 to report its small disk", || {
        c.node_entry(1, 0)
            .and_then(|e| e["capacity"]["free_bytes"].as_u64())
            .is_some_and(|free| free <= 32 * MIB)
    });
    c.create(1, "roomy", 2, "128M", &[]);
    assert_eq!(c.placement(1, "roomy"), ["n2", "n3"]);
    c.create(1, "everywhere", 3, "128M", &[]);
    assert_eq!(c.placement(1, "everywhere"), ["n1", "n2", "n3"]);
    // A small volume fits n1, the least loaded now.
    c.create(1, "small", 1, "16M", &[]);
    assert_eq!(c.placement(1, "small"), ["n1"]);
    for v in ["roomy", "everywhere", "small"] {
        c.remove(1, v);
    }
    c.shutdown();
    drop(disk);
}

/// `serve --zone`: a volume's replicas go to distinct zones (racks) before
/// anything else, and a replica of a node that stays down is replaced in
/// a zone the others are not in.
#[test]
fn replicas_spread_over_zones_and_a_replacement_keeps_the_spread() {
    let zones = ["rack-a", "rack-a", "rack-b", "rack-b"];
    let mut c = Cluster::start_with(Mode::Loopback, 4, |i| {
        [
            "--zone",
            zones[i],
            "--sweep-interval",
            "1",
            "--replace-after",
            "2",
        ]
        .map(String::from)
        .to_vec()
    });
    let listed: Vec<(String, String)> = c
        .node_ls(0)
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["zone"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("n1", "rack-a"),
            ("n2", "rack-a"),
            ("n3", "rack-b"),
            ("n4", "rack-b")
        ]
        .map(|(n, z)| (n.to_string(), z.to_string()))
    );
    assert!(c.cli_ok(0, &["node", "ls"]).contains("rack-b"));
    // By name and load alone this would be n1 and n2, both in rack-a.
    c.create(0, "spread", 2, "64M", &[]);
    assert_eq!(c.placement(0, "spread"), ["n1", "n3"]);
    c.create(0, "triple", 3, "64M", &[("nodes", "n1,n2,n3")]);
    c.kill9(2);
    // n2 is first by name, but n4 keeps a copy in rack-b; a repl=3 volume
    // has a fourth replica while its replacement resyncs.
    c.wait_for("n3's replicas replaced in rack-b", || {
        c.placement(0, "spread") == ["n1", "n4"] && c.placement(0, "triple") == ["n1", "n2", "n4"]
    });
    c.start_again(2);
    c.remove(0, "spread");
    c.remove(0, "triple");
    c.shutdown();
}

/// `snapshot group` in a cluster: on the node where the attached volumes
/// are (the others attached nowhere), one snapshot of each on every
/// replica; asked on another node, refused, naming where to ask.
#[test]
fn a_group_snapshot_of_replicated_volumes() {
    let c = Cluster::start(Mode::Loopback, 2);
    for v in ["gdata", "glog"] {
        c.create(0, v, 2, "64M", &[]);
    }
    let d = BlockDev::open(&c.attach_on(0, "gdata"));
    write_blocks(&d, 0..16, 1);
    d.sync().expect("fdatasync");
    let err = c.cli_err(1, &["snapshot", "group", "g1", "gdata", "glog"]);
    assert!(err.contains("attached on node n1"), "{err}");
    assert_eq!(
        c.cli_ok(0, &["snapshot", "group", "g1", "gdata", "glog"]),
        "gdata g1\nglog g1\n"
    );
    for v in ["gdata", "glog"] {
        assert_eq!(
            snapshot_names_on(&c, 1, v),
            [("g1".to_string(), vec!["n1".to_string(), "n2".to_string()])],
            "{v}"
        );
    }
    write_blocks(&d, 0..16, 2);
    d.sync().expect("fdatasync");
    drop(d);
    c.detach_on(0, "gdata");
    c.cli_ok(1, &["volume", "restore", "gdata", "g1"]);
    let d = BlockDev::open(&c.attach_on(1, "gdata"));
    verify_blocks(&d, 0..16, 1);
    drop(d);
    c.detach_on(1, "gdata");
    for v in ["gdata", "glog"] {
        c.cli_ok(0, &["snapshot", "rm", v, "g1"]);
        c.remove(0, v);
    }
    c.shutdown();
}

// ---------------------------------------------------------------------------------------
// Shared volumes (shared=true): several nodes mount one volume at once
// ---------------------------------------------------------------------------------------

/// Docker's Mount of `vol` on node `i` for mount ID `id`; the path.
fn mount_on(c: &Cluster, i: usize, vol: &str, id: &str) -> std::path::PathBuf {
    let v = c.node(i).ok(
        "/VolumeDriver.Mount",
        &serde_json::json!({"Name": vol, "ID": id}),
    );
    std::path::PathBuf::from(v["Mountpoint"].as_str().expect("a Mountpoint"))
}

fn unmount_on(c: &Cluster, i: usize, vol: &str, id: &str) {
    c.node(i).ok(
        "/VolumeDriver.Unmount",
        &serde_json::json!({"Name": vol, "ID": id}),
    );
}

/// The filesystem type mounted at `path`, if any (from /proc/self/mountinfo).
fn fstype_at(path: &std::path::Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mp = left.split(' ').nth(4)?;
        (std::path::Path::new(mp) == path)
            .then(|| right.split(' ').next().unwrap_or("").to_string())
    })
}

/// Runs `script` with sh as uid:gid 1000:1000 (no groups); whether it succeeded.
fn as_user_1000(script: &str) -> bool {
    Command::new("setpriv")
        .args([
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .status()
        .expect("run setpriv")
        .success()
}

/// A shared volume is mounted by three nodes at once: the holder mounts
/// its filesystem, the others mount clients of it; what one node writes
/// and closes, the others read when they open it; files are made as the
/// caller and permissions hold; the holder keeps the volume while another
/// node uses it and lets go after the last; when the holder stops or dies,
/// the clients get errors rather than hang, and a client node takes the
/// volume over with every file synced before; a killed holder back does
/// not take back its stale mount.
#[test]
fn a_shared_volume_is_mounted_on_several_nodes_at_once() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut c = Cluster::start(Mode::Loopback, 3);
    c.create(0, "web", 2, "64M", &[("fs", "ext4"), ("shared", "true")]);
    c.create(0, "solo", 1, "32M", &[("fs", "ext4")]);

    let p1 = mount_on(&c, 0, "web", "c1");
    assert_eq!(fstype_at(p1.parent().unwrap()).as_deref(), Some("ext4"));
    std::fs::write(p1.join("a.txt"), "from n1\n").unwrap();
    let p2 = mount_on(&c, 1, "web", "c2");
    assert_ne!(p1, p2);
    assert_eq!(fstype_at(&p2).as_deref(), Some("fuse.dunnage-share"));
    assert_eq!(
        std::fs::read_to_string(p2.join("a.txt")).unwrap(),
        "from n1\n"
    );

    // n2 writes a tree; n1 sees it as written.
    let big: Vec<u8> = (0..3 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::create_dir(p2.join("d")).unwrap();
    {
        let mut f = std::fs::File::create(p2.join("d/big.bin")).unwrap();
        std::io::Write::write_all(&mut f, &big).unwrap();
        f.sync_all().unwrap();
    }
    std::os::unix::fs::symlink("../a.txt", p2.join("d/link")).unwrap();
    std::fs::rename(p2.join("d/big.bin"), p2.join("d/data.bin")).unwrap();
    std::fs::set_permissions(p2.join("d"), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(std::fs::read(p1.join("d/data.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read_link(p1.join("d/link")).unwrap(),
        std::path::Path::new("../a.txt")
    );
    assert_eq!(
        std::fs::read_to_string(p1.join("d/link")).unwrap(),
        "from n1\n"
    );
    assert!(!p1.join("d/big.bin").exists());
    // Close-to-open: n1 rewrites a.txt; n2's next open reads it.
    std::fs::write(p1.join("a.txt"), "n1 again\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(p2.join("a.txt")).unwrap(),
        "n1 again\n"
    );

    // A third node joins; the holder lists both.
    let p3 = mount_on(&c, 2, "web", "c3");
    let mut names: Vec<String> = std::fs::read_dir(p3.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["data.bin", "link"]);
    let v = c.inspect_on(0, "web");
    assert_eq!(v["shared"], true, "{v}");
    assert_eq!(v["shared_with"], serde_json::json!(["n2", "n3"]), "{v}");
    assert_eq!(c.inspect_on(1, "web")["served_by"], "n1");
    let ls = c.cli_ok(1, &["volume", "ls"]);
    let row = ls
        .lines()
        .find(|l| l.trim_start().starts_with("web "))
        .unwrap_or("");
    assert!(row.contains("mounted") && row.contains("via n1"), "{ls}");

    // Files are the caller's, and the holder's permissions hold on clients.
    assert!(as_user_1000(&format!(
        "echo mine > {}/d/u.txt",
        p3.display()
    )));
    let meta = std::fs::metadata(p1.join("d/u.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert!(
        !as_user_1000(&format!("echo no >> {}/a.txt", p2.display())),
        "uid 1000 wrote root's 0644 file through a client"
    );
    assert_eq!(
        std::fs::read_to_string(p1.join("a.txt")).unwrap(),
        "n1 again\n"
    );

    // A volume that is not shared is still refused, naming the holder.
    mount_on(&c, 0, "solo", "s1");
    let err = c.node(1).err(
        "/VolumeDriver.Mount",
        &serde_json::json!({"Name": "solo", "ID": "s2"}),
    );
    assert!(err.contains("attached on node n1"), "{err}");
    unmount_on(&c, 0, "solo", "s1");

    // n1's last container goes: n2 and n3 still use it, so it stays.
    unmount_on(&c, 0, "web", "c1");
    assert!(
        fstype_at(p1.parent().unwrap()).is_some(),
        "n1 let go while shared"
    );
    assert_eq!(std::fs::read(p2.join("d/data.bin")).unwrap(), big);
    let err = c.cli_err(0, &["volume", "rm", "web"]);
    assert!(err.contains("shared with node(s) n2, n3"), "{err}");
    // n3's daemon dies with its client mounted: n1 counts its session out,
    // and n3 back removes the dead mount.
    c.kill9(2);
    c.wait_for("n1 to count n3's session out", || {
        c.inspect_on(0, "web")["shared_with"] == serde_json::json!(["n2"])
    });
    c.start_again(2);
    c.wait_node_up(0, 2, true);
    assert_eq!(fstype_at(&p3), None, "n3's dead client is unmounted");
    unmount_on(&c, 1, "web", "c2");
    assert_eq!(fstype_at(&p2), None, "n2's client is gone");
    c.wait_for("n1 to let go of the volume", || {
        fstype_at(p1.parent().unwrap()).is_none()
    });

    // Now n2 mounts first: it holds the volume itself, and n1 joins it.
    let q2 = mount_on(&c, 1, "web", "c4");
    assert_eq!(fstype_at(q2.parent().unwrap()).as_deref(), Some("ext4"));
    let q1 = mount_on(&c, 0, "web", "c5");
    assert_eq!(fstype_at(&q1).as_deref(), Some("fuse.dunnage-share"));
    let write_synced = |path: std::path::PathBuf, data: &[u8]| {
        let mut f = std::fs::File::create(path).unwrap();
        std::io::Write::write_all(&mut f, data).unwrap();
        f.sync_all().unwrap();
    };
    write_synced(q1.join("synced.bin"), &big[..MIB as usize]);
    let dead_client = |path: &std::path::Path| {
        let err = std::fs::read_dir(path)
            .and_then(|d| d.collect::<Result<Vec<_>, _>>())
            .map(|_| ())
            .and_then(|()| std::fs::read(path.join("synced.bin")).map(|_| ()))
            .expect_err("a client of a gone holder answered");
        assert!(
            [libc::EIO, libc::ENOTCONN].contains(&err.raw_os_error().unwrap_or(0)),
            "{err}"
        );
    };
    // n2 stops in order with n1's session open: the session ends before
    // n2 unmounts, and n2 lets the volume go.
    c.node_mut(1).sigterm_and_wait();
    dead_client(&q1);
    // Another container on n1 is not handed the dead client.
    let err = c.node(0).err(
        "/VolumeDriver.Mount",
        &serde_json::json!({"Name": "web", "ID": "c5b"}),
    );
    assert!(
        err.contains("session to node n2") && err.contains("is gone"),
        "{err}"
    );
    unmount_on(&c, 0, "web", "c5");
    assert_eq!(fstype_at(&q1), None, "the broken client is unmounted");
    c.start_again(1);
    c.wait_node_up(0, 1, true);
    let r1 = mount_on(&c, 0, "web", "c6");
    assert_eq!(fstype_at(r1.parent().unwrap()).as_deref(), Some("ext4"));
    assert_eq!(
        std::fs::read(r1.join("synced.bin")).unwrap(),
        &big[..MIB as usize]
    );
    let r2 = mount_on(&c, 1, "web", "c7");
    assert_eq!(fstype_at(&r2).as_deref(), Some("fuse.dunnage-share"));
    write_synced(r2.join("late.bin"), &big[MIB as usize..2 * MIB as usize]);

    // The holder n1 dies: n2's client fails instead of hanging, and once
    // n1's lease is gone n2 takes the volume over, everything in it.
    c.kill9(0);
    dead_client(&r2);
    unmount_on(&c, 1, "web", "c7");
    assert_eq!(fstype_at(&r2), None, "the broken client is unmounted");
    let deadline = Instant::now() + CONVERGE;
    let s2 = loop {
        let (status, v) = c.node(1).call(
            "/VolumeDriver.Mount",
            &serde_json::json!({"Name": "web", "ID": "c8"}),
        );
        if status == 200 && v["Err"].as_str().unwrap_or("").is_empty() {
            break std::path::PathBuf::from(v["Mountpoint"].as_str().unwrap());
        }
        assert!(Instant::now() < deadline, "no takeover: {v}");
        thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(fstype_at(s2.parent().unwrap()).as_deref(), Some("ext4"));
    assert_eq!(
        std::fs::read(s2.join("synced.bin")).unwrap(),
        &big[..MIB as usize]
    );
    assert_eq!(
        std::fs::read(s2.join("late.bin")).unwrap(),
        &big[MIB as usize..2 * MIB as usize]
    );
    assert_eq!(std::fs::read(s2.join("d/data.bin")).unwrap(), big);
    unmount_on(&c, 1, "web", "c8");
    // n1 comes back: n2 attached the volume since, so n1 does not take
    // back its stale mount (n2 replayed the journal under it).
    c.start_again(0);
    c.wait_node_up(1, 0, true);
    c.wait_for("n1 to drop its stale mount", || {
        fstype_at(r1.parent().unwrap()).is_none()
    });
    assert_eq!(c.inspect_on(0, "web")["state"], "detached");
    assert!(
        c.node(0)
            .log_tail()
            .contains("another node attached it while"),
        "{}",
        c.node(0).log_tail()
    );
    for v in ["web", "solo"] {
        c.remove(0, v);
    }
    c.shutdown();
}

// ---------------------------------------------------------------------------------------
// Encryption in a cluster: the cluster's key (every node's --secret-file)
// ---------------------------------------------------------------------------------------

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn encrypted_volume_moves_between_nodes_sharing_the_cluster_key() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (shared, other) = (
        keys.path().join("cluster.key"),
        keys.path().join("other.key"),
    );
    let passphrase = "the cluster's passphrase, for this test only";
    std::fs::write(&shared, passphrase).expect("write key");
    std::fs::write(&other, "a passphrase no other node has").expect("write key");
    // n3 was started with another key file.
    let key_for = |i: usize| if i == 2 { &other } else { &shared };
    let mut c = Cluster::start_with(Mode::Loopback, 3, |i| {
        vec!["--secret-file".into(), key_for(i).display().to_string()]
    });
    let vol = "sealed";

    // A volume's own key would have to be kept somewhere: refused.
    let err = c.cli_err(
        0,
        &[
            "volume",
            "create",
            "own",
            "-o",
            "repl=2",
            "-o",
            "fs=none",
            "-o",
            "secure=true",
            "-o",
            "secret_key=abcdefgh",
        ],
    );
    assert!(
        err.contains("secret_key") && err.contains("--secret-file"),
        "own key in a cluster: {err}"
    );
    assert!(!c.volume_names(0).contains(&"own".to_string()));

    c.create(0, vol, 2, "64M", &[("nodes", "n1,n2"), ("secure", "true")]);
    assert_eq!(c.inspect_on(2, vol)["encrypted"], true);
    const MARKER: &[u8] = b"DUNNAGE-CLUSTER-MARKER:";
    let block: Vec<u8> = MARKER.iter().copied().cycle().take(BLOCK).collect();
    let indexes: Vec<u64> = (0..256u64).map(|b| b * 7).collect();

    let dev = c.attach_on(0, vol);
    let d = BlockDev::open(&dev);
    for &b in &indexes {
        d.write_block(b, &block).expect("write");
    }
    d.sync().expect("fdatasync");
    drop(d);
    c.detach_on(0, vol);
    assert_checksums_equal(&c, &[0, 1], vol);

    // The replicas hold ciphertext only (and hold data), on both nodes.
    for i in [0, 1] {
        let mut data_bytes = 0usize;
        for f in files_under(&c.node(i).data_dir.join("volumes")) {
            let bytes = std::fs::read(&f).expect("read replica file");
            assert!(
                !bytes.windows(MARKER.len()).any(|w| w == MARKER),
                "{} on {} holds plaintext",
                f.display(),
                c.name(i)
            );
            data_bytes += bytes.iter().filter(|&&b| b != 0).count();
        }
        assert!(
            data_bytes >= indexes.len() * BLOCK / 2,
            "{}: {data_bytes} bytes",
            c.name(i)
        );
    }

    // n2 has the same key: it reads the volume back.
    let dev = c.attach_on(1, vol);
    let d = BlockDev::open(&dev);
    for &b in &indexes {
        assert_eq!(d.read_block(b).expect("read"), block, "block {b} on n2");
    }
    assert_eq!(
        d.read_block(3).expect("read"),
        vec![0; BLOCK],
        "never written"
    );
    // Its daemon killed and started again: the volume resumes, the key
    // read again from --secret-file.
    c.kill9(1);
    c.start_again(1);
    let fresh: Vec<u8> = block.iter().rev().copied().collect();
    d.write_block(5, &fresh).expect("write after the restart");
    d.sync().expect("fdatasync after the restart");
    assert_eq!(d.read_block(5).expect("read"), fresh);
    assert_eq!(d.read_block(7).expect("read"), block);
    drop(d);
    c.detach_on(1, vol);

    // n3's key is another: refused before any IO, saying what to do.
    let err = c.cli_err(2, &["attach", vol]);
    assert!(
        err.contains(vol) && err.contains("n3") && err.contains("same --secret-file"),
        "attach on n3: {err}"
    );
    assert_eq!(c.cluster_info(0, vol)["attached_on"], Value::Null);
    // Nor is there a key of its own to unlock.
    let shared_path = shared.display().to_string();
    let err = c.cli_err(0, &["volume", "unlock", vol, "--key-file", &shared_path]);
    assert!(err.contains("cluster's key"), "unlock: {err}");

    // etcd holds the parameters, never the passphrase.
    let dump = common::run_with_timeout(
        {
            let mut cmd = Command::new(netns::ETCDCTL);
            cmd.args(["--endpoints", &c.etcd.client_url, "get", "--prefix", ""]);
            cmd
        },
        Duration::from_secs(30),
    );
    assert!(dump.status.success(), "etcdctl get");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("key_check"),
        "the catalog keeps the parameters: {dump}"
    );
    assert!(!dump.contains(passphrase));

    c.remove(0, vol);
    c.shutdown();
}

/// A replica's image, opened by this test while no daemon holds it:
/// retried until the last link's thread has let it go.
fn open_replica(dir: &std::path::Path) -> dunnage::engine::ThinImage {
    let start = Instant::now();
    loop {
        match dunnage::engine::ThinImage::open(dir) {
            Ok(img) => return img,
            Err(e) => {
                assert!(start.elapsed() < CONVERGE, "open {}: {e}", dir.display());
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Block `index` of a replica's snapshot `snap` (its head for `None`).
fn snapshot_block(dir: &std::path::Path, snap: Option<&str>, index: u64) -> Vec<u8> {
    let img = open_replica(dir);
    let mut buf = vec![0u8; BLOCK];
    match snap {
        Some(s) => img
            .snapshot_view(s)
            .unwrap_or_else(|e| panic!("snapshot {s} in {}: {e}", dir.display()))
            .read_at(&mut buf, index * BLOCK as u64),
        None => dunnage::engine::BlockEngine::read_at(&img, &mut buf, index * BLOCK as u64),
    }
    .expect("read");
    buf
}

fn snapshot_names_on(c: &Cluster, i: usize, vol: &str) -> Vec<(String, Vec<String>)> {
    let out = c.cli_ok(i, &["snapshot", "ls", vol, "--json"]);
    let list: Vec<Value> = serde_json::from_str(&out).expect("snapshot ls --json");
    list.iter()
        .map(|s| {
            let nodes = s["nodes"].as_array().expect("nodes");
            (
                s["name"].as_str().unwrap().to_string(),
                nodes
                    .iter()
                    .map(|n| n.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn snapshots_of_a_replicated_volume_are_taken_and_restored_on_every_replica() {
    let mut c = Cluster::start(Mode::Loopback, 3);
    let vol = "snappy";
    // A schedule is accepted in a cluster (it runs on the attached node).
    c.create(
        0,
        vol,
        2,
        "64M",
        &[("nodes", "n1,n2"), ("snap_schedule", "daily=03:00,3")],
    );
    let id = c.inspect_on(0, vol)["id"].as_str().unwrap().to_string();
    let (a, b) = (pattern(BLOCK, 1), pattern(BLOCK, 2));

    let dev = c.attach_on(0, vol);
    let d = BlockDev::open(&dev);
    d.write_block(3, &a).expect("write");
    d.sync().expect("fdatasync");
    c.cli_ok(0, &["snapshot", "create", vol, "before"]);
    d.write_block(3, &b).expect("write");
    d.sync().expect("fdatasync");
    // Seen from every node, n3 holding no replica included.
    let both = vec!["n1".to_string(), "n2".to_string()];
    for i in 0..3 {
        assert_eq!(
            snapshot_names_on(&c, i, vol),
            vec![("before".to_string(), both.clone())],
            "snapshot ls on {}",
            c.name(i)
        );
    }
    let table = c.cli_ok(2, &["snapshot", "ls", vol]);
    assert!(
        table.contains("NODES") && table.contains("n1,n2"),
        "{table}"
    );
    // n3 holds no replica: its space figures are a replica's (asked of n1).
    let space = |i: usize| {
        let out = c.cli_ok(i, &["snapshot", "ls", vol, "--json"]);
        let list: Vec<Value> = serde_json::from_str(&out).expect("snapshot ls --json");
        (
            list[0]["referenced_bytes"].clone(),
            list[0]["exclusive_bytes"].clone(),
        )
    };
    let on_n1 = space(0);
    assert!(
        on_n1.0.as_u64() > Some(0) && on_n1.1.as_u64() > Some(0),
        "{on_n1:?}"
    );
    assert_eq!(space(2), on_n1, "snapshot sizes seen from n3");
    // The attached node's mirror takes them: other nodes forward there.
    c.cli_ok(1, &["snapshot", "create", vol, "elsewhere"]);
    assert_eq!(
        snapshot_names_on(&c, 2, vol),
        vec![
            ("before".to_string(), both.clone()),
            ("elsewhere".to_string(), both.clone())
        ]
    );
    let err = c.cli_err(2, &["snapshot", "create", vol, "before"]);
    assert!(
        err.contains("before") && err.contains("asked node n1"),
        "a taken name, refused by the holder: {err}"
    );
    c.cli_ok(2, &["snapshot", "rm", vol, "elsewhere"]);
    let err = c.cli_err(0, &["snapshot", "create", vol, "before"]);
    assert!(err.contains("before"), "a taken name: {err}");
    // Nor is it restored under the attached node's feet.
    let err = c.cli_err(1, &["volume", "restore", vol, "before"]);
    assert!(err.contains("n1") && err.contains(vol), "{err}");
    drop(d);
    c.detach_on(0, vol);

    // Detached: any node takes one, n3 holding no replica too.
    c.cli_ok(2, &["snapshot", "create", vol, "detached"]);
    assert_eq!(
        snapshot_names_on(&c, 1, vol)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["before", "detached"]
    );
    assert_eq!(c.cluster_info(0, vol)["attached_on"], Value::Null);
    // Each replica holds each snapshot as it was taken.
    for i in [0, 1] {
        let dir = c.node(i).data_dir.join("volumes").join(&id);
        assert_eq!(snapshot_block(&dir, Some("before"), 3), a, "{}", c.name(i));
        assert_eq!(
            snapshot_block(&dir, Some("detached"), 3),
            b,
            "{}",
            c.name(i)
        );
        assert_eq!(snapshot_block(&dir, None, 3), b, "{}", c.name(i));
    }

    // A snapshot etcd does not list (a crash between the replicas' take
    // and the record) does not block its name.
    open_replica(&c.node(1).data_dir.join("volumes").join(&id))
        .snapshot("orphan")
        .expect("an orphan snapshot on n2's replica");
    c.cli_ok(0, &["snapshot", "create", vol, "orphan"]);
    c.cli_ok(0, &["snapshot", "rm", vol, "orphan"]);
    // One under a name nobody takes again: n2's sweep deletes it while
    // the volume is attached nowhere; the listed ones stay.
    let n2_dir = c.node(1).data_dir.join("volumes").join(&id);
    open_replica(&n2_dir)
        .snapshot("stray")
        .expect("an orphan snapshot on n2's replica");
    c.wait_for(
        "n2's sweep deleting the snapshot etcd does not list",
        || {
            !dunnage::engine::ThinImage::snapshot_names(&n2_dir)
                .unwrap()
                .contains(&"stray".to_string())
        },
    );
    assert_eq!(
        dunnage::engine::ThinImage::snapshot_names(&n2_dir).unwrap(),
        ["before", "detached"]
    );

    // Restored on every replica: from n3 (both replicas remote), then back
    // from n1 (its own replica first).
    c.cli_ok(2, &["volume", "restore", vol, "before"]);
    for i in [0, 1] {
        let dir = c.node(i).data_dir.join("volumes").join(&id);
        assert_eq!(snapshot_block(&dir, None, 3), a, "{}", c.name(i));
        assert_eq!(c.replica_info(2, vol, c.name(i))["state"], "in-sync");
    }
    c.cli_ok(0, &["volume", "restore", vol, "detached"]);
    let dev = c.attach_on(1, vol);
    let d = BlockDev::open(&dev);
    assert_eq!(d.read_block(3).expect("read"), b, "restored, read on n2");
    drop(d);
    c.detach_on(1, vol);
    assert_checksums_equal(&c, &[0, 1], vol);
    let err = c.cli_err(0, &["volume", "restore", vol, "nonesuch"]);
    assert!(err.contains("nonesuch"), "{err}");

    // A replica's node down: refused, naming it, and nothing recorded.
    c.kill9(1);
    c.wait_node_up(0, 1, false);
    let err = c.cli_err(0, &["snapshot", "create", vol, "late"]);
    assert!(err.contains("n2") && err.contains("late"), "{err}");
    let err = c.cli_err(0, &["snapshot", "rm", vol, "before"]);
    assert!(err.contains("n2"), "{err}");
    let err = c.cli_err(0, &["volume", "restore", vol, "before"]);
    assert!(err.contains("n2"), "{err}");
    assert_eq!(c.replica_info(0, vol, "n2")["state"], "in-sync");
    c.start_again(1);
    c.wait_node_up(0, 1, true);

    // Deleted on every replica and in etcd.
    c.cli_ok(1, &["snapshot", "rm", vol, "before"]);
    let err = c.cli_err(1, &["snapshot", "rm", vol, "before"]);
    assert!(err.contains("before"), "{err}");
    assert_eq!(
        snapshot_names_on(&c, 0, vol),
        vec![("detached".to_string(), both.clone())]
    );
    for i in [0, 1] {
        let dir = c.node(i).data_dir.join("volumes").join(&id);
        let img = open_replica(&dir);
        let names: Vec<String> = img
            .snapshots()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["detached"], "{}", c.name(i));
    }
    c.remove(0, vol);
    c.shutdown();
}

#[test]
fn a_clone_of_a_replicated_volume_lives_on_its_parents_nodes() {
    let c = Cluster::start(Mode::Loopback, 3);
    let (src, copy) = ("origin", "copy");
    c.create(0, src, 2, "64M", &[("nodes", "n1,n2")]);
    let [a, b, new, mine] = [1, 2, 3, 4].map(|seed| pattern(BLOCK, seed));

    let dev = c.attach_on(0, src);
    let d = BlockDev::open(&dev);
    d.write_block(3, &a).expect("write");
    d.write_block(4, &b).expect("write");
    d.sync().expect("fdatasync");
    // Where it is attached and its replicas' states, in `volume ls` on
    // a node without a replica.
    let ls: Vec<Value> = serde_json::from_str(&c.cli_ok(2, &["volume", "ls", "--json"])).unwrap();
    let listed = ls.iter().find(|v| v["name"] == src).expect("listed");
    assert_eq!(listed["cluster"]["attached_on"], "n1", "{listed}");
    let states: Vec<(&str, &str)> = listed["cluster"]["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| (r["node"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("n1", "in-sync"), ("n2", "in-sync")], "{listed}");
    let parent = format!("parent={src}");
    // Its replicas are the parent's: no other placement.
    let err = c.cli_err(
        0,
        &["volume", "create", copy, "-o", &parent, "-o", "repl=3"],
    );
    assert!(err.contains("repl") && err.contains("n1,n2"), "{err}");
    // Cloned while attached and written on n1, asked on n2: n1's mirror
    // takes the base snapshot.
    c.cli_ok(1, &["volume", "create", copy, "-o", &parent]);
    d.write_block(3, &new).expect("write after the clone");
    d.sync().expect("fdatasync");
    drop(d);
    c.detach_on(0, src);
    assert_eq!(c.placement(2, copy), ["n1", "n2"]);

    // The clone holds the parent as it was, on n2; its writes are its own.
    let dev = c.attach_on(1, copy);
    let d = BlockDev::open(&dev);
    assert_eq!(d.read_block(3).expect("read"), a);
    assert_eq!(d.read_block(4).expect("read"), b);
    d.write_block(4, &mine).expect("write to the clone");
    d.sync().expect("fdatasync");
    drop(d);
    c.detach_on(1, copy);
    assert_checksums_equal(&c, &[0, 1], copy);

    // The parent's replica on n2 holds the blocks of the clone's there.
    let err = c.cli_err(2, &["replica", "rm", src, "n2"]);
    assert!(err.contains(copy) && err.contains("n2"), "{err}");
    // A replica of the clone where its parent has none is a plain copy,
    // made whole from the others (detached: a background resync).
    c.cli_ok(
        2,
        &[
            "replica",
            "add",
            copy,
            "n3",
            "--wait",
            "--timeout",
            &RESYNC_TIMEOUT_SECS.to_string(),
        ],
    );
    assert_all_in_sync(&c, 2, copy, "after replica add of a clone");
    assert_checksums_equal(&c, &[0, 1, 2], copy);
    // The parent's replica on n3, added after the clone's plain copy
    // there, shares nothing with it: it may go again.
    let wait = RESYNC_TIMEOUT_SECS.to_string();
    c.cli_ok(
        1,
        &["replica", "add", src, "n3", "--wait", "--timeout", &wait],
    );
    assert_eq!(c.placement(2, src), ["n1", "n2", "n3"]);
    c.cli_ok(0, &["replica", "rm", src, "n3"]);
    assert_eq!(c.placement(2, src), ["n1", "n2"]);
    let dev = c.attach_on(2, copy);
    let d = BlockDev::open(&dev);
    assert_eq!(d.read_block(3).expect("read"), a);
    assert_eq!(d.read_block(4).expect("read"), mine);
    drop(d);
    c.detach_on(2, copy);

    let dev = c.attach_on(0, src);
    let d = BlockDev::open(&dev);
    assert_eq!(d.read_block(3).expect("read"), new);
    assert_eq!(d.read_block(4).expect("read"), b);
    drop(d);
    c.detach_on(0, src);

    // The parent stays while its clone does; then its base snapshot goes.
    let err = c.cli_err(2, &["volume", "rm", src]);
    assert!(err.contains(copy), "{err}");
    let bases = snapshot_names_on(&c, 2, src);
    assert_eq!(bases.len(), 1);
    let err = c.cli_err(2, &["snapshot", "rm", src, &bases[0].0]);
    assert!(err.contains(copy), "the clone's base stays with it: {err}");
    c.remove(2, copy);
    c.wait_for("the clone's base snapshot deleted", || {
        snapshot_names_on(&c, 2, src).is_empty()
    });

    // A clone of one of its snapshots (`parent=SRC@SNAP`), asked on a
    // node without a replica: made from each replica's SNAP.
    c.cli_ok(2, &["snapshot", "create", src, "s1"]);
    let dev = c.attach_on(0, src);
    let d = BlockDev::open(&dev);
    d.write_block(4, &a).expect("write after s1");
    d.sync().expect("fdatasync");
    let old = "old";
    c.cli_ok(
        2,
        &["volume", "create", old, "-o", &format!("parent={src}@s1")],
    );
    let err = c.cli_err(
        2,
        &["volume", "create", "bad", "-o", &format!("parent={src}@s0")],
    );
    assert!(
        err.contains("no snapshot s0") && err.contains("s1"),
        "{err}"
    );
    let dev2 = c.attach_on(1, old);
    let d2 = BlockDev::open(&dev2);
    assert_eq!(d2.read_block(3).expect("read"), new);
    assert_eq!(d2.read_block(4).expect("read"), b);
    drop(d2);
    c.detach_on(1, old);
    assert_eq!(d.read_block(4).expect("read"), a, "the parent goes on");
    drop(d);
    c.detach_on(0, src);
    let err = c.cli_err(0, &["snapshot", "rm", src, "s1"]);
    assert!(err.contains("clones (old)"), "{err}");
    c.remove(2, old);
    assert_eq!(
        snapshot_names_on(&c, 2, src)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["s1"],
        "SNAP stays with its volume"
    );
    // Once each node's sweep has deleted its replica of the clone.
    c.wait_for("s1 to be deletable", || {
        c.cli(0, &["snapshot", "rm", src, "s1"]).status.success()
    });
    c.remove(0, src);
    c.shutdown();
}

/// `replica add` and `rm`: a replica moves from n2 to n3 while fio writes
/// (LINSTOR's resource create/delete, Portworx's ha-update), and one whose
/// node is down is replaced while the volume is detached.
#[test]
fn replicas_move_between_nodes_while_in_use() {
    common::require_tools(&["fio"]);
    // Resyncs of the 64 MiB volume last ~16 s: long enough to be caught.
    let mut c = Cluster::start_with(Mode::Loopback, 3, |_| {
        vec!["--resync-rate".into(), "4".into()]
    });
    let vol = "mover";
    c.create(0, vol, 2, "64M", &[("nodes", "n1,n2")]);
    let id = c.inspect_on(0, vol)["id"].as_str().unwrap().to_string();
    let replica_dir = |c: &Cluster, i: usize| c.node(i).data_dir.join("volumes").join(&id);
    let dev = c.attach_on(0, vol);
    let d = BlockDev::open(&dev);
    // Outside fio's 32 MiB.
    let mine = 9000..9256u64;
    write_blocks(&d, mine.clone(), 1);
    d.sync().expect("fdatasync");

    let child = common::fio_verify("mover", &dev, "32M", &["--rate_iops=1500"])
        .spawn()
        .expect("run fio");
    let err = c.cli_err(0, &["replica", "add", vol, "n2"]);
    assert!(err.contains("already"), "{err}");
    // Asked on n2: forwarded to n1, whose mirror takes it live.
    let out = c.cli_ok(
        1,
        &[
            "replica",
            "add",
            vol,
            "--wait",
            "--timeout",
            &RESYNC_TIMEOUT_SECS.to_string(),
        ],
    );
    assert!(
        out.contains("n3"),
        "placement picks the one node left: {out}"
    );
    assert_all_in_sync(&c, 0, vol, "after replica add");
    assert_eq!(c.placement(0, vol), ["n1", "n2", "n3"]);
    let err = c.cli_err(2, &["replica", "add", vol]);
    assert!(
        err.contains("3 replicas") && err.contains("asked node n1"),
        "{err}"
    );
    c.cli_ok(2, &["replica", "rm", vol, "n2"]);
    assert_eq!(c.placement(0, vol), ["n1", "n3"]);
    assert_eq!(
        c.placement(2, vol),
        ["n1", "n3"],
        "etcd's record, seen from n3"
    );
    let err = c.cli_err(0, &["replica", "rm", vol, "n2"]);
    assert!(err.contains("no replica"), "{err}");

    let (ok, out) = common::wait_child(child, "fio", Duration::from_secs(300), || c.logs());
    assert!(
        ok && !out.contains("verify:"),
        "fio failed while a replica moved:\n{out}\n{}",
        c.logs()
    );
    verify_blocks(&d, mine.clone(), 1);
    let seen = device_sha256(&dev);
    drop(d);
    c.detach_on(0, vol);
    assert_eq!(assert_checksums_equal(&c, &[0, 2], vol), seen);
    c.wait_for("n2 dropping its removed replica", || {
        !replica_dir(&c, 1).exists()
    });

    // n3 lost for good: its replica is replaced while the volume is detached.
    c.kill9(2);
    c.wait_node_up(0, 2, false);
    let err = c.cli_err(0, &["replica", "rm", vol, "n1"]);
    assert!(err.contains("only current copy"), "n3 is down: {err}");
    c.cli_ok(1, &["replica", "rm", vol, "n3"]);
    let err = c.cli_err(0, &["replica", "rm", vol, "n1"]);
    assert!(err.contains("only replica"), "{err}");
    let out = c.cli_ok(1, &["replica", "add", vol]);
    assert!(out.contains("n2"), "the one live node without one: {out}");
    // Attached nowhere, it is resynced at once, in the background (on n2,
    // which ran the command, unless n1's sweep was quicker).
    let info = c.cluster_info(0, vol);
    assert!(info["resync_on"].is_string(), "{info}");
    assert_eq!(info["attached_on"], Value::Null, "{info}");
    assert_ne!(c.replica_info(0, vol, "n2")["state"], "in-sync");
    // An attach does not wait for it: the resync gives way (n1 asks n2
    // to stop it), and goes on under the attach.
    let dev = c.attach_on(0, vol);
    let info = c.cluster_info(0, vol);
    assert_eq!(info["attached_on"], "n1", "{info}");
    assert_eq!(info["resync_on"], Value::Null, "{info}");
    c.resync_on(0, vol, RESYNC_TIMEOUT_SECS);
    let d = BlockDev::open(&dev);
    verify_blocks(&d, mine.clone(), 1);
    drop(d);
    c.detach_on(0, vol);
    assert_eq!(assert_checksums_equal(&c, &[0, 1], vol), seen);

    // n3 back: the replica it lost while down is dropped; a new one is
    // added and resynced while the volume stays detached.
    c.start_again(2);
    c.wait_for("n3 dropping the replica it lost while down", || {
        !replica_dir(&c, 2).exists()
    });
    c.wait_node_up(0, 2, true);
    c.cli_ok(
        0,
        &[
            "replica",
            "add",
            vol,
            "n3",
            "--wait",
            "--timeout",
            &RESYNC_TIMEOUT_SECS.to_string(),
        ],
    );
    let info = c.cluster_info(2, vol);
    assert_eq!(info["attached_on"], Value::Null, "{info}");
    assert_all_in_sync(&c, 2, vol, "after a resync while detached");
    assert_eq!(assert_checksums_equal(&c, &[0, 1, 2], vol), seen);
    c.remove(0, vol);
    c.shutdown();
}

/// A replicated volume grows in use, asked on a node without a replica
/// (forwarded to the attached one, whose mirror opens again at the new
/// size while fio writes and verifies); refused in use while a replica is
/// away, naming it; then grows detached, from any node, with that replica
/// node down: the attached node's replica grows at the attach, the one
/// that was down when it comes back and is resynced; the data below the
/// old end stays, the new space takes writes, and the replicas end equal.
#[test]
fn a_replicated_volume_grows_in_use_and_with_a_replica_away() {
    common::require_tools(&["fio"]);
    let mut c = loopback_sweeping_every(3, 1);
    let vol = "growing";
    c.create(0, vol, 2, "32M", &[("nodes", "n1,n2")]);
    let dev = c.attach_on(0, vol);
    let d = BlockDev::open(&dev);
    write_blocks(&d, 0..64, 1);
    d.sync().expect("fdatasync");
    // fio over 8..24 MiB, clear of the blocks above.
    let child = common::fio_verify("growing", &dev, "16M", &["--offset=8M", "--rate_iops=1500"])
        .spawn()
        .expect("run fio");
    std::thread::sleep(Duration::from_millis(500));
    let said: Value =
        serde_json::from_str(&c.cli_ok(2, &["volume", "resize", vol, "64M", "--json"])).unwrap();
    assert_eq!(said["size_bytes"].as_u64(), Some(64 * MIB), "{said}");
    assert_eq!(device_bytes(&dev), 64 * MIB);
    assert!(
        c.node(0)
            .log()
            .contains("mirror open again at the grown size")
            && c.node(1).log().contains("grew the replica"),
        "n1's mirror did not reopen, or n2's replica did not grow, in use\n{}",
        c.logs()
    );
    // Past the old end (32 MiB = 8192 blocks of 4 KiB), while fio runs.
    let past_in_use = 8192 - 8..8192 + 64;
    write_blocks(&d, past_in_use.clone(), 2);
    let (ok, out) = common::wait_child(child, "fio", Duration::from_secs(300), || c.logs());
    assert!(
        ok && !out.contains("verify:"),
        "fio failed across the grow of a repl=2 volume in use:\n{out}\n{}",
        c.logs()
    );
    verify_blocks(&d, 0..64, 1);
    verify_blocks(&d, past_in_use.clone(), 2);
    d.sync().expect("fdatasync");
    assert_all_in_sync(&c, 0, vol, "after growing in use");

    // n2 away: refused in use, with the replica named.
    c.kill9(1);
    c.wait_node_up(0, 1, false);
    write_blocks(&d, 64..72, 4);
    d.sync().expect("fdatasync");
    c.wait_for("n1's mirror to find n2 gone", || {
        c.cluster_info(0, vol)["replicas"]
            .as_array()
            .is_some_and(|rs| {
                rs.iter()
                    .any(|r| r["node"] == "n2" && r["state"] != "in-sync")
            })
    });
    let err = c.cli_err(2, &["volume", "resize", vol, "96M"]);
    assert!(
        err.contains("replica on node n2") && err.contains("detach"),
        "{err}"
    );
    assert_eq!(c.inspect_on(2, vol)["size_bytes"].as_u64(), Some(64 * MIB));
    assert_eq!(device_bytes(&dev), 64 * MIB);
    drop(d);
    c.detach_on(0, vol);

    c.cli_ok(2, &["volume", "resize", vol, "96M"]);
    for i in [0, 2] {
        assert_eq!(
            c.inspect_on(i, vol)["size_bytes"].as_u64().unwrap(),
            96 * MIB
        );
    }
    let dev = c.attach_on(0, vol);
    assert_eq!(device_bytes(&dev), 96 * MIB);
    let d = BlockDev::open(&dev);
    verify_blocks(&d, 0..64, 1);
    verify_blocks(&d, 64..72, 4);
    verify_blocks(&d, past_in_use.clone(), 2);
    // Past the old end (64 MiB = 16384 blocks of 4 KiB), up to the new one.
    let past = 16384 - 8..16384 + 64;
    let last = 24576 - 16..24576;
    write_blocks(&d, past.clone(), 5);
    write_blocks(&d, last.clone(), 3);
    drop(d);
    c.detach_on(0, vol);

    c.start_again(1);
    wait_all_in_sync(&c, 2, vol);
    wait_resync_gone(&c, 2, vol);
    assert_checksums_equal(&c, &[0, 1], vol);
    // Once in use, once now.
    assert_eq!(
        c.node(1).log().matches("grew the replica").count(),
        2,
        "n2's replica did not grow when it came back\n{}",
        c.logs()
    );
    let d = BlockDev::open(&c.attach_on(1, vol));
    verify_blocks(&d, 0..64, 1);
    verify_blocks(&d, 64..72, 4);
    verify_blocks(&d, past_in_use, 2);
    verify_blocks(&d, past, 5);
    verify_blocks(&d, last, 3);
    drop(d);
    c.detach_on(1, vol);
    c.remove(0, vol);
    c.shutdown();
}

/// The size of block device `dev` in bytes.
fn device_bytes(dev: &str) -> u64 {
    let out = Command::new("blockdev")
        .args(["--getsize64", dev])
        .output()
        .expect("blockdev");
    assert!(out.status.success(), "blockdev {dev}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a size")
}

/// `node cordon` keeps new replicas off a node; `node evacuate` moves
/// every replica it holds elsewhere, one of a volume in use (fio writing
/// and verifying across it) and one of a repl=1 volume, keeping the data;
/// `node rm` forgets the node once it is down, never while it is up. The
/// volume in use is attached on the node emptied, which goes on diskless;
/// its metrics show the cordon and the replicas' states.
#[test]
fn a_node_is_cordoned_evacuated_and_forgotten() {
    common::require_tools(&["fio"]);
    let metrics = format!("127.0.0.1:{}", netns::free_port(Ipv4Addr::LOCALHOST));
    let m = metrics.clone();
    let mut c = Cluster::start_with(Mode::Loopback, 3, move |i| {
        let mut args = vec!["--sweep-interval".into(), "1".into()];
        if i == 1 {
            args.extend(["--metrics-listen".into(), m.clone()]);
        }
        args
    });
    let scrape = || {
        let conn = std::net::TcpStream::connect(&metrics).expect("connect to n2's metrics");
        let (status, body) = common::http_get(conn, "/metrics");
        assert!(
            status.contains("200"),
            "scrape of n2's metrics: {status}\n{body}"
        );
        body
    };
    c.create(0, "ev-a", 2, "32M", &[("nodes", "n1,n2")]);
    c.create(0, "ev-b", 1, "16M", &[("nodes", "n2")]);
    let d = BlockDev::open(&c.attach_on(1, "ev-b"));
    write_blocks(&d, 0..256, 7);
    drop(d);
    c.detach_on(1, "ev-b");
    // Attached on the node to empty: it goes on diskless.
    let dev = c.attach_on(1, "ev-a");
    let d = BlockDev::open(&dev);
    // Outside fio's 8..24 MiB.
    write_blocks(&d, 0..64, 1);
    d.sync().expect("fdatasync");

    c.cli_ok(2, &["node", "cordon", "n2"]);
    let nodes: Value = serde_json::from_str(&c.cli_ok(0, &["node", "ls", "--json"])).unwrap();
    let cordoned: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["cordoned"] == true)
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(cordoned, ["n2"], "{nodes}");
    // Each node reported its data directory's size and free space.
    for m in nodes.as_array().unwrap() {
        let size = m["capacity"]["total_bytes"].as_u64().unwrap_or(0);
        let free = m["capacity"]["free_bytes"].as_u64().unwrap_or(u64::MAX);
        assert!(size > 0 && free <= size, "{m}");
    }
    let table = c.cli_ok(1, &["node", "ls"]);
    assert!(
        table.contains("up, cordoned") && table.contains("FREE") && table.contains("%)"),
        "{table}"
    );
    let err = c.cli_err(
        0,
        &["volume", "create", "ev-c", "-o", "repl=3", "-o", "size=16M"],
    );
    assert!(
        err.contains("only 2 are up") && err.contains("cordoned, taking no new replicas: n2"),
        "{err}"
    );
    let err = c.cli_err(
        0,
        &["volume", "create", "ev-c", "-o", "repl=1", "-o", "nodes=n2"],
    );
    assert!(err.contains("node n2 named in nodes= is cordoned"), "{err}");
    let err = c.cli_err(0, &["node", "cordon", "n9"]);
    assert!(err.contains("node n9 is not a member"), "{err}");
    let m = scrape();
    assert!(
        m.contains("dunnage_cluster_node_free_bytes{node=\"n3\"}"),
        "no free space of n3 in n2's metrics:\n{m}"
    );
    for line in [
        "dunnage_cluster_node_cordoned{node=\"n2\"} 1",
        "dunnage_cluster_node_cordoned{node=\"n3\"} 0",
        "dunnage_cluster_node_up{node=\"n2\"} 1",
        "dunnage_replica_in_sync{volume=\"ev-a\",replica=\"n2\"} 1",
        "dunnage_replica_connected{volume=\"ev-a\",replica=\"n2\"} 1",
        "dunnage_volume_replicas_behind{volume=\"ev-a\"} 0",
    ] {
        assert!(
            m.lines().any(|l| l == line),
            "no `{line}` in n2's metrics:\n{m}"
        );
    }

    let child = common::fio_verify("evac", &dev, "16M", &["--offset=8M", "--rate_iops=1500"])
        .spawn()
        .expect("run fio");
    let out = c.cli_ok(0, &["node", "evacuate", "n2", "--timeout", "300"]);
    assert!(
        out.contains("ev-a: replica on n2 removed")
            && out.contains("ev-b: replica on n2 removed")
            && out.contains("node n2 holds no replicas (2 moved)"),
        "{out}"
    );
    assert_eq!(c.placement(2, "ev-a"), ["n1", "n3"]);
    let m = scrape();
    assert!(
        m.lines()
            .any(|l| l == "dunnage_replica_in_sync{volume=\"ev-a\",replica=\"n3\"} 1")
            && !m.contains("replica=\"n2\""),
        "n2's metrics after the evacuation:\n{m}"
    );
    // Placement's pick: n1 and n3 hold one replica each now, n1 first by name.
    assert_eq!(c.placement(2, "ev-b"), ["n1"]);
    let (ok, out) = common::wait_child(child, "fio", Duration::from_secs(300), || c.logs());
    assert!(
        ok && !out.contains("verify:"),
        "fio failed while its volume's replica moved off n2:\n{out}\n{}",
        c.logs()
    );
    verify_blocks(&d, 0..64, 1);
    let seen = device_sha256(&dev);
    drop(d);
    c.detach_on(1, "ev-a");
    assert_eq!(assert_checksums_equal(&c, &[0, 2], "ev-a"), seen);
    let d = BlockDev::open(&c.attach_on(2, "ev-b"));
    verify_blocks(&d, 0..256, 7);
    drop(d);
    c.detach_on(2, "ev-b");
    assert_checksums_equal(&c, &[0], "ev-b");
    // Nothing left to move: a second run does nothing, and says so.
    let out = c.cli_ok(1, &["node", "evacuate", "n2"]);
    assert!(out.contains("(0 moved)"), "{out}");

    let err = c.cli_err(0, &["node", "rm", "n2"]);
    assert!(err.contains("node n2 is up"), "{err}");
    c.kill9(1);
    c.wait_node_up(0, 1, false);
    let err = c.cli_err(0, &["node", "rm", "n3"]);
    assert!(err.contains("node n3 holds replicas of ev-a"), "{err}");
    c.cli_ok(0, &["node", "rm", "n2"]);
    let nodes = c.cli_ok(2, &["node", "ls"]);
    assert!(!nodes.contains("n2"), "{nodes}");
    let err = c.cli_err(0, &["node", "rm", "n2"]);
    assert!(err.contains("node n2 is not a member"), "{err}");
    // Started again, it joins again, not cordoned (the cordon went with it).
    c.start_again(1);
    c.wait_node_up(0, 1, true);
    let nodes = c.cli_ok(0, &["node", "ls"]);
    assert!(
        nodes.contains("n2") && !nodes.contains("cordoned"),
        "{nodes}"
    );
    c.remove(0, "ev-a");
    c.remove(0, "ev-b");
    c.shutdown();
}

/// A replicated volume's snapshots export on a node holding a replica
/// (the attached one or another; refused elsewhere), and import into a
/// new replicated volume placed on other nodes, whose replicas end equal.
#[test]
fn a_replicated_volumes_snapshots_export_and_import_into_another_volume() {
    let c = Cluster::start(Mode::Loopback, 3);
    let tmp = tempfile::tempdir().unwrap();
    let f = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    c.create(0, "ex", 2, "32M", &[("nodes", "n1,n2")]);
    let d = BlockDev::open(&c.attach_on(0, "ex"));
    write_blocks(&d, 0..64, 1);
    d.sync().expect("fdatasync");
    c.cli_ok(0, &["snapshot", "create", "ex", "s1"]);
    write_blocks(&d, 32..96, 2);
    d.sync().expect("fdatasync");
    c.cli_ok(2, &["snapshot", "create", "ex", "s2"]);
    write_blocks(&d, 200..210, 3);

    let err = c.cli_err(2, &["snapshot", "export", "ex", "s1", "-o", &f("no")]);
    assert!(
        err.contains("node n3 holds no replica") && err.contains("n1, n2"),
        "{err}"
    );
    // On n2, whose replica is not the attached node's; then on n1, in use.
    c.cli_ok(1, &["snapshot", "export", "ex", "s1", "-o", &f("s1")]);
    c.cli_ok(
        0,
        &[
            "snapshot",
            "export",
            "ex",
            "s2",
            "--since",
            "s1",
            "-o",
            &f("s2"),
        ],
    );
    drop(d);
    c.detach_on(0, "ex");

    c.cli_ok(
        2,
        &[
            "volume",
            "import",
            "copy",
            "-i",
            &f("s1"),
            "-o",
            "repl=2",
            "-o",
            "nodes=n2,n3",
        ],
    );
    c.cli_ok(2, &["volume", "import", "copy", "-i", &f("s2")]);
    assert_eq!(c.placement(0, "copy"), ["n2", "n3"]);
    let d = BlockDev::open(&c.attach_on(2, "copy"));
    verify_blocks(&d, 0..32, 1);
    verify_blocks(&d, 32..96, 2);
    // Written after s2: not in the copy.
    for i in 200..210 {
        assert!(
            d.read_block(i).unwrap().iter().all(|&b| b == 0),
            "block {i}"
        );
    }
    drop(d);
    c.detach_on(2, "copy");
    assert_checksums_equal(&c, &[1, 2], "copy");
    c.remove(0, "copy");
    c.remove(0, "ex");
    c.shutdown();
}

/// `volume verify` finds a replica whose data went bad behind dunnage's
/// back (a block of its data file overwritten) and repairs it from the
/// replica reads come from: attached nowhere (run here, followed with
/// --wait), and attached (asked on another node, run by the attached one,
/// the volume in use).
#[test]
fn verify_finds_and_repairs_a_replica_that_differs() {
    let c = Cluster::start(Mode::Loopback, 3);
    c.create(0, "vf", 2, "16M", &[("nodes", "n1,n2")]);
    c.create(0, "single", 1, "16M", &[]);
    let err = c.cli_err(1, &["volume", "verify", "single"]);
    assert!(err.contains("nothing to compare"), "{err}");
    let id = c.inspect_on(0, "vf")["id"].as_str().unwrap().to_string();
    let data = c.node(1).data_dir.join("volumes").join(&id).join("data");
    let damage = |block: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all_at(&[0xEE; 4096], block * 4096).unwrap();
        f.sync_all().unwrap();
    };
    let d = BlockDev::open(&c.attach_on(0, "vf"));
    write_blocks(&d, 0..256, 1);
    drop(d);
    c.detach_on(0, "vf");
    let good = c.checksum_on(0, "vf");

    // Attached nowhere: compared and repaired here.
    damage(10);
    assert_ne!(
        c.checksum_on(1, "vf"),
        good,
        "the damage did not reach n2's replica"
    );
    let out = c.cli_ok(0, &["volume", "verify", "vf", "--wait"]);
    assert!(
        out.contains("compared 16.00 MiB on node n1") && out.contains("differed and were repaired"),
        "{out}\n{}",
        c.logs()
    );
    assert_eq!(c.checksum_on(1, "vf"), good);
    let v = &c.cluster_info(0, "vf")["verification"];
    assert_eq!(v["finished"], true, "{v}");
    assert!(v["repaired_bytes"].as_u64().unwrap() > 0, "{v}");
    // Nothing differs now: a second run says so.
    let out = c.cli_ok(0, &["volume", "verify", "vf", "--wait"]);
    assert!(out.contains("every replica held the same data"), "{out}");

    // Attached on n1, asked on n3.
    let d = BlockDev::open(&c.attach_on(0, "vf"));
    damage(100);
    let out = c.cli_ok(2, &["volume", "verify", "vf"]);
    assert!(out.contains("on node n1"), "{out}");
    c.wait_for("n1's comparison to finish", || {
        let v = &c.cluster_info(0, "vf")["verification"];
        v["finished"] == true && v["requested"] == true
    });
    let v = &c.cluster_info(0, "vf")["verification"];
    assert!(v["repaired_bytes"].as_u64().unwrap() > 0, "{v}");
    verify_blocks(&d, 0..256, 1);
    drop(d);
    c.detach_on(0, "vf");
    assert_checksums_equal(&c, &[0, 1], "vf");
    c.remove(0, "vf");
    c.remove(0, "single");
    c.shutdown();
}

/// A node that stays down past `--replace-after` has its replicas replaced
/// on the other nodes, with no operator: a volume attached elsewhere (its
/// attached node does it, while it serves IO) and one attached nowhere (the
/// node of its first live in-sync replica does it) each get a new replica,
/// resynced, and then lose the dead node's; the dead node, back, deletes
/// its files. Off by default (`--replace-after 600`, and 0 is never).
#[test]
fn replicas_of_a_node_that_stays_down_are_replaced_elsewhere() {
    let mut c = Cluster::start_with(Mode::Loopback, 3, |_| {
        ["--sweep-interval", "1", "--replace-after", "3"]
            .map(String::from)
            .to_vec()
    });
    c.create(0, "inuse", 2, "64M", &[("nodes", "n1,n2")]);
    c.create(0, "idle", 2, "64M", &[("nodes", "n2,n3")]);
    let ids: Vec<String> = ["inuse", "idle"]
        .iter()
        .map(|v| c.inspect_on(0, v)["id"].as_str().unwrap().to_string())
        .collect();
    let d = BlockDev::open(&c.attach_on(2, "idle"));
    write_blocks(&d, 0..512, 1);
    d.sync().expect("fdatasync");
    drop(d);
    c.detach_on(2, "idle");
    let d = BlockDev::open(&c.attach_on(0, "inuse"));
    write_blocks(&d, 0..512, 2);
    d.sync().expect("fdatasync");

    // Cordoned (maintenance), n2's replicas are left alone while it is down.
    c.cli_ok(0, &["node", "cordon", "n2"]);
    c.kill9(1);
    // Written while n2 is down, before and during its replacement.
    write_blocks(&d, 1024..1280, 3);
    d.sync().expect("fdatasync");
    c.wait_node_up(0, 1, false);
    thread::sleep(Duration::from_secs(6));
    assert_eq!(c.placement(0, "inuse"), ["n1", "n2"]);
    assert_eq!(c.placement(0, "idle"), ["n2", "n3"]);
    assert!(!c.logs().contains("adding a replica elsewhere"));
    c.cli_ok(0, &["node", "uncordon", "n2"]);
    let replaced = |vol: &str, want: [&str; 2]| {
        c.placement(0, vol) == want
            && c.cluster_info(0, vol)["replicas"]
                .as_array()
                .is_some_and(|rs| rs.iter().all(|r| r["state"] == "in-sync"))
    };
    c.wait_for("n2's replica of inuse replaced on n3", || {
        replaced("inuse", ["n1", "n3"])
    });
    write_blocks(&d, 2048..2304, 4);
    d.sync().expect("fdatasync");
    c.wait_for("n2's replica of idle replaced on n1", || {
        replaced("idle", ["n1", "n3"])
    });
    let info = c.cluster_info(0, "inuse");
    assert!(
        info["replicas"]
            .as_array()
            .is_some_and(|rs| rs.iter().all(|r| r["replaces"].is_null())),
        "a finished replacement is no longer shown: {info}"
    );
    let log = netns::strip_ansi(&c.logs());
    assert!(
        log.contains("replacement replica added") && log.contains("its replacement is in sync"),
        "{log}"
    );
    verify_blocks(&d, 0..512, 2);
    verify_blocks(&d, 1024..1280, 3);
    verify_blocks(&d, 2048..2304, 4);
    drop(d);
    c.detach_on(0, "inuse");
    assert_checksums_equal(&c, &[0, 2], "inuse");
    assert_checksums_equal(&c, &[0, 2], "idle");

    // n2 comes back: etcd places nothing there any more, so it deletes
    // both replicas' files at its sweep, and gets no replica back.
    c.start_again(1);
    let dir = c.node(1).data_dir.join("volumes");
    c.wait_for("n2 to delete its replaced replicas", || {
        ids.iter().all(|id| !dir.join(id).exists())
    });
    assert_eq!(c.placement(1, "inuse"), ["n1", "n3"]);
    assert_eq!(c.placement(1, "idle"), ["n1", "n3"]);
    let d = BlockDev::open(&c.attach_on(0, "idle"));
    verify_blocks(&d, 0..512, 1);
    drop(d);
    c.detach_on(0, "idle");
    c.remove(0, "inuse");
    c.remove(0, "idle");
    c.shutdown();
}

/// Replica traffic is authenticated (DRBD's shared-secret): every node of
/// the harness holds the cluster secret. A peer without it gets nothing
/// from the replica port, not even a fence of the attached node with a
/// forged generation; a node started without the secret, or with another
/// one, is refused by the attached node (the volume goes on with the
/// others), and taken back once it has the right one.
#[test]
fn replica_traffic_needs_the_cluster_secret() {
    use dunnage::replication::wire::{self, ErrorCode, Frame, Hello};
    let mut c = Cluster::start(Mode::Loopback, 2);
    let vol = "guarded";
    c.create(0, vol, 2, "64M", &[("nodes", "n1,n2")]);
    let id = c.inspect_on(0, vol)["id"].as_str().unwrap().to_string();
    let d = BlockDev::open(&c.attach_on(0, vol));
    write_blocks(&d, 0..64, 1);
    d.sync().expect("fdatasync");

    // A forged Hello at a generation far ahead: challenged, then refused.
    let forged = Hello::new(
        &id,
        1 << 40,
        "intruder",
        dunnage::engine::ThinParams {
            size: 64 * MIB,
            block_size: 32 << 10,
        },
    );
    let s = std::net::TcpStream::connect(c.addr(1)).expect("connect to n2's replica port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    wire::write_frame(&mut &s, &Frame::Hello(forged)).unwrap();
    match wire::read_frame(&mut &s).expect("n2 answers") {
        Some(Frame::Challenge { .. }) => {}
        other => panic!("expected a challenge, got {other:?}"),
    }
    wire::write_frame(&mut &s, &Frame::Proof { proof: [7; 32] }).unwrap();
    match wire::read_frame(&mut &s).expect("n2 answers") {
        Some(Frame::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::Unauthorized, "{message}");
            assert!(message.contains("intruder"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(s);
    // n1 still writes to both: nothing was fenced.
    write_blocks(&d, 64..128, 2);
    d.sync().expect("fdatasync");
    assert_all_in_sync(&c, 0, vol, "after the forged Hello");

    let secret = c.secret_file().display().to_string();
    let other = c.node(1).root().join("other.secret");
    std::fs::write(&other, "another cluster's secret\n").unwrap();
    let other = other.display().to_string();
    let refusals = [
        (None, "accepted this node without authenticating it"),
        (Some(other.as_str()), "did not prove this cluster's secret"),
    ];
    for (seed, (with, refusal)) in (3u64..).zip(refusals) {
        c.kill9(1);
        c.node_mut(1).set_arg("--cluster-secret-file", with);
        c.start_again(1);
        // The write finds n2's old link gone; n1 reconnects, and refuses.
        write_blocks(&d, 0..32, seed);
        d.sync().expect("fdatasync");
        c.wait_for(&format!("n1 to refuse n2 ({refusal})"), || {
            c.node(0).log().contains(refusal)
        });
        assert_ne!(
            c.replica_info(0, vol, "n2")["state"],
            "in-sync",
            "n2 must not serve as a replica ({with:?})"
        );
    }
    // n1 retries every second; n2 (with another secret) says so once.
    thread::sleep(Duration::from_secs(3));
    let log = c.node(1).log();
    let this_run = log.rsplit("===== spawn").next().unwrap_or_default();
    let warned = this_run
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("replica link refused"))
        .count();
    assert_eq!(warned, 1, "{this_run}");
    // `status` says what needs a look; `--check` says it to scripts.
    let out = c.cli(0, &["status", "--check"]);
    assert!(matches!(out.status.code(), Some(1 | 2)), "{out:?}");
    assert!(
        out.stdout.contains("WARN   volume guarded: n2 outdated")
            && out.stdout.contains("cluster   2 nodes: 2 up, 0 down"),
        "{}",
        out.stdout
    );
    c.kill9(1);
    c.node_mut(1)
        .set_arg("--cluster-secret-file", Some(&secret));
    c.start_again(1);
    c.resync_on(0, vol, RESYNC_TIMEOUT_SECS);
    assert_all_in_sync(&c, 0, vol, "with the right secret");
    // Healthy but for this host's disk, which may be filling (not ours).
    let status: Value = serde_json::from_str(&c.cli_ok(1, &["status", "--json"])).unwrap();
    let findings = status["findings"].as_array().unwrap();
    assert!(
        findings
            .iter()
            .all(|f| f["what"].as_str().unwrap().starts_with("data directory")),
        "{status}"
    );
    assert_eq!(status["volumes"]["total"], 1, "{status}");
    assert_eq!(status["volumes"]["degraded"], 0, "{status}");
    assert_eq!(status["nodes"]["up"], 2, "{status}");
    verify_blocks(&d, 0..32, 4);
    verify_blocks(&d, 64..128, 2);
    drop(d);
    c.detach_on(0, vol);
    assert_checksums_equal(&c, &[0, 1], vol);
    c.remove(0, vol);
    c.shutdown();
}
