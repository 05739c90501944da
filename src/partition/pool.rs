//! One accelerator's queue pairs as a counted pool of real indexes.
//!
//! An instance's queues are queue pairs `0..total` of its accelerator, handed
//! out lowest first. Like PASIDs, a released queue pair drains before it is
//! reused: a hardware queue pair with jobs in flight cannot be given to
//! another instance.

use std::collections::BTreeSet;

use serde::Serialize;

/// Counts for listings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueuePairUsage {
    pub total: u32,
    pub used: u32,
    pub draining: u32,
    pub free: u32,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PoolError {
    #[error("{free} of {total} queue pairs free, need {need}")]
    Exhausted { free: u32, total: u32, need: u32 },
    #[error("queue pair {0} is not in the state this step expects")]
    WrongState(u32),
}

#[derive(Clone, Debug)]
pub struct QueuePool {
    total: u32,
    free: BTreeSet<u32>,
    used: BTreeSet<u32>,
    draining: BTreeSet<u32>,
}

impl QueuePool {
    pub fn new(total: u32) -> QueuePool {
        QueuePool {
            total,
            free: (0..total).collect(),
            used: BTreeSet::new(),
            draining: BTreeSet::new(),
        }
    }

    pub fn is_free(&self, index: u32) -> bool {
        self.free.contains(&index)
    }

    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    /// The `n` lowest free indexes, now used; nothing taken if fewer are free.
    pub fn take(&mut self, n: u32) -> Result<Vec<u32>, PoolError> {
        if self.free_count() < n {
            return Err(PoolError::Exhausted {
                free: self.free_count(),
                total: self.total,
                need: n,
            });
        }
        let taken: Vec<u32> = (0..n).filter_map(|_| self.free.pop_first()).collect();
        self.used.extend(&taken);
        Ok(taken)
    }

    /// Takes these very indexes (a daemon re-claiming an instance's queue
    /// pairs after a restart), all or nothing.
    pub fn claim(&mut self, indexes: &[u32]) -> Result<(), PoolError> {
        let mut seen = BTreeSet::new();
        if let Some(&bad) = indexes
            .iter()
            .find(|&&i| !self.free.contains(&i) || !seen.insert(i))
        {
            return Err(PoolError::WrongState(bad));
        }
        move_all(&mut self.free, &mut self.used, indexes)
    }

    /// Used → free at once, all or nothing: undoes a `take` whose instance
    /// never ran (nothing can be in flight).
    pub fn untake(&mut self, indexes: &[u32]) -> Result<(), PoolError> {
        move_all(&mut self.used, &mut self.free, indexes)
    }

    /// Used → draining, all or nothing.
    pub fn retire(&mut self, indexes: &[u32]) -> Result<(), PoolError> {
        move_all(&mut self.used, &mut self.draining, indexes)
    }

    /// Draining → free, all or nothing.
    pub fn restore(&mut self, indexes: &[u32]) -> Result<(), PoolError> {
        move_all(&mut self.draining, &mut self.free, indexes)
    }

    pub fn usage(&self) -> QueuePairUsage {
        QueuePairUsage {
            total: self.total,
            used: self.used.len() as u32,
            draining: self.draining.len() as u32,
            free: self.free_count(),
        }
    }
}

fn move_all(
    from: &mut BTreeSet<u32>,
    to: &mut BTreeSet<u32>,
    indexes: &[u32],
) -> Result<(), PoolError> {
    if let Some(&bad) = indexes.iter().find(|i| !from.contains(i)) {
        return Err(PoolError::WrongState(bad));
    }
    for i in indexes {
        from.remove(i);
        to.insert(*i);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_pairs_are_real_indexes_drained_before_reuse() {
        let mut p = QueuePool::new(4);
        assert_eq!(p.take(2), Ok(vec![0, 1]));
        assert_eq!(p.take(1), Ok(vec![2]));
        assert_eq!(
            p.take(2),
            Err(PoolError::Exhausted {
                free: 1,
                total: 4,
                need: 2
            })
        );
        assert_eq!(p.free_count(), 1, "a refused take takes nothing");
        p.retire(&[0, 1]).unwrap();
        // 0 and 1 drain: the next take skips them.
        assert_eq!(p.take(1), Ok(vec![3]));
        assert_eq!(
            p.usage(),
            QueuePairUsage {
                total: 4,
                used: 2,
                draining: 2,
                free: 0
            }
        );
        p.restore(&[0, 1]).unwrap();
        assert_eq!(p.take(2), Ok(vec![0, 1]));
        p.untake(&[1]).unwrap();
        assert_eq!(p.untake(&[1]), Err(PoolError::WrongState(1)));
        assert_eq!(p.take(1), Ok(vec![1]));
    }

    #[test]
    fn claimed_indexes_must_be_free_and_distinct() {
        let mut p = QueuePool::new(4);
        p.claim(&[2, 0]).unwrap();
        assert_eq!(p.take(2), Ok(vec![1, 3]));
        p.retire(&[1]).unwrap();
        assert_eq!(p.claim(&[1]), Err(PoolError::WrongState(1)), "draining");
        assert_eq!(p.claim(&[4]), Err(PoolError::WrongState(4)), "out of range");
        let mut q = QueuePool::new(4);
        assert_eq!(q.claim(&[1, 1]), Err(PoolError::WrongState(1)));
        assert_eq!(q.usage().used, 0, "all or nothing");
    }

    #[test]
    fn steps_on_the_wrong_indexes_change_nothing() {
        let mut p = QueuePool::new(4);
        let got = p.take(2).unwrap();
        assert_eq!(p.restore(&got), Err(PoolError::WrongState(0)));
        assert_eq!(p.retire(&[1, 3]), Err(PoolError::WrongState(3)));
        assert_eq!(p.usage().used, 2, "all or nothing");
        p.retire(&got).unwrap();
        assert_eq!(p.retire(&got), Err(PoolError::WrongState(0)));
        assert_eq!(
            PoolError::Exhausted {
                free: 2,
                total: 64,
                need: 4
            }
            .to_string(),
            "2 of 64 queue pairs free, need 4"
        );
    }
}
