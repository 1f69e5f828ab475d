//! The bench's targets, and which of them this host can run. Apart from
//! the rest of the bench so that `tests/bench_kinds.rs` can test it (the
//! bench has no test harness of its own).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Limit,
    Peer,
    Dunnage,
    DunnageEngine,
    DunnageSecure,
    DunnageSnaps,
    DunnageRepl2,
    DunnageRepl3,
    DunnageUblk,
}

/// What serves a target: the bench starts each of these once, and only for
/// the targets of the run that need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The kernel's loop driver alone (the limit).
    Kernel,
    QemuStorageDaemon,
    /// `dunnage serve --fuse-passthrough auto`; the control-plane timings
    /// and the main memory figures use it too.
    Passthrough,
    /// `dunnage serve --fuse-passthrough off`.
    Engine,
    /// The daemon of dunnage-secure and dunnage-10snaps (default flags).
    Features,
    /// The three-node cluster with its etcd.
    Cluster,
    /// `dunnage serve --export ublk`.
    Ublk,
}

/// Its presence means the kernel has ublk, and the bench a dunnage-ublk row.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// The snapshots of the dunnage-10snaps volume.
pub const SNAPSHOTS: usize = 10;

impl Kind {
    /// Every target, in the order the jobs run, per profile per round.
    pub const ALL: [Kind; 9] = [
        Kind::Limit,
        Kind::Peer,
        Kind::Dunnage,
        Kind::DunnageEngine,
        Kind::DunnageSecure,
        Kind::DunnageSnaps,
        Kind::DunnageRepl2,
        Kind::DunnageRepl3,
        Kind::DunnageUblk,
    ];

    /// The targets of a run, in run order: all of them where the kernel
    /// has ublk (`/dev/ublk-control`), all but dunnage-ublk elsewhere
    /// (dunnage-secure, dunnage-10snaps and the replicated rows run on
    /// every host).
    pub fn selected(ublk: bool) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| ublk || *k != Kind::DunnageUblk)
            .collect()
    }

    /// The targets named by `--only`: a comma-separated list of
    /// [`Kind::name`]s, in run order, each once. Refuses an unknown name
    /// (listing the valid ones), an empty list, and dunnage-ublk where the
    /// kernel has no ublk (`ublk` false).
    pub fn parse_list(list: &str, ublk: bool) -> Result<Vec<Kind>, String> {
        let valid = || {
            Kind::ALL
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut wanted = Vec::new();
        // Empty items (a trailing comma) name nothing; an empty list is refused below.
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let k = Kind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| format!("--only: unknown target {name:?}; valid: {}", valid()))?;
            if k == Kind::DunnageUblk && !ublk {
                return Err(format!(
                    "--only: {name} needs a kernel with ublk, and this host has none ({UBLK_CONTROL} is missing)"
                ));
            }
            wanted.push(k);
        }
        if wanted.is_empty() {
            return Err(format!("--only needs at least one target of: {}", valid()));
        }
        Ok(Kind::ALL
            .into_iter()
            .filter(|k| wanted.contains(k))
            .collect())
    }

    /// The run order of `kinds` as words, for the results.
    pub fn order(kinds: &[Kind]) -> String {
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        format!("per profile per round: {}", names.join(", "))
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Limit => "limit",
            Kind::Peer => "peer",
            Kind::Dunnage => "dunnage",
            Kind::DunnageEngine => "dunnage-engine",
            Kind::DunnageSecure => "dunnage-secure",
            Kind::DunnageSnaps => "dunnage-10snaps",
            Kind::DunnageRepl2 => "dunnage-repl2",
            Kind::DunnageRepl3 => "dunnage-repl3",
            Kind::DunnageUblk => "dunnage-ublk",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Limit => "kernel loop device, direct IO, over a raw file",
            Kind::Peer => {
                "qemu-storage-daemon FUSE export of a raw file (cache.direct=off), loop device with direct IO"
            }
            Kind::Dunnage => {
                "dunnage volume (fs=none, FUSE export), `dunnage attach`, daemon with `--fuse-passthrough auto`: the kernel does IO on the data file when the volume's layout allows it"
            }
            Kind::DunnageEngine => {
                "dunnage volume (fs=none, FUSE export), `dunnage attach`, second daemon with `--fuse-passthrough off`: every IO through dunnage's FUSE threads and engine"
            }
            Kind::DunnageSecure => {
                "encrypted dunnage volume (fs=none, `secure=true` with its own `secret_key`, AES-256-XTS per 4 KiB; FUSE export), `dunnage attach`, from a daemon of its own (shared with dunnage-10snaps) with the default `--fuse-passthrough auto`: encryption keeps the volume off passthrough, so every IO goes through dunnage's FUSE threads, engine and cipher"
            }
            Kind::DunnageSnaps => {
                "dunnage volume with 10 snapshots (fs=none, FUSE export), `dunnage attach`, from the daemon of dunnage-secure (`--fuse-passthrough auto`): prefilled over its whole size by one sequential fio write (1 MiB, QD8), then 10 × (`dunnage snapshot create`, a sequential 1 MiB overwrite of the next tenth of the device), so each snapshot holds different data. Before each job the newest snapshot (snap10) is deleted and taken again, so every job starts with 10 snapshots and the whole volume shared with snap10: the first write to each shared 32 KiB block in a job copies it (copy-on-write). The setup is its write-through: it is not written through again before the profiles. Snapshots keep it off passthrough: every IO through dunnage's FUSE threads and engine"
            }
            Kind::DunnageRepl2 => {
                "replicated dunnage volume (fs=none, FUSE export, `repl=2`, `nodes=n1,n2`), `dunnage attach` on n1, from a three-node cluster: each daemon in a network namespace of its own on a veth pair into a bridge, etcd in the bridge's namespace, default flags (lease TTL 10 s, replica timeout 5 s). Every write goes through n1's engine and is acknowledged once n2 holds it too (over TCP on the veth network); replication keeps the volume off passthrough. Server CPU is the three daemons' together"
            }
            Kind::DunnageRepl3 => {
                "replicated dunnage volume (fs=none, FUSE export, `repl=3`, `nodes=n1,n2,n3`), `dunnage attach` on n1, from the cluster of dunnage-repl2: every write is acknowledged once n2 and n3 hold it too. Server CPU is the three daemons' together"
            }
            Kind::DunnageUblk => {
                "dunnage volume (fs=none, ublk export: /dev/ublkbN), `dunnage attach`, third daemon with `--export ublk`: every IO through dunnage's ublk queue threads and engine"
            }
        }
    }

    /// What serves this target.
    pub fn server(self) -> Server {
        match self {
            Kind::Limit => Server::Kernel,
            Kind::Peer => Server::QemuStorageDaemon,
            Kind::Dunnage => Server::Passthrough,
            Kind::DunnageEngine => Server::Engine,
            Kind::DunnageSecure | Kind::DunnageSnaps => Server::Features,
            Kind::DunnageRepl2 | Kind::DunnageRepl3 => Server::Cluster,
            Kind::DunnageUblk => Server::Ublk,
        }
    }

    /// Whether one of `kinds` needs `server`.
    pub fn need(kinds: &[Kind], server: Server) -> bool {
        kinds.iter().any(|k| k.server() == server)
    }

    /// Whether this is a dunnage volume (served by a `dunnage serve`).
    pub fn is_dunnage(self) -> bool {
        matches!(
            self,
            Kind::Dunnage
                | Kind::DunnageEngine
                | Kind::DunnageSecure
                | Kind::DunnageSnaps
                | Kind::DunnageRepl2
                | Kind::DunnageRepl3
                | Kind::DunnageUblk
        )
    }

    /// Copies of the data: 2 and 3 for the replicated rows, 1 elsewhere.
    pub fn replicas(self) -> u32 {
        match self {
            Kind::DunnageRepl2 => 2,
            Kind::DunnageRepl3 => 3,
            _ => 1,
        }
    }

    /// The `--export` of the daemon serving this target.
    pub fn export(self) -> Option<&'static str> {
        match self {
            Kind::Dunnage
            | Kind::DunnageEngine
            | Kind::DunnageSecure
            | Kind::DunnageSnaps
            | Kind::DunnageRepl2
            | Kind::DunnageRepl3 => Some("fuse"),
            Kind::DunnageUblk => Some("ublk"),
            Kind::Limit | Kind::Peer => None,
        }
    }

    /// The `--fuse-passthrough` value of the daemon serving this target.
    pub fn fuse_passthrough(self) -> Option<&'static str> {
        match self {
            Kind::Dunnage
            | Kind::DunnageSecure
            | Kind::DunnageSnaps
            | Kind::DunnageRepl2
            | Kind::DunnageRepl3 => Some("auto"),
            Kind::DunnageEngine => Some("off"),
            Kind::Limit | Kind::Peer | Kind::DunnageUblk => None,
        }
    }

    /// Whether every IO of this target must go through dunnage's engine
    /// (the daemon's flag, encryption, snapshots or replication rule
    /// passthrough out).
    pub fn engine_path(self) -> bool {
        matches!(
            self,
            Kind::DunnageEngine
                | Kind::DunnageSecure
                | Kind::DunnageSnaps
                | Kind::DunnageRepl2
                | Kind::DunnageRepl3
                | Kind::DunnageUblk
        )
    }

    /// The dunnage volume's name in its daemon (two targets share a daemon).
    pub fn volume(self) -> Option<&'static str> {
        match self {
            Kind::Dunnage | Kind::DunnageEngine | Kind::DunnageUblk => Some("benchvol"),
            Kind::DunnageSecure => Some("benchvol-secure"),
            Kind::DunnageSnaps => Some("benchvol-10snaps"),
            Kind::DunnageRepl2 => Some("benchvol-repl2"),
            Kind::DunnageRepl3 => Some("benchvol-repl3"),
            Kind::Limit | Kind::Peer => None,
        }
    }

    /// Whether its setup writes the whole device already, in place of the
    /// write-through that every other target gets before the profiles (a
    /// second one would copy every shared block before any measurement).
    pub fn written_by_setup(self) -> bool {
        self == Kind::DunnageSnaps
    }

    /// The bench's setup work for it, in units of one write of the whole
    /// device: dunnage-10snaps' setup writes it twice (prefill and the
    /// tenths) in place of the write-through every other target gets.
    pub fn device_writes(self) -> u64 {
        if self.written_by_setup() {
            2
        } else {
            1
        }
    }

    /// The backing space it may take, in device sizes: the volume with
    /// snapshots holds its prefill and the tenths overwritten after each
    /// snapshot (snap01 to snap09 keep up to 1.9 devices of it), the data of
    /// snap10, taken again before each job (up to one device), and the
    /// volume's own blocks once a job has copied them (one device). A
    /// replicated volume holds a device per replica (all on this host).
    pub fn space_in_devices(self) -> u64 {
        match self {
            Kind::DunnageSnaps => 4,
            k => u64::from(k.replicas()),
        }
    }
}

/// The `i`-th (0-based) of the ten parts of a device of `size` bytes that
/// the dunnage-10snaps setup overwrites, as (offset, length): 1 MiB
/// aligned, next to each other, the last one up to the end.
pub fn tenth(size: u64, i: usize) -> (u64, u64) {
    const MIB: u64 = 1 << 20;
    let n = SNAPSHOTS as u64;
    let i = i as u64;
    let at = |j: u64| {
        if j >= n {
            size
        } else {
            (size * j / n) / MIB * MIB
        }
    };
    (at(i), at(i + 1) - at(i))
}

#[cfg(test)]
mod tests {
    // Spelled out: the bench target has cfg(test) under `cargo clippy
    // --all-targets` but no test harness, so an import would be unused.
    #[test]
    fn ublk_rows_only_where_the_kernel_has_ublk() {
        use super::Kind;
        assert_eq!(
            Kind::selected(false),
            [
                Kind::Limit,
                Kind::Peer,
                Kind::Dunnage,
                Kind::DunnageEngine,
                Kind::DunnageSecure,
                Kind::DunnageSnaps,
                Kind::DunnageRepl2,
                Kind::DunnageRepl3
            ]
        );
        assert_eq!(Kind::selected(true), Kind::ALL);
        assert_eq!(
            Kind::order(&Kind::selected(true)),
            "per profile per round: limit, peer, dunnage, dunnage-engine, dunnage-secure, dunnage-10snaps, dunnage-repl2, dunnage-repl3, dunnage-ublk"
        );
    }

    #[test]
    fn secure_and_snapshot_rows_on_every_host() {
        use super::Kind;
        for ublk in [false, true] {
            let kinds = Kind::selected(ublk);
            for k in [
                Kind::DunnageSecure,
                Kind::DunnageSnaps,
                Kind::DunnageRepl2,
                Kind::DunnageRepl3,
            ] {
                assert_eq!(kinds.iter().filter(|&&x| x == k).count(), 1, "{k:?}");
                // Right after the engine row they are measured against.
                let at = |k: Kind| kinds.iter().position(|&x| x == k).unwrap();
                assert!(at(k) > at(Kind::DunnageEngine), "{k:?}");
            }
        }
        assert_eq!(Kind::DunnageSecure.name(), "dunnage-secure");
        assert_eq!(Kind::DunnageSnaps.name(), "dunnage-10snaps");
        assert!(Kind::DunnageSnaps.describe().contains("10 snapshots"));
        assert!(Kind::DunnageSecure.describe().contains("secure=true"));
    }

    #[test]
    fn each_dunnage_target_has_its_daemon_flags() {
        use super::Kind;
        for k in Kind::ALL {
            assert_eq!(k.is_dunnage(), k.export().is_some(), "{k:?}");
            assert_eq!(k.is_dunnage(), k.volume().is_some(), "{k:?}");
            assert!(!k.engine_path() || k.is_dunnage(), "{k:?}");
        }
        assert_eq!(Kind::DunnageUblk.export(), Some("ublk"));
        assert_eq!(Kind::DunnageUblk.fuse_passthrough(), None);
        assert_eq!(Kind::Dunnage.export(), Some("fuse"));
        assert_eq!(Kind::DunnageEngine.fuse_passthrough(), Some("off"));
        // The features rule passthrough out, not the daemon's flag.
        for k in [
            Kind::DunnageSecure,
            Kind::DunnageSnaps,
            Kind::DunnageRepl2,
            Kind::DunnageRepl3,
        ] {
            assert_eq!(k.export(), Some("fuse"));
            assert_eq!(k.fuse_passthrough(), Some("auto"));
            assert!(k.engine_path());
        }
        assert!(!Kind::Dunnage.engine_path());
        // The two share a daemon, so their volumes need names of their own.
        assert_ne!(Kind::DunnageSecure.volume(), Kind::DunnageSnaps.volume());
        let mut names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Kind::ALL.len());
    }

    #[test]
    fn only_the_snapshot_volume_skips_the_write_through() {
        use super::Kind;
        for k in Kind::ALL {
            assert_eq!(k.written_by_setup(), k == Kind::DunnageSnaps, "{k:?}");
        }
    }

    #[test]
    fn replicated_rows_hold_a_device_per_replica() {
        use super::Kind;
        for k in Kind::ALL {
            let expected = match k {
                Kind::DunnageSnaps => 4,
                Kind::DunnageRepl2 => 2,
                Kind::DunnageRepl3 => 3,
                _ => 1,
            };
            assert_eq!(k.space_in_devices(), expected, "{k:?}");
            assert_eq!(
                k.replicas() > 1,
                matches!(k, Kind::DunnageRepl2 | Kind::DunnageRepl3),
                "{k:?}"
            );
        }
        assert_eq!(Kind::DunnageRepl2.name(), "dunnage-repl2");
        assert_eq!(Kind::DunnageRepl3.name(), "dunnage-repl3");
        assert_ne!(Kind::DunnageRepl2.volume(), Kind::DunnageRepl3.volume());
        assert!(Kind::DunnageRepl3.describe().contains("repl=3"));
    }

    #[test]
    fn the_tenths_tile_the_device() {
        use super::{tenth, SNAPSHOTS};
        for size in [64u64 << 20, 512 << 20, 2 << 30, (1 << 30) + (3 << 20)] {
            let mut end = 0;
            for i in 0..SNAPSHOTS {
                let (off, len) = tenth(size, i);
                assert_eq!(off, end, "size {size} part {i}");
                assert_eq!(off % (1 << 20), 0);
                assert!(
                    len >= size / SNAPSHOTS as u64 - (1 << 20),
                    "size {size} part {i}"
                );
                end = off + len;
            }
            assert_eq!(end, size);
        }
    }
}
