//! Keeping an instance for a successor process: its listening socket, its
//! state memfd, its VMM's connection and every fd the device holds are
//! deposited in the holder under the instance's UUID; after every message
//! the session and the device's state go into the state memfd.
//!
//! Keys in the holder, per instance (`inst/<uuid>/`):
//!
//! | key | fd |
//! |---|---|
//! | `listen` | the instance's listening socket |
//! | `state` | its state memfd ([`StateFile`]) |
//! | `conn` | the VMM's connection, while one is served |
//! | `fd/<role>/` | each fd the device holds: `fd/dma/<iova>/`, `fd/irq/msix/<n>/` … |
//!
//! (The `fd/` keys end in `/` so that dropping one by prefix never drops
//! another whose name it begins.)

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use uuid::Uuid;

use super::holder::{HolderClient, HolderError};
use super::state::{Snapshot, StateFile, StateFileError, VmmSnapshot};
use crate::transport::keeper::{DeviceRecord, Handled, Keeper, SessionRecord};

/// The daemon's line to its fd holder, shared by every instance. A call
/// that fails drops the connection; the next call connects again.
pub struct HolderLink {
    path: PathBuf,
    client: Mutex<Option<HolderClient>>,
}

impl HolderLink {
    pub fn new(path: &Path) -> HolderLink {
        HolderLink {
            path: path.to_owned(),
            client: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on a connected client (connecting first if need be).
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut HolderClient) -> Result<T, HolderError>,
    ) -> Result<T, HolderError> {
        let mut slot = self.client.lock();
        if slot.is_none() {
            *slot = Some(HolderClient::connect(&self.path)?);
        }
        let r = f(slot.as_mut().expect("connected above"));
        if r.is_err() {
            *slot = None;
        }
        r
    }

    pub fn put(&self, key: &str, fd: BorrowedFd<'_>) -> Result<(), HolderError> {
        self.with(|c| c.put(key, fd))
    }

    pub fn drop_prefix(&self, prefix: &str) -> Result<usize, HolderError> {
        self.with(|c| c.drop_prefix(prefix))
    }

    pub fn take(&self, prefix: &str) -> Result<Vec<(String, OwnedFd)>, HolderError> {
        self.with(|c| c.take(prefix))
    }

    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, HolderError> {
        self.with(|c| c.keys(prefix))
    }

    /// The instances the holder keeps something of.
    pub fn instances(&self) -> Result<Vec<Uuid>, HolderError> {
        let keys = self.keys("inst/")?;
        let mut out: Vec<Uuid> = keys
            .iter()
            .filter_map(|k| k.strip_prefix("inst/")?.split('/').next()?.parse().ok())
            .collect();
        out.dedup();
        Ok(out)
    }
}

/// Why an instance cannot be kept or taken up.
#[derive(Debug, thiserror::Error)]
pub enum KeepError {
    #[error("the fd holder at {path}: {source}")]
    Holder {
        path: PathBuf,
        #[source]
        source: HolderError,
    },
    #[error(transparent)]
    State(#[from] StateFileError),
}

/// `(device, inode)` of the file behind `fd`: what tells two fds apart.
fn identity(fd: impl AsFd) -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// One instance's keeping: its keys in the holder and its state memfd.
#[derive(Clone)]
pub struct InstanceKeep {
    link: Arc<HolderLink>,
    prefix: String,
    state: Arc<StateFile>,
}

impl InstanceKeep {
    fn holder_err(&self, source: HolderError) -> KeepError {
        KeepError::Holder {
            path: self.link.path().to_owned(),
            source,
        }
    }

    /// Keep a new instance: a fresh state memfd (no VMM) and its listening
    /// socket go to the holder.
    pub fn create(
        link: Arc<HolderLink>,
        uuid: Uuid,
        queues: u32,
        max_depth: u32,
        listener: BorrowedFd<'_>,
    ) -> Result<InstanceKeep, KeepError> {
        let (fd, state) = StateFile::create(&format!("wdvirt-{uuid}"), queues, max_depth)?;
        let keep = InstanceKeep {
            link,
            prefix: format!("inst/{uuid}/"),
            state: Arc::new(state),
        };
        // Anything a predecessor left under this UUID is stale now.
        keep.link
            .drop_prefix(&keep.prefix)
            .and_then(|_| keep.link.put(&keep.key("state"), fd.as_fd()))
            .and_then(|_| keep.link.put(&keep.key("listen"), listener))
            .map_err(|e| keep.holder_err(e))?;
        Ok(keep)
    }

    /// The keeping of an instance taken over from a predecessor.
    pub fn adopt(link: Arc<HolderLink>, uuid: Uuid, state: Arc<StateFile>) -> InstanceKeep {
        InstanceKeep {
            link,
            prefix: format!("inst/{uuid}/"),
            state,
        }
    }

    fn key(&self, what: &str) -> String {
        format!("{}{what}", self.prefix)
    }

    pub fn state(&self) -> &Arc<StateFile> {
        &self.state
    }

    /// The instance is stopped for good: the holder lets go of it all.
    pub fn forget(&self) {
        if let Err(e) = self.link.drop_prefix(&self.prefix) {
            tracing::warn!("the fd holder could not drop {}: {e}", self.prefix);
        }
    }

    /// The VMM the predecessor served is not taken up: the holder lets go
    /// of its connection and fds, the snapshot says no VMM.
    pub fn forget_vmm(&self) {
        let mut k = ConnectionKeeper {
            keep: self.clone(),
            deposited: BTreeMap::new(),
            last: 0,
        };
        if let Err(e) = k.clear() {
            tracing::warn!("{e}");
        }
    }

    /// A VMM connected on `conn`: it is kept, and the returned keeper keeps
    /// its session and device from now on.
    pub fn connection(&self, conn: BorrowedFd<'_>) -> Result<ConnectionKeeper, KeepError> {
        let mut k = ConnectionKeeper {
            keep: self.clone(),
            deposited: BTreeMap::new(),
            last: 0,
        };
        k.clear()?;
        self.link
            .put(&self.key("conn"), conn)
            .map_err(|e| self.holder_err(e))?;
        Ok(k)
    }

    /// A connection taken over from a predecessor, whose device fds the
    /// holder has under the keys `snapshot` (number `seq`) lists.
    pub fn adopted_connection(&self, snapshot: &VmmSnapshot, seq: u64) -> ConnectionKeeper {
        ConnectionKeeper {
            keep: self.clone(),
            deposited: (snapshot.fds.iter())
                .map(|(k, dev, ino)| (k.clone(), (*dev, *ino)))
                .collect(),
            last: seq,
        }
    }
}

/// The [`Keeper`] of one VMM connection.
pub struct ConnectionKeeper {
    keep: InstanceKeep,
    /// Device fds in the holder, by role, with the identity of each.
    deposited: BTreeMap<String, (u64, u64)>,
    /// The sequence number of the last snapshot written.
    last: u64,
}

impl ConnectionKeeper {
    fn fd_key(&self, role: &str) -> String {
        self.keep.key(&format!("fd/{role}/"))
    }

    /// No VMM: the snapshot says so, the holder lets go of its fds.
    fn clear(&mut self) -> Result<(), KeepError> {
        self.last = self.keep.state.write_snapshot(&Snapshot { vmm: None })?;
        self.deposited.clear();
        let link = &self.keep.link;
        link.drop_prefix(&self.keep.key("fd/"))
            .and_then(|_| link.drop_prefix(&self.keep.key("conn")))
            .map_err(|e| self.keep.holder_err(e))?;
        Ok(())
    }

    /// Bring the holder's copies of the device's fds in line with `fds`.
    fn sync_fds(&mut self, fds: &[(String, RawFd)]) -> Result<(), KeepError> {
        let link = self.keep.link.clone();
        let now: BTreeMap<&str, RawFd> = fds.iter().map(|(k, fd)| (k.as_str(), *fd)).collect();
        let gone: Vec<String> = (self.deposited.keys())
            .filter(|k| !now.contains_key(k.as_str()))
            .cloned()
            .collect();
        for role in gone {
            link.drop_prefix(&self.fd_key(&role))
                .map_err(|e| self.keep.holder_err(e))?;
            self.deposited.remove(&role);
        }
        for (role, raw) in now {
            // SAFETY: the device holds `raw` open until its next message,
            // and this runs between two messages on the connection's thread.
            let fd = unsafe { BorrowedFd::borrow_raw(raw) };
            let Some(id) = identity(fd) else { continue };
            // A memfd is told apart by its inode; eventfds all share the
            // one anonymous inode, so an interrupt's is always put again.
            if !role.starts_with("irq/") && self.deposited.get(role) == Some(&id) {
                continue;
            }
            link.put(&self.fd_key(role), fd)
                .map_err(|e| self.keep.holder_err(e))?;
            self.deposited.insert(role.to_string(), id);
        }
        Ok(())
    }
}

impl Keeper for ConnectionKeeper {
    fn keep(
        &mut self,
        handled: &Handled,
        reply: Option<&[u8]>,
        session: SessionRecord,
        device: DeviceRecord,
    ) -> Result<(), String> {
        if let Some(fds) = &device.fds {
            self.sync_fds(fds).map_err(|e| e.to_string())?;
        }
        // The reply first: the snapshot that names it counts only once
        // whole, and the reply of the one before was sent already.
        let reply = reply
            .map(|r| self.keep.state.write_reply(r))
            .transpose()
            .map_err(|e| e.to_string())?;
        let snap = Snapshot {
            vmm: Some(VmmSnapshot {
                session,
                device: device.state,
                fds: (self.deposited.iter())
                    .map(|(k, (dev, ino))| (k.clone(), *dev, *ino))
                    .collect(),
                handled: Some(*handled),
                reply,
            }),
        };
        self.last = self
            .keep
            .state
            .write_snapshot(&snap)
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn replied(&mut self) {
        self.keep.state.mark_replied(self.last);
    }

    fn ended(&mut self) {
        if let Err(e) = self.clear() {
            tracing::warn!("after its VMM left: {e}");
        }
    }
}
