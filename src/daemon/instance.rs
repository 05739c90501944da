//! One served instance: a vfio-user socket, the PCI function with the
//! accelerator model behind it, and the thread that serves one VMM
//! connection at a time. The device outlives connections: when a VMM goes
//! away the device is reset and its memory dropped, and the next VMM finds a
//! fresh function at the same socket. The instance and its connection
//! share the device; the connection locks it one message at a time, so the
//! daemon reads it between messages ([`Instance::live`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::accel::Pasid;
use crate::restart::adopt::{Taken, rebuild};
use crate::restart::keep::{HolderLink, InstanceKeep};
use crate::stats::{InstanceSnapshot, InstanceStats, QueueSnapshot};
use crate::transport::server::{Connection, Listener, SocketAccess, StopHandle};
use crate::transport::stats::StatsSnapshot;
use crate::transport::{self, Limits, LogBudget, TransportError};
use crate::vdev::device::DeviceError;
use crate::vdev::pci::{Interrupts, PciFunction};
use crate::vdev::wd::backends::Backends;
use crate::vdev::wd::queue::QueueShared;
use crate::vdev::wd::{WdConfig, WdDevice};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("instance {name}: cannot serve at {path}: {source}")]
    Socket {
        name: String,
        path: PathBuf,
        source: TransportError,
    },
    #[error("instance {name}: {source}")]
    Device { name: String, source: DeviceError },
    #[error("instance {name}: cannot start its thread: {source}")]
    Thread {
        name: String,
        source: std::io::Error,
    },
}

/// What to create.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    pub name: String,
    pub socket: PathBuf,
    pub config: WdConfig,
    /// The instance type's name, in the migration compatibility block: a
    /// destination of another type refuses the stream.
    pub type_name: String,
}

/// What an instance has done, for listings and `--json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceReport {
    pub name: String,
    pub socket: PathBuf,
    pub pasid: Pasid,
    /// VMM connections served.
    pub connections: u64,
    /// Connections closed at once because a VMM was already being served.
    pub refused_connections: u64,
    pub device: InstanceSnapshot,
    pub queues: Vec<QueueSnapshot>,
    /// The current (or last) connection's protocol counters.
    pub transport: Option<StatsSnapshot>,
    /// Protocol counters over every connection this instance served (the
    /// current one included): where limit hits (`fds_refused`, `stalled`,
    /// `bad_frames`, ...) and contained panics (`panics`) add up.
    #[serde(default)]
    pub transport_totals: StatsSnapshot,
    /// Warning lines the instance did not log (its per-second budget,
    /// shared by its connections and its accept loop).
    #[serde(default)]
    pub log_lines_suppressed: u64,
    /// The device as its guest sees it now, read under the device's lock
    /// between two of the VMM's messages; `None` while a message holds the
    /// device longer than a listing should wait (a reset draining its jobs).
    pub live: Option<DeviceLive>,
    /// Taken over with its VMM from a predecessor daemon (a restart).
    #[serde(default)]
    pub adopted: Option<Adoption>,
}

/// How long a listing waits for a device a message holds.
const LIVE_WAIT: Duration = Duration::from_millis(20);

/// What the guest has set up, read from the live device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLive {
    /// PCI command register's Bus Master Enable.
    pub bus_master: bool,
    /// `DEV_STATUS.ENABLED`.
    pub enabled: bool,
    /// Each queue's `Q_STATUS.ENABLED`.
    pub queues_enabled: Vec<bool>,
}

/// The connection being served (or the last one served).
struct CurrentConnection {
    stop: StopHandle,
    stats: Arc<transport::stats::ConnectionStats>,
    /// `None` once joined.
    thread: Option<JoinHandle<()>>,
    /// A second handle on its socket, to tell whether its VMM hung up.
    probe: Option<std::os::unix::net::UnixStream>,
}

#[derive(Debug, Default)]
struct ConnectionCounters {
    served: AtomicU64,
    refused: AtomicU64,
    /// A VMM is being served now.
    active: AtomicBool,
    /// Protocol counters of the connections before the current one, added
    /// when the next one replaces it (under the current connection's lock).
    ended: Mutex<StatsSnapshot>,
}

/// Clears `active` when the connection thread ends, however it ends.
struct Release(Arc<ConnectionCounters>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.active.store(false, Ordering::Release);
    }
}

/// Take the instance for a new connection. A VMM that has just gone away (or
/// a liveness probe that connected and closed) may still be finishing: when
/// the connection being served has seen its peer hang up, give it a moment
/// before calling the instance busy. While its VMM is still there the new
/// connection is refused at once, so a burst of connections costs the
/// accept thread nothing.
fn claim(active: &AtomicBool, current: &Mutex<Option<CurrentConnection>>) -> bool {
    if !active.swap(true, Ordering::AcqRel) {
        return true;
    }
    let finishing = current
        .lock()
        .as_ref()
        .and_then(|c| c.probe.as_ref())
        .is_none_or(peer_gone);
    if !finishing {
        return false;
    }
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        if !active.swap(true, Ordering::AcqRel) {
            return true;
        }
    }
    false
}

/// Has the VMM at the other end of `stream` hung up (or the connection
/// been shut down)?
fn peer_gone(stream: &std::os::unix::net::UnixStream) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(stream, PollFlags::RDHUP)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&zero)) {
        Ok(n) => {
            n > 0
                && fds[0]
                    .revents()
                    .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
        }
        Err(_) => true,
    }
}

/// Accept VMMs until stopped. One is served at a time (a PCI function has one
/// VMM); another that connects meanwhile is closed at once, so its VMM fails
/// fast instead of waiting out its reply timeout (QEMU: 5 s) on a socket
/// nobody reads.
#[allow(clippy::too_many_arguments)]
fn accept_loop(
    name: &str,
    listener: &Listener,
    device: Arc<Mutex<PciFunction<WdDevice>>>,
    current: &Mutex<Option<CurrentConnection>>,
    counters: &Arc<ConnectionCounters>,
    stopping: &AtomicBool,
    limits: &Limits,
    log_budget: &Arc<LogBudget>,
    keep: Option<&InstanceKeep>,
) {
    let mut backoff = Duration::from_millis(5);
    while !stopping.load(Ordering::Acquire) {
        let conn = match listener.accept() {
            Ok(c) => {
                backoff = Duration::from_millis(5);
                c
            }
            // Out of fds or memory for a moment: wait and try again rather
            // than stop serving this instance for good.
            Err(e) if e.is_transient() && !stopping.load(Ordering::Acquire) => {
                tracing::warn!(instance = %name, "accept failed, retrying in {backoff:?}: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(e) => {
                if !stopping.load(Ordering::Acquire) {
                    tracing::error!(instance = %name, "accept failed: {e}");
                }
                break;
            }
        };
        if stopping.load(Ordering::Acquire) {
            break;
        }
        if !claim(&counters.active, current) {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            if log_budget.take() {
                tracing::warn!(instance = %name, "a VMM is already connected; closing the new connection");
            }
            continue;
        }
        counters.served.fetch_add(1, Ordering::Relaxed);
        let mut conn = conn.with_limits(limits, log_budget.clone());
        if let Some(keep) = keep {
            use std::os::fd::AsFd;
            match keep.connection(conn.stream().as_fd()) {
                Ok(k) => conn = conn.with_keeper(Box::new(k)),
                Err(e) => tracing::error!(
                    instance = %name,
                    "this VMM's device will not survive a restart of the daemon: {e}"
                ),
            }
        }
        serve_connection(name, conn, device.clone(), current, counters, log_budget);
    }
}

/// Serve `conn` on a thread of its own, as the instance's current
/// connection (the instance is already claimed for it).
fn serve_connection(
    name: &str,
    mut conn: Connection,
    device: Arc<Mutex<PciFunction<WdDevice>>>,
    current: &Mutex<Option<CurrentConnection>>,
    counters: &Arc<ConnectionCounters>,
    log_budget: &Arc<LogBudget>,
) {
    let mut slot = current.lock();
    if let Some(old) = slot.take() {
        // Its thread has released the instance, so it is ending; once
        // joined its counters are final and move into `ended`.
        if let Some(t) = old.thread {
            let _ = t.join();
        }
        counters.ended.lock().accumulate(&old.stats.snapshot());
    }
    let (stop, stats) = (conn.stop_handle(), conn.stats());
    let probe = conn.stream().try_clone().ok();
    let (device, active, name2) = (device.clone(), counters.clone(), name.to_string());
    let budget = log_budget.clone();
    let served = std::thread::Builder::new()
        .name(format!("wd-vmm-{name}"))
        .spawn(move || {
            let _release = Release(active);
            match conn.run(&*device) {
                // A bug, contained: always logged.
                Err(e @ TransportError::Panicked(_)) => {
                    tracing::error!(instance = %name2, "connection ended: {e}")
                }
                // A VMM can reconnect in a loop: under the budget.
                end if !budget.take() => {
                    tracing::debug!(instance = %name2, "VMM disconnected: {end:?}")
                }
                Ok(how) => tracing::info!(instance = %name2, "VMM disconnected: {how:?}"),
                Err(e) => tracing::warn!(instance = %name2, "connection ended: {e}"),
            }
        });
    match served {
        Ok(t) => {
            *slot = Some(CurrentConnection {
                stop,
                stats,
                thread: Some(t),
                probe,
            })
        }
        Err(e) => {
            tracing::error!(instance = %name, "cannot start a connection thread: {e}");
            counters.active.store(false, Ordering::Release);
        }
    }
}

/// A running instance. Dropping it stops the server thread.
pub struct Instance {
    spec: InstanceSpec,
    /// Shared with the connection, which locks it one message at a time.
    device: Arc<Mutex<PciFunction<WdDevice>>>,
    pasid: Pasid,
    listener: Arc<Listener>,
    stats: Arc<InstanceStats>,
    queues: Vec<Arc<QueueShared>>,
    connection: Arc<Mutex<Option<CurrentConnection>>>,
    counters: Arc<ConnectionCounters>,
    /// Warning lines per second, shared by the accept loop and connections.
    log_budget: Arc<LogBudget>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Its keeping for a successor process, if it is kept.
    keep: Option<InstanceKeep>,
    /// It was taken over from a predecessor, with its VMM.
    adoption: Option<Adoption>,
}

/// How an instance starts with respect to restarts of the daemon.
pub enum KeepPlan {
    /// Nothing outlives this process.
    None,
    /// Kept in the fd holder from the start, under its UUID.
    Fresh {
        link: Arc<HolderLink>,
        uuid: uuid::Uuid,
    },
    /// Taken over from a predecessor that kept it.
    Adopt(Box<Taken>),
}

/// An instance taken over with its VMM from a predecessor process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    /// Jobs the predecessor had taken and not completed, run again.
    pub jobs_rerun: u64,
    /// How long rebuilding its device took.
    pub rebuilt_in: Duration,
}

impl Instance {
    /// Bind the socket, build the device and start serving, under the
    /// transport's default [`Limits`].
    pub fn start(
        spec: InstanceSpec,
        backends: impl Into<Backends>,
        pasid: Pasid,
    ) -> Result<Instance, InstanceError> {
        Instance::start_with_limits(spec, backends, pasid, Limits::default())
    }

    /// [`start`](Instance::start) with the given transport limits.
    pub fn start_with_limits(
        spec: InstanceSpec,
        backends: impl Into<Backends>,
        pasid: Pasid,
        limits: Limits,
    ) -> Result<Instance, InstanceError> {
        Instance::start_as(spec, backends, pasid, limits, SocketAccess::default())
    }

    /// [`start_with_limits`](Instance::start_with_limits), its socket
    /// created with `access`'s mode and owner (the VMM's user: anyone else
    /// is refused by the filesystem at `connect(2)`).
    pub fn start_as(
        spec: InstanceSpec,
        backends: impl Into<Backends>,
        pasid: Pasid,
        limits: Limits,
        access: SocketAccess,
    ) -> Result<Instance, InstanceError> {
        Instance::start_kept(spec, backends, pasid, limits, access, KeepPlan::None)
    }

    /// [`start_as`](Instance::start_as), kept for a successor process as
    /// `plan` says: its socket, state and VMM in the fd holder, or taken
    /// over from a predecessor that kept them.
    pub fn start_kept(
        spec: InstanceSpec,
        backends: impl Into<Backends>,
        pasid: Pasid,
        limits: Limits,
        access: SocketAccess,
        plan: KeepPlan,
    ) -> Result<Instance, InstanceError> {
        let name = spec.name.clone();
        let backends = backends.into();
        let socket_err = |source| InstanceError::Socket {
            name: name.clone(),
            path: spec.socket.clone(),
            source,
        };
        let fresh_keep = match &plan {
            KeepPlan::Fresh { link, uuid } => Some((link.clone(), *uuid)),
            _ => None,
        };
        let (listener, mut taken) = match plan {
            KeepPlan::Adopt(taken) => {
                let Taken {
                    listener,
                    keep,
                    vmm,
                } = *taken;
                (Listener::adopt(listener, &spec.socket), Some((keep, vmm)))
            }
            _ => (
                Listener::bind_with(&spec.socket, &access).map_err(socket_err)?,
                None,
            ),
        };
        let build = || -> Result<PciFunction<WdDevice>, InstanceError> {
            let interrupts = Interrupts::new(spec.config.queues as u16);
            let mut model = WdDevice::new(
                spec.config,
                backends.clone(),
                pasid,
                Arc::new(interrupts.clone()),
            )
            .map_err(|source| InstanceError::Device {
                name: name.clone(),
                source,
            })?;
            model.set_type_name(spec.type_name.clone());
            PciFunction::try_new(model, interrupts).map_err(|e| InstanceError::Device {
                name: name.clone(),
                source: DeviceError::Invalid(e.to_string()),
            })
        };
        let mut device = build()?;
        // Kept for a successor: a new keeping, or the predecessor's.
        let keep = match (fresh_keep, taken.as_ref()) {
            (Some((link, uuid)), _) => {
                use std::os::fd::AsFd;
                let (queues, depth) = (spec.config.queues, spec.config.max_depth);
                match InstanceKeep::create(link, uuid, queues, depth, listener.as_fd()) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        tracing::error!(instance = %name, "will not survive a restart of the daemon: {e}");
                        None
                    }
                }
            }
            (None, Some((keep, _))) => Some(keep.clone()),
            (None, None) => None,
        };
        if let Some(k) = &keep {
            device.model_mut().set_journals(k.state().journals());
        }
        // A VMM the predecessor served: its device, rebuilt, serves it on.
        let mut adopted_conn = None;
        let mut adoption = None;
        if let Some((keep, Some(mut vmm))) = taken.take() {
            let started = std::time::Instant::now();
            match rebuild(&mut device, &mut vmm, keep.state()) {
                Ok((record, found)) => {
                    let stream = std::os::unix::net::UnixStream::from(vmm.conn);
                    match Connection::adopt(stream, record, vmm.resume.clone()) {
                        Ok(conn) => {
                            let conn = conn
                                .with_limits(
                                    &limits,
                                    Arc::new(LogBudget::new(limits.log_lines_per_sec)),
                                )
                                .with_keeper(Box::new(
                                    keep.adopted_connection(&vmm.snapshot, vmm.seq),
                                ));
                            adoption = Some(Adoption {
                                jobs_rerun: found.jobs_rerun,
                                rebuilt_in: started.elapsed(),
                            });
                            adopted_conn = Some(conn);
                        }
                        Err(e) => {
                            tracing::error!(instance = %name, "its VMM's connection cannot be served again: {e}")
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(
                        instance = %name,
                        "its VMM's device could not be taken over ({e}); the VMM loses it"
                    );
                    // Whatever the rebuild changed goes; the VMM's
                    // connection closes with `vmm`.
                    device = build()?;
                    device.model_mut().set_journals(keep.state().journals());
                    keep.forget_vmm();
                }
            }
        }
        let stats = device.model().stats();
        let queues = device.model().queue_stats();
        let device = Arc::new(Mutex::new(device));
        let listener = Arc::new(listener);
        let connection: Arc<Mutex<Option<_>>> = Arc::default();
        let counters = Arc::new(ConnectionCounters::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let log_budget = Arc::new(LogBudget::new(limits.log_lines_per_sec));
        if let Some(conn) = adopted_conn {
            counters.active.store(true, Ordering::Release);
            counters.served.fetch_add(1, Ordering::Relaxed);
            serve_connection(
                &name,
                conn,
                device.clone(),
                &connection,
                &counters,
                &log_budget,
            );
        }
        let thread = {
            let (listener, connection, counters, stopping) = (
                listener.clone(),
                connection.clone(),
                counters.clone(),
                stopping.clone(),
            );
            let keep = keep.clone();
            std::thread::Builder::new()
                .name(format!("wd-inst-{name}"))
                .spawn({
                    let device = device.clone();
                    let budget = log_budget.clone();
                    move || {
                        accept_loop(
                            &name,
                            &listener,
                            device,
                            &connection,
                            &counters,
                            &stopping,
                            &limits,
                            &budget,
                            keep.as_ref(),
                        )
                    }
                })
                .map_err(|source| InstanceError::Thread {
                    name: spec.name.clone(),
                    source,
                })?
        };
        Ok(Instance {
            spec,
            device,
            pasid,
            listener,
            stats,
            queues,
            connection,
            counters,
            log_budget,
            stopping,
            thread: Some(thread),
            keep,
            adoption,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }
    pub fn socket(&self) -> &Path {
        &self.spec.socket
    }
    pub fn pasid(&self) -> Pasid {
        self.pasid
    }
    /// The live device's state, taken between two of the VMM's messages.
    /// A guest's reset holds the device while its jobs drain (up to 2 s):
    /// a listing does not wait for that, it says the device is busy.
    pub fn live(&self) -> Option<DeviceLive> {
        let dev = self.device.try_lock_for(LIVE_WAIT)?;
        let (enabled, queues_enabled) = dev.model().enabled_state();
        Some(DeviceLive {
            bus_master: dev.config().command() & crate::vdev::pci::config::CMD_BUS_MASTER != 0,
            enabled,
            queues_enabled,
        })
    }

    /// Protocol counters over every connection served, the current one
    /// included.
    pub fn transport_totals(&self) -> StatsSnapshot {
        // Under the connection's lock, which the accept loop holds while it
        // moves a finished connection's counters into `ended`.
        let current = self.connection.lock();
        let mut totals = *self.counters.ended.lock();
        if let Some(c) = current.as_ref() {
            totals.accumulate(&c.stats.snapshot());
        }
        totals
    }

    /// A VMM is connected now.
    pub fn attached(&self) -> bool {
        self.counters.active.load(Ordering::Acquire)
    }

    /// The instance's statistics now (see `crate::stats::report`).
    pub fn stats_sample(
        &self,
        uuid: uuid::Uuid,
        vm: Option<String>,
        qos: String,
    ) -> crate::stats::report::InstanceSample {
        use crate::stats::report::{InstanceSample, QueueSample};
        InstanceSample {
            uuid,
            name: self.spec.name.clone(),
            vm,
            qos,
            device: self.stats.snapshot(),
            queues: (self.queues.iter().enumerate())
                .map(|(i, q)| QueueSample::take(i as u32, &q.stats))
                .collect(),
            // The registry fills it from the QoS schedulers' snapshots: the
            // instance does not know its neighbours' names.
            scheduler: None,
        }
    }

    pub fn report(&self) -> InstanceReport {
        // Before the literal: its `connection.lock()` temporary lives to
        // the end of the statement, and the totals take the same lock.
        let transport_totals = self.transport_totals();
        InstanceReport {
            name: self.spec.name.clone(),
            socket: self.spec.socket.clone(),
            pasid: self.pasid,
            connections: self.counters.served.load(Ordering::Relaxed),
            refused_connections: self.counters.refused.load(Ordering::Relaxed),
            device: self.stats.snapshot(),
            queues: self.queues.iter().map(|q| q.stats.snapshot()).collect(),
            transport: self.connection.lock().as_ref().map(|c| c.stats.snapshot()),
            transport_totals,
            log_lines_suppressed: self.log_budget.suppressed(),
            live: self.live(),
            adopted: self.adoption,
        }
    }

    /// Stop serving: the current VMM connection is ended and the socket removed.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Wakes a blocked accept() (Linux returns EINVAL to it).
        let _ = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Both);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!(instance = %self.spec.name, "instance thread panicked");
        }
        let served = self.connection.lock().as_mut().and_then(|c| {
            c.stop.stop();
            c.thread.take()
        });
        if let Some(t) = served
            && t.join().is_err()
        {
            tracing::error!(instance = %self.spec.name, "connection thread panicked");
        }
        // Stopped for good: nothing of it is to outlive this process.
        if let Some(k) = self.keep.take() {
            k.forget();
        }
    }

    /// It was taken over from a predecessor process with its VMM.
    pub fn adoption(&self) -> Option<Adoption> {
        self.adoption
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.halt();
    }
}
