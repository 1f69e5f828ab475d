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
    DunnageUblk,
}

impl Kind {
    /// Every target, in the order the jobs run, per profile per round.
    pub const ALL: [Kind; 6] = [
        Kind::Limit,
        Kind::Peer,
        Kind::Dunnage,
        Kind::DunnageEngine,
        Kind::DunnageSecure,
        Kind::DunnageUblk,
    ];

    /// The targets of a run, in run order: all of them where the kernel
    /// has ublk (`/dev/ublk-control`), all but dunnage-ublk elsewhere
    /// (dunnage-secure runs on every host).
    pub fn selected(ublk: bool) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| ublk || *k != Kind::DunnageUblk)
            .collect()
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
                "encrypted dunnage volume (fs=none, `secure=true` with its own `secret_key`, AES-256-XTS per 4 KiB; FUSE export), `dunnage attach`, from a daemon of its own with the default `--fuse-passthrough auto`: encryption keeps the volume off passthrough, so every IO goes through dunnage's FUSE threads, engine and cipher"
            }
            Kind::DunnageUblk => {
                "dunnage volume (fs=none, ublk export: /dev/ublkbN), `dunnage attach`, third daemon with `--export ublk`: every IO through dunnage's ublk queue threads and engine"
            }
        }
    }

    /// Whether this is a dunnage volume (served by a `dunnage serve`).
    pub fn is_dunnage(self) -> bool {
        matches!(
            self,
            Kind::Dunnage | Kind::DunnageEngine | Kind::DunnageSecure | Kind::DunnageUblk
        )
    }

    /// The `--export` of the daemon serving this target.
    pub fn export(self) -> Option<&'static str> {
        match self {
            Kind::Dunnage | Kind::DunnageEngine | Kind::DunnageSecure => Some("fuse"),
            Kind::DunnageUblk => Some("ublk"),
            Kind::Limit | Kind::Peer => None,
        }
    }

    /// The `--fuse-passthrough` value of the daemon serving this target.
    pub fn fuse_passthrough(self) -> Option<&'static str> {
        match self {
            Kind::Dunnage | Kind::DunnageSecure => Some("auto"),
            Kind::DunnageEngine => Some("off"),
            Kind::Limit | Kind::Peer | Kind::DunnageUblk => None,
        }
    }

    /// Whether every IO of this target must go through dunnage's engine
    /// (the daemon's flag or encryption rule passthrough out).
    pub fn engine_path(self) -> bool {
        matches!(
            self,
            Kind::DunnageEngine | Kind::DunnageSecure | Kind::DunnageUblk
        )
    }

    /// The dunnage volume's name in its daemon.
    pub fn volume(self) -> Option<&'static str> {
        match self {
            Kind::Dunnage | Kind::DunnageEngine | Kind::DunnageUblk => Some("benchvol"),
            Kind::DunnageSecure => Some("benchvol-secure"),
            Kind::Limit | Kind::Peer => None,
        }
    }
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
                Kind::DunnageSecure
            ]
        );
        assert_eq!(Kind::selected(true), Kind::ALL);
        assert_eq!(
            Kind::order(&Kind::selected(true)),
            "per profile per round: limit, peer, dunnage, dunnage-engine, dunnage-secure, dunnage-ublk"
        );
    }

    #[test]
    fn secure_rows_on_every_host() {
        use super::Kind;
        for ublk in [false, true] {
            let kinds = Kind::selected(ublk);
            let k = Kind::DunnageSecure;
            assert_eq!(kinds.iter().filter(|&&x| x == k).count(), 1, "{k:?}");
            // After the engine row it is measured against.
            let at = |k: Kind| kinds.iter().position(|&x| x == k).unwrap();
            assert!(at(k) > at(Kind::DunnageEngine), "{k:?}");
        }
        assert_eq!(Kind::DunnageSecure.name(), "dunnage-secure");
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
        // Encryption rules passthrough out, not the daemon's flag.
        assert_eq!(Kind::DunnageSecure.export(), Some("fuse"));
        assert_eq!(Kind::DunnageSecure.fuse_passthrough(), Some("auto"));
        assert!(Kind::DunnageSecure.engine_path());
        assert!(!Kind::Dunnage.engine_path());
        let mut names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Kind::ALL.len());
    }
}
