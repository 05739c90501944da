//! Definitions that outlive the daemon: one JSON file per instance under
//! `STATE_DIR/instances/`, named by UUID.
//!
//! Every write is atomic (temp file in the same directory, `fsync`, rename,
//! `fsync` of the directory), so a daemon killed at any moment leaves either
//! the old file or the new one, never half of one; a definition is
//! acknowledged to its caller only after its rename is durable. Temp files a
//! killed daemon left behind are removed at load.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What an operator defined; everything else about an instance is derived
/// (its placement, PASID and socket are chosen afresh at each start).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub uuid: Uuid,
    pub name: String,
    /// The instance type's name (see `wdvirt types`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Start with the daemon.
    pub auto: bool,
    /// The VM's NUMA node, when placement should be near it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<u32>,
    /// A QoS policy overriding the type's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// The VM the instance is for (a libvirt domain's name): shown in
    /// listings, and how the libvirt hook knows the instances it made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The user the VMM runs as (a name or a uid): its socket is 0600 and
    /// owned by this user. `None`: the daemon's `--instance-owner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot create the state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another wdvirt daemon holds the state directory {path} (two daemons on one state would overwrite each other's definitions)"
    )]
    Locked { path: PathBuf },
    #[error("cannot read the state directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A definition file that could not be loaded; it is left in place for the
/// operator and reported, never fatal for the others.
#[derive(Debug)]
pub struct Unreadable {
    pub path: PathBuf,
    pub reason: String,
}

/// Where definitions live. Holding a `Store` holds an exclusive lock on
/// its state directory (`STATE_DIR/lock`) for the daemon's life.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

const TMP_PREFIX: &str = ".tmp-";

/// Writes `bytes` to `path` atomically and durably: a temporary file
/// (named `prefix...`) in the same directory, given `mode` when there is
/// one, synced, renamed over `path`, and the directory synced.
pub fn write_atomically(
    path: &Path,
    prefix: &str,
    bytes: &[u8],
    mode: Option<u32>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(prefix).tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    // The data and the file's size; the rename's durability is the
    // directory's fsync below.
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, PersistError> {
        let dir = state_dir.join("instances");
        let made = !dir.exists();
        std::fs::create_dir_all(&dir).map_err(|source| PersistError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        if made {
            // The new directories' own entries must be durable before a
            // definition inside them is acknowledged.
            let parent = match state_dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            for d in [state_dir, parent] {
                File::open(d).and_then(|f| f.sync_all()).map_err(|source| {
                    PersistError::CreateDir {
                        path: d.to_owned(),
                        source,
                    }
                })?;
            }
        }
        let lock_path = state_dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| PersistError::CreateDir {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(PersistError::Locked {
                    path: state_dir.to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(PersistError::CreateDir {
                    path: lock_path,
                    source,
                });
            }
        }
        Ok(Store { dir, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, uuid: Uuid) -> PathBuf {
        self.dir.join(format!("{uuid}.json"))
    }

    /// Writes `def` atomically and durably.
    pub fn save(&self, def: &Definition) -> Result<(), PersistError> {
        let path = self.path_of(def.uuid);
        let err = |source| PersistError::Write {
            path: path.clone(),
            source,
        };
        let mut bytes = serde_json::to_vec_pretty(def).map_err(|e| err(e.into()))?;
        bytes.push(b'\n');
        write_atomically(&path, TMP_PREFIX, &bytes, None).map_err(err)
    }

    /// Removes `uuid`'s definition durably (absent already is fine).
    pub fn remove(&self, uuid: Uuid) -> Result<(), PersistError> {
        let path = self.path_of(uuid);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(PersistError::Remove { path, source }),
        }
        self.sync_dir()
            .map_err(|source| PersistError::Remove { path, source })
    }

    fn sync_dir(&self) -> std::io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// Every definition on disk, sorted by name, and the files that could
    /// not be read. Temp files of an interrupted write are deleted.
    pub fn load(&self) -> Result<(Vec<Definition>, Vec<Unreadable>), PersistError> {
        let read_dir = std::fs::read_dir(&self.dir).map_err(|source| PersistError::ReadDir {
            path: self.dir.clone(),
            source,
        })?;
        let (mut defs, mut bad) = (Vec::new(), Vec::new());
        for entry in read_dir.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) {
                tracing::info!("removing {} left by an interrupted write", path.display());
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            match load_one(&path, stem) {
                Ok(def) => defs.push(def),
                Err(reason) => bad.push(Unreadable { path, reason }),
            }
        }
        // By name, then UUID: of two files claiming one name, the same one
        // wins on every load.
        defs.sort_by(|a, b| (&a.name, a.uuid).cmp(&(&b.name, b.uuid)));
        Ok((defs, bad))
    }
}

fn load_one(path: &Path, stem: &str) -> Result<Definition, String> {
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    let def: Definition = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    if def.uuid.to_string() != stem {
        return Err(format!("holds UUID {} but is named after {stem}", def.uuid));
    }
    Ok(def)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str) -> Definition {
        Definition {
            uuid: Uuid::new_v4(),
            name: name.into(),
            type_name: "zip".into(),
            auto: true,
            numa: Some(1),
            qos: None,
            vm: None,
            owner: None,
        }
    }

    #[test]
    fn saved_definitions_load_back_and_removed_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (def("b-second"), def("a-first"));
        store.save(&a).unwrap();
        store.save(&b).unwrap();
        let (defs, bad) = store.load().unwrap();
        assert!(bad.is_empty());
        assert_eq!(defs, vec![b.clone(), a.clone()]);
        store.remove(a.uuid).unwrap();
        store.remove(a.uuid).unwrap();
        assert_eq!(store.load().unwrap().0, vec![b]);
    }

    #[test]
    fn one_store_per_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let e = Store::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("another wdvirt daemon holds"), "{e}");
        drop(first);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn torn_and_foreign_files_are_reported_or_cleaned_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = def("good");
        store.save(&good).unwrap();
        // A temp file from a write that was killed before its rename.
        std::fs::write(store.dir().join(".tmp-abc"), b"{\"uuid\":").unwrap();
        // A file cut short by hand, and one whose name and UUID disagree.
        let torn = store.dir().join(format!("{}.json", Uuid::new_v4()));
        std::fs::write(&torn, b"{\"uuid\": \"").unwrap();
        let moved = def("moved");
        let wrong = store.dir().join(format!("{}.json", Uuid::new_v4()));
        std::fs::write(&wrong, serde_json::to_vec(&moved).unwrap()).unwrap();
        let (defs, bad) = store.load().unwrap();
        assert_eq!(defs, vec![good]);
        let mut bad_paths: Vec<_> = bad.iter().map(|u| u.path.clone()).collect();
        bad_paths.sort();
        let mut want = vec![torn, wrong];
        want.sort();
        assert_eq!(bad_paths, want);
        assert!(bad.iter().any(|u| u.reason.contains("is named after")));
        assert!(!store.dir().join(".tmp-abc").exists());
    }
}
