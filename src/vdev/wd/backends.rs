//! The accelerators an instance's queues run on. Most instances use one;
//! placement may combine functions of several accelerators (compression
//! queues from one, hashing queues from another, `docs/placement.md`), and
//! the guest still sees one device whose queues each advertise their
//! operations (`Q_CAP_OPS`). The PASID is the same on every backend.

use std::sync::Arc;

use crate::accel::{AccelError, Accelerator, Pasid, SharedAccelerator};

/// Each queue's backend, and the distinct backends for instance-wide
/// operations (PASID binding, Bus Master, quiescing an unmap).
#[derive(Clone)]
pub struct Backends {
    distinct: Vec<SharedAccelerator>,
    /// Index into `distinct` per queue; empty means queue q uses `distinct[0]`.
    per_queue: Vec<usize>,
}

impl Backends {
    /// Every queue on `accel`.
    pub fn one(accel: SharedAccelerator) -> Backends {
        Backends {
            distinct: vec![accel],
            per_queue: Vec::new(),
        }
    }

    /// Queue q on `queues[q]`. Backends are told apart by identity.
    /// `None` when `queues` is empty.
    pub fn per_queue(queues: &[SharedAccelerator]) -> Option<Backends> {
        let mut distinct: Vec<SharedAccelerator> = Vec::new();
        let per_queue = queues
            .iter()
            .map(|a| match distinct.iter().position(|d| Arc::ptr_eq(d, a)) {
                Some(i) => i,
                None => {
                    distinct.push(a.clone());
                    distinct.len() - 1
                }
            })
            .collect();
        (!distinct.is_empty()).then_some(Backends {
            distinct,
            per_queue,
        })
    }

    /// The queues this covers, when given per queue.
    pub fn queues(&self) -> Option<usize> {
        (!self.per_queue.is_empty()).then_some(self.per_queue.len())
    }

    pub fn for_queue(&self, q: usize) -> &SharedAccelerator {
        &self.distinct[self.per_queue.get(q).copied().unwrap_or(0)]
    }

    pub fn all(&self) -> &[SharedAccelerator] {
        &self.distinct
    }

    /// Opcodes queue `q`'s backend can run.
    pub fn supported_ops(&self, q: usize) -> u32 {
        self.for_queue(q).supported_ops()
    }

    /// What any backend can run.
    pub fn any_ops(&self) -> u32 {
        self.distinct.iter().fold(0, |m, a| m | a.supported_ops())
    }

    /// The largest job every backend takes.
    pub fn max_xfer(&self) -> u32 {
        self.distinct
            .iter()
            .map(|a| a.max_xfer())
            .min()
            .unwrap_or(0)
    }

    /// Runs `f` once no job of `pasid` runs on any backend and none can
    /// start on any (each backend's gate held in turn, nested).
    pub fn quiesced(&self, pasid: Pasid, f: &mut dyn FnMut()) -> Result<(), AccelError> {
        fn nest(
            rest: &[SharedAccelerator],
            pasid: Pasid,
            f: &mut dyn FnMut(),
        ) -> Result<(), AccelError> {
            match rest.split_first() {
                None => {
                    f();
                    Ok(())
                }
                Some((a, rest)) => {
                    let mut inner = Ok(());
                    a.quiesced(pasid, &mut || inner = nest(rest, pasid, f))?;
                    inner
                }
            }
        }
        nest(&self.distinct, pasid, f)
    }
}

impl From<SharedAccelerator> for Backends {
    fn from(a: SharedAccelerator) -> Backends {
        Backends::one(a)
    }
}

impl<A: Accelerator + 'static> From<Arc<A>> for Backends {
    fn from(a: Arc<A>) -> Backends {
        Backends::one(a)
    }
}
