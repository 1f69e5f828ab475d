//! Single-node catalog: one JSON file, replaced atomically on every change
//! (write a temporary file, fsync it, rename over, fsync the directory), so a
//! crash leaves either the old catalog or the new one, never a mix.

use super::{Catalog, CatalogError, VolumeRecord};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "catalog.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    volumes: BTreeMap<String, VolumeRecord>,
}

pub struct EmbeddedCatalog {
    path: PathBuf,
    volumes: RwLock<BTreeMap<String, VolumeRecord>>,
    /// Serialises writers so that file replacements happen in memory order.
    write: Mutex<()>,
}

impl EmbeddedCatalog {
    /// Open (or create empty) the catalog under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, CatalogError> {
        let path = data_dir.join(FILE);
        let io = |source| CatalogError::Io {
            path: path.clone(),
            source,
        };
        let volumes = match fs::read(&path) {
            Ok(bytes) => {
                let disk: OnDisk =
                    serde_json::from_slice(&bytes).map_err(|e| CatalogError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if disk.version != FORMAT_VERSION {
                    return Err(CatalogError::Corrupt {
                        path,
                        reason: format!("format version {} is not {FORMAT_VERSION}", disk.version),
                    });
                }
                disk.volumes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(e)),
        };
        // A crash between writing the temporary file and renaming it leaves it behind.
        let _ = fs::remove_file(path.with_extension("json.tmp"));
        Ok(EmbeddedCatalog {
            path,
            volumes: RwLock::new(volumes),
            write: Mutex::new(()),
        })
    }

    fn persist(&self, volumes: &BTreeMap<String, VolumeRecord>) -> Result<(), CatalogError> {
        let io = |source| CatalogError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let disk = OnDisk {
            version: FORMAT_VERSION,
            volumes: volumes.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&disk).expect("catalog serialises");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// Apply `change` to a copy, persist it, then publish it: readers never
    /// see a state that is not on disk.
    fn mutate(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, VolumeRecord>) -> Result<(), CatalogError>,
    ) -> Result<(), CatalogError> {
        let _w = self.write.lock();
        let mut next = self.volumes.read().clone();
        change(&mut next)?;
        self.persist(&next)?;
        *self.volumes.write() = next;
        Ok(())
    }
}

impl Catalog for EmbeddedCatalog {
    fn list(&self) -> Vec<VolumeRecord> {
        self.volumes.read().values().cloned().collect()
    }

    fn get(&self, name: &str) -> Option<VolumeRecord> {
        self.volumes.read().get(name).cloned()
    }

    fn insert(&self, record: VolumeRecord) -> Result<(), CatalogError> {
        self.mutate(|v| {
            if v.contains_key(&record.name) {
                return Err(CatalogError::Exists(record.name.clone()));
            }
            v.insert(record.name.clone(), record);
            Ok(())
        })
    }

    fn modify(
        &self,
        name: &str,
        id: &str,
        change: &mut dyn FnMut(&mut VolumeRecord),
    ) -> Result<VolumeRecord, CatalogError> {
        let mut out = None;
        self.mutate(|v| match v.get_mut(name) {
            Some(r) if r.id == id => {
                change(r);
                out = Some(r.clone());
                Ok(())
            }
            _ => Err(CatalogError::NotFound(name.to_string())),
        })?;
        Ok(out.expect("set on success"))
    }

    fn remove(&self, name: &str, id: &str) -> Result<(), CatalogError> {
        self.mutate(|v| match v.get(name) {
            Some(r) if r.id == id => {
                v.remove(name);
                Ok(())
            }
            _ => Err(CatalogError::NotFound(name.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VolumeSpec;

    fn record(name: &str) -> VolumeRecord {
        VolumeRecord {
            grow_fs: false,
            replacing: Default::default(),
            name: name.into(),
            id: crate::catalog::new_volume_id(),
            created_at: chrono::Utc::now(),
            spec: VolumeSpec::default(),
            options: BTreeMap::new(),
            formatted: false,
            clone_of: None,
            replicas: Vec::new(),
            crypt: None,
        }
    }

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = EmbeddedCatalog::open(dir.path()).unwrap();
        let a = record("a");
        c.insert(a.clone()).unwrap();
        c.insert(record("b")).unwrap();
        assert!(matches!(
            c.insert(record("a")),
            Err(CatalogError::Exists(_))
        ));
        let a2 = c.modify("a", &a.id, &mut |r| r.formatted = true).unwrap();
        assert!(a2.formatted);
        c.remove("b", &c.get("b").unwrap().id).unwrap();
        drop(c);
        let c = EmbeddedCatalog::open(dir.path()).unwrap();
        assert_eq!(c.list(), vec![a2]);
    }

    #[test]
    fn remove_checks_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let c = EmbeddedCatalog::open(dir.path()).unwrap();
        c.insert(record("a")).unwrap();
        assert!(c.remove("a", "not-the-id").is_err());
        assert!(c.get("a").is_some());
    }

    #[test]
    fn damaged_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let err = EmbeddedCatalog::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("catalog.json"), "{err}");
    }
}
