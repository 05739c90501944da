//! GET_IRQ_INFO and SET_IRQS on the wire, in the encodings QEMU 11.1 sends
//! (argsz 20, fds only in SCM_RIGHTS, count 0 disable, fd-less de-assign).

mod transport_support;

use transport_support::*;
use wdvirt::transport::wire;
use wdvirt::vdev::device::IrqAction;
use zerocopy::{FromBytes, IntoBytes};

const MSIX: u32 = 2;

fn ready() -> (Served, RawClient) {
    let (served, mut c) = serve_pair();
    c.version();
    (served, c)
}

#[test]
fn irq_info_is_32_bytes_and_checks_the_index() {
    let (_s, mut c) = ready();
    let req = wire::IrqInfo {
        argsz: 16,
        index: MSIX,
        ..Default::default()
    };
    let r = c.request(7, req.as_bytes(), &[]).ok();
    assert_eq!(r.header.size, 32);
    let info = wire::IrqInfo::read_from_bytes(&r.body).unwrap();
    assert_eq!(
        (info.argsz, info.index, info.count),
        (16, MSIX, IRQ_COUNTS[2])
    );
    let req = wire::IrqInfo {
        argsz: 16,
        index: NUM_IRQS,
        ..Default::default()
    };
    assert_eq!(c.request(7, req.as_bytes(), &[]).errno(), libc::EINVAL);
}

#[test]
fn qemu_encodings_reach_the_device() {
    let (s, mut c) = ready();
    let fds = [eventfd(), eventfd(), eventfd()];
    // 0x24 EVENTFD|TRIGGER, INTx, one fd.
    assert_eq!(
        c.set_irqs(0x24, 0, 0, 1, &borrow(&fds[..1]))
            .ok()
            .header
            .size,
        16
    );
    // 0x21 NONE|TRIGGER count 0: disable the index.
    c.set_irqs(0x21, 0, 0, 0, &[]).ok();
    // 0x24 MSI-X start 0 count 1, no fd: "enabled, no vectors" (de-assign).
    c.set_irqs(0x24, MSIX, 0, 1, &[]).ok();
    // A run of two vectors with fds.
    c.set_irqs(0x24, MSIX, 1, 2, &borrow(&fds[1..])).ok();
    // 0x11 NONE|UNMASK INTx.
    c.set_irqs(0x11, 0, 0, 1, &[]).ok();
    // DATA_BOOL|MASK with its bytes in the body.
    let mut body = wire::IrqSet {
        argsz: 24,
        flags: 0x0a,
        index: MSIX,
        start: 0,
        count: 4,
    }
    .as_bytes()
    .to_vec();
    body.extend_from_slice(&[1, 0, 1, 0]);
    c.request(8, &body, &[]).ok();

    let log = s.log.lock();
    assert_eq!(
        log.irqs,
        [
            (0, IrqAction::Trigger, 0, 1, "eventfd", 1),
            (0, IrqAction::Trigger, 0, 0, "none", 0),
            (MSIX, IrqAction::Trigger, 0, 1, "eventfd", 0),
            (MSIX, IrqAction::Trigger, 1, 2, "eventfd", 2),
            (0, IrqAction::Unmask, 0, 1, "none", 0),
            (MSIX, IrqAction::Mask, 0, 4, "bool", 0),
        ]
    );
    assert_eq!(log.bools, [vec![true, false, true, false]]);
    assert_eq!(log.irq_fds.len(), 3);
}

#[test]
fn wrong_fd_count_is_einval() {
    let (s, mut c) = ready();
    let fds = [eventfd(), eventfd()];
    assert_eq!(
        c.set_irqs(0x24, MSIX, 0, 3, &borrow(&fds)).errno(),
        libc::EINVAL,
        "2 fds for 3"
    );
    assert_eq!(
        c.set_irqs(0x24, MSIX, 0, 1, &borrow(&fds)).errno(),
        libc::EINVAL,
        "2 fds for 1"
    );
    assert_eq!(
        c.set_irqs(0x21, MSIX, 0, 1, &borrow(&fds[..1])).errno(),
        libc::EINVAL,
        "fd without EVENTFD"
    );
    assert!(s.log.lock().irqs.is_empty());
}

#[test]
fn bad_ranges_and_flags_are_einval() {
    let (s, mut c) = ready();
    assert_eq!(
        c.set_irqs(0x24, MSIX, 3, 2, &[]).errno(),
        libc::EINVAL,
        "start+count past 4"
    );
    assert_eq!(
        c.set_irqs(0x24, MSIX, u32::MAX, 2, &[]).errno(),
        libc::EINVAL,
        "wraps"
    );
    assert_eq!(
        c.set_irqs(0x24, NUM_IRQS, 0, 1, &[]).errno(),
        libc::EINVAL,
        "index"
    );
    assert_eq!(
        c.set_irqs(0x26, MSIX, 0, 1, &[]).errno(),
        libc::EINVAL,
        "two data types"
    );
    assert_eq!(
        c.set_irqs(0x64, MSIX, 0, 1, &[]).errno(),
        libc::EINVAL,
        "unknown bit"
    );
    assert_eq!(
        c.set_irqs(0x04, MSIX, 0, 1, &[]).errno(),
        libc::EINVAL,
        "no action"
    );
    assert_eq!(
        c.set_irqs(0x0a, MSIX, 0, 4, &[]).errno(),
        libc::EINVAL,
        "BOOL without its bytes"
    );
    assert!(s.log.lock().irqs.is_empty());
}
