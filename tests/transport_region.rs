//! DEVICE_GET_INFO, GET_REGION_INFO, REGION_READ/WRITE, REGION_WRITE_MULTI,
//! DEVICE_RESET on the wire: reply shapes QEMU and cloud-hypervisor read,
//! region-info truncation, and the generic bounds checks.

mod transport_support;

use transport_support::*;
use wdvirt::transport::wire::{self, RegionInfo, SparseArea, SparseMmapCap};
use zerocopy::{FromBytes, IntoBytes};

fn ready() -> (Served, RawClient) {
    let (served, mut c) = serve_pair();
    c.version();
    (served, c)
}

fn region_info(c: &mut RawClient, index: u32, argsz: u32) -> Reply {
    let req = RegionInfo {
        argsz,
        index,
        ..Default::default()
    };
    c.request(5, req.as_bytes(), &[])
}

#[test]
fn device_info_is_32_bytes() {
    let (_s, mut c) = ready();
    let r = c
        .request(
            4,
            wire::DeviceInfo {
                argsz: 16,
                ..Default::default()
            }
            .as_bytes(),
            &[],
        )
        .ok();
    assert_eq!(r.header.size, 32);
    let info = wire::DeviceInfo::read_from_bytes(&r.body).unwrap();
    assert_eq!(
        (info.argsz, info.flags, info.num_regions, info.num_irqs),
        (16, 3, NUM_REGIONS, NUM_IRQS)
    );
    assert_eq!(
        c.request(
            4,
            wire::DeviceInfo {
                argsz: 8,
                ..Default::default()
            }
            .as_bytes(),
            &[]
        )
        .errno(),
        libc::EINVAL
    );
}

#[test]
fn region_info_with_argsz_32_is_truncated_but_says_the_full_size() {
    let (_s, mut c) = ready();
    let r = region_info(&mut c, 2, 32).ok();
    assert_eq!(r.header.size, 48, "16 + the client's argsz");
    assert_eq!(r.fds.len(), 1, "the mmap fd");
    let info = RegionInfo::read_from_bytes(&r.body).unwrap();
    assert_eq!(
        info.argsz,
        32 + 16 + 2 * 16,
        "full size: info + cap header + 2 areas"
    );
    assert_eq!(info.flags, 0xf, "READ|WRITE|MMAP|CAPS");
    assert_eq!((info.index, info.size, info.cap_offset), (2, BAR2_SIZE, 32));

    // The retry with the full argsz gets the sparse-mmap capability.
    let r = region_info(&mut c, 2, info.argsz).ok();
    assert_eq!(r.header.size, 16 + info.argsz);
    assert_eq!(r.fds.len(), 1);
    let cap = SparseMmapCap::read_from_prefix(&r.body[32..]).unwrap().0;
    assert_eq!((cap.id, cap.version, cap.next, cap.nr_areas), (1, 1, 0, 2));
    let a1 = SparseArea::read_from_prefix(&r.body[48..]).unwrap().0;
    let a2 = SparseArea::read_from_prefix(&r.body[64..]).unwrap().0;
    assert_eq!(
        (a1.offset, a1.size, a2.offset, a2.size),
        (0x1000, 0x1000, 0x3000, 0x1000)
    );

    // A larger argsz than needed gets only what exists.
    assert_eq!(
        region_info(&mut c, 2, 4096).ok().header.size,
        16 + info.argsz
    );
}

#[test]
fn region_fd_the_device_does_not_keep_still_reaches_the_vmm() {
    // The device hands out a new fd and keeps no copy: the reply owns it
    // until it is sent (a bare fd number would be closed by then).
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (mut dev, log) = FakeDevice::new();
    dev.fresh_bar2_fd = true;
    let _served = serve_device(
        wdvirt::transport::Connection::from_stream(a).unwrap(),
        dev,
        log,
    );
    let mut c = RawClient::new(b);
    c.version();
    for _ in 0..2 {
        let r = region_info(&mut c, 2, 32).ok();
        assert_eq!(r.fds.len(), 1);
        let mut mark = vec![0u8; FRESH_FD_MARK.len()];
        rustix::io::pread(&r.fds[0], &mut mark, 0).unwrap();
        assert_eq!(mark, FRESH_FD_MARK);
    }
}

#[test]
fn plain_region_info_has_no_fd_and_no_caps() {
    let (_s, mut c) = ready();
    let r = region_info(&mut c, 7, 32).ok();
    assert_eq!(r.header.size, 48);
    assert!(r.fds.is_empty());
    let info = RegionInfo::read_from_bytes(&r.body).unwrap();
    assert_eq!(
        (info.argsz, info.flags, info.size, info.cap_offset),
        (32, 3, CONFIG_SIZE, 0)
    );
    let info = RegionInfo::read_from_bytes(&region_info(&mut c, 1, 32).ok().body).unwrap();
    assert_eq!((info.size, info.flags), (0, 0), "an absent BAR");
}

#[test]
fn region_info_bad_index_or_argsz_is_einval() {
    let (_s, mut c) = ready();
    assert_eq!(region_info(&mut c, NUM_REGIONS, 32).errno(), libc::EINVAL);
    assert_eq!(region_info(&mut c, u32::MAX, 32).errno(), libc::EINVAL);
    assert_eq!(region_info(&mut c, 0, 16).errno(), libc::EINVAL);
}

#[test]
fn region_read_and_write_reply_shapes() {
    let (s, mut c) = ready();
    let w = c.region_write(0, 0x80, &[9, 8, 7, 6]).ok();
    assert_eq!(
        w.header.size, 32,
        "REGION_WRITE reply echoes offset/region/count"
    );
    let a = wire::RegionAccess::read_from_bytes(&w.body).unwrap();
    assert_eq!((a.offset, a.region, a.count), (0x80, 0, 4));
    let r = c.region_read(0, 0x80, 4).ok();
    assert_eq!(r.header.size, 32 + 4);
    assert_eq!(&r.body[16..], &[9, 8, 7, 6]);
    // A whole 256-byte config read in one message (QEMU does this at realize).
    assert_eq!(
        c.region_read(7, 0, CONFIG_SIZE as u32).ok().body.len(),
        16 + 256
    );
    assert_eq!(s.log.lock().writes, [(0, 0x80, vec![9, 8, 7, 6])]);
}

#[test]
fn region_access_out_of_range_is_einval_before_the_device() {
    let (s, mut c) = ready();
    assert_eq!(
        c.region_read(NUM_REGIONS, 0, 4).errno(),
        libc::EINVAL,
        "index"
    );
    assert_eq!(
        c.region_read(0, BAR0_SIZE - 2, 4).errno(),
        libc::EINVAL,
        "offset+count past end"
    );
    assert_eq!(
        c.region_read(0, u64::MAX - 1, 4).errno(),
        libc::EINVAL,
        "offset+count wraps"
    );
    assert_eq!(
        c.region_read(1, 0, 4).errno(),
        libc::EINVAL,
        "absent region"
    );
    assert_eq!(c.region_read(0, 0, 0).errno(), libc::EINVAL, "count 0");
    assert_eq!(
        c.region_read(0, 0, (1 << 20) + 1).errno(),
        libc::EINVAL,
        "over max_data_xfer_size"
    );
    assert_eq!(c.region_write(0, BAR0_SIZE, &[1]).errno(), libc::EINVAL);
    assert_eq!(
        c.region_write(6, 0, &[1]).errno(),
        libc::EINVAL,
        "read-only ROM"
    );
    assert!(s.log.lock().writes.is_empty());
    c.region_read(6, 0, 4).ok();
}

fn multi(entries: &[(u64, u32, &[u8])]) -> Vec<u8> {
    let mut b = (entries.len() as u64).to_ne_bytes().to_vec();
    for &(offset, region, data) in entries {
        let mut e = wire::WriteMultiEntry {
            offset,
            region,
            count: data.len() as u32,
            data: [0; 8],
        };
        e.data[..data.len()].copy_from_slice(data);
        b.extend_from_slice(e.as_bytes());
    }
    b
}

#[test]
fn region_write_multi_applies_every_entry_without_a_reply() {
    let (s, mut c) = ready();
    c.send(
        15,
        wire::FLAG_NO_REPLY,
        &multi(&[(0x10, 0, &[1, 2, 3, 4]), (0x18, 0, &[5; 8])]),
        &[],
    );
    // Bad entry (past the end): nothing applied, nothing sent, counted.
    c.send(
        15,
        wire::FLAG_NO_REPLY,
        &multi(&[(0x20, 0, &[7]), (BAR0_SIZE, 0, &[7])]),
        &[],
    );
    let r = c.region_read(0, 0x10, 16).ok();
    assert_eq!(
        &r.body[16..],
        &[1, 2, 3, 4, 0, 0, 0, 0, 5, 5, 5, 5, 5, 5, 5, 5]
    );
    assert_eq!(c.region_read(0, 0x20, 1).ok().body[16], 0);
    assert_eq!(s.stats.snapshot().posted_write_errors, 1);
    // Without No_reply it is answered; wr_cnt 0 and a size mismatch are EINVAL.
    c.request(15, &multi(&[(0x30, 0, &[1])]), &[]).ok();
    assert_eq!(
        c.request(15, &0u64.to_ne_bytes(), &[]).errno(),
        libc::EINVAL
    );
    let mut short = multi(&[(0x30, 0, &[1])]);
    short.truncate(20);
    assert_eq!(c.request(15, &short, &[]).errno(), libc::EINVAL);
}

#[test]
fn reset_reply_is_16_bytes() {
    let (s, mut c) = ready();
    assert_eq!(c.request(13, &[], &[]).ok().header.size, 16);
    assert_eq!(s.log.lock().resets, 1);
}
