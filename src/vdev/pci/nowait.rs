//! Reads and writes on eventfds a VMM controls, that never block.
//!
//! `O_NONBLOCK` belongs to the open file description, which the VMM shares
//! with us: it can clear the flag with `F_SETFL` at any time, fill the
//! counter, and a plain `write` of 1 then waits for a reader forever — on
//! the connection thread holding the device's lock, or a queue worker
//! holding the interrupt lock. A private description is no way out: an
//! eventfd is an anonymous inode, and reopening it through `/proc/self/fd`
//! fails with ENXIO. A zero-timeout `poll` first is not enough either: the
//! VMM can fill the counter between our `poll` and our `write`.
//!
//! So every such syscall runs under a per-thread one-shot timer
//! (`timer_create` with `SIGEV_THREAD_ID`) that, should the syscall still
//! be waiting after [`GRACE`], delivers a signal whose handler does nothing
//! and is installed without `SA_RESTART`: the syscall returns EINTR, which
//! reads as "would block". The `poll` before it makes that path rare (only
//! a VMM racing us on purpose takes it), and costs nothing when the counter
//! is full.

use std::cell::RefCell;
use std::os::fd::AsFd;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;

/// Longest a syscall on a VMM's fd may wait before it is interrupted.
pub const GRACE: Duration = Duration::from_millis(20);

/// The signal that interrupts it (a real-time signal nothing else in the
/// process uses; glibc keeps the first few for itself and `SIGRTMIN()`
/// already skips those).
fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

/// What an attempt to signal an eventfd came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signalled {
    /// 1 was added to the counter.
    Written,
    /// The counter is at its maximum (so non-zero: the VMM's poll already
    /// sees it), or the write would have waited and was interrupted.
    Full,
}

/// Adds 1 to the eventfd `fd` without ever blocking, whatever the VMM did
/// to its flags.
pub fn signal_eventfd(fd: impl AsFd) -> Result<Signalled, Errno> {
    let fd = fd.as_fd();
    if !ready(fd, PollFlags::OUT) {
        return Ok(Signalled::Full);
    }
    match guarded(|| rustix::io::write(fd, &1u64.to_ne_bytes())) {
        Ok(_) => Ok(Signalled::Written),
        Err(Errno::AGAIN | Errno::INTR) => Ok(Signalled::Full),
        Err(e) => Err(e),
    }
}

/// Reads (and so clears) the eventfd's counter without ever blocking:
/// `None` if it was zero.
pub fn consume_eventfd(fd: impl AsFd) -> Option<u64> {
    let fd = fd.as_fd();
    if !ready(fd, PollFlags::IN) {
        return None;
    }
    let mut buf = [0u8; 8];
    match guarded(|| rustix::io::read(fd, &mut buf)) {
        Ok(8) => Some(u64::from_ne_bytes(buf)),
        _ => None,
    }
}

/// Is `fd` ready for `what` right now?
fn ready(fd: std::os::fd::BorrowedFd<'_>, what: PollFlags) -> bool {
    let mut fds = [PollFd::from_borrowed_fd(fd, what)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0 && fds[0].revents().contains(what))
}

extern "C" fn wake(_: libc::c_int) {}

/// Installs the do-nothing handler once, without SA_RESTART.
fn install_handler() -> bool {
    static ONCE: Once = Once::new();
    static OK: AtomicBool = AtomicBool::new(false);
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler is an `extern "C" fn(c_int)` that touches
        // nothing, so it is async-signal-safe; the signal is ours alone.
        let ok = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = wake as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(wake_signal(), &sa, std::ptr::null_mut()) == 0
        };
        OK.store(ok, Ordering::Release);
    });
    OK.load(Ordering::Acquire)
}

/// A POSIX timer that signals the thread that created it.
struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    fn new() -> Option<ThreadTimer> {
        // SAFETY: sigevent is plain data, zeroed is valid; SIGEV_THREAD_ID
        // with our own tid targets this thread; `timer` is written by the
        // kernel on success only.
        unsafe {
            let mut sev: libc::sigevent = std::mem::zeroed();
            sev.sigev_notify = libc::SIGEV_THREAD_ID;
            sev.sigev_signo = wake_signal();
            sev.sigev_notify_thread_id = libc::gettid();
            let mut timer: libc::timer_t = std::ptr::null_mut();
            (libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) == 0)
                .then_some(ThreadTimer(timer))
        }
    }

    fn arm(&self, after: Duration) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: the timer is live (owned by self); spec is a valid value.
        unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) };
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: created by timer_create and deleted only here.
        unsafe { libc::timer_delete(self.0) };
    }
}

thread_local! {
    static TIMER: RefCell<Option<ThreadTimer>> = const { RefCell::new(None) };
}

/// Runs `f` (one syscall) with this thread's timer armed for [`GRACE`].
/// Without a timer (none could be created) `f` still runs: the `poll`
/// before it already made blocking unlikely, and a warning says so.
fn guarded<T>(f: impl FnOnce() -> T) -> T {
    if !install_handler() {
        tracing::warn!("cannot install the eventfd wake-up handler; writing unguarded");
        return f();
    }
    TIMER.with(|t| {
        let mut t = t.borrow_mut();
        if t.is_none() {
            *t = ThreadTimer::new();
        }
        match t.as_ref() {
            Some(timer) => {
                timer.arm(GRACE);
                let r = f();
                timer.arm(Duration::ZERO);
                r
            }
            None => {
                tracing::warn!("cannot create an eventfd wake-up timer; writing unguarded");
                f()
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{EventfdFlags, eventfd};

    #[test]
    fn a_blocking_full_eventfd_is_never_waited_on() {
        // No O_NONBLOCK, as a VMM that cleared it leaves it.
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        assert_eq!(signal_eventfd(&fd), Ok(Signalled::Written));
        assert_eq!(consume_eventfd(&fd), Some(1));
        assert_eq!(consume_eventfd(&fd), None, "an empty counter is not read");
        rustix::io::write(&fd, &(u64::MAX - 1).to_ne_bytes()).unwrap();
        let t = std::time::Instant::now();
        assert_eq!(signal_eventfd(&fd), Ok(Signalled::Full));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    /// What the guard costs per MSI-X delivery: a plain write to a
    /// non-blocking eventfd against [`signal_eventfd`] (poll, arm, write,
    /// disarm). A measurement, not a check: it prints and asserts nothing
    /// about speed. `cargo test --lib -- --ignored --nocapture
    /// vdev::pci::nowait::tests::cost_of_a_guarded_signal`
    #[test]
    #[ignore = "a measurement; run it by name with --ignored --nocapture"]
    fn cost_of_a_guarded_signal() {
        const N: u32 = 200_000;
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
        let mut rounds = Vec::new();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..N {
                rustix::io::write(&fd, &1u64.to_ne_bytes()).unwrap();
            }
            let plain = t.elapsed();
            let t = std::time::Instant::now();
            for _ in 0..N {
                assert_eq!(signal_eventfd(&fd), Ok(Signalled::Written));
            }
            let guarded = t.elapsed();
            assert_eq!(consume_eventfd(&fd), Some(2 * N as u64));
            rounds.push((plain, guarded));
        }
        for (plain, guarded) in rounds {
            let per = |d: Duration| d.as_nanos() as f64 / N as f64;
            println!(
                "plain write {:.0} ns, signal_eventfd {:.0} ns, ratio {:.2}",
                per(plain),
                per(guarded),
                per(guarded) / per(plain)
            );
        }
    }

    #[test]
    fn a_write_that_would_wait_is_interrupted() {
        // The race the poll cannot close, forced: the write itself waits.
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, &(u64::MAX - 1).to_ne_bytes()).unwrap();
        let t = std::time::Instant::now();
        let r = guarded(|| rustix::io::write(&fd, &1u64.to_ne_bytes()));
        assert_eq!(r, Err(Errno::INTR));
        assert!(t.elapsed() >= GRACE && t.elapsed() < Duration::from_secs(2));
        // The timer is disarmed after: a later blocking read of a
        // non-empty counter is not interrupted.
        std::thread::sleep(GRACE * 2);
        assert_eq!(consume_eventfd(&fd), Some(u64::MAX - 1));
    }
}
