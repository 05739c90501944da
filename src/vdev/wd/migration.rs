//! The accelerator model's half of a migration: park every queue keeping
//! every job, derive [`WdState`] from the parked device, and rebuild a
//! device from a checked [`WdState`] without the enable path (which clears
//! the completion ring).
//!
//! What happens to each job when the device stops, and why each completes
//! exactly once, is told in `docs/migration.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wdvirt_abi::{IDX_ALIGN, RING_ALIGN, RegError, regs as r};

use super::queue::{IdleThread, Parked, QueueRunner, WorkerContext, overlaps};
use super::state::{ErrState, QueueState, RingState, StateError, WD_STATE_VERSION, WdState};
use super::{ErrLatch, WdDevice};
use crate::migration::stream::{Compat, QueueCompat};
use crate::vdev::device::DeviceError;
use crate::vdev::function::ModelMigration;

impl WdDevice {
    /// Park every running queue (see `QueueRunner::signal_park`): all are
    /// told first so that they settle together, within one park budget
    /// ([`PARK_BUDGET`](super::queue::PARK_BUDGET) unless
    /// [`WdDevice::set_park_budget`] said otherwise). If a queue pair still
    /// holds jobs when its budget runs out, every queue runs again and the
    /// quiesce fails with `Busy`: no job is left without a worker to write
    /// its completion.
    pub fn quiesce_queues(&mut self) -> Result<(), DeviceError> {
        if self.quiesced {
            return Ok(());
        }
        let running: Vec<(usize, QueueRunner)> = self
            .queues
            .iter_mut()
            .enumerate()
            .filter_map(|(i, q)| q.runner.take().map(|r| (i, r)))
            .collect();
        // Nothing running: this is a migration's destination on its way to
        // RESUMING (or an idle function). Start the threads a restored
        // state's queues will run on now, not in the downtime's resume.
        if running.is_empty() {
            for (qi, q) in self.queues.iter_mut().enumerate() {
                if q.parked.is_none() && q.spare.is_none() {
                    q.spare = IdleThread::spare(qi as u32)
                        .inspect_err(|e| tracing::debug!(queue = qi, "no spare queue thread: {e}"))
                        .ok();
                }
            }
        }
        for (_, r) in &running {
            r.signal_park();
        }
        let mut unsettled = None;
        for (qi, r) in running {
            match r.join_parked() {
                Some(p) => {
                    if p.in_flight > 0 {
                        unsettled.get_or_insert(qi);
                    }
                    self.queues[qi].parked = Some(p);
                }
                None => {
                    // A worker that panicked has lost its positions: the
                    // queue is stopped, as a disable would.
                    let code = RegError::NoQueuePair;
                    self.queues[qi].error = r::Q_STATUS_ERROR | ((code.code() as u32) << 8);
                }
            }
        }
        self.quiesced = true;
        if let Some(queue) = unsettled {
            self.resume_queues()?;
            return Err(StateError::Unsettled { queue }.into());
        }
        Ok(())
    }

    /// Start every parked queue again from its positions.
    pub fn resume_queues(&mut self) -> Result<(), DeviceError> {
        for qi in 0..self.queues.len() {
            let Some(p) = self.queues[qi].parked.take() else {
                continue;
            };
            match QueueRunner::resume(p) {
                Ok(runner) => self.queues[qi].runner = Some(runner),
                Err(e) => {
                    // The thread was refused with the context in it: the
                    // queue is gone, and says so as a failed enable does.
                    tracing::error!(queue = qi, "cannot start queue worker: {e}");
                    let code = RegError::NoQueuePair;
                    self.queues[qi].error = r::Q_STATUS_ERROR | ((code.code() as u32) << 8);
                    return Err(DeviceError::Io(e));
                }
            }
        }
        self.quiesced = false;
        // Threads no restored queue took end by themselves.
        self.queues.iter_mut().for_each(|q| q.spare = None);
        Ok(())
    }

    /// The device's state, derived from the parked queues.
    pub fn state(&self) -> Result<WdState, StateError> {
        if !self.quiesced {
            return Err(StateError::NotQuiesced("saving"));
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (qi, q) in self.queues.iter().enumerate() {
            let ring = match &q.parked {
                Some(p) if p.in_flight > 0 => return Err(StateError::Unsettled { queue: qi }),
                Some(p) => Some(p.ctx.ring.clone()),
                None => None,
            };
            queues.push(QueueState {
                config: q.cfg,
                error: q.error,
                completed: q.shared.completed.load(Ordering::Relaxed),
                rings_ready: ring.is_some() && q.rings_ready.load(Ordering::Acquire),
                ring,
            });
        }
        Ok(self.state_with(queues))
    }

    /// The device's registers and error latch around `queues`.
    fn state_with(&self, queues: Vec<QueueState>) -> WdState {
        WdState {
            version: WD_STATE_VERSION,
            enabled: self.enabled,
            err: ErrState {
                code: self.err.code.map_or(0, RegError::code),
                offset: self.err.offset,
                count: self.err.count,
            },
            queues,
        }
    }

    /// The device's state while it runs: as [`state`](Self::state), with
    /// each enabled queue's ring positions at zero (its journal has them).
    pub fn live_state(&self) -> WdState {
        let queues = (self.queues.iter())
            .map(|q| {
                let enabled = q.runner.is_some() || q.parked.is_some();
                QueueState {
                    config: q.cfg,
                    error: q.error,
                    completed: q.shared.completed.load(Ordering::Relaxed),
                    rings_ready: enabled && q.rings_ready.load(Ordering::Acquire),
                    ring: enabled.then(RingState::default),
                }
            })
            .collect();
        self.state_with(queues)
    }

    /// Every check a restore makes before it changes anything.
    fn check_state(&self, st: &WdState) -> Result<(), StateError> {
        if st.version != WD_STATE_VERSION {
            return Err(StateError::Version { found: st.version });
        }
        if st.queues.len() != self.cfg.queues as usize {
            return Err(StateError::QueueCount {
                found: st.queues.len(),
                expected: self.cfg.queues,
            });
        }
        if st.err.code != 0 && RegError::from_code(st.err.code).is_none() {
            return Err(StateError::ErrCode { code: st.err.code });
        }
        // The offset is in the BAR the access went to: BAR0, or BAR2 for a
        // doorbell read (WriteOnly; BAR2 outgrows BAR0 past four queues).
        let (bar, size) = if st.err.code == RegError::WriteOnly.code() {
            let bar2 = wdvirt_abi::pci::bar2_size(self.cfg.queues);
            ("BAR0 or BAR2", wdvirt_abi::pci::BAR0_SIZE.max(bar2))
        } else {
            ("BAR0", wdvirt_abi::pci::BAR0_SIZE)
        };
        if u64::from(st.err.offset) >= size {
            return Err(StateError::ErrOffset {
                offset: st.err.offset,
                bar,
                size,
            });
        }
        for (qi, q) in st.queues.iter().enumerate() {
            self.check_queue(qi, q, st.enabled)?;
        }
        Ok(())
    }

    fn check_queue(&self, qi: usize, q: &QueueState, dev_enabled: bool) -> Result<(), StateError> {
        let c = &q.config;
        let max = self.cfg.max_depth;
        if c.depth != 0 && (!c.depth.is_power_of_two() || c.depth < 2 || c.depth > max) {
            return Err(StateError::Depth {
                queue: qi,
                depth: c.depth,
                max,
            });
        }
        let allowed = self.cfg.queue_cap_ops(qi as u32);
        if c.ops & !allowed != 0 {
            return Err(StateError::Ops {
                queue: qi,
                ops: c.ops,
                allowed,
            });
        }
        let vectors = u32::from(self.msix_vectors());
        if c.vector != r::NO_VECTOR && c.vector >= vectors {
            return Err(StateError::Vector {
                queue: qi,
                vector: c.vector,
                vectors,
            });
        }
        for (what, addr, align) in [
            ("submission ring", c.sq_base, RING_ALIGN),
            ("completion ring", c.cq_base, RING_ALIGN),
            ("index block", c.idx_base, IDX_ALIGN),
        ] {
            if !addr.is_multiple_of(align) {
                return Err(StateError::Misaligned {
                    queue: qi,
                    what,
                    addr,
                });
            }
        }
        if q.error != 0 {
            let code = (q.error >> 8) as u16;
            if q.error & !(0xff00 | r::Q_STATUS_ERROR) != 0
                || q.error & r::Q_STATUS_ERROR == 0
                || RegError::from_code(code).is_none()
            {
                return Err(StateError::QueueError {
                    queue: qi,
                    bits: q.error,
                });
            }
        }
        let Some(ring) = &q.ring else {
            return Ok(());
        };
        if !dev_enabled {
            return Err(StateError::EnabledOnDisabledDevice { queue: qi });
        }
        if c.depth == 0 {
            return Err(StateError::EnabledWithoutDepth { queue: qi });
        }
        let names = ["submission ring", "completion ring", "index block"];
        let rings = c.ring_ranges();
        for (&(addr, len), what) in rings.iter().zip(names) {
            if !self.dma.contains(addr, len) {
                return Err(StateError::RingOutsideMaps {
                    queue: qi,
                    what,
                    addr,
                    len,
                });
            }
        }
        for (i, a) in rings.iter().enumerate() {
            if rings[i + 1..].iter().any(|b| overlaps(a.0, a.1, b.0, b.1)) {
                return Err(StateError::RingsOverlap { queue: qi });
            }
        }
        // Completions since the last interrupt: with coalescing, up to the
        // count less one, plus one pass's completions (at most a ring) before
        // the worker looks; Bus Master off stops both, and the count with it.
        let owed_max = u64::from(c.depth) + u64::from(super::queue::coalesce(c.coalesce).0);
        if u64::from(ring.irq_pending) > owed_max {
            return Err(StateError::TooManyOwed {
                queue: qi,
                count: ring.irq_pending,
                max: owed_max,
            });
        }
        for (what, count) in [
            ("held results", ring.held.len() as u64),
            ("pending jobs", ring.pending.len() as u64),
            (
                "held results and pending jobs",
                ring.held.len() as u64 + ring.pending.len() as u64,
            ),
        ] {
            if count > u64::from(c.depth) {
                return Err(StateError::TooMany {
                    queue: qi,
                    what,
                    count,
                    depth: c.depth,
                });
            }
        }
        if ring.sq_head.wrapping_sub(ring.cq_tail) as usize != ring.held.len() + ring.pending.len()
        {
            return Err(StateError::Positions {
                queue: qi,
                sq_head: ring.sq_head,
                cq_tail: ring.cq_tail,
                held: ring.held.len(),
                pending: ring.pending.len(),
            });
        }
        if let Some(h) = ring.held.iter().find(|h| h.result().is_none()) {
            return Err(StateError::HeldStatus {
                queue: qi,
                status: h.status,
            });
        }
        Ok(())
    }

    /// Become `st`, parked: checked first, then a queue pair opened for each
    /// enabled queue, and only then anything changed. The rings in guest
    /// memory are not touched (the enable path would clear them).
    pub fn restore_state(&mut self, st: WdState, bus_master: bool) -> Result<(), StateError> {
        if !self.quiesced {
            return Err(StateError::NotQuiesced("restoring"));
        }
        self.check_state(&st)?;
        // With Bus Master set, a running queue's rings were cleared when it
        // was set (or at the enable): a state saying otherwise would leave
        // the queue waiting for a clear that never comes.
        if bus_master
            && let Some(queue) = st
                .queues
                .iter()
                .position(|q| q.ring.is_some() && !q.rings_ready)
        {
            return Err(StateError::RingsNotReady { queue });
        }
        // A queue parked here keeps its queue pair (settled: nothing is in
        // it); any other enabled queue gets a new one, opened before
        // anything changes. `Some(None)`: reuse the parked one.
        let mut pairs = Vec::new();
        for (qi, q) in st.queues.iter().enumerate() {
            if q.ring.is_none() {
                pairs.push(None);
            } else if self.queues[qi].parked.is_some() {
                pairs.push(Some(None));
            } else {
                let qp = self
                    .backends
                    .for_queue(qi)
                    .open_queue_pair(self.pasid, qi as u32)
                    .map_err(|e| StateError::NoQueuePair {
                        queue: qi,
                        reason: e.to_string(),
                    })?;
                pairs.push(Some(Some(qp)));
            }
        }
        // Nothing can fail from here on.
        let mut old: Vec<Option<Parked>> =
            self.queues.iter_mut().map(|s| s.parked.take()).collect();
        self.stop_queues();
        self.enabled = st.enabled;
        self.err = ErrLatch {
            code: RegError::from_code(st.err.code),
            offset: st.err.offset,
            count: st.err.count,
        };
        self.bus_master.set(bus_master);
        self.set_engine_dma(bus_master);
        for ((qi, q), pair) in st.queues.into_iter().enumerate().zip(pairs) {
            // A parked queue's thread waits to run the restored queue.
            let (qp, idle) = match pair {
                Some(Some(qp)) => (Some(qp), self.queues[qi].spare.take()),
                Some(None) => match old[qi].take() {
                    Some(p) => (Some(p.ctx.qp), p.idle),
                    None => (None, None),
                },
                None => (None, None),
            };
            let slot = &mut self.queues[qi];
            slot.cfg = q.config;
            slot.error = q.error;
            slot.shared.completed.store(q.completed, Ordering::Relaxed);
            let rings_ready = Arc::new(AtomicBool::new(q.rings_ready));
            slot.rings_ready = rings_ready.clone();
            if let (Some(ring), Some(qp)) = (q.ring, qp) {
                slot.parked = Some(Parked {
                    ctx: WorkerContext {
                        queue: qi as u32,
                        config: q.config,
                        max_xfer: self.cfg.max_xfer,
                        space: self.dma.address_space(),
                        qp,
                        irq: self.irq.clone(),
                        bus_master: self.bus_master.clone(),
                        shared: slot.shared.clone(),
                        rings_ready,
                        ring,
                        park_budget: self.park_budget,
                        journal: self.journals.as_ref().map(|j| j[qi].clone()),
                    },
                    in_flight: 0,
                    idle,
                });
            }
        }
        self.quiesced = true;
        Ok(())
    }

    /// The compatibility block a destination must match.
    pub fn compat_block(&self) -> Compat {
        Compat {
            abi_version: r::ABI_VERSION,
            type_name: self.type_name.clone(),
            queues: (0..self.cfg.queues)
                .map(|q| QueueCompat {
                    max_depth: self.cfg.max_depth,
                    ops: self.cfg.queue_cap_ops(q),
                })
                .collect(),
            max_xfer: self.cfg.max_xfer,
        }
    }
}

impl ModelMigration for WdDevice {
    fn quiesce(&mut self) -> Result<(), DeviceError> {
        self.quiesce_queues()
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        self.resume_queues()
    }

    fn compat(&self) -> Compat {
        self.compat_block()
    }

    fn save(&self) -> Result<serde_json::Value, DeviceError> {
        let st = self.state()?;
        serde_json::to_value(st).map_err(|e| DeviceError::Invalid(e.to_string()))
    }

    fn live_save(&self) -> Result<serde_json::Value, DeviceError> {
        serde_json::to_value(self.live_state()).map_err(|e| DeviceError::Invalid(e.to_string()))
    }

    fn restore(&mut self, state: serde_json::Value, bus_master: bool) -> Result<(), DeviceError> {
        let st: WdState =
            serde_json::from_value(state).map_err(|e| StateError::Decode(e.to_string()))?;
        Ok(self.restore_state(st, bus_master)?)
    }

    // The dirty log is the instance's guest memory's (every device write
    // marks its page there): DmaSpace reads and clears it.
    fn dirty_log_start(&mut self, page_size: u64) -> Result<(), DeviceError> {
        self.dma.start_dirty_log(page_size)
    }

    fn dirty_log_stop(&mut self) {
        self.dma.stop_dirty_log()
    }

    fn dirty_report(
        &mut self,
        iova: u64,
        size: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        self.dma.report_dirty(iova, size, page_size, bitmap)
    }
}
