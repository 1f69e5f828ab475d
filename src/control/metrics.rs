//! Prometheus metrics (`GET /metrics`, on `serve --metrics-listen` and on
//! the control socket), gathered when scraped: nothing is counted on the
//! IO path. A volume's IO figures are its block device's own counters
//! (`/sys/block/<dev>/stat`, what iostat reads), so they cover every
//! export path, passthrough included, and restart from zero when the
//! volume is attached again (a counter reset, which Prometheus expects).

use crate::catalog::VolumeRecord;
use crate::cluster::Member;
use crate::replication::{ReplicaState, ReplicaStatus};
use crate::volume::{Runtime, State};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::path::Path;
use std::sync::atomic::AtomicU64;

/// What a scrape reads of one volume.
pub struct VolumeSample {
    pub record: VolumeRecord,
    pub runtime: Runtime,
    /// Bytes its files take on this node.
    pub allocated: u64,
    /// Its replicas, where this node holds its attach (the mirror's view).
    pub replicas: Option<Vec<ReplicaStatus>>,
    /// Time its IO waited for its caps here (since the daemon started).
    pub throttled: Option<std::time::Duration>,
}

/// A block device's counters (Documentation/block/stat.rst), bytes rather
/// than sectors.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub read_ms: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub write_ms: u64,
    pub in_flight: u64,
    pub io_ms: u64,
    pub discards: u64,
    pub discard_bytes: u64,
    pub flushes: u64,
}

impl DeviceStats {
    /// Parse a `stat` file's line; older kernels lack the discard and
    /// flush fields (read as 0).
    pub fn parse(line: &str) -> Option<DeviceStats> {
        let f: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        if f.len() < 11 {
            return None;
        }
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        Some(DeviceStats {
            reads: at(0),
            read_bytes: at(2) * 512,
            read_ms: at(3),
            writes: at(4),
            write_bytes: at(6) * 512,
            write_ms: at(7),
            in_flight: at(8),
            io_ms: at(9),
            discards: at(11),
            discard_bytes: at(13) * 512,
            flushes: at(15),
        })
    }

    /// What was counted since `base` (a loop device's counters run on
    /// across attaches).
    pub fn since(&self, base: &DeviceStats) -> DeviceStats {
        DeviceStats {
            reads: self.reads.saturating_sub(base.reads),
            read_bytes: self.read_bytes.saturating_sub(base.read_bytes),
            read_ms: self.read_ms.saturating_sub(base.read_ms),
            writes: self.writes.saturating_sub(base.writes),
            write_bytes: self.write_bytes.saturating_sub(base.write_bytes),
            write_ms: self.write_ms.saturating_sub(base.write_ms),
            in_flight: self.in_flight,
            io_ms: self.io_ms.saturating_sub(base.io_ms),
            discards: self.discards.saturating_sub(base.discards),
            discard_bytes: self.discard_bytes.saturating_sub(base.discard_bytes),
            flushes: self.flushes.saturating_sub(base.flushes),
        }
    }

    /// The counters of `device` (`/dev/loop3` reads `/sys/class/block/loop3/stat`).
    pub fn of(device: &Path) -> Option<DeviceStats> {
        let name = device.file_name()?;
        let stat = Path::new("/sys/class/block").join(name).join("stat");
        DeviceStats::parse(&std::fs::read_to_string(stat).ok()?)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    volume: String,
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    node: String,
    version: String,
    export: String,
}

type Gauges<L> = Family<L, Gauge>;
type Counters<L> = Family<L, Counter>;
type SecondsTotal<L> = Family<L, Counter<f64, AtomicU64>>;

/// A family registered under `name`; filled by the caller.
fn family<M: prometheus_client::registry::Metric + Default + Clone>(
    reg: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let m = M::default();
    reg.register(name, help, m.clone());
    m
}

/// The text exposition of this node's metrics. `members`: the cluster's
/// nodes (None on a single node, or when etcd did not answer).
pub fn render(
    node: &str,
    export: &str,
    volumes: &[VolumeSample],
    members: Option<&[Member]>,
    data: Option<crate::cluster::Capacity>,
) -> String {
    let mut reg = Registry::default();
    if let Some(c) = data {
        let size: Gauge = family(
            &mut reg,
            "dunnage_data_capacity_bytes",
            "Size of the filesystem holding this node's data directory",
        );
        let free: Gauge = family(
            &mut reg,
            "dunnage_data_free_bytes",
            "Free space of the filesystem holding this node's data directory",
        );
        size.set(gauge(c.total_bytes));
        free.set(gauge(c.free_bytes));
    }
    let info: Gauges<InfoLabels> = family(
        &mut reg,
        "dunnage_node_info",
        "This daemon: its node name, version and export (always 1)",
    );
    info.get_or_create(&InfoLabels {
        node: node.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        export: export.to_string(),
    })
    .set(1);

    let size: Gauges<VolumeLabels> =
        family(&mut reg, "dunnage_volume_size_bytes", "The volume's size");
    let allocated: Gauges<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_allocated_bytes",
        "Bytes the volume's files take on this node's backing filesystem",
    );
    let attached: Gauges<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_attached",
        "1 while the volume is attached on this node (mounted for Docker or a raw device)",
    );
    let mounts: Gauges<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_docker_mounts",
        "Docker mounts outstanding on this node",
    );
    let reads: Counters<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_reads",
        "Reads completed by the volume's device on this node",
    );
    let read_bytes: Counters<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_read_bytes",
        "Bytes read from the volume's device",
    );
    let read_secs: SecondsTotal<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_read_seconds",
        "Time reads spent, summed over reads",
    );
    let writes: Counters<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_writes",
        "Writes completed by the volume's device on this node",
    );
    let write_bytes: Counters<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_written_bytes",
        "Bytes written to the volume's device",
    );
    let write_secs: SecondsTotal<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_write_seconds",
        "Time writes spent, summed over writes",
    );
    let discards: Counters<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_discards",
        "Discards (TRIM) completed",
    );
    let discard_bytes: Counters<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_discarded_bytes",
        "Bytes discarded",
    );
    let flushes: Counters<VolumeLabels> =
        family(&mut reg, "dunnage_volume_flushes", "Flushes completed");
    let busy: SecondsTotal<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_busy_seconds",
        "Time the device had IO in flight (utilisation)",
    );
    let in_flight: Gauges<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_io_in_flight",
        "IOs in flight on the volume's device",
    );

    let max_iops: Gauges<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_max_iops",
        "The volume's IO cap (max_iops), where it has one",
    );
    let max_bw: Gauges<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_max_bandwidth_bytes",
        "The volume's bandwidth cap (max_bandwidth) in bytes per second, where it has one",
    );
    let throttled: SecondsTotal<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_throttled_seconds",
        "Time the volume's IO waited for its caps on this node, summed over IOs",
    );
    let in_sync: Gauges<ReplicaLabels> = family(
        &mut reg,
        "dunnage_replica_in_sync",
        "1 while the replica is in sync (as the volume's attached node sees it)",
    );
    let connected: Gauges<ReplicaLabels> = family(
        &mut reg,
        "dunnage_replica_connected",
        "1 while the attached node's link to the replica is up",
    );
    let resync_left: Gauges<ReplicaLabels> = family(
        &mut reg,
        "dunnage_replica_resync_remaining_bytes",
        "Bytes the replica's resync still has to go through",
    );
    let resync_sent: Counters<ReplicaLabels> = family(
        &mut reg,
        "dunnage_replica_resync_sent_bytes",
        "Bytes resyncs sent to the replica since the volume was attached here",
    );
    let behind: Gauges<VolumeLabels> = family(
        &mut reg,
        "dunnage_volume_replicas_behind",
        "Replicas of the volume not in sync (as its attached node sees them)",
    );

    for v in volumes {
        let l = VolumeLabels {
            volume: v.record.name.clone(),
        };
        size.get_or_create(&l).set(gauge(v.record.spec.size));
        allocated.get_or_create(&l).set(gauge(v.allocated));
        attached
            .get_or_create(&l)
            .set(i64::from(v.runtime.state != State::Detached));
        mounts.get_or_create(&l).set(i64::from(v.runtime.mounts));
        if let Some(n) = v.record.spec.limits.iops {
            max_iops.get_or_create(&l).set(i64::from(n));
        }
        if let Some(b) = v.record.spec.limits.bandwidth {
            max_bw.get_or_create(&l).set(gauge(b));
        }
        if let Some(t) = v.throttled {
            throttled.get_or_create(&l).inc_by(t.as_secs_f64());
        }
        let stats = v.runtime.device.as_deref().and_then(DeviceStats::of);
        if let Some(s) = stats.map(|s| s.since(&v.runtime.device_base.unwrap_or_default())) {
            reads.get_or_create(&l).inc_by(s.reads);
            read_bytes.get_or_create(&l).inc_by(s.read_bytes);
            read_secs.get_or_create(&l).inc_by(seconds(s.read_ms));
            writes.get_or_create(&l).inc_by(s.writes);
            write_bytes.get_or_create(&l).inc_by(s.write_bytes);
            write_secs.get_or_create(&l).inc_by(seconds(s.write_ms));
            discards.get_or_create(&l).inc_by(s.discards);
            discard_bytes.get_or_create(&l).inc_by(s.discard_bytes);
            flushes.get_or_create(&l).inc_by(s.flushes);
            busy.get_or_create(&l).inc_by(seconds(s.io_ms));
            in_flight.get_or_create(&l).set(gauge(s.in_flight));
        }
        let Some(replicas) = &v.replicas else {
            continue;
        };
        let mut not_in_sync = 0;
        for r in replicas {
            let rl = ReplicaLabels {
                volume: v.record.name.clone(),
                replica: r.node.clone(),
            };
            let ok = r.state == ReplicaState::InSync;
            not_in_sync += i64::from(!ok);
            in_sync.get_or_create(&rl).set(i64::from(ok));
            connected.get_or_create(&rl).set(i64::from(r.connected));
            let left = r
                .resync
                .map_or(0, |p| p.total_bytes.saturating_sub(p.done_bytes));
            resync_left.get_or_create(&rl).set(gauge(left));
            resync_sent.get_or_create(&rl).inc_by(r.resync_sent_bytes);
        }
        behind.get_or_create(&l).set(not_in_sync);
    }

    if let Some(members) = members {
        let size: Gauges<NodeLabels> = family(
            &mut reg,
            "dunnage_cluster_node_capacity_bytes",
            "Size of the node's data directory's filesystem, as it last reported it",
        );
        let free: Gauges<NodeLabels> = family(
            &mut reg,
            "dunnage_cluster_node_free_bytes",
            "Free space of the node's data directory's filesystem, as it last reported it",
        );
        let up: Gauges<NodeLabels> = family(
            &mut reg,
            "dunnage_cluster_node_up",
            "1 while the node's etcd lease is alive",
        );
        let cordoned: Gauges<NodeLabels> = family(
            &mut reg,
            "dunnage_cluster_node_cordoned",
            "1 while the node takes no new replicas",
        );
        for m in members {
            let l = NodeLabels {
                node: m.name.clone(),
            };
            up.get_or_create(&l).set(i64::from(m.up));
            cordoned.get_or_create(&l).set(i64::from(m.cordoned));
            if let Some(c) = m.capacity {
                size.get_or_create(&l).set(gauge(c.total_bytes));
                free.get_or_create(&l).set(gauge(c.free_bytes));
            }
        }
    }

    let mut out = String::new();
    encode(&mut out, &reg).expect("encoding into a String does not fail");
    out
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_stats_parse_the_kernels_line() {
        // A loop device after some IO (Linux 6.x: 17 fields).
        let line = "    1500        3   24000     250     4000       10  800000    1200        2     1400     1450      7    0    56    1   30    9\n";
        let s = DeviceStats::parse(line).unwrap();
        assert_eq!(s.reads, 1500);
        assert_eq!(s.read_bytes, 24000 * 512);
        assert_eq!(s.read_ms, 250);
        assert_eq!(s.writes, 4000);
        assert_eq!(s.write_bytes, 800000 * 512);
        assert_eq!(s.write_ms, 1200);
        assert_eq!(s.in_flight, 2);
        assert_eq!(s.io_ms, 1400);
        assert_eq!(s.discards, 7);
        assert_eq!(s.discard_bytes, 56 * 512);
        assert_eq!(s.flushes, 30);
        // Before Linux 4.18: 11 fields, no discards or flushes.
        let old = DeviceStats::parse("1 0 8 1 2 0 16 3 0 4 4").unwrap();
        assert_eq!(
            (old.reads, old.writes, old.discards, old.flushes),
            (1, 2, 0, 0)
        );
        // A loop device's counters run on from its earlier attaches.
        let later =
            DeviceStats::parse("1600 3 24800 260 4100 10 800800 1300 0 1500 1450 7 0 56 1 31 9")
                .unwrap();
        let d = later.since(&s);
        assert_eq!(
            (
                d.reads,
                d.read_bytes,
                d.writes,
                d.write_bytes,
                d.flushes,
                d.discards
            ),
            (100, 800 * 512, 100, 800 * 512, 1, 0)
        );
        assert_eq!(d.write_ms, 100);
        assert_eq!(DeviceStats::parse("1 2 3"), None);
        assert_eq!(DeviceStats::parse("a b c d e f g h i j k"), None);
    }
}
