//! Counters that every stage updates and anyone may read: per instance and
//! per queue, plain atomics (no process-global registry), snapshotted into
//! serialisable structs for listings and `--json`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

macro_rules! counters {
    ($(#[$m:meta])* $name:ident / $snap:ident { $($(#[$fm:meta])* $f:ident,)* }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name { $($(#[$fm])* pub $f: AtomicU64,)* }
        /// A point-in-time copy.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
        pub struct $snap { $(pub $f: u64,)* }
        impl $name {
            pub fn snapshot(&self) -> $snap { $snap { $($f: self.$f.load(Relaxed),)* } }
        }
    };
}

counters! {
    /// One queue of one instance.
    QueueStats / QueueSnapshot {
        /// Jobs completed with status OK.
        jobs_ok,
        /// Jobs completed with an error status.
        jobs_failed,
        bytes_in,
        bytes_out,
        /// Doorbell writes received.
        doorbells,
        /// MSI-X interrupts raised.
        interrupts,
        /// Times the worker went to sleep with the doorbell armed.
        sleeps,
    }
}

counters! {
    /// One instance, beyond its queues.
    InstanceStats / InstanceSnapshot {
        /// BAR0 accesses refused (`ERR_COUNT` without saturation).
        register_errors,
        /// Doorbell writes to a queue that is not enabled.
        stray_doorbells,
        dma_maps,
        dma_unmaps,
        resets,
    }
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}
