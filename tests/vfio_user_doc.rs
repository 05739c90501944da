//! docs/vfio-user.md's table of bad messages, read back and sent: every row
//! of the table is parsed, each of its cases is sent over a UNIX socket to a
//! real instance (the accelerator function behind the PCI layer, served by
//! the transport), and the errno of the reply must be the one the row names.
//! A row the test does not know, or a documented errno no case produces,
//! fails the test, so the table and the server cannot drift apart.

mod transport_support;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use transport_support::{RawClient, borrow, eventfd, in_child_process, version_body};
use wdvirt::accel::soft::SoftAccel;
use wdvirt::transport::{Connection, Disconnect, Limits, LogBudget, TransportError};
use wdvirt::vdev::pci::{Interrupts, PciFunction};
use wdvirt::vdev::wd::{WdConfig, WdDevice};

const READ: u32 = 1;
const RW: u32 = 3;
const INTX: u32 = 0;
const MSIX: u32 = 2;
/// SET_IRQS flags: DATA_NONE, DATA_EVENTFD, ACTION_TRIGGER.
const NONE_TRIGGER: u32 = 0x21;
const EVENTFD_TRIGGER: u32 = 0x24;
const QUEUES: u32 = 4;
const RAM: u64 = 0x1_0000_0000;

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/vfio-user.md")).unwrap()
}

/// Every row of the table: (bad message, errno cell).
fn rows(doc: &str) -> Vec<(String, String)> {
    let rows: Vec<(String, String)> = doc
        .lines()
        .skip_while(|l| !l.starts_with("| bad message | errno |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let (msg, errno) = l.trim_matches('|').rsplit_once(" | ").unwrap();
            (msg.trim().to_string(), errno.trim().to_string())
        })
        .collect();
    assert!(rows.len() >= 19, "the table was not found: {rows:?}");
    rows
}

fn errno_named(name: &str) -> i32 {
    match name {
        "EINVAL" => libc::EINVAL,
        "E2BIG" => libc::E2BIG,
        "ENOSYS" => libc::ENOSYS,
        "ENOTTY" => libc::ENOTTY,
        "ENOTSUP" => libc::ENOTSUP,
        "EMFILE" => libc::EMFILE,
        "EEXIST" => libc::EEXIST,
        "ENOSPC" => libc::ENOSPC,
        "ENOENT" => libc::ENOENT,
        other => panic!("unknown errno {other:?} in the table"),
    }
}

/// The errnos an errno cell names ("E2BIG or EINVAL, then ...").
fn errnos(cell: &str) -> Vec<i32> {
    cell.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            w.len() > 2
                && w.starts_with('E')
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
        .map(errno_named)
        .collect()
}

/// A real instance served on one end of a socket pair.
struct Server {
    client: RawClient,
    thread: JoinHandle<Result<Disconnect, TransportError>>,
}

fn serve() -> Server {
    serve_with(&Limits::default())
}

/// As [`serve`], the connection held to `limits`.
fn serve_with(limits: &Limits) -> Server {
    let (a, b) = UnixStream::pair().unwrap();
    let interrupts = Interrupts::new(QUEUES as u16);
    let cfg = WdConfig {
        queues: QUEUES,
        ..WdConfig::default()
    };
    let model = WdDevice::new(cfg, SoftAccel::new(1), 1, Arc::new(interrupts.clone())).unwrap();
    let dev = PciFunction::try_new(model, interrupts).unwrap();
    let mut conn = Connection::from_stream(a)
        .unwrap()
        .with_limits(limits, Arc::new(LogBudget::new(10)));
    let thread = std::thread::spawn(move || conn.run(&parking_lot::Mutex::new(dev)));
    Server {
        client: RawClient::new(b),
        thread,
    }
}

/// A served instance past VERSION.
fn ready() -> Server {
    let mut s = serve();
    s.client.version();
    s
}

/// Guest RAM as QEMU's memory-backend-memfd makes it (sealed against resizing).
use transport_support::sealed_memfd as sealed;

fn one(fd: &OwnedFd) -> Vec<std::os::fd::BorrowedFd<'_>> {
    vec![fd.as_fd()]
}

/// One case: what was sent, and the errno that came back.
type Outcome = (&'static str, i32);

/// Sends every case of the row whose message starts with `row`; returns
/// what came back, and whether the connection was then closed.
fn send_row(row: &str) -> (Vec<Outcome>, bool) {
    let mut out = Vec::new();
    let mut closed = false;
    let key = row.split_whitespace().take(4).collect::<Vec<_>>().join(" ");
    match key.as_str() {
        "any command before VERSION," => {
            let mut s = serve();
            out.push((
                "DMA_UNMAP first",
                s.client.request(3, &[0; 24], &[]).errno(),
            ));
            s.client.version();
            let second = s.client.request(1, &version_body("{}"), &[]).errno();
            out.push(("a second VERSION", second));
        }
        "VERSION with malformed JSON," => {
            for (what, body) in [
                ("malformed JSON", version_body("{\"capabilities\": ")),
                ("no NUL", b"\0\0\0\0{}".to_vec()),
                (
                    "major 1",
                    [&[1u8, 0][..], &version_body("{}")[2..]].concat(),
                ),
            ] {
                let mut s = serve();
                out.push((what, s.client.request(1, &body, &[]).errno()));
            }
        }
        "body shorter than the" => {
            let mut s = ready();
            out.push((
                "DMA_MAP of 8 bytes",
                s.client.request(2, &[0; 8], &[]).errno(),
            ));
            out.push((
                "REGION_READ of 4",
                s.client.request(9, &[0; 4], &[]).errno(),
            ));
        }
        "header `size` under 16" => {
            for (what, size) in [("size 8", 8u32), ("size 2 GiB", 0x7fff_ffff)] {
                let mut s = ready();
                let mut h = vec![7u8, 0, 9, 0];
                h.extend_from_slice(&size.to_le_bytes());
                h.extend_from_slice(&[0; 8]);
                s.client.send_raw(&h, &[]);
                out.push((what, s.client.recv().errno()));
                s.client.expect_eof();
                // The server's side ended too (its result says why).
                s.thread.join().expect("server thread panicked").ok();
            }
            closed = true;
        }
        "unknown command" => {
            let mut s = ready();
            out.push(("command 0x7777", s.client.request(0x7777, &[], &[]).errno()));
        }
        "DEVICE_FEATURE of a feature" => {
            let mut s = ready();
            for (what, feature) in [
                ("MIG_DATA_SIZE", 11u32),
                ("PCI_VF_TOKEN", 0),
                ("0xffff", 0xffff),
            ] {
                let mut body = 16u32.to_ne_bytes().to_vec();
                body.extend_from_slice(&(0x10000 | feature).to_ne_bytes());
                out.push((what, s.client.request(16, &body, &[]).errno()));
            }
        }
        "DEVICE_FEATURE with argsz under" => {
            let mut s = ready();
            let mig = 1u32;
            for (what, argsz, flags) in [
                ("argsz 4", 4u32, mig | 0x10000),
                ("flag bit 19", 16, mig | 0x80000),
                ("no operation", 16, mig),
                ("GET and SET", 16, mig | 0x30000),
            ] {
                let mut body = argsz.to_ne_bytes().to_vec();
                body.extend_from_slice(&flags.to_ne_bytes());
                out.push((what, s.client.request(16, &body, &[]).errno()));
            }
        }
        "fds on a command" => {
            let mut s = ready();
            let e = eventfd();
            let body = wdvirt::transport::wire::RegionAccess {
                offset: 0,
                region: 0,
                count: 4,
            };
            use zerocopy::IntoBytes;
            let r = s.client.request(9, body.as_bytes(), &one(&e));
            out.push(("REGION_READ with an fd", r.errno()));
            let two = [sealed(4096), sealed(4096)];
            out.push((
                "DMA_MAP with two fds",
                s.client.dma_map(RW, 0, RAM, 4096, &borrow(&two)).errno(),
            ));
        }
        "fds dropped by the" => {
            // Lowers RLIMIT_NOFILE: runs alone in a child process, which
            // asserts the documented errno itself.
            assert!(!in_child_process(
                "fds_dropped_by_the_kernel_get_the_documented_errno"
            ));
            out.push(("DMA_MAP and SET_IRQS whose fds were dropped", libc::EMFILE));
        }
        "DMA_MAP not aligned to" => {
            let mut s = ready();
            let m = sealed(0x10000);
            for (what, iova, size) in [
                ("iova not page-aligned", RAM + 0x10, 4096),
                ("size not page-aligned", RAM, 100),
                ("size 0", RAM, 0),
                ("iova + size overflows", u64::MAX - 0xfff, 0x2000),
            ] {
                out.push((what, s.client.dma_map(RW, 0, iova, size, &one(&m)).errno()));
            }
            out.push((
                "offset not page-aligned",
                s.client.dma_map(RW, 8, RAM, 4096, &one(&m)).errno(),
            ));
        }
        "DMA_MAP overlapping an existing" => {
            let mut s = ready();
            let m = sealed(0x10000);
            s.client.dma_map(RW, 0, RAM, 0x10000, &one(&m)).ok();
            let other = sealed(4096);
            out.push((
                "overlap",
                s.client
                    .dma_map(RW, 0, RAM + 0x1000, 4096, &one(&other))
                    .errno(),
            ));
        }
        "DMA_MAP beyond the map" => {
            let mut s = ready();
            for i in 0..1024u64 {
                s.client.dma_map(READ, 0, i * 0x2000, 0x1000, &[]).ok();
            }
            out.push((
                "map 1025",
                s.client.dma_map(READ, 0, 1 << 32, 0x1000, &[]).errno(),
            ));
            let mut s = ready();
            // 1 TiB of sparse guest memory, mapped whole, then one page more.
            let big = sealed(1 << 40);
            s.client.dma_map(RW, 0, 1 << 44, 1 << 40, &one(&big)).ok();
            let page = sealed(4096);
            out.push((
                "fd-backed byte past 1 TiB",
                s.client.dma_map(RW, 0, RAM, 4096, &one(&page)).errno(),
            ));
        }
        "DMA_MAP of an fd" => {
            let mut s = ready();
            let unsealed = transport_support::memfd(0x10000);
            out.push((
                "unsealed memfd",
                s.client
                    .dma_map(RW, 0, RAM, 0x10000, &one(&unsealed))
                    .errno(),
            ));
            let huge = rustix::fs::MemfdFlags::CLOEXEC
                | rustix::fs::MemfdFlags::ALLOW_SEALING
                | rustix::fs::MemfdFlags::HUGETLB;
            let h = rustix::fs::memfd_create("huge", huge).expect("a hugetlbfs memfd");
            rustix::fs::ftruncate(&h, 2 << 20).unwrap();
            let seals = rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW;
            rustix::fs::fcntl_add_seals(&h, seals).unwrap();
            out.push((
                "sealed hugetlbfs memfd",
                s.client.dma_map(RW, 0, RAM, 2 << 20, &one(&h)).errno(),
            ));
        }
        "DMA_UNMAP of a range" => {
            let mut s = ready();
            out.push(("never mapped", s.client.dma_unmap(0, RAM, 4096).errno()));
        }
        "DMA_UNMAP of part of" => {
            let mut s = ready();
            let m = sealed(0x10000);
            s.client.dma_map(RW, 0, RAM, 0x10000, &one(&m)).ok();
            out.push(("part of a map", s.client.dma_unmap(0, RAM, 0x1000).errno()));
        }
        "region index past the" => {
            let mut s = ready();
            out.push(("region 42", s.client.region_read(42, 0, 4).errno()));
            out.push((
                "region 42 write",
                s.client.region_write(42, 0, &[0; 4]).errno(),
            ));
        }
        "region access with `offset" => {
            let mut s = ready();
            let bar0 = wdvirt_abi::pci::BAR0_SIZE;
            out.push(("past BAR0", s.client.region_read(0, bar0 - 2, 4).errno()));
            out.push((
                "offset overflows",
                s.client.region_read(0, u64::MAX - 1, 4).errno(),
            ));
            out.push(("count 0", s.client.region_read(0, 0, 0).errno()));
            out.push((
                "count over 1 MiB",
                s.client.region_read(0, 0, (1 << 20) + 4).errno(),
            ));
            // Over max_data_xfer_size but inside the 16 KiB BAR0: messages
            // of 8 KiB advertise 8 KiB - 32 bytes of data.
            let mut small = serve_with(&Limits {
                max_message_size: 8192,
                ..Limits::default()
            });
            small.client.version();
            out.push((
                "count over max_data_xfer_size, inside BAR0",
                small.client.region_read(0, 0, 8192).errno(),
            ));
            out.push((
                "write past BAR2",
                s.client.region_write(2, 0x4000 - 2, &[0; 4]).errno(),
            ));
        }
        "SET_IRQS with `start +" => {
            let mut s = ready();
            out.push((
                "MSI-X past the vectors",
                s.client
                    .set_irqs(NONE_TRIGGER, MSIX, QUEUES - 1, 2, &[])
                    .errno(),
            ));
            let e = eventfd();
            out.push((
                "two vectors, one fd",
                s.client
                    .set_irqs(EVENTFD_TRIGGER, MSIX, 0, 2, &one(&e))
                    .errno(),
            ));
        }
        "SET_IRQS with an fd" => {
            let mut s = ready();
            let m = transport_support::memfd(4096);
            out.push((
                "a memfd as eventfd",
                s.client
                    .set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1, &one(&m))
                    .errno(),
            ));
        }
        "SET_IRQS on INTx other" => {
            let mut s = ready();
            let e = eventfd();
            out.push((
                "INTx trigger eventfd",
                s.client
                    .set_irqs(EVENTFD_TRIGGER, INTX, 0, 1, &one(&e))
                    .errno(),
            ));
            // "Disable" is accepted.
            s.client.set_irqs(NONE_TRIGGER, INTX, 0, 0, &[]).ok();
        }
        other => panic!("docs/vfio-user.md row {other:?} ({row}) is not sent by this test"),
    }
    (out, closed)
}

#[test]
fn every_documented_bad_message_gets_its_errno() {
    let doc = doc();
    for (row, cell) in rows(&doc) {
        let want = errnos(&cell);
        assert!(!want.is_empty(), "row {row:?}: no errno in {cell:?}");
        let (outcomes, closed) = send_row(&row);
        eprintln!("{row}: {outcomes:?}");
        assert!(!outcomes.is_empty(), "row {row:?} sent nothing");
        for (what, got) in &outcomes {
            assert!(
                want.contains(got),
                "row {row:?}, case {what}: errno {got}, the table says {cell}"
            );
        }
        for w in &want {
            assert!(
                outcomes.iter().any(|(_, got)| got == w),
                "row {row:?}: no case produced errno {w} ({cell})"
            );
        }
        assert_eq!(closed, cell.contains("connection is closed"), "row {row:?}");
    }
}

/// The EMFILE row, in a child process of its own (it exhausts the
/// process's fds).
#[test]
fn fds_dropped_by_the_kernel_get_the_documented_errno() {
    if !in_child_process("fds_dropped_by_the_kernel_get_the_documented_errno") {
        return;
    }
    let doc = doc();
    let (_, cell) = rows(&doc)
        .into_iter()
        .find(|(m, _)| m.starts_with("fds dropped by the kernel"))
        .expect("the EMFILE row");
    let want = errnos(&cell);
    let mut s = ready();
    let m = sealed(0x10000);
    let e = eventfd();
    let _out = transport_support::exhaust_fds();
    let map = s.client.dma_map(RW, 0, RAM, 0x10000, &one(&m)).errno();
    let irq = s
        .client
        .set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1, &one(&e))
        .errno();
    assert_eq!((vec![map], vec![irq]), (want.clone(), want));
}
