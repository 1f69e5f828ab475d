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
}

/// Persisted with the attach record, so a restarted daemon keeps counting.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Mount ID -> how many times Docker mounted it without unmounting.
    mounts: BTreeMap<String, u32>,
    host: bool,
}

impl Usage {
    pub fn check_mount(&self, volume: &str) -> Result<MountStep, UsageError> {
        if self.host {
            return Err(UsageError::HostAttached(volume.to_string()));
        }
        Ok(if self.mounts.is_empty() {
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
        if self.mounts.is_empty() {
            UnmountStep::Detach
        } else {
            UnmountStep::Keep
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
        Ok(())
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
        Ok(())
    }

    pub fn total_mounts(&self) -> u32 {
        self.mounts.values().sum()
    }

    pub fn is_idle(&self) -> bool {
        !self.host && self.mounts.is_empty()
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
    fn restore_undoes_a_failed_detach() {
        let mut u = Usage::default();
        u.mounted("a");
        assert_eq!(u.unmount("a"), UnmountStep::Detach);
        u.restore("a");
        assert_eq!(u.total_mounts(), 1);
        assert_eq!(u.unmount("a"), UnmountStep::Detach);
    }
}
