//! DMA_MAP / DMA_UNMAP on the wire: fd and fd-less maps, exact errnos for
//! alignment, overlap, fd counts and unknown ranges, unmap-all (flag 0x2).

mod transport_support;

use transport_support::*;

const RW: u32 = 3;

fn ready() -> (Served, RawClient) {
    let (served, mut c) = serve_pair();
    c.version();
    (served, c)
}

#[test]
fn map_with_and_without_fd_reaches_the_device() {
    let (served, mut c) = ready();
    let mem = memfd(0x40000);
    let r = c
        .dma_map(
            RW,
            0x20000,
            0x100000,
            0x20000,
            &borrow(std::slice::from_ref(&mem)),
        )
        .ok();
    assert_eq!(r.header.size, 16, "DMA_MAP reply is header only");
    // Read-only, fd-less (QEMU's BIOS/ROM ranges).
    c.dma_map(1, 0, 0xfffc0000, 0x40000, &[]).ok();
    let log = served.log.lock();
    assert_eq!(
        log.maps,
        [
            (0x100000, 0x20000, true, true, Some(0x20000)),
            (0xfffc0000, 0x40000, true, false, None)
        ]
    );
    assert_eq!(log.map_fds.len(), 1);
}

#[test]
fn unknown_map_flag_bits_are_tolerated() {
    let (served, mut c) = ready();
    c.dma_map(RW | 0x4 | 0x100, 0, 0x1000, 0x1000, &[]).ok();
    assert_eq!(served.log.lock().maps.len(), 1);
}

#[test]
fn unaligned_or_empty_or_wrapping_maps_are_einval() {
    let (served, mut c) = ready();
    for (iova, size) in [
        (0x1001, 0x1000),
        (0x1000, 0x800),
        (0x1000, 0),
        (!0xfffu64, 0x2000),
    ] {
        assert_eq!(
            c.dma_map(RW, 0, iova, size, &[]).errno(),
            libc::EINVAL,
            "{iova:#x}+{size:#x}"
        );
    }
    // An fd map with an unaligned file offset.
    let mem = memfd(0x4000);
    assert_eq!(
        c.dma_map(
            RW,
            0x10,
            0x1000,
            0x1000,
            &borrow(std::slice::from_ref(&mem))
        )
        .errno(),
        libc::EINVAL
    );
    assert!(
        served.log.lock().maps.is_empty(),
        "the device saw none of them"
    );
}

#[test]
fn two_fds_on_a_map_are_einval() {
    let (served, mut c) = ready();
    let fds = [memfd(0x1000), memfd(0x1000)];
    assert_eq!(
        c.dma_map(RW, 0, 0x1000, 0x1000, &borrow(&fds)).errno(),
        libc::EINVAL
    );
    assert!(served.log.lock().maps.is_empty());
    c.dma_map(RW, 0, 0x1000, 0x1000, &borrow(&fds[..1])).ok();
}

#[test]
fn overlapping_map_is_eexist() {
    let (served, mut c) = ready();
    c.dma_map(RW, 0, 0x10000, 0x4000, &[]).ok();
    for (iova, size) in [
        (0x10000, 0x4000),
        (0xf000, 0x2000),
        (0x13000, 0x1000),
        (0, 0x100000),
    ] {
        assert_eq!(
            c.dma_map(RW, 0, iova, size, &[]).errno(),
            libc::EEXIST,
            "{iova:#x}+{size:#x}"
        );
    }
    // Neighbours are fine.
    c.dma_map(RW, 0, 0xf000, 0x1000, &[]).ok();
    c.dma_map(RW, 0, 0x14000, 0x1000, &[]).ok();
    assert_eq!(served.log.lock().maps.len(), 3);
}

#[test]
fn unmap_must_match_exactly() {
    let (served, mut c) = ready();
    c.dma_map(RW, 0, 0x10000, 0x4000, &[]).ok();
    assert_eq!(c.dma_unmap(0, 0x80000, 0x1000).errno(), libc::ENOENT);
    assert_eq!(
        c.dma_unmap(0, 0x10000, 0x1000).errno(),
        libc::EINVAL,
        "part of a map"
    );
    assert_eq!(
        c.dma_unmap(0x8, 0x10000, 0x4000).errno(),
        libc::EINVAL,
        "unknown flag"
    );
    let r = c.dma_unmap(0, 0x10000, 0x4000).ok();
    // The reply echoes the 24-byte request body (40 B in all).
    assert_eq!(r.header.size, 40);
    assert_eq!(&r.body[8..16], &0x10000u64.to_ne_bytes());
    assert_eq!(&r.body[16..24], &0x4000u64.to_ne_bytes());
    assert_eq!(
        c.dma_unmap(0, 0x10000, 0x4000).errno(),
        libc::ENOENT,
        "already gone"
    );
    // The range is free again.
    c.dma_map(RW, 0, 0x10000, 0x4000, &[]).ok();
    assert_eq!(served.log.lock().unmaps, [(0x10000, 0x4000)]);
}

#[test]
fn unmap_all_is_flag_0x2_and_clears_the_table() {
    let (served, mut c) = ready();
    c.dma_map(RW, 0, 0x10000, 0x4000, &[]).ok();
    c.dma_map(RW, 0, 0x20000, 0x4000, &[]).ok();
    assert_eq!(
        c.dma_unmap(2, 0x10000, 0x4000).errno(),
        libc::EINVAL,
        "ALL with a range"
    );
    assert_eq!(
        c.dma_unmap(1, 0x10000, 0x4000).errno(),
        libc::ENOTSUP,
        "dirty bitmap"
    );
    c.dma_unmap(2, 0, 0).ok();
    assert_eq!(served.log.lock().unmap_all, 1);
    // Everything is free again.
    c.dma_map(RW, 0, 0x10000, 0x4000, &[]).ok();
    c.dma_map(RW, 0, 0x20000, 0x4000, &[]).ok();
}

/// Per-connection caps: 1024 maps, advertised in VERSION.
const MAX_MAPS: u64 = 1024;
/// Per-connection cap on fd-backed bytes: 1 TiB.
const MAX_FD_BYTES: u64 = 1 << 40;

#[test]
fn version_advertises_the_map_cap() {
    let (_served, mut c) = serve_pair();
    let r = c.version();
    let json: serde_json::Value = serde_json::from_slice(&r.body[4..r.body.len() - 1]).unwrap();
    assert_eq!(json["capabilities"]["max_dma_maps"], MAX_MAPS);
}

#[test]
fn maps_past_the_per_connection_count_are_enospc() {
    let (served, mut c) = ready();
    for i in 0..MAX_MAPS {
        c.dma_map(1, 0, i * 0x2000, 0x1000, &[]).ok();
    }
    let over = MAX_MAPS * 0x2000;
    assert_eq!(c.dma_map(1, 0, over, 0x1000, &[]).errno(), libc::ENOSPC);
    let mem = memfd(0x1000);
    assert_eq!(
        c.dma_map(RW, 0, over, 0x1000, &borrow(std::slice::from_ref(&mem)))
            .errno(),
        libc::ENOSPC,
        "fd-backed too"
    );
    assert_eq!(served.log.lock().maps.len(), MAX_MAPS as usize);
    // An unmap makes room for exactly one more.
    c.dma_unmap(0, 0, 0x1000).ok();
    c.dma_map(1, 0, over, 0x1000, &[]).ok();
    assert_eq!(
        c.dma_map(1, 0, over + 0x2000, 0x1000, &[]).errno(),
        libc::ENOSPC
    );
}

#[test]
fn fd_backed_bytes_past_the_per_connection_cap_are_enospc() {
    let (served, mut c) = ready();
    // The transport checks sizes, not the file (the device does that).
    let mem = memfd(0x1000);
    let fd = borrow(std::slice::from_ref(&mem));
    c.dma_map(RW, 0, 0, MAX_FD_BYTES - 0x1000, &fd).ok();
    c.dma_map(RW, 0, 1 << 41, 0x1000, &fd).ok();
    assert_eq!(
        c.dma_map(RW, 0, 1 << 42, 0x1000, &fd).errno(),
        libc::ENOSPC,
        "one page over 1 TiB"
    );
    // Fd-less maps cost no memory and are not counted.
    c.dma_map(1, 0, 1 << 43, MAX_FD_BYTES, &[]).ok();
    assert_eq!(served.log.lock().maps.len(), 3);
    // Unmapping returns the bytes; unmap-all returns them all.
    c.dma_unmap(0, 1 << 41, 0x1000).ok();
    c.dma_map(RW, 0, 1 << 42, 0x1000, &fd).ok();
    assert_eq!(c.dma_map(RW, 0, 1 << 41, 0x1000, &fd).errno(), libc::ENOSPC);
    c.dma_unmap(2, 0, 0).ok();
    c.dma_map(RW, 0, 0, MAX_FD_BYTES, &fd).ok();
}
