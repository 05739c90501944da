//! Taking an instance over from a predecessor process: its listening
//! socket, its state memfd and, if a VMM was connected, the connection, the
//! device's fds and its state, rebuilt into a new device that goes on where
//! the old one stopped.
//!
//! Rebuilding uses the migration's restore path: the device is given the
//! VMM's DMA maps and eventfds again, then the function state from the last
//! snapshot, in which each enabled queue's ring positions come from its
//! journal ([`QueueJournal::recover`]): jobs the predecessor took and did
//! not complete are run again, each completes once.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use uuid::Uuid;
use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
use vm_memory::GuestAddressSpace;

use super::keep::{HolderLink, InstanceKeep, KeepError};
use super::state::{StateFile, StateFileError, VmmSnapshot};
use crate::stats::add;
use crate::transport::keeper::{Resume, SessionRecord};
use crate::vdev::device::{DeviceError, DmaMapping, Migratable, VfioUserDevice};
use crate::vdev::pci::PciFunction;
use crate::vdev::pci::state::LiveState;
use crate::vdev::wd::WdDevice;
use crate::vdev::wd::journal::JournalError;
use crate::vdev::wd::state::WdState;

/// Why an instance could not be taken over. Each says which part failed;
/// the instance is then started afresh and its VMM, if any, loses it.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(transparent)]
    Keep(#[from] KeepError),
    #[error("the holder keeps no {0} for it")]
    Missing(&'static str),
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error("the device state in the snapshot does not parse: {0}")]
    Decode(String),
    #[error("queue {queue}'s journal: {source}")]
    Journal {
        queue: usize,
        #[source]
        source: JournalError,
    },
    #[error("the holder has no fd for {0}, which the snapshot lists")]
    MissingFd(String),
    #[error("the fd kept as {0} is not the file the snapshot names")]
    StaleFd(String),
    #[error("the device refused the kept state: {0}")]
    Device(#[from] DeviceError),
}

/// What the holder kept of an instance.
pub struct Taken {
    pub listener: OwnedFd,
    pub keep: InstanceKeep,
    /// The VMM that was connected, if one was.
    pub vmm: Option<TakenVmm>,
}

/// A connected VMM's part.
pub struct TakenVmm {
    pub conn: OwnedFd,
    pub snapshot: VmmSnapshot,
    /// The snapshot's sequence number.
    pub seq: u64,
    /// Where the conversation with the VMM stood.
    pub resume: Resume,
    /// The device's fds by role (`dma/<iova>`, `irq/msix/<n>` …).
    pub fds: BTreeMap<String, OwnedFd>,
}

/// What a rebuild found, for the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Jobs taken by the predecessor and not completed: run again.
    pub jobs_rerun: u64,
    /// Completions the predecessor had written.
    pub completions: u64,
}

/// Take what the holder keeps of instance `uuid` (of `queues` queues of at
/// most `max_depth` entries). `Ok(None)`: it keeps nothing of it.
pub fn take(
    link: &Arc<HolderLink>,
    uuid: Uuid,
    queues: u32,
    max_depth: u32,
) -> Result<Option<Taken>, AdoptError> {
    let prefix = format!("inst/{uuid}/");
    let held = link.take(&prefix).map_err(|source| {
        AdoptError::Keep(KeepError::Holder {
            path: link.path().to_owned(),
            source,
        })
    })?;
    if held.is_empty() {
        return Ok(None);
    }
    let mut by_key: BTreeMap<String, OwnedFd> = held
        .into_iter()
        .filter_map(|(k, fd)| Some((k.strip_prefix(&prefix)?.to_string(), fd)))
        .collect();
    let listener = by_key
        .remove("listen")
        .ok_or(AdoptError::Missing("listening socket"))?;
    let state_fd = by_key
        .remove("state")
        .ok_or(AdoptError::Missing("state memfd"))?;
    let state = StateFile::open(&state_fd, queues, max_depth)?;
    let (snapshot, seq, replied) = state.read_newest()?;
    let state = Arc::new(state);
    let keep = InstanceKeep::adopt(link.clone(), uuid, state.clone());
    let vmm = match (snapshot.vmm, by_key.remove("conn")) {
        (Some(snapshot), Some(conn)) => {
            let fds = by_key
                .into_iter()
                .filter_map(|(k, fd)| {
                    let role = k.strip_prefix("fd/")?.strip_suffix('/')?.to_string();
                    Some((role, fd))
                })
                .collect();
            // The last message's reply, if it did not go out.
            let unsent_reply = match (snapshot.reply, replied) {
                (Some(r), false) => Some(
                    state
                        .read_reply(&r)
                        .ok_or(AdoptError::Missing("reply to the last message"))?,
                ),
                _ => None,
            };
            let resume = Resume {
                handled: snapshot.handled,
                unsent_reply,
            };
            Some(TakenVmm {
                conn,
                snapshot,
                seq,
                fds,
                resume,
            })
        }
        _ => None,
    };
    Ok(Some(Taken {
        listener,
        keep,
        vmm,
    }))
}

/// Make `dev` (new, as the instance's type builds it) the device the
/// predecessor served: the VMM's maps and eventfds, then the function state
/// with each enabled queue where its journal says it stood. The queues run
/// when this returns. Returns the session to serve the connection with.
pub fn rebuild(
    dev: &mut PciFunction<WdDevice>,
    vmm: &mut TakenVmm,
    state: &StateFile,
) -> Result<(SessionRecord, Rebuilt), AdoptError> {
    let snap = &vmm.snapshot;
    // Every fd is the file the snapshot names.
    for (role, dev_id, ino) in &snap.fds {
        let fd = vmm
            .fds
            .get(role)
            .ok_or_else(|| AdoptError::MissingFd(role.clone()))?;
        let st = rustix::fs::fstat(fd).map_err(|e| DeviceError::Io(e.into()))?;
        if (st.st_dev, st.st_ino) != (*dev_id, *ino) {
            return Err(AdoptError::StaleFd(role.clone()));
        }
    }
    let live: LiveState = serde_json::from_value(snap.device.clone())
        .map_err(|e| AdoptError::Decode(e.to_string()))?;
    dev.model_mut().set_journals(state.journals());
    for m in &snap.session.dma {
        let (readable, writable) = (
            m.flags & VFIO_DMA_MAP_FLAG_READ != 0,
            m.flags & VFIO_DMA_MAP_FLAG_WRITE != 0,
        );
        let fd = vmm
            .fds
            .remove(&format!("dma/{:#x}", m.iova))
            .map(|fd| (fd, m.offset));
        dev.dma_map(DmaMapping {
            iova: m.iova,
            size: m.size,
            readable,
            writable,
            fd,
        })?;
    }
    let irq_fds: BTreeMap<String, OwnedFd> = std::mem::take(&mut vmm.fds)
        .into_iter()
        .filter(|(role, _)| role.starts_with("irq/"))
        .collect();
    dev.interrupts().adopt(&live.irqs, irq_fds)?;
    // Each enabled queue's positions, from its journal.
    let mut function = live.function;
    let mut model: WdState = serde_json::from_value(function.model.clone())
        .map_err(|e| AdoptError::Decode(e.to_string()))?;
    let mem = dev.model().address_space().memory();
    let mut found = Rebuilt::default();
    let mut counts = Vec::new();
    for (qi, q) in model.queues.iter_mut().enumerate() {
        let Some(ring) = q.ring.as_mut() else {
            counts.push(None);
            continue;
        };
        let journal = state.journal(qi as u32);
        let (recovered, c) = journal
            .recover(q.config.depth, q.config.cq_base, &mem)
            .map_err(|source| AdoptError::Journal { queue: qi, source })?;
        found.jobs_rerun += (recovered.pending.len() + recovered.held.len()) as u64;
        found.completions += recovered.cq_tail as u64;
        *ring = recovered;
        q.completed = c.completed;
        counts.push(Some((c, ring.pending.len() + ring.held.len())));
    }
    function.model = serde_json::to_value(&model).map_err(|e| AdoptError::Decode(e.to_string()))?;
    Migratable::quiesce(dev)?;
    dev.restore_state(function)?;
    // The counters the guest's jobs were counted in go on from where
    // they stood.
    for (shared, c) in dev.model().queue_stats().iter().zip(counts) {
        if let Some((c, in_flight)) = c {
            let s = &shared.stats;
            add(&s.jobs_ok, c.jobs_ok);
            add(&s.jobs_failed, c.jobs_failed);
            add(&s.bytes_out, c.bytes_out);
            add(
                &s.jobs_submitted,
                c.jobs_ok + c.jobs_failed + in_flight as u64,
            );
        }
    }
    Migratable::resume(dev)?;
    Ok((snap.session.clone(), found))
}
