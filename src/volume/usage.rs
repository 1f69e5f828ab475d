//! Who uses a volume on this node: Docker mounts, refcounted per mount ID, or
//! the host through `dunnage attach`. Pure state with no IO, so every rule is
//! unit-tested; the volume actor asks it before acting and tells it after.

use std::collections::BTreeMap;

/// What must happen for a Docker Mount to succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountStep {
    /// First mount: bring the device up, (format,) and mount the filesystem.
    Attach,
    /// Already mounted for another mount ID (or this one again): just count.
    Join,
}

/// What an Unmount leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmountStep {
    /// That was the last mount: unmount and detach.
    Detach,
    /// Others still use it.
    Keep,
    /// Docker never mounted that ID here (or it was forgotten in a restart).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("it is attached on the host by `dunnage attach`; run `dunnage detach {0}` first")]
    HostAttached(String),
    #[error("it is mounted by Docker ({0} mount(s)); stop the containers using it first")]
    DockerMounted(u32),
    #[error("it is shared with node(s) {0}, whose containers use it: stop them first")]
    Shared(String),
}

/// Persisted with the attach record, so a restarted daemon keeps counting.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Mount ID -> how many times Docker mounted it without unmounting.
    mounts: BTreeMap<String, u32>,
    host: bool,
    /// Other nodes' sessions on this shared volume, by session number:
    /// the filesystem stays mounted while any is open. Not persisted: a
    /// session dies with the daemon.
    #[serde(skip)]
    sharers: BTreeMap<u64, String>,
    #[serde(skip)]
    next_session: u64,
}

impl Usage {
    pub fn check_mount(&self, volume: &str) -> Result<MountStep, UsageError> {
        if self.host {
            return Err(UsageError::HostAttached(volume.to_string()));
        }
        Ok(if self.mounts.is_empty() && self.sharers.is_empty() {
            MountStep::Attach
        } else {
            MountStep::Join
        })
    }

    /// Record a mount that succeeded.
    pub fn mounted(&mut self, id: &str) {
        *self.mounts.entry(id.to_string()).or_insert(0) += 1;
    }

    /// Count one Unmount of `id` and say what follows.
    pub fn unmount(&mut self, id: &str) -> UnmountStep {
        let Some(n) = self.mounts.get_mut(id) else {
            return UnmountStep::Unknown;
        };
        *n -= 1;
        if *n == 0 {
            self.mounts.remove(id);
        }
        if self.mounts.is_empty() && self.sharers.is_empty() {
            UnmountStep::Detach
        } else {
            UnmountStep::Keep
        }
    }

    /// Another node opened a session on the (mounted) volume: its number.
    pub fn share_opened(&mut self, node: &str) -> u64 {
        self.next_session += 1;
        self.sharers.insert(self.next_session, node.to_string());
        self.next_session
    }

    /// A session ended; whether the volume is now used by no one.
    pub fn share_closed(&mut self, session: u64) -> bool {
        self.sharers.remove(&session).is_some() && self.is_idle()
    }

    /// The nodes with a session open, each once.
    pub fn sharers(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.sharers.values().cloned().collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    fn check_shared(&self) -> Result<(), UsageError> {
        match self.sharers() {
            nodes if nodes.is_empty() => Ok(()),
            nodes => Err(UsageError::Shared(nodes.join(", "))),
        }
    }

    /// Undo a count whose detach failed, so that a retried Unmount tries again.
    pub fn restore(&mut self, id: &str) {
        self.mounted(id)
    }

    pub fn check_host_attach(&self) -> Result<(), UsageError> {
        if !self.mounts.is_empty() {
            return Err(UsageError::DockerMounted(self.total_mounts()));
        }
        self.check_shared()
    }

    pub fn set_host(&mut self, attached: bool) {
        self.host = attached;
    }

    pub fn host_attached(&self) -> bool {
        self.host
    }

    pub fn check_remove(&self, volume: &str) -> Result<(), UsageError> {
        if self.host {
            return Err(UsageError::HostAttached(volume.to_string()));
        }
        if !self.mounts.is_empty() {
            return Err(UsageError::DockerMounted(self.total_mounts()));
        }
        self.check_shared()
    }

    pub fn total_mounts(&self) -> u32 {
        self.mounts.values().sum()
    }

    pub fn is_idle(&self) -> bool {
        !self.host && self.mounts.is_empty() && self.sharers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_mount_attaches_then_others_join() {
        let mut u = Usage::default();
        assert_eq!(u.check_mount("v"), Ok(MountStep::Attach));
        u.mounted("a");
        assert_eq!(u.check_mount("v"), Ok(MountStep::Join));
        u.mounted("b");
        assert_eq!(u.total_mounts(), 2);
        assert_eq!(u.unmount("a"), UnmountStep::Keep);
        assert_eq!(u.unmount("b"), UnmountStep::Detach);
        assert!(u.is_idle());
    }

    #[test]
    fn same_id_twice_is_a_counter_not_a_set() {
        let mut u = Usage::default();
        u.mounted("x");
        u.mounted("x");
        assert_eq!(u.total_mounts(), 2);
        assert_eq!(u.unmount("x"), UnmountStep::Keep);
        assert_eq!(u.unmount("x"), UnmountStep::Detach);
        assert_eq!(u.unmount("x"), UnmountStep::Unknown);
    }

    #[test]
    fn unknown_id_changes_nothing() {
        let mut u = Usage::default();
        u.mounted("a");
        assert_eq!(u.unmount("zzz"), UnmountStep::Unknown);
        assert_eq!(u.total_mounts(), 1);
    }

    #[test]
    fn host_attach_excludes_docker_and_back() {
        let mut u = Usage::default();
        u.check_host_attach().unwrap();
        u.set_host(true);
        let err = u.check_mount("pg").unwrap_err();
        assert!(err.to_string().contains("dunnage detach pg"), "{err}");
        assert!(u.check_remove("pg").is_err());
        u.set_host(false);
        u.mounted("a");
        assert_eq!(u.check_host_attach(), Err(UsageError::DockerMounted(1)));
        assert!(u
            .check_remove("pg")
            .unwrap_err()
            .to_string()
            .contains("1 mount"));
    }

    #[test]
    fn other_nodes_sessions_keep_a_shared_volume_mounted() {
        let mut u = Usage::default();
        u.mounted("a");
        let s1 = u.share_opened("n2");
        let s2 = u.share_opened("n2");
        let s3 = u.share_opened("n3");
        assert_eq!(u.sharers(), vec!["n2", "n3"]);
        // The last local container goes: the sessions keep it mounted.
        assert_eq!(u.unmount("a"), UnmountStep::Keep);
        assert!(!u.is_idle());
        let err = u.check_remove("v").unwrap_err();
        assert_eq!(err, UsageError::Shared("n2, n3".into()));
        assert!(err.to_string().contains("n2, n3"), "{err}");
        assert!(u.check_host_attach().is_err());
        // A new local mount joins what is mounted.
        assert_eq!(u.check_mount("v"), Ok(MountStep::Join));
        u.mounted("a");
        assert!(!u.share_closed(s1));
        assert!(!u.share_closed(s1), "closing twice counts once");
        assert!(!u.share_closed(s3));
        assert!(!u.share_closed(s2), "a local mount is left");
        assert_eq!(u.unmount("a"), UnmountStep::Detach);
        let mut u = Usage::default();
        let s = u.share_opened("n2");
        assert!(u.share_closed(s), "the last user gone: detach");
        assert!(u.is_idle());
        assert_eq!(u.check_mount("v"), Ok(MountStep::Attach));
    }

    #[test]
    fn restore_undoes_a_failed_detach() {
        let mut u = Usage::default();
        u.mounted("a");
        assert_eq!(u.unmount("a"), UnmountStep::Detach);
        u.restore("a");
        assert_eq!(u.total_mounts(), 1);
        assert_eq!(u.unmount("a"), UnmountStep::Detach);
    }
}
