//! Interrupt delivery: MSI-X vectors, INTx, and the ERR and REQ eventfds.
//!
//! [`Interrupts`] is a cheap clonable handle (an `Arc` around one
//! `parking_lot::Mutex`) shared by the PCI layer, the model and its worker
//! threads. The PCI layer feeds it VFIO `SET_IRQS` requests, MSI-X table/PBA
//! accesses and the config bits that gate delivery (MSI-X Enable and Function
//! Mask, Command INTx Disable); the model only calls `trigger_*`.
//!
//! An MSI-X vector is delivered (1 written to its eventfd) when MSI-X is
//! enabled and neither the Function Mask, the VFIO-level mask
//! (`SET_IRQS MASK/UNMASK`) nor the table's Mask bit (see
//! [`msix`](super::msix) for when that counts) is set, and it has an
//! eventfd. A trigger on a masked vector, or on one without an eventfd,
//! sets its PBA bit; whatever clears the last mask or assigns the eventfd
//! delivers it. (Removing all eventfds, `SET_IRQS` count 0, keeps the PBA.)
//! The lock is held across the eventfd write, which never blocks (every fd
//! is checked to be an eventfd when assigned, and written through
//! [`nowait`](super::nowait), since the VMM can clear `O_NONBLOCK` on the
//! description it shares with us at any time; a full counter counts as
//! delivered).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::fs::OFlags;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
};

use super::msix::MsixTable;
use crate::vdev::device::{DeviceError, IrqAction, IrqData};

/// What became of one trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqOutcome {
    /// 1 was written to the eventfd.
    Delivered,
    /// Masked, or an MSI-X vector without an eventfd yet: remembered (the
    /// PBA bit for MSI-X), delivered once unmasked and with an eventfd.
    Pending,
    /// INTx, ERR or REQ without an eventfd, or a failed eventfd write:
    /// dropped.
    NoEventfd,
    /// No such vector.
    OutOfRange,
    /// The interrupt mode is off (MSI-X Enable clear, or INTx while MSI-X is
    /// enabled): dropped, as a function cannot signal it.
    Disabled,
}

/// Per-vector counts since creation (never reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VectorCounters {
    /// Eventfd writes, including deliveries of pending triggers.
    pub delivered: u64,
    /// Triggers that found the vector masked (or, for MSI-X, without an
    /// eventfd) and were left pending.
    pub pending: u64,
    /// Triggers (or pending deliveries) lost: no eventfd, disabled, or a
    /// failed eventfd write.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Vector {
    fd: Option<OwnedFd>,
    vfio_masked: bool,
    counters: VectorCounters,
}

#[derive(Debug, Default)]
struct Intx {
    fd: Option<OwnedFd>,
    /// KVM-style resample eventfd (`SET_IRQS` EVENTFD|UNMASK): the VMM
    /// signals it on EOI. Read lazily at the next trigger (there is no thread
    /// polling it), so a level that stays asserted is re-raised only when the
    /// model triggers again.
    resample: Option<OwnedFd>,
    /// VFIO mask; set automatically by each delivery (AUTOMASKED).
    masked: bool,
    /// Command register INTx Disable.
    disabled_by_command: bool,
    pending: bool,
    counters: VectorCounters,
}

#[derive(Debug)]
struct State {
    msix: MsixTable,
    vectors: Vec<Vector>,
    msix_enabled: bool,
    function_masked: bool,
    intx: Intx,
    err: Option<OwnedFd>,
    req: Option<OwnedFd>,
}

/// The interrupt handle shared by the PCI layer, the model and its workers.
#[derive(Clone, Debug)]
pub struct Interrupts {
    inner: Arc<Mutex<State>>,
    msix_vectors: u16,
}

/// What `/proc/self/fd/N` links to for an eventfd.
const EVENTFD_LINK: &str = "anon_inode:[eventfd]";

/// Accept `fd` as an interrupt eventfd: it must really be an eventfd, and its
/// writes are made non-blocking. `signal` writes under the `Interrupts`
/// lock, from the queue workers too; a blocking write to a full pipe, FIFO or
/// eventfd would hang them there. (O_NONBLOCK is a property of the open file
/// description, which the VMM shares; QEMU and cloud-hypervisor create their
/// eventfds non-blocking anyway.) Needs `/proc`.
fn prepare_eventfd(fd: &OwnedFd) -> Result<(), DeviceError> {
    let raw = fd.as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{raw}")).map_err(|e| {
        invalid(format!(
            "fd {raw}: cannot tell what it is (/proc/self/fd: {e})"
        ))
    })?;
    if link.as_os_str() != EVENTFD_LINK {
        return Err(invalid(format!(
            "fd {raw} is {}, not an eventfd",
            link.display()
        )));
    }
    let flags =
        rustix::fs::fcntl_getfl(fd).map_err(|e| invalid(format!("eventfd {raw}: F_GETFL: {e}")))?;
    if !flags.contains(OFlags::NONBLOCK) {
        rustix::fs::fcntl_setfl(fd, flags | OFlags::NONBLOCK)
            .map_err(|e| invalid(format!("eventfd {raw}: F_SETFL O_NONBLOCK: {e}")))?;
    }
    Ok(())
}

/// Write 1 to an eventfd. Never blocks, whatever the VMM did to the flags
/// of the file description it shares with us ([`super::nowait`]). A full
/// counter counts as signalled: it is non-zero, so the VMM's poll sees it.
fn signal(fd: &OwnedFd) -> bool {
    match super::nowait::signal_eventfd(fd) {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "eventfd write failed");
            false
        }
    }
}

/// Has the resample eventfd been signalled? Consumes the count; never
/// blocks.
fn resampled(fd: &OwnedFd) -> bool {
    super::nowait::consume_eventfd(fd).is_some()
}

fn invalid(msg: impl Into<String>) -> DeviceError {
    DeviceError::Invalid(msg.into())
}

/// `start..start + count` inside `0..max`, checked.
fn check_range(
    what: &str,
    start: u32,
    count: u32,
    max: u32,
) -> Result<std::ops::Range<u32>, DeviceError> {
    match start.checked_add(count) {
        Some(end) if end <= max => Ok(start..end),
        _ => Err(invalid(format!(
            "{what}: vectors {start}+{count} past the {max} available"
        ))),
    }
}

/// The vectors a DATA_NONE/DATA_BOOL request selects.
fn selected(range: std::ops::Range<u32>, data: &IrqData) -> Result<Vec<u32>, DeviceError> {
    match data {
        IrqData::None => Ok(range.collect()),
        IrqData::Bool(flags) => {
            if flags.len() != range.len() {
                return Err(invalid(format!(
                    "{} bools for {} vectors",
                    flags.len(),
                    range.len()
                )));
            }
            Ok(range
                .zip(flags)
                .filter(|(_, f)| **f)
                .map(|(v, _)| v)
                .collect())
        }
        IrqData::Eventfds(_) => Err(invalid("eventfds where none are expected")),
    }
}

impl State {
    /// Is the vector held back by a mask? Out of range: masked.
    fn msix_masked(&self, v: u16) -> bool {
        self.function_masked
            || self
                .vectors
                .get(usize::from(v))
                .is_none_or(|x| x.vfio_masked)
            || self.msix.entry_masked(v)
    }

    /// Can the vector be written now: unmasked, with an eventfd?
    fn msix_ready(&self, v: u16) -> bool {
        !self.msix_masked(v)
            && self
                .vectors
                .get(usize::from(v))
                .is_some_and(|x| x.fd.is_some())
    }

    /// A trigger on an enabled but masked vector, or one without an eventfd
    /// yet, sets its PBA bit. Without an eventfd the VMM is between removing
    /// and adding vectors (QEMU sends "enabled, no vectors" first, then one
    /// vector at a time as the guest unmasks them); the message goes out
    /// when one is assigned.
    fn trigger_msix(&mut self, v: u16) -> IrqOutcome {
        let ready = self.msix_ready(v);
        let (enabled, pba) = (self.msix_enabled, &mut self.msix);
        let Some(vec) = self.vectors.get_mut(usize::from(v)) else {
            return IrqOutcome::OutOfRange;
        };
        if !enabled {
            vec.counters.dropped += 1;
            return IrqOutcome::Disabled;
        }
        if !ready {
            pba.set_pending(v, true);
            vec.counters.pending += 1;
            return IrqOutcome::Pending;
        }
        Self::send_msix(vec)
    }

    fn send_msix(vec: &mut Vector) -> IrqOutcome {
        match &vec.fd {
            Some(fd) if signal(fd) => {
                vec.counters.delivered += 1;
                IrqOutcome::Delivered
            }
            _ => {
                vec.counters.dropped += 1;
                IrqOutcome::NoEventfd
            }
        }
    }

    /// Deliver every pending vector that is unmasked and has an eventfd.
    fn flush_pending(&mut self) {
        if !self.msix_enabled || self.function_masked {
            return;
        }
        for v in 0..self.msix.vectors() {
            if self.msix.pending(v) && self.msix_ready(v) {
                self.msix.set_pending(v, false);
                if let Some(vec) = self.vectors.get_mut(usize::from(v)) {
                    Self::send_msix(vec);
                }
            }
        }
    }

    fn trigger_intx(&mut self) -> IrqOutcome {
        if self.msix_enabled {
            self.intx.counters.dropped += 1;
            return IrqOutcome::Disabled;
        }
        if self.intx.masked && self.intx.resample.as_ref().is_some_and(resampled) {
            self.intx.masked = false;
        }
        if self.intx.masked || self.intx.disabled_by_command {
            self.intx.pending = true;
            self.intx.counters.pending += 1;
            return IrqOutcome::Pending;
        }
        self.send_intx()
    }

    fn send_intx(&mut self) -> IrqOutcome {
        let intx = &mut self.intx;
        match &intx.fd {
            Some(fd) if signal(fd) => {
                intx.masked = true;
                intx.pending = false;
                intx.counters.delivered += 1;
                IrqOutcome::Delivered
            }
            _ => {
                intx.pending = false;
                intx.counters.dropped += 1;
                IrqOutcome::NoEventfd
            }
        }
    }

    fn flush_intx(&mut self) {
        if self.intx.pending
            && !self.intx.masked
            && !self.intx.disabled_by_command
            && !self.msix_enabled
        {
            self.send_intx();
        }
    }

    fn set_msix(
        &mut self,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), DeviceError> {
        // DATA_NONE|TRIGGER with count 0: disable the index (VFIO uapi).
        // The eventfds go; pending bits stay, for when vectors come back.
        if action == IrqAction::Trigger && count == 0 && matches!(data, IrqData::None) {
            for v in &mut self.vectors {
                v.fd = None;
                v.vfio_masked = false;
            }
            return Ok(());
        }
        let range = check_range("MSI-X", start, count, self.vectors.len() as u32)?;
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                if fds.len() != range.len() {
                    return Err(invalid(format!(
                        "{} eventfds for {} vectors",
                        fds.len(),
                        range.len()
                    )));
                }
                for (v, fd) in range.zip(fds) {
                    if let Some(vec) = self.vectors.get_mut(v as usize) {
                        vec.fd = fd;
                    }
                }
                self.flush_pending();
            }
            // DATA_NONE/BOOL|TRIGGER: fire (a test hook in VFIO). Goes through
            // the masks like a device-raised trigger.
            (IrqAction::Trigger, data) => {
                for v in selected(range, &data)? {
                    self.trigger_msix(v as u16);
                }
            }
            (IrqAction::Mask, data) => {
                for v in selected(range, &data)? {
                    if let Some(vec) = self.vectors.get_mut(v as usize) {
                        vec.vfio_masked = true;
                    }
                }
            }
            (IrqAction::Unmask, data) => {
                for v in selected(range, &data)? {
                    if let Some(vec) = self.vectors.get_mut(v as usize) {
                        vec.vfio_masked = false;
                    }
                }
                self.flush_pending();
            }
        }
        Ok(())
    }

    fn set_intx(
        &mut self,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), DeviceError> {
        if action == IrqAction::Trigger && count == 0 && matches!(data, IrqData::None) {
            self.intx.fd = None;
            self.intx.resample = None;
            self.intx.masked = false;
            self.intx.pending = false;
            return Ok(());
        }
        let range = check_range("INTx", start, count, 1)?;
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfds(mut fds)) => {
                if fds.len() != range.len() {
                    return Err(invalid("INTx: eventfd count mismatch"));
                }
                if let Some(fd) = fds.pop() {
                    // A fresh trigger starts unmasked (vfio_intx_enable).
                    self.intx.fd = fd;
                    self.intx.masked = false;
                }
            }
            (IrqAction::Trigger, data) => {
                if !selected(range, &data)?.is_empty() {
                    self.trigger_intx();
                }
            }
            (IrqAction::Mask, data) => {
                if !selected(range, &data)?.is_empty() {
                    self.intx.masked = true;
                }
            }
            (IrqAction::Unmask, IrqData::Eventfds(mut fds)) => {
                if fds.len() != range.len() {
                    return Err(invalid("INTx: resample eventfd count mismatch"));
                }
                if let Some(fd) = fds.pop() {
                    self.intx.resample = fd;
                }
            }
            (IrqAction::Unmask, data) => {
                if !selected(range, &data)?.is_empty() {
                    self.intx.masked = false;
                    self.flush_intx();
                }
            }
        }
        Ok(())
    }

    /// ERR and REQ: one eventfd, not maskable.
    fn set_single(
        slot: &mut Option<OwnedFd>,
        what: &str,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), DeviceError> {
        if action == IrqAction::Trigger && count == 0 && matches!(data, IrqData::None) {
            *slot = None;
            return Ok(());
        }
        let range = check_range(what, start, count, 1)?;
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfds(mut fds)) => {
                if fds.len() != range.len() {
                    return Err(invalid(format!("{what}: eventfd count mismatch")));
                }
                if let Some(fd) = fds.pop() {
                    *slot = fd;
                }
                Ok(())
            }
            (IrqAction::Trigger, data) => {
                if !selected(range, &data)?.is_empty()
                    && let Some(fd) = slot
                {
                    signal(fd);
                }
                Ok(())
            }
            _ => Err(invalid(format!("{what} is not maskable"))),
        }
    }
}

impl Interrupts {
    pub fn new(msix_vectors: u16) -> Self {
        let state = State {
            msix: MsixTable::new(msix_vectors),
            vectors: (0..msix_vectors).map(|_| Vector::default()).collect(),
            msix_enabled: false,
            function_masked: false,
            intx: Intx::default(),
            err: None,
            req: None,
        };
        Interrupts {
            inner: Arc::new(Mutex::new(state)),
            msix_vectors,
        }
    }

    pub fn msix_vectors(&self) -> u16 {
        self.msix_vectors
    }

    /// Raise MSI-X `vector`.
    pub fn trigger_msix(&self, vector: u16) -> IrqOutcome {
        self.inner.lock().trigger_msix(vector)
    }

    /// Raise INTx (edge-style: one eventfd write, then auto-masked until the
    /// VMM unmasks or signals the resample eventfd).
    pub fn trigger_intx(&self) -> IrqOutcome {
        self.inner.lock().trigger_intx()
    }

    /// Signal the ERR eventfd (AER-style error notification to the VMM).
    pub fn trigger_err(&self) -> IrqOutcome {
        match &self.inner.lock().err {
            Some(fd) if signal(fd) => IrqOutcome::Delivered,
            _ => IrqOutcome::NoEventfd,
        }
    }

    /// Signal the REQ eventfd (ask the VMM to release the device).
    pub fn trigger_req(&self) -> IrqOutcome {
        match &self.inner.lock().req {
            Some(fd) if signal(fd) => IrqOutcome::Delivered,
            _ => IrqOutcome::NoEventfd,
        }
    }

    /// MSI-X Enable is set in config space.
    pub fn msix_enabled(&self) -> bool {
        self.inner.lock().msix_enabled
    }

    pub fn msix_counters(&self, vector: u16) -> Option<VectorCounters> {
        self.inner
            .lock()
            .vectors
            .get(usize::from(vector))
            .map(|v| v.counters)
    }

    pub fn intx_counters(&self) -> VectorCounters {
        self.inner.lock().intx.counters
    }

    /// The vector's PBA bit. `None` out of range.
    pub fn msix_pending(&self, vector: u16) -> Option<bool> {
        let st = self.inner.lock();
        (vector < self.msix_vectors).then(|| st.msix.pending(vector))
    }

    /// Has the vector an eventfd? `None` out of range.
    pub fn msix_has_eventfd(&self, vector: u16) -> Option<bool> {
        self.inner
            .lock()
            .vectors
            .get(usize::from(vector))
            .map(|v| v.fd.is_some())
    }

    /// A `VFIO_DEVICE_SET_IRQS` request (the transport checked the index
    /// against `num_irqs` and the fd count against `count`).
    pub fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), DeviceError> {
        // Checked before the lock and before anything is assigned: one bad
        // fd refuses the whole request.
        if let IrqData::Eventfds(fds) = &data {
            fds.iter().flatten().try_for_each(prepare_eventfd)?;
        }
        let mut st = self.inner.lock();
        match index {
            VFIO_PCI_INTX_IRQ_INDEX => st.set_intx(action, start, count, data),
            VFIO_PCI_MSIX_IRQ_INDEX => st.set_msix(action, start, count, data),
            VFIO_PCI_ERR_IRQ_INDEX => {
                State::set_single(&mut st.err, "ERR", action, start, count, data)
            }
            VFIO_PCI_REQ_IRQ_INDEX => {
                State::set_single(&mut st.req, "REQ", action, start, count, data)
            }
            // No MSI capability: only the harmless "disable" is accepted.
            VFIO_PCI_MSI_IRQ_INDEX
                if action == IrqAction::Trigger && count == 0 && matches!(data, IrqData::None) =>
            {
                Ok(())
            }
            VFIO_PCI_MSI_IRQ_INDEX => Err(invalid("MSI is not supported (no MSI capability)")),
            _ => Err(invalid(format!("no IRQ index {index}"))),
        }
    }

    /// MSI-X table read (`offset` from the table's start).
    pub(crate) fn msix_table_read(&self, offset: u64, data: &mut [u8]) {
        self.inner.lock().msix.read_table(offset, data);
    }

    /// MSI-X table write; delivers pending vectors it unmasks.
    pub(crate) fn msix_table_write(&self, offset: u64, data: &[u8]) {
        let mut st = self.inner.lock();
        if !st.msix.write_table(offset, data).is_empty() {
            st.flush_pending();
        }
    }

    pub(crate) fn msix_pba_read(&self, offset: u64, data: &mut [u8]) {
        self.inner.lock().msix.read_pba(offset, data);
    }

    /// Config MSI-X Message Control changed.
    pub(crate) fn set_msix_control(&self, enabled: bool, function_masked: bool) {
        let mut st = self.inner.lock();
        st.msix_enabled = enabled;
        st.function_masked = function_masked;
        st.flush_pending();
        st.flush_intx();
    }

    /// Config Command INTx Disable changed.
    pub(crate) fn set_intx_disabled(&self, disabled: bool) {
        let mut st = self.inner.lock();
        st.intx.disabled_by_command = disabled;
        st.flush_intx();
    }

    /// Function reset: table, PBA, masks and gates to reset values. Eventfds
    /// are kept (VFIO DEVICE_RESET does not tear down IRQ fds).
    pub(crate) fn reset(&self) {
        let mut st = self.inner.lock();
        st.msix.reset();
        st.msix_enabled = false;
        st.function_masked = false;
        for v in &mut st.vectors {
            v.vfio_masked = false;
        }
        st.intx.masked = false;
        st.intx.pending = false;
        st.intx.disabled_by_command = false;
    }

    /// The interrupt state a migration carries: the MSI-X table and PBA and
    /// the INTx latch; never an eventfd, nor the VMM's own VFIO masks (the
    /// destination's VMM sets those up for itself).
    pub fn saved(&self) -> super::state::InterruptState {
        let st = self.inner.lock();
        super::state::InterruptState {
            msix_entries: st.msix.entries().to_vec(),
            msix_pba: st.msix.pba_words().to_vec(),
            msix_client_owned: st.msix.client_owned(),
            intx_masked: st.intx.masked,
            intx_pending: st.intx.pending,
        }
    }

    /// What the VMM set through SET_IRQS beside the eventfds (the VFIO
    /// masks of the MSI-X vectors), for a successor process.
    pub fn vmm_state(&self) -> super::state::VmmIrqState {
        let st = self.inner.lock();
        super::state::VmmIrqState {
            msix_vfio_masked: (st.vectors.iter().enumerate())
                .filter(|(_, v)| v.vfio_masked)
                .map(|(i, _)| i as u16)
                .collect(),
        }
    }

    /// Every eventfd the VMM gave, keyed by its role: `irq/msix/<vector>`,
    /// `irq/intx`, `irq/intx-resample`, `irq/err`, `irq/req`. Valid until
    /// the next SET_IRQS (which comes only on the caller's thread).
    pub fn held_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        let st = self.inner.lock();
        let mut out: Vec<(String, std::os::fd::RawFd)> = (st.vectors.iter().enumerate())
            .filter_map(|(i, v)| Some((format!("irq/msix/{i}"), v.fd.as_ref()?.as_raw_fd())))
            .collect();
        let single = [
            ("irq/intx", &st.intx.fd),
            ("irq/intx-resample", &st.intx.resample),
            ("irq/err", &st.err),
            ("irq/req", &st.req),
        ];
        for (key, fd) in single {
            if let Some(fd) = fd {
                out.push((key.to_string(), fd.as_raw_fd()));
            }
        }
        out
    }

    /// Take up what a predecessor process's [`held_fds`](Self::held_fds)
    /// and [`vmm_state`](Self::vmm_state) described: each eventfd under its
    /// key (checked as SET_IRQS checks one; an fd that is not an eventfd is
    /// refused and named), and the VFIO masks.
    pub fn adopt(
        &self,
        vmm: &super::state::VmmIrqState,
        mut fds: std::collections::BTreeMap<String, OwnedFd>,
    ) -> Result<(), DeviceError> {
        for fd in fds.values() {
            prepare_eventfd(fd)?;
        }
        let mut st = self.inner.lock();
        for (key, fd) in std::mem::take(&mut fds) {
            let slot = match key.as_str() {
                "irq/intx" => &mut st.intx.fd,
                "irq/intx-resample" => &mut st.intx.resample,
                "irq/err" => &mut st.err,
                "irq/req" => &mut st.req,
                other => {
                    let v = other
                        .strip_prefix("irq/msix/")
                        .and_then(|v| v.parse::<usize>().ok())
                        .filter(|&v| v < st.vectors.len())
                        .ok_or_else(|| invalid(format!("no interrupt is called {other}")))?;
                    &mut st.vectors[v].fd
                }
            };
            *slot = Some(fd);
        }
        for &v in &vmm.msix_vfio_masked {
            let v = st
                .vectors
                .get_mut(v as usize)
                .ok_or_else(|| invalid(format!("MSI-X vector {v} of {}", self.msix_vectors)))?;
            v.vfio_masked = true;
        }
        Ok(())
    }

    /// Why `saved` could not be this function's interrupt state.
    pub fn check_saved(&self, saved: &super::state::InterruptState) -> Option<String> {
        self.inner
            .lock()
            .msix
            .check_parts(&saved.msix_entries, &saved.msix_pba)
    }

    /// Become `saved` (checked by [`Interrupts::check_saved`]), with the
    /// gates config space says (MSI-X Enable and Function Mask, Command
    /// INTx Disable). Eventfds are kept; nothing is signalled now: pending
    /// vectors go out when the VMM assigns their eventfds or unmasks them.
    pub(crate) fn restore(
        &self,
        saved: &super::state::InterruptState,
        msix_enabled: bool,
        function_masked: bool,
        intx_disabled: bool,
    ) {
        let mut st = self.inner.lock();
        st.msix.restore(
            &saved.msix_entries,
            &saved.msix_pba,
            saved.msix_client_owned,
        );
        st.msix_enabled = msix_enabled;
        st.function_masked = function_masked;
        st.intx.masked = saved.intx_masked;
        st.intx.pending = saved.intx_pending;
        st.intx.disabled_by_command = intx_disabled;
    }

    /// Deliver what is pending and deliverable (a function resumed after a
    /// migration: vectors that went pending while it was stopped, or on
    /// the source).
    pub(crate) fn flush(&self) {
        let mut st = self.inner.lock();
        st.flush_pending();
        st.flush_intx();
    }

    /// The VMM went away: drop every eventfd.
    pub(crate) fn drop_fds(&self) {
        let mut st = self.inner.lock();
        for v in &mut st.vectors {
            v.fd = None;
        }
        st.intx.fd = None;
        st.intx.resample = None;
        st.err = None;
        st.req = None;
    }
}

impl crate::vdev::function::InterruptSink for Interrupts {
    fn msix(&self, vector: u16) -> bool {
        self.trigger_msix(vector) == IrqOutcome::Delivered
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustix::event::{EventfdFlags, eventfd};

    /// A non-blocking eventfd and a duplicate to hand over.
    pub(crate) fn efd() -> (OwnedFd, OwnedFd) {
        let fd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).unwrap();
        let dup = rustix::io::dup(&fd).unwrap();
        (fd, dup)
    }

    /// The eventfd's count, consumed; 0 if not signalled.
    pub(crate) fn count(fd: &OwnedFd) -> u64 {
        let mut b = [0u8; 8];
        match rustix::io::read(fd, &mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    fn assign(irq: &Interrupts, index: u32, start: u32, fds: Vec<Option<OwnedFd>>) {
        let n = fds.len() as u32;
        irq.set_irqs(index, IrqAction::Trigger, start, n, IrqData::Eventfds(fds))
            .unwrap();
    }

    #[test]
    fn msix_needs_enable_and_an_eventfd() {
        let irq = Interrupts::new(4);
        let (fd, dup) = efd();
        assign(&irq, VFIO_PCI_MSIX_IRQ_INDEX, 1, vec![Some(dup)]);
        assert_eq!(irq.trigger_msix(1), IrqOutcome::Disabled);
        irq.set_msix_control(true, false);
        assert_eq!(irq.trigger_msix(1), IrqOutcome::Delivered);
        assert_eq!(irq.trigger_msix(1), IrqOutcome::Delivered);
        assert_eq!(count(&fd), 2);
        // No eventfd on vector 0 yet: pending until one is assigned.
        assert_eq!(irq.trigger_msix(0), IrqOutcome::Pending);
        assert_eq!(irq.msix_pending(0), Some(true));
        assert_eq!(irq.trigger_msix(4), IrqOutcome::OutOfRange);
        let c = irq.msix_counters(1).unwrap();
        assert_eq!((c.delivered, c.pending, c.dropped), (2, 0, 1));
        let c = irq.msix_counters(0).unwrap();
        assert_eq!((c.delivered, c.pending, c.dropped), (0, 1, 0));
        let (fd0, dup) = efd();
        assign(&irq, VFIO_PCI_MSIX_IRQ_INDEX, 0, vec![Some(dup)]);
        assert_eq!(count(&fd0), 1);
        assert_eq!(irq.msix_pending(0), Some(false));
    }

    #[test]
    fn vfio_mask_and_function_mask_latch_pending() {
        let irq = Interrupts::new(2);
        let (fd, dup) = efd();
        assign(&irq, VFIO_PCI_MSIX_IRQ_INDEX, 0, vec![Some(dup)]);
        irq.set_msix_control(true, false);
        irq.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            IrqAction::Mask,
            0,
            1,
            IrqData::None,
        )
        .unwrap();
        assert_eq!(irq.trigger_msix(0), IrqOutcome::Pending);
        assert_eq!(irq.msix_pending(0), Some(true));
        assert_eq!(count(&fd), 0);
        // Function mask also holds it back after the VFIO unmask.
        irq.set_msix_control(true, true);
        irq.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            IrqAction::Unmask,
            0,
            1,
            IrqData::None,
        )
        .unwrap();
        assert_eq!(count(&fd), 0);
        assert_eq!(irq.msix_pending(0), Some(true));
        irq.set_msix_control(true, false);
        assert_eq!(count(&fd), 1);
        assert_eq!(irq.msix_pending(0), Some(false));
        // DATA_BOOL selects vectors.
        irq.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            IrqAction::Mask,
            0,
            2,
            IrqData::Bool(vec![false, true]),
        )
        .unwrap();
        assert_eq!(irq.trigger_msix(0), IrqOutcome::Delivered);
        assert_eq!(irq.trigger_msix(1), IrqOutcome::Pending);
    }

    #[test]
    fn set_irqs_ranges_and_disable() {
        let irq = Interrupts::new(4);
        let (_fd, dup) = efd();
        let e = irq.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            IrqAction::Trigger,
            3,
            2,
            IrqData::Eventfds(vec![None, None]),
        );
        assert!(matches!(e, Err(DeviceError::Invalid(_))));
        let e = irq.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            IrqAction::Mask,
            u32::MAX,
            2,
            IrqData::None,
        );
        assert!(matches!(e, Err(DeviceError::Invalid(_))));
        let e = irq.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            IrqAction::Trigger,
            0,
            2,
            IrqData::Eventfds(vec![None]),
        );
        assert!(matches!(e, Err(DeviceError::Invalid(_))));
        assign(&irq, VFIO_PCI_MSIX_IRQ_INDEX, 3, vec![Some(dup)]);
        assert_eq!(irq.msix_has_eventfd(3), Some(true));
        irq.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            IrqAction::Trigger,
            0,
            0,
            IrqData::None,
        )
        .unwrap();
        assert_eq!(irq.msix_has_eventfd(3), Some(false));
        // MSI: only disable.
        irq.set_irqs(
            VFIO_PCI_MSI_IRQ_INDEX,
            IrqAction::Trigger,
            0,
            0,
            IrqData::None,
        )
        .unwrap();
        assert!(
            irq.set_irqs(
                VFIO_PCI_MSI_IRQ_INDEX,
                IrqAction::Trigger,
                0,
                1,
                IrqData::None
            )
            .is_err()
        );
        assert!(
            irq.set_irqs(5, IrqAction::Trigger, 0, 0, IrqData::None)
                .is_err()
        );
        // ERR is not maskable.
        assert!(
            irq.set_irqs(VFIO_PCI_ERR_IRQ_INDEX, IrqAction::Mask, 0, 1, IrqData::None)
                .is_err()
        );
    }

    #[test]
    fn intx_automasks_and_unmask_rearms() {
        let irq = Interrupts::new(0);
        let (fd, dup) = efd();
        assign(&irq, VFIO_PCI_INTX_IRQ_INDEX, 0, vec![Some(dup)]);
        assert_eq!(irq.trigger_intx(), IrqOutcome::Delivered);
        assert_eq!(irq.trigger_intx(), IrqOutcome::Pending);
        assert_eq!(count(&fd), 1);
        irq.set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            IrqAction::Unmask,
            0,
            1,
            IrqData::None,
        )
        .unwrap();
        assert_eq!(count(&fd), 1, "the pending level fires on unmask");
        // Command INTx Disable holds it.
        irq.set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            IrqAction::Unmask,
            0,
            1,
            IrqData::None,
        )
        .unwrap();
        irq.set_intx_disabled(true);
        assert_eq!(irq.trigger_intx(), IrqOutcome::Pending);
        irq.set_intx_disabled(false);
        assert_eq!(count(&fd), 1);
        // With MSI-X enabled INTx is off.
        irq.set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            IrqAction::Unmask,
            0,
            1,
            IrqData::None,
        )
        .unwrap();
        irq.set_msix_control(true, false);
        assert_eq!(irq.trigger_intx(), IrqOutcome::Disabled);
        irq.set_msix_control(false, false);
        // Disable drops the fd.
        irq.set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            IrqAction::Trigger,
            0,
            0,
            IrqData::None,
        )
        .unwrap();
        assert_eq!(irq.trigger_intx(), IrqOutcome::NoEventfd);
        assert!(
            irq.set_irqs(
                VFIO_PCI_INTX_IRQ_INDEX,
                IrqAction::Mask,
                0,
                2,
                IrqData::None
            )
            .is_err()
        );
    }

    #[test]
    fn intx_resample_eventfd_unmasks_lazily() {
        let irq = Interrupts::new(0);
        let (fd, dup) = efd();
        let (resample, rdup) = efd();
        assign(&irq, VFIO_PCI_INTX_IRQ_INDEX, 0, vec![Some(dup)]);
        irq.set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            IrqAction::Unmask,
            0,
            1,
            IrqData::Eventfds(vec![Some(rdup)]),
        )
        .unwrap();
        assert_eq!(irq.trigger_intx(), IrqOutcome::Delivered);
        assert_eq!(irq.trigger_intx(), IrqOutcome::Pending);
        // The VMM signals EOI on the resample fd.
        rustix::io::write(&resample, &1u64.to_ne_bytes()).unwrap();
        assert_eq!(irq.trigger_intx(), IrqOutcome::Delivered);
        assert_eq!(count(&fd), 2);
    }

    #[test]
    fn err_and_req_eventfds() {
        let irq = Interrupts::new(0);
        assert_eq!(irq.trigger_err(), IrqOutcome::NoEventfd);
        let (fd, dup) = efd();
        assign(&irq, VFIO_PCI_ERR_IRQ_INDEX, 0, vec![Some(dup)]);
        assert_eq!(irq.trigger_err(), IrqOutcome::Delivered);
        irq.set_irqs(
            VFIO_PCI_ERR_IRQ_INDEX,
            IrqAction::Trigger,
            0,
            1,
            IrqData::None,
        )
        .unwrap();
        assert_eq!(count(&fd), 2);
        let (rfd, rdup) = efd();
        assign(&irq, VFIO_PCI_REQ_IRQ_INDEX, 0, vec![Some(rdup)]);
        assert_eq!(irq.trigger_req(), IrqOutcome::Delivered);
        assert_eq!(count(&rfd), 1);
        irq.drop_fds();
        assert_eq!(irq.trigger_err(), IrqOutcome::NoEventfd);
        assert_eq!(irq.trigger_req(), IrqOutcome::NoEventfd);
    }

    /// An eventfd opened without O_NONBLOCK, as a careless VMM might send.
    fn blocking_efd() -> (OwnedFd, OwnedFd) {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        let dup = rustix::io::dup(&fd).unwrap();
        (fd, dup)
    }

    fn nonblocking(fd: &OwnedFd) -> bool {
        rustix::fs::fcntl_getfl(fd)
            .unwrap()
            .contains(rustix::fs::OFlags::NONBLOCK)
    }

    #[test]
    fn a_pipe_is_not_an_eventfd() {
        let irq = Interrupts::new(2);
        let errno = |index, action, start| {
            let (_r, w) = rustix::pipe::pipe().unwrap();
            irq.set_irqs(index, action, start, 1, IrqData::Eventfds(vec![Some(w)]))
                .unwrap_err()
                .errno()
        };
        let einval = libc::EINVAL as u32;
        assert_eq!(
            errno(VFIO_PCI_MSIX_IRQ_INDEX, IrqAction::Trigger, 1),
            einval
        );
        assert_eq!(
            errno(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Trigger, 0),
            einval
        );
        assert_eq!(errno(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Unmask, 0), einval);
        assert_eq!(errno(VFIO_PCI_ERR_IRQ_INDEX, IrqAction::Trigger, 0), einval);
        assert_eq!(errno(VFIO_PCI_REQ_IRQ_INDEX, IrqAction::Trigger, 0), einval);
        // One bad fd refuses the whole request: the good one is not kept.
        let (_fd, dup) = efd();
        let (_r, w) = rustix::pipe::pipe().unwrap();
        let e = irq.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            IrqAction::Trigger,
            0,
            2,
            IrqData::Eventfds(vec![Some(dup), Some(w)]),
        );
        assert!(matches!(e, Err(DeviceError::Invalid(_))));
        assert_eq!(irq.msix_has_eventfd(0), Some(false));
        assert_eq!(irq.msix_has_eventfd(1), Some(false));
        assert_eq!(irq.trigger_err(), IrqOutcome::NoEventfd);
    }

    #[test]
    fn assigned_eventfds_become_nonblocking() {
        let irq = Interrupts::new(1);
        let (msix, dup) = blocking_efd();
        assign(&irq, VFIO_PCI_MSIX_IRQ_INDEX, 0, vec![Some(dup)]);
        let (intx, dup) = blocking_efd();
        assign(&irq, VFIO_PCI_INTX_IRQ_INDEX, 0, vec![Some(dup)]);
        let (resample, dup) = blocking_efd();
        irq.set_irqs(
            VFIO_PCI_INTX_IRQ_INDEX,
            IrqAction::Unmask,
            0,
            1,
            IrqData::Eventfds(vec![Some(dup)]),
        )
        .unwrap();
        let (err, dup) = blocking_efd();
        assign(&irq, VFIO_PCI_ERR_IRQ_INDEX, 0, vec![Some(dup)]);
        let (req, dup) = blocking_efd();
        assign(&irq, VFIO_PCI_REQ_IRQ_INDEX, 0, vec![Some(dup)]);
        for (what, fd) in [
            ("msix", &msix),
            ("intx", &intx),
            ("resample", &resample),
            ("err", &err),
            ("req", &req),
        ] {
            assert!(nonblocking(fd), "{what}");
        }
    }

    /// An eventfd whose counter is at its maximum (0xffff_ffff_ffff_fffe):
    /// a blocking write of 1 would wait for a reader forever, holding the
    /// lock. Every trigger must return at once and count as delivered.
    #[test]
    fn signalling_a_full_eventfd_does_not_block() {
        let irq = Interrupts::new(1);
        let (fd, dup) = blocking_efd();
        rustix::io::write(&fd, &(u64::MAX - 1).to_ne_bytes()).unwrap();
        assign(&irq, VFIO_PCI_MSIX_IRQ_INDEX, 0, vec![Some(dup)]);
        let (efd, dup) = blocking_efd();
        rustix::io::write(&efd, &(u64::MAX - 1).to_ne_bytes()).unwrap();
        assign(&irq, VFIO_PCI_ERR_IRQ_INDEX, 0, vec![Some(dup)]);
        irq.set_msix_control(true, false);
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = irq.clone();
        // Detached: if the write blocked, the thread would stay stuck.
        std::thread::spawn(move || {
            let _ = tx.send((worker.trigger_msix(0), worker.trigger_err()));
        });
        let outcome = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("a trigger blocked on a full eventfd");
        assert_eq!(outcome, (IrqOutcome::Delivered, IrqOutcome::Delivered));
        assert_eq!(count(&fd), u64::MAX - 1);
    }

    #[test]
    fn triggers_from_another_thread() {
        let irq = Interrupts::new(1);
        let (fd, dup) = efd();
        assign(&irq, VFIO_PCI_MSIX_IRQ_INDEX, 0, vec![Some(dup)]);
        irq.set_msix_control(true, false);
        let worker = irq.clone();
        std::thread::spawn(move || {
            for _ in 0..10 {
                assert_eq!(worker.trigger_msix(0), IrqOutcome::Delivered);
            }
        })
        .join()
        .unwrap();
        assert_eq!(count(&fd), 10);
    }
}
