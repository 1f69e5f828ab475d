//! The cluster's catalog: one etcd key per volume. Reads go to etcd every
//! time, so a volume created on any node is visible everywhere at once;
//! writes are compare-and-swap transactions on the key's revisions.

use super::{parse, to_json, volume_key, volumes_prefix, Cluster, ClusterError};
use crate::catalog::{Catalog, CatalogError, VolumeRecord};
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp};
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{error, warn};

/// Attempts of a compare-and-swap before giving up on a key that keeps changing.
const CAS_TRIES: usize = 20;

pub struct EtcdCatalog {
    cluster: Arc<Cluster>,
    /// The last answer etcd gave, by name. `list` and `get` cannot fail (the
    /// trait's contract, for Docker, whose Get failing deletes its record of
    /// the volume), so while etcd is unreachable they answer from here.
    last: RwLock<BTreeMap<String, VolumeRecord>>,
}

impl EtcdCatalog {
    pub(super) fn new(cluster: Arc<Cluster>) -> Self {
        EtcdCatalog {
            cluster,
            last: RwLock::new(BTreeMap::new()),
        }
    }

    fn read(&self, name: &str) -> Result<Option<(VolumeRecord, KeyValue)>, ClusterError> {
        let key = volume_key(name);
        let kv = self.cluster.run(|s| async move { s.get(&key).await })?;
        kv.map(|kv| parse(&kv).map(|r| (r, kv))).transpose()
    }

    /// A transaction guarded by one comparison; true if it was applied.
    fn swap(&self, when: Compare, then: TxnOp) -> Result<bool, ClusterError> {
        self.cluster.run(|s| async move {
            Ok(s.txn(Txn::new().when([when]).and_then([then]))
                .await?
                .succeeded())
        })
    }
}

/// An etcd failure on volume `name`'s record, as the catalog's error.
fn failed(name: &str, e: ClusterError) -> CatalogError {
    match e {
        ClusterError::Corrupt { key, reason } => CatalogError::Corrupt {
            path: PathBuf::from(key),
            reason,
        },
        e => CatalogError::Unavailable {
            key: volume_key(name),
            reason: e.to_string(),
        },
    }
}

impl Catalog for EtcdCatalog {
    fn list(&self) -> Vec<VolumeRecord> {
        let prefix = volumes_prefix();
        match self
            .cluster
            .run(|s| async move { s.get_prefix(&prefix).await })
        {
            Ok(kvs) => {
                let mut all = BTreeMap::new();
                for kv in kvs {
                    match parse::<VolumeRecord>(&kv) {
                        Ok(r) => {
                            all.insert(r.name.clone(), r);
                        }
                        // One damaged record must not hide the others.
                        Err(e) => error!("catalog: {e}"),
                    }
                }
                *self.last.write() = all.clone();
                all.into_values().collect()
            }
            Err(e) => {
                warn!("catalog: {e}; listing the volumes as last read");
                self.last.read().values().cloned().collect()
            }
        }
    }

    fn get(&self, name: &str) -> Option<VolumeRecord> {
        match self.read(name) {
            Ok(Some((r, _))) => {
                self.last.write().insert(name.to_string(), r.clone());
                Some(r)
            }
            Ok(None) => {
                self.last.write().remove(name);
                None
            }
            Err(e) => {
                warn!("catalog: {e}; answering for volume {name} as last read");
                self.last.read().get(name).cloned()
            }
        }
    }

    fn insert(&self, record: VolumeRecord) -> Result<(), CatalogError> {
        let name = record.name.clone();
        let key = volume_key(&name);
        let put = TxnOp::put(key.as_str(), to_json(&record), None);
        let created = self
            .swap(
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                put,
            )
            .map_err(|e| failed(&name, e))?;
        if !created {
            return Err(CatalogError::Exists(name));
        }
        self.last.write().insert(name, record);
        Ok(())
    }

    fn modify(
        &self,
        name: &str,
        id: &str,
        change: &mut dyn FnMut(&mut VolumeRecord),
    ) -> Result<VolumeRecord, CatalogError> {
        let key = volume_key(name);
        for _ in 0..CAS_TRIES {
            let (mut record, kv) = match self.read(name).map_err(|e| failed(name, e))? {
                Some((r, kv)) if r.id == id => (r, kv),
                _ => return Err(CatalogError::NotFound(name.to_string())),
            };
            change(&mut record);
            let put = TxnOp::put(key.as_str(), to_json(&record), None);
            let guard = Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision());
            if self.swap(guard, put).map_err(|e| failed(name, e))? {
                self.last.write().insert(name.to_string(), record.clone());
                return Ok(record);
            }
        }
        Err(failed(
            name,
            ClusterError::Etcd(format!(
                "volume {name} kept changing under {CAS_TRIES} attempts to modify it; retry"
            )),
        ))
    }

    fn remove(&self, name: &str, id: &str) -> Result<(), CatalogError> {
        let key = volume_key(name);
        for _ in 0..CAS_TRIES {
            let kv = match self.read(name).map_err(|e| failed(name, e))? {
                Some((r, kv)) if r.id == id => kv,
                _ => return Err(CatalogError::NotFound(name.to_string())),
            };
            let del = TxnOp::delete(key.as_str(), None);
            let guard = Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision());
            if self.swap(guard, del).map_err(|e| failed(name, e))? {
                self.last.write().remove(name);
                return Ok(());
            }
        }
        Err(failed(
            name,
            ClusterError::Etcd(format!(
                "volume {name} kept changing under {CAS_TRIES} attempts to remove it; retry"
            )),
        ))
    }
}
