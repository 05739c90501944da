//! Shared by the `transport_*` tests: a RAM-backed fake device (a test
//! double for the transport only) and a raw vfio-user client that can send
//! any bytes, with or without fds.
#![allow(dead_code)]

use std::io::{IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use wdvirt::migration::stream::{Compat, QueueCompat};
use wdvirt::transport::wire::{self, Header};
use wdvirt::transport::{Connection, ConnectionStats, Disconnect, StopHandle, TransportError};
use wdvirt::vdev::device::{
    DeviceError, DeviceInfo, DmaMapping, IrqAction, IrqData, IrqInfo, Migratable, MmapArea,
    RegionInfo, RegionMmap, VfioUserDevice,
};
use zerocopy::{FromBytes, IntoBytes};

pub mod attacks;

pub const NUM_REGIONS: u32 = 8;
pub const NUM_IRQS: u32 = 5;
pub const BAR0_SIZE: u64 = 0x1000;
pub const BAR2_SIZE: u64 = 0x4000;
pub const CONFIG_SIZE: u64 = 256;
/// BAR0 offset whose writes the fake device refuses with EBUSY.
pub const BAR0_BUSY: u64 = 0x100;
/// IRQ counts per index: INTx, MSI, MSI-X, ERR, REQ.
pub const IRQ_COUNTS: [u32; 5] = [1, 1, 4, 1, 1];

/// What the fake device was asked to do.
#[derive(Debug, Default)]
pub struct Log {
    /// (iova, size, readable, writable, fd offset if an fd came)
    pub maps: Vec<(u64, u64, bool, bool, Option<u64>)>,
    /// The fds of the maps, kept open so a test can read through them.
    pub map_fds: Vec<OwnedFd>,
    pub unmaps: Vec<(u64, u64)>,
    pub unmap_all: u32,
    /// (index, action, start, count, data kind, fds present)
    pub irqs: Vec<(u32, IrqAction, u32, u32, &'static str, usize)>,
    pub irq_fds: Vec<OwnedFd>,
    pub bools: Vec<Vec<bool>>,
    pub writes: Vec<(u32, u64, Vec<u8>)>,
    pub resets: u32,
    pub disconnected: u32,
    /// `Migratable` calls, by name, in order.
    pub mig_calls: Vec<&'static str>,
    /// Guest addresses the fake device "wrote": what its dirty report names
    /// (and removes) once logging is on.
    pub dirty: std::collections::BTreeSet<u64>,
}

pub struct FakeDevice {
    pub regions: Vec<Vec<u8>>,
    pub bar2_fd: Arc<OwnedFd>,
    /// Hand out a new memfd (holding `FRESH_FD_MARK`) on each GET_REGION_INFO
    /// of BAR2 and keep no copy: the reply alone holds it open.
    pub fresh_bar2_fd: bool,
    pub log: Arc<Mutex<Log>>,
    /// The migration side (`None`: the device cannot migrate).
    pub mig: Option<FakeMig>,
}

/// What a `fresh_bar2_fd` memfd holds at offset 0.
pub const FRESH_FD_MARK: &[u8] = b"fresh bar2";

impl FakeDevice {
    pub fn new() -> (FakeDevice, Arc<Mutex<Log>>) {
        let sizes = [BAR0_SIZE, 0, BAR2_SIZE, 0, 0, 0, 0x800, CONFIG_SIZE];
        let regions = sizes.iter().map(|&s| vec![0u8; s as usize]).collect();
        let bar2_fd =
            rustix::fs::memfd_create("bar2", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
        rustix::fs::ftruncate(&bar2_fd, BAR2_SIZE).expect("ftruncate");
        let log = Arc::new(Mutex::new(Log::default()));
        (
            FakeDevice {
                regions,
                bar2_fd: Arc::new(bar2_fd),
                fresh_bar2_fd: false,
                log: log.clone(),
                mig: None,
            },
            log,
        )
    }
}

const RW: u32 = 3;

impl VfioUserDevice for FakeDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: 3,
            num_regions: NUM_REGIONS,
            num_irqs: NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError> {
        let size = self
            .regions
            .get(index as usize)
            .map(|r| r.len() as u64)
            .unwrap_or(0);
        let (flags, mmap) = match index {
            2 => (
                RW,
                Some(RegionMmap {
                    fd: if self.fresh_bar2_fd {
                        let fd = memfd(BAR2_SIZE);
                        rustix::io::pwrite(&fd, FRESH_FD_MARK, 0).unwrap();
                        Arc::new(fd)
                    } else {
                        self.bar2_fd.clone()
                    },
                    file_offset: 0,
                    areas: vec![
                        MmapArea {
                            offset: 0x1000,
                            size: 0x1000,
                        },
                        MmapArea {
                            offset: 0x3000,
                            size: 0x1000,
                        },
                    ],
                }),
            ),
            6 => (1, None),
            _ if size > 0 => (RW, None),
            _ => (0, None),
        };
        Ok(RegionInfo { flags, size, mmap })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, DeviceError> {
        let count = *IRQ_COUNTS
            .get(index as usize)
            .ok_or_else(|| DeviceError::Invalid(format!("irq {index}")))?;
        Ok(IrqInfo { flags: 0, count })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let r = &self.regions[index as usize];
        data.copy_from_slice(&r[offset as usize..offset as usize + data.len()]);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if index == 0 && offset == BAR0_BUSY {
            return Err(DeviceError::Busy("register locked".into()));
        }
        if index == 0 && self.mig.as_ref().is_some_and(|m| m.quiesced) {
            return Err(DeviceError::Busy("quiesced".into()));
        }
        let r = &mut self.regions[index as usize];
        r[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        self.log.lock().writes.push((index, offset, data.to_vec()));
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), DeviceError> {
        let mut log = self.log.lock();
        let (kind, fds) = match data {
            IrqData::None => ("none", 0),
            IrqData::Bool(b) => {
                log.bools.push(b);
                ("bool", 0)
            }
            IrqData::Eventfds(v) => {
                let n = v.iter().filter(|f| f.is_some()).count();
                log.irq_fds.extend(v.into_iter().flatten());
                ("eventfd", n)
            }
        };
        log.irqs.push((index, action, start, count, kind, fds));
        Ok(())
    }

    fn dma_map(&mut self, map: DmaMapping) -> Result<(), DeviceError> {
        let mut log = self.log.lock();
        let off = map.fd.as_ref().map(|(_, o)| *o);
        log.maps
            .push((map.iova, map.size, map.readable, map.writable, off));
        if let Some((fd, _)) = map.fd {
            log.map_fds.push(fd);
        }
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), DeviceError> {
        self.log.lock().unmaps.push((iova, size));
        Ok(())
    }

    fn dma_unmap_all(&mut self) -> Result<(), DeviceError> {
        self.log.lock().unmap_all += 1;
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.log.lock().resets += 1;
        if let Some(m) = self.mig.as_mut() {
            m.quiesced = false;
        }
        Ok(())
    }

    fn disconnected(&mut self) {
        self.log.lock().disconnected += 1;
    }
    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        if self.mig.is_some() { Some(self) } else { None }
    }
    fn survivable(&mut self) -> Option<&mut dyn wdvirt::vdev::device::Survivable> {
        None
    }
}

/// The fake device's migration side: BAR0 is its register block (what
/// `save` returns and `restore` replaces), `quiesced` its run flag (BAR0
/// writes are refused with EBUSY while it is set). Every call is logged in
/// [`Log::mig_calls`].
#[derive(Clone, Debug)]
pub struct FakeMig {
    pub compat: Compat,
    pub quiesced: bool,
    /// Bytes `save` appends after BAR0 (to make a stream of a given size).
    pub state_extra: usize,
    /// The next call of this name fails with EBUSY (once).
    pub fail: Option<&'static str>,
    pub dirty_on: bool,
}

/// What the fake migratable device says it is.
pub fn fake_compat() -> Compat {
    Compat {
        abi_version: 1 << 16,
        type_name: "fake".into(),
        queues: vec![
            QueueCompat {
                max_depth: 64,
                ops: 0xff
            };
            2
        ],
        max_xfer: 4096,
    }
}

impl Default for FakeMig {
    fn default() -> FakeMig {
        FakeMig {
            compat: fake_compat(),
            quiesced: false,
            state_extra: 0,
            fail: None,
            dirty_on: false,
        }
    }
}

impl FakeDevice {
    /// A fake device that can migrate.
    pub fn migratable() -> (FakeDevice, Arc<Mutex<Log>>) {
        let (mut dev, log) = FakeDevice::new();
        dev.mig = Some(FakeMig::default());
        (dev, log)
    }

    fn mig_call(&mut self, name: &'static str) -> Result<&mut FakeMig, DeviceError> {
        self.log.lock().mig_calls.push(name);
        let m = self
            .mig
            .as_mut()
            .ok_or_else(|| DeviceError::NotSupported("not migratable".into()))?;
        if m.fail == Some(name) {
            m.fail = None;
            return Err(DeviceError::Busy(format!("{name} fails (test)")));
        }
        Ok(m)
    }
}

impl Migratable for FakeDevice {
    fn quiesce(&mut self) -> Result<(), DeviceError> {
        self.mig_call("quiesce")?.quiesced = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), DeviceError> {
        self.mig_call("resume")?.quiesced = false;
        Ok(())
    }
    fn compat(&self) -> Compat {
        self.log.lock().mig_calls.push("compat");
        self.mig
            .as_ref()
            .map(|m| m.compat.clone())
            .unwrap_or_else(fake_compat)
    }
    fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
        let extra = self.mig_call("save")?.state_extra;
        let mut state = self.regions[0].clone();
        state.extend((0..extra).map(|i| i as u8));
        Ok(state)
    }
    fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        self.mig_call("restore")?;
        let n = self.regions[0].len();
        if state.len() < n {
            return Err(DeviceError::Invalid(format!(
                "a state of {} bytes",
                state.len()
            )));
        }
        self.regions[0].copy_from_slice(&state[..n]);
        Ok(())
    }
    fn dirty_log_start(&mut self, page_size: u64) -> Result<(), DeviceError> {
        let m = self.mig_call("dirty_log_start")?;
        if page_size != 4096 {
            return Err(DeviceError::NotSupported(format!("page size {page_size}")));
        }
        m.dirty_on = true;
        self.log.lock().dirty.clear();
        Ok(())
    }
    fn dirty_log_stop(&mut self) {
        if let Ok(m) = self.mig_call("dirty_log_stop") {
            m.dirty_on = false;
        }
    }
    fn dirty_report(
        &mut self,
        iova: u64,
        size: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        if !self.mig_call("dirty_report")?.dirty_on {
            return Err(DeviceError::Invalid("logging is off".into()));
        }
        let mut log = self.log.lock();
        let hit: Vec<u64> = log
            .dirty
            .iter()
            .copied()
            .filter(|&a| a >= iova && a - iova < size)
            .collect();
        for a in hit {
            log.dirty.remove(&a);
            let bit = (a - iova) / page_size;
            let mut word = [0u8; 8];
            let at = (bit / 64) as usize * 8;
            word.copy_from_slice(&bitmap[at..at + 8]);
            let w = u64::from_ne_bytes(word) | 1 << (bit % 64);
            bitmap[at..at + 8].copy_from_slice(&w.to_ne_bytes());
        }
        Ok(())
    }
}

/// A connection served on its own thread.
pub struct Served {
    pub thread: JoinHandle<Result<Disconnect, TransportError>>,
    pub stop: StopHandle,
    pub stats: Arc<ConnectionStats>,
    pub log: Arc<Mutex<Log>>,
}

impl Served {
    pub fn join(self) -> Result<Disconnect, TransportError> {
        self.thread.join().expect("server thread panicked")
    }
}

pub fn serve(conn: Connection) -> Served {
    let (dev, log) = FakeDevice::new();
    serve_device(conn, dev, log)
}

/// Serves `conn` with a device the test set up (log: `FakeDevice::new`'s).
pub fn serve_device(conn: Connection, dev: FakeDevice, log: Arc<Mutex<Log>>) -> Served {
    let stop = conn.stop_handle();
    let stats = conn.stats();
    let mut conn = conn;
    let thread = std::thread::spawn(move || conn.run(&parking_lot::Mutex::new(dev)));
    Served {
        thread,
        stop,
        stats,
        log,
    }
}

/// A socket pair: the server end served on a thread, the raw client end.
pub fn serve_pair() -> (Served, RawClient) {
    let (a, b) = UnixStream::pair().unwrap();
    let served = serve(Connection::from_stream(a).unwrap());
    (served, RawClient::new(b))
}

/// A fresh listener in a temp dir; one connection accepted and served.
pub fn serve_listener() -> (tempfile::TempDir, Served, RawClient) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vfio-user.sock");
    let l = wdvirt::transport::Listener::bind(&path).unwrap();
    let t = std::thread::spawn(move || l.accept().map(serve));
    let client = RawClient::new(UnixStream::connect(&path).unwrap());
    let served = t.join().unwrap().unwrap();
    (dir, served, client)
}

/// A reply as read back: header, body, fds.
#[derive(Debug)]
pub struct Reply {
    pub header: Header,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    pub fn is_error(&self) -> bool {
        self.header.flags & wire::FLAG_ERROR != 0
    }
    /// The errno of an error reply (panics in the test otherwise).
    pub fn errno(&self) -> i32 {
        assert!(self.is_error(), "expected an error reply, got {self:?}");
        assert_eq!(self.header.size, 16, "error replies are header only");
        self.header.error as i32
    }
    pub fn ok(self) -> Reply {
        assert!(
            !self.is_error(),
            "unexpected error reply: errno {}",
            self.header.error
        );
        assert_eq!(
            self.header.flags & wire::FLAG_TYPE_MASK,
            wire::FLAG_TYPE_REPLY
        );
        self
    }
}

pub struct RawClient {
    pub stream: UnixStream,
    next_id: u16,
}

/// QEMU 11.1's VERSION JSON (214-byte request).
pub const QEMU_CAPS: &str = r#"{"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": true, "migration": {"pgsize": 4096, "max_bitmap_size": 268435456}}}"#;

impl RawClient {
    pub fn new(stream: UnixStream) -> RawClient {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        RawClient {
            stream,
            next_id: 0x100,
        }
    }

    /// Sends raw bytes with fds attached to the first byte.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let n = send_with_fds(&self.stream, bytes, fds).unwrap();
        self.stream.write_all(&bytes[n..]).unwrap();
    }

    /// Sends a message with a correct header; returns its id.
    pub fn send(&mut self, cmd: u16, flags: u32, body: &[u8], fds: &[BorrowedFd<'_>]) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header {
            id,
            cmd,
            size: (16 + body.len()) as u32,
            flags,
            error: 0,
        };
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(body);
        self.send_raw(&bytes, fds);
        id
    }

    /// Reads one whole message (fds collected).
    pub fn recv(&mut self) -> Reply {
        let mut hb = [0u8; 16];
        let mut fds = Vec::new();
        self.read_exact_fds(&mut hb, &mut fds)
            .expect("reply header");
        let header = Header::read_from_bytes(&hb).unwrap();
        let mut body = vec![0u8; header.size as usize - 16];
        self.read_exact_fds(&mut body, &mut fds)
            .expect("reply body");
        Reply { header, body, fds }
    }

    /// Ok(()) when the server closed the connection (EOF) before any byte.
    pub fn expect_eof(&mut self) {
        let mut b = [0u8; 1];
        let mut fds = Vec::new();
        match self.recv_some(&mut b, &mut fds) {
            Ok(0) => {}
            other => panic!("expected EOF, got {other:?}"),
        }
    }

    fn read_exact_fds(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.recv_some(&mut buf[got..], fds)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        Ok(())
    }

    fn recv_some(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = recvmsg(
            &self.stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = m {
                fds.extend(r);
            }
        }
        Ok(r.bytes)
    }

    /// Sends a request and reads the reply, checking id and command.
    pub fn request(&mut self, cmd: u16, body: &[u8], fds: &[BorrowedFd<'_>]) -> Reply {
        let id = self.send(cmd, 0, body, fds);
        let r = self.recv();
        assert_eq!(r.header.id, id, "reply id");
        assert_eq!(r.header.cmd, cmd, "reply command");
        r
    }

    /// VERSION with QEMU's capabilities; returns the reply.
    pub fn version(&mut self) -> Reply {
        self.request(1, &version_body(QEMU_CAPS), &[]).ok()
    }

    pub fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        iova: u64,
        size: u64,
        fds: &[BorrowedFd<'_>],
    ) -> Reply {
        let m = wire::DmaMap {
            argsz: 32,
            flags,
            offset,
            iova,
            size,
        };
        self.request(2, m.as_bytes(), fds)
    }

    pub fn dma_unmap(&mut self, flags: u32, iova: u64, size: u64) -> Reply {
        let u = wire::DmaUnmap {
            argsz: 24,
            flags,
            iova,
            size,
        };
        self.request(3, u.as_bytes(), &[])
    }

    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Reply {
        let a = wire::RegionAccess {
            offset,
            region,
            count,
        };
        self.request(9, a.as_bytes(), &[])
    }

    pub fn region_write_body(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
        let a = wire::RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        let mut body = a.as_bytes().to_vec();
        body.extend_from_slice(data);
        body
    }

    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Reply {
        self.request(10, &Self::region_write_body(region, offset, data), &[])
    }

    pub fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Reply {
        let s = wire::IrqSet {
            argsz: 20,
            flags,
            index,
            start,
            count,
        };
        self.request(8, s.as_bytes(), fds)
    }
}

pub fn version_body(json: &str) -> Vec<u8> {
    let mut b = vec![0u8, 0, 0, 0];
    b.extend_from_slice(json.as_bytes());
    b.push(0);
    b
}

pub fn memfd(size: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    fd
}

/// Guest RAM as QEMU's memory-backend-memfd makes it: a memfd of `size`
/// bytes sealed against shrinking and growing.
pub fn sealed_memfd(size: u64) -> OwnedFd {
    let flags = rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING;
    let fd = rustix::fs::memfd_create("ram", flags).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    let seals = rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW;
    rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
    fd
}

pub fn eventfd() -> OwnedFd {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap()
}

pub fn borrow(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

/// Set (to the test's name) in a re-executed test binary that runs that one
/// test alone, so it may change process-wide state such as RLIMIT_NOFILE
/// without disturbing the tests running beside it.
pub const CHILD_ENV: &str = "WDVIRT_TRANSPORT_TEST_CHILD";

/// In the test process: re-runs test `name` alone in a fresh process,
/// asserts that it ran and passed, and returns false. In that child:
/// returns true, and the caller runs the body.
pub fn in_child_process(name: &str) -> bool {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child run of {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// This process out of fds: RLIMIT_NOFILE lowered to just above the highest
/// open fd and every free slot below it filled. Dropping it frees the slots
/// and restores the limit. Use only in a child process (see
/// [`in_child_process`]).
pub struct FdExhaustion {
    fillers: Vec<OwnedFd>,
    old: rustix::process::Rlimit,
}

pub fn exhaust_fds() -> FdExhaustion {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    let old = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(highest + 1),
            maximum: old.maximum,
        },
    )
    .unwrap();
    let stderr = std::io::stderr();
    let mut fillers = Vec::new();
    for _ in 0..=highest {
        match rustix::io::fcntl_dupfd_cloexec(&stderr, 0) {
            Ok(fd) => fillers.push(fd),
            Err(rustix::io::Errno::MFILE) => return FdExhaustion { fillers, old },
            Err(e) => panic!("dup: {e}"),
        }
    }
    panic!("could not exhaust fds below {}", highest + 1);
}

impl Drop for FdExhaustion {
    fn drop(&mut self) {
        self.fillers.clear();
        rustix::process::setrlimit(rustix::process::Resource::Nofile, self.old).unwrap();
    }
}

/// One `sendmsg` of `bytes` with `fds` attached; returns the bytes sent.
pub fn send_with_fds(
    s: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<usize> {
    let mut space =
        vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    Ok(sendmsg(
        s,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}
