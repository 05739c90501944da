#!/usr/bin/env python3
"""Drive a wdvirt instance through the real QEMU vfio-user-pci client, with
no guest OS: QEMU runs with `-accel qtest` and this script plays the guest
over QEMU's qtest text protocol (PCI config cycles on 0xcf8/0xcfc, MMIO with
readl/writel, guest RAM with read/write).

What one run checks:
  * QEMU realizes the device (no "vfio-user" error on its stderr);
  * the device is found on bus 0 by config cycles: vendor, device, class;
  * BAR0/BAR2 get addresses, memory + bus master are enabled;
  * BAR0 ID reads 0x31564457 (a REGION_READ through QEMU);
  * a queue set up in guest RAM runs CRC32C, SHA-256 and zlib-compress jobs
    submitted with one doorbell (a posted REGION_WRITE); the completions and
    output buffers are read back and checked against Python's own results;
  * (--msix) the queue's MSI-X vector, aimed at a guest RAM address, lands
    its message there (QEMU's emulated MSI-X table + SET_IRQS eventfd);
  * (--reset) `system_reset` on the HMP monitor resets the device
    (DEV_STATUS, queue registers back to reset values, BARs cleared);
then QEMU is killed with SIGKILL (unless --keep) and the script checks the
server process (--server-pid) is still alive.

Python 3 standard library only. Runs as root on the host; QEMU runs in the
trixie chroot built by scripts/qemu-chroot.sh. Exit 0 and "PASS" on success.
"""

import argparse
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

# --- ABI (abi/src/lib.rs, docs/device-spec.md) ---------------------------
VENDOR_ID = 0x7764
DEVICE_ID = 0x0001
CLASS_CODE = 0x120000
ID_MAGIC = 0x31564457
ABI_VERSION = 1 << 16 | 1
R_ID, R_VERSION, R_CAP_OPS, R_NUM_QUEUES = 0x000, 0x004, 0x008, 0x00C
R_MAX_DEPTH, R_MAX_XFER = 0x010, 0x014
R_DEV_CTRL, R_DEV_STATUS = 0x020, 0x024
R_ERR_STATUS, R_ERR_CODE, R_ERR_OFFSET, R_ERR_COUNT = 0x028, 0x02C, 0x030, 0x034
Q_BASE, Q_STRIDE = 0x1000, 0x40
Q_SQ_BASE, Q_CQ_BASE, Q_IDX_BASE = 0x00, 0x08, 0x10
Q_DEPTH, Q_OPS, Q_CTRL, Q_STATUS = 0x18, 0x1C, 0x20, 0x24
Q_MSIX_VECTOR, Q_IRQ_COALESCE, Q_COMPLETED = 0x28, 0x2C, 0x30
NO_VECTOR = 0xFFFF
MSIX_TABLE_OFFSET = 0x2000
OP_CRC32C, OP_SHA256, OP_ZLIB_COMPRESS = 7, 8, 3
IDX_SQ_TAIL, IDX_CQ_HEAD, IDX_SQ_HEAD, IDX_FLAGS = 0, 4, 8, 12
IDX_FLAG_NO_DOORBELL = 1
CQE_PHASE = 1
DOORBELL_STRIDE = 0x1000

# Guest-physical layout the script uses (q35 with 256 MiB RAM).
BAR0_ADDR = 0xE0000000
BAR2_ADDR = 0xE0100000
RAM = 0x01000000  # 16 MiB: well inside RAM, away from BIOS areas
SQ_ADDR = RAM
CQ_ADDR = RAM + 0x1000
IDX_ADDR = RAM + 0x2000
SRC_ADDR = RAM + 0x10000
DST_SHA = RAM + 0x20000
DST_ZLIB = RAM + 0x30000
MSI_ADDR = RAM + 0x40000  # MSI-X message address: plain guest RAM
MSI_DATA = 0x4D53ABCD
DEPTH = 16


class Fail(Exception):
    pass


# Jobs this script expects the server to count, over all runs.
EXPECT = {"ok": 0, "failed": 0}


def check(cond, what):
    if not cond:
        raise Fail(what)
    print(f"  ok  {what}", flush=True)


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli), reflected, init/xorout 0xffffffff."""
    table = crc32c.table
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


crc32c.table = _crc32c_table()
assert crc32c(b"123456789") == 0xE3069283


class QTest:
    """QEMU's qtest text protocol: one command line, one "OK ..." line back.
    Lines starting with "IRQ" are asynchronous events and are skipped."""

    def __init__(self, conn):
        self.conn = conn
        self.buf = b""
        self.count = 0

    def cmd(self, line, timeout=10.0):
        self.conn.settimeout(timeout)
        self.conn.sendall(line.encode() + b"\n")
        self.count += 1
        while True:
            while b"\n" not in self.buf:
                chunk = self.conn.recv(65536)
                if not chunk:
                    raise Fail(f"qtest connection closed during '{line[:60]}'")
                self.buf += chunk
            resp, self.buf = self.buf.split(b"\n", 1)
            resp = resp.decode()
            if resp.startswith("IRQ"):
                continue
            if not resp.startswith("OK"):
                raise Fail(f"qtest '{line[:60]}' -> {resp}")
            return resp[2:].strip()

    def outl(self, port, v):
        self.cmd(f"outl {port:#x} {v:#x}")

    def outw(self, port, v):
        self.cmd(f"outw {port:#x} {v:#x}")

    def outb(self, port, v):
        self.cmd(f"outb {port:#x} {v:#x}")

    def inl(self, port):
        return int(self.cmd(f"inl {port:#x}"), 16)

    def inw(self, port):
        return int(self.cmd(f"inw {port:#x}"), 16)

    def inb(self, port):
        return int(self.cmd(f"inb {port:#x}"), 16)

    def readl(self, addr):
        return int(self.cmd(f"readl {addr:#x}"), 16)

    def writel(self, addr, v):
        self.cmd(f"writel {addr:#x} {v:#x}")

    def writeq(self, addr, v):
        self.cmd(f"writeq {addr:#x} {v:#x}")

    def read(self, addr, n):
        r = self.cmd(f"read {addr:#x} {n:#x}")
        return bytes.fromhex(r[2:])

    def write(self, addr, data):
        self.cmd(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")


class Pci:
    """Configuration mechanism #1 (0xcf8/0xcfc) on bus 0."""

    def __init__(self, qt, dev=0, fn=0):
        self.qt, self.dev, self.fn = qt, dev, fn

    def _addr(self, off):
        return 0x80000000 | (self.dev << 11) | (self.fn << 8) | (off & 0xFC)

    def read32(self, off):
        self.qt.outl(0xCF8, self._addr(off))
        return self.qt.inl(0xCFC)

    def read16(self, off):
        self.qt.outl(0xCF8, self._addr(off))
        return self.qt.inw(0xCFC + (off & 2))

    def read8(self, off):
        self.qt.outl(0xCF8, self._addr(off))
        return self.qt.inb(0xCFC + (off & 3))

    def write32(self, off, v):
        self.qt.outl(0xCF8, self._addr(off))
        self.qt.outl(0xCFC, v)

    def write16(self, off, v):
        self.qt.outl(0xCF8, self._addr(off))
        self.qt.outw(0xCFC + (off & 2), v)

    def caps(self):
        """{cap id: offset} from the capability list."""
        out = {}
        if not self.read16(0x06) & 0x10:
            return out
        off = self.read8(0x34) & 0xFC
        seen = 0
        while off and seen < 48:
            cid = self.read8(off)
            out.setdefault(cid, off)
            off = self.read8(off + 1) & 0xFC
            seen += 1
        return out


def find_device(qt):
    for dev in range(32):
        p = Pci(qt, dev)
        v = p.read32(0x00)
        if v & 0xFFFF == VENDOR_ID and v >> 16 == DEVICE_ID:
            return p
    raise Fail("no 7764:0001 device on bus 0")


def wait_for(pred, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def qreg(q, r):
    return BAR0_ADDR + Q_BASE + q * Q_STRIDE + r


def enable_function(qt, p):
    """Assign BARs, enable memory + bus master; returns nothing."""
    p.write32(0x10, BAR0_ADDR)
    p.write32(0x18, BAR2_ADDR)
    check(p.read32(0x10) & ~0xF == BAR0_ADDR, f"BAR0 assigned at {BAR0_ADDR:#x}")
    check(p.read32(0x18) & ~0xF == BAR2_ADDR, f"BAR2 assigned at {BAR2_ADDR:#x}")
    p.write16(0x04, p.read16(0x04) | 0x0006)  # MEM | MASTER
    check(p.read16(0x04) & 0x6 == 0x6, "command register: memory + bus master on")


def setup_queue(qt, q, vector=NO_VECTOR):
    """Zero the rings, program queue q, enable it."""
    qt.cmd(f"memset {SQ_ADDR:#x} {0x3000:#x} 0")
    qt.writeq(qreg(q, Q_SQ_BASE), SQ_ADDR)
    qt.writeq(qreg(q, Q_CQ_BASE), CQ_ADDR)
    # The 64-bit index base as two 4-byte writes (low half first), the other
    # access shape the spec allows.
    qt.writel(qreg(q, Q_IDX_BASE), IDX_ADDR & 0xFFFFFFFF)
    qt.writel(qreg(q, Q_IDX_BASE) + 4, IDX_ADDR >> 32)
    qt.writel(qreg(q, Q_DEPTH), DEPTH)
    qt.writel(qreg(q, Q_OPS), qt.readl(BAR0_ADDR + R_CAP_OPS))
    qt.writel(qreg(q, Q_MSIX_VECTOR), vector)
    qt.writel(qreg(q, Q_CTRL), 1)
    st = qt.readl(qreg(q, Q_STATUS))
    if st != 1:
        err = qt.readl(BAR0_ADDR + R_ERR_CODE)
        raise Fail(f"queue {q} did not enable: Q_STATUS {st:#x}, ERR_CODE {err}")
    check(True, f"queue {q} enabled (depth {DEPTH}, vector {vector:#x})")


def sqe(opcode, tag, src, src_len, dst=0, dst_len=0, param=0):
    return struct.pack("<BBHIQQIIQ24x", opcode, 0, 0, tag, src, dst, src_len, dst_len, param)


def run_jobs(qt, q, first_index=0):
    """Submit three jobs with one doorbell; check their completions."""
    data = bytes((i * 7 + (i >> 8) * 13) & 0xFF for i in range(12288)) + b"wdvirt " * 512
    qt.write(SRC_ADDR, data)
    jobs = [
        (OP_CRC32C, 0x100 + first_index, sqe(OP_CRC32C, 0x100 + first_index, SRC_ADDR, len(data))),
        (OP_SHA256, 0x200 + first_index, sqe(OP_SHA256, 0x200 + first_index, SRC_ADDR, len(data), DST_SHA, 32)),
        (
            OP_ZLIB_COMPRESS,
            0x300 + first_index,
            sqe(OP_ZLIB_COMPRESS, 0x300 + first_index, SRC_ADDR, len(data), DST_ZLIB, 0x10000, 6),
        ),
    ]
    for i, (_, _, e) in enumerate(jobs):
        qt.write(SQ_ADDR + ((first_index + i) % DEPTH) * 64, e)
    tail = first_index + len(jobs)
    qt.writel(IDX_ADDR + IDX_SQ_TAIL, tail)
    flags = qt.readl(IDX_ADDR + IDX_FLAGS)
    t0 = time.monotonic()
    if not flags & IDX_FLAG_NO_DOORBELL:
        qt.writel(BAR2_ADDR + q * DOORBELL_STRIDE, 1)  # posted REGION_WRITE
    lap = (first_index // DEPTH) & 1
    phase = CQE_PHASE if lap == 0 else 0

    def cqe(i):
        b = qt.read(CQ_ADDR + ((first_index + i) % DEPTH) * 16, 16)
        tag, status, fl, nbytes, result = struct.unpack("<IHHII", b)
        return (tag, status, fl, nbytes, result) if (fl & CQE_PHASE) == phase else None

    got = {}
    for i in range(len(jobs)):
        c = wait_for(lambda i=i: cqe(i), f"completion {i}")
        got[c[0]] = c
    took = time.monotonic() - t0
    qt.writel(IDX_ADDR + IDX_CQ_HEAD, tail)
    check(len(got) == 3, f"3 completions after one doorbell ({took * 1000:.1f} ms incl. polling)")
    for op, tag, _ in jobs:
        c = got.get(tag)
        if c is None:
            raise Fail(f"no completion with tag {tag:#x}; got {sorted(got)}")
        if c[1] != 0:
            raise Fail(f"job tag {tag:#x} op {op} status {c[1]}")
    want_crc = crc32c(data)
    check(got[jobs[0][1]][4] == want_crc, f"CRC32C result {got[jobs[0][1]][4]:#010x} == {want_crc:#010x}")
    digest = qt.read(DST_SHA, 32)
    check(
        digest == hashlib.sha256(data).digest() and got[jobs[1][1]][3] == 32,
        f"SHA-256 digest in guest RAM matches ({digest.hex()[:16]}...)",
    )
    zlen = got[jobs[2][1]][3]
    comp = qt.read(DST_ZLIB, zlen)
    check(
        0 < zlen < len(data) and zlib.decompress(comp) == data,
        f"zlib-compress output ({len(data)} -> {zlen} bytes) decompresses to the input",
    )
    check(qt.readl(IDX_ADDR + IDX_SQ_HEAD) == tail, f"device sq_head == {tail}")
    EXPECT["ok"] += len(jobs)
    return tail


def bad_address_jobs(qt, q, first_index):
    """Descriptors pointing at memory QEMU mapped without an fd (the BIOS at
    0xfffc0000, read-only) or not at all: completed with BadAddress (3),
    never touched."""
    jobs = [
        sqe(OP_CRC32C, 0x900, 0xFFFC0000, 4096),  # BIOS: DMA_MAP without fd
        sqe(OP_SHA256, 0x901, SRC_ADDR, 64, 0xFFFC0000, 32),  # dst read-only, no fd
        sqe(OP_CRC32C, 0x902, 0x40000000, 4096),  # above RAM: not mapped at all
    ]
    for i, e in enumerate(jobs):
        qt.write(SQ_ADDR + ((first_index + i) % DEPTH) * 64, e)
    tail = first_index + len(jobs)
    qt.writel(IDX_ADDR + IDX_SQ_TAIL, tail)
    if not qt.readl(IDX_ADDR + IDX_FLAGS) & IDX_FLAG_NO_DOORBELL:
        qt.writel(BAR2_ADDR + q * DOORBELL_STRIDE, 1)
    phase = CQE_PHASE if ((first_index // DEPTH) & 1) == 0 else 0
    statuses = {}
    for i in range(len(jobs)):
        def cqe(i=i):
            b = qt.read(CQ_ADDR + ((first_index + i) % DEPTH) * 16, 16)
            tag, status, fl, _, _ = struct.unpack("<IHHII", b)
            return (tag, status) if (fl & CQE_PHASE) == phase else None
        tag, status = wait_for(cqe, f"completion {first_index + i}")
        statuses[tag] = status
    qt.writel(IDX_ADDR + IDX_CQ_HEAD, tail)
    check(
        statuses == {0x900: 3, 0x901: 3, 0x902: 3},
        "jobs on fd-less (BIOS) and unmapped addresses completed BadAddress",
    )
    EXPECT["failed"] += len(jobs)
    return tail


def flr(qt, p):
    """PCIe function-level reset: a config write QEMU forwards verbatim."""
    caps = p.caps()
    check(0x10 in caps, f"PCIe capability at {caps.get(0x10, 0):#x}")
    cap = caps[0x10]
    check(p.read32(cap + 4) & (1 << 28), "DEVCAP advertises FLR")
    p.write16(cap + 8, p.read16(cap + 8) | 0x8000)
    check(qt.readl(BAR0_ADDR + R_DEV_STATUS) == 0, "FLR: DEV_STATUS back to 0")
    check(qt.readl(qreg(0, Q_STATUS)) == 0, "FLR: queue 0 disabled")


def setup_msix(qt, p, vector=0):
    caps = p.caps()
    check(0x11 in caps, f"MSI-X capability at {caps.get(0x11, 0):#x}")
    cap = caps[0x11]
    ctrl = p.read16(cap + 2)
    table = p.read32(cap + 4)
    check(
        (table & 7) == 0 and (table & ~7) == MSIX_TABLE_OFFSET,
        f"MSI-X table in BAR0 at {MSIX_TABLE_OFFSET:#x}, {(ctrl & 0x7FF) + 1} vectors",
    )
    p.write16(cap + 2, ctrl | 0x8000)  # enable
    ent = BAR0_ADDR + MSIX_TABLE_OFFSET + vector * 16
    qt.writel(ent + 0, MSI_ADDR & 0xFFFFFFFF)
    qt.writel(ent + 4, MSI_ADDR >> 32)
    qt.writel(ent + 8, MSI_DATA)
    qt.writel(ent + 12, 0)  # unmask: QEMU now sends SET_IRQS with the vector's eventfd
    qt.writel(MSI_ADDR, 0)


def hmp(sock_path, command):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sock_path)
    buf = b""
    while b"(qemu)" not in buf:
        buf += s.recv(4096)
    s.sendall(command.encode() + b"\n")
    buf = b""
    while buf.count(b"(qemu)") < 1:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    s.close()
    return buf.decode(errors="replace")


def run_qemu(args, tag):
    d = args.chroot
    run_dir = os.path.join(d, "run")
    os.makedirs(run_dir, exist_ok=True)
    qsock = f"/run/qtest-{tag}.sock"
    msock = f"/run/mon-{tag}.sock"
    pidf = f"/run/qemu-{tag}.pid"
    for f in (qsock, msock, pidf):
        try:
            os.unlink(d + f)
        except FileNotFoundError:
            pass
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(d + qsock)
    listener.listen(1)
    dev = '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"%s"}}' % args.socket
    cmd = [
        "bash", os.path.join(HERE, "qemu-chroot.sh"), "run", "--",
        "qemu-system-x86_64", "-accel", "qtest", "-qtest", f"unix:{qsock}",
        "-machine", "q35,memory-backend=mem",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
        "-device", dev,
        "-nodefaults", "-nographic", "-display", "none", "-serial", "none",
        "-monitor", f"unix:{msock},server=on,wait=off",
        "-pidfile", pidf,
    ]
    log_path = os.path.join(args.logdir, f"qemu-{tag}.log")
    log = open(log_path, "w")
    print(f"[{tag}] starting QEMU: {' '.join(cmd[4:])}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, listener, t0, d + pidf, d + msock, log_path


def connect_qtest(proc, listener, t0, tag, log_path):
    listener.settimeout(30)
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        raise Fail(f"QEMU did not connect to the qtest socket; see {log_path}")
    finally:
        listener.close()
    t_conn = time.monotonic() - t0
    qt = QTest(conn)
    # qtest commands are answered by QEMU's main loop, i.e. after machine
    # init, which includes the device's realize and the first reset.
    check(qt.cmd("endianness", timeout=30) == "little", "qtest answers")
    t_ready = time.monotonic() - t0
    print(
        f"[{tag}] qtest connected {t_conn * 1000:.0f} ms, main loop answering "
        f"{t_ready * 1000:.0f} ms after QEMU start",
        flush=True,
    )
    return qt


def qemu_errors(log_path):
    with open(log_path) as f:
        text = f.read()
    return [l for l in text.splitlines() if "vfio" in l.lower() or "error" in l.lower()]


def one_run(args, tag, full):
    proc, listener, t0, pidf, msock, log_path = run_qemu(args, tag)
    try:
        qt = connect_qtest(proc, listener, t0, tag, log_path)
        errs = qemu_errors(log_path)
        check(proc.poll() is None and not errs, f"QEMU realized vfio-user-pci without errors {errs or ''}")
        p = find_device(qt)
        check(True, f"device 7764:0001 at 00:{p.dev:02x}.0")
        cls = p.read32(0x08)
        check(cls >> 8 == CLASS_CODE, f"class {cls >> 8:#08x}, revision {cls & 0xFF:#x}")
        enable_function(qt, p)
        t = time.monotonic()
        ident = qt.readl(BAR0_ADDR + R_ID)
        check(ident == ID_MAGIC, f"BAR0 ID = {ident:#010x} ({(time.monotonic() - t) * 1e6:.0f} us round trip)")
        check(qt.readl(BAR0_ADDR + R_VERSION) == ABI_VERSION, "BAR0 VERSION = 1.1")
        nq = qt.readl(BAR0_ADDR + R_NUM_QUEUES)
        check(nq >= 1, f"NUM_QUEUES = {nq}, MAX_DEPTH = {qt.readl(BAR0_ADDR + R_MAX_DEPTH)}")
        # Nothing left over from an earlier VMM (killed with its queue on).
        check(
            qt.readl(BAR0_ADDR + R_DEV_STATUS) == 0 and qt.readl(qreg(0, Q_STATUS)) == 0,
            "fresh state: device and queue 0 disabled",
        )
        check(qt.readl(BAR0_ADDR + 0x3000) == 0, "MSI-X PBA (read through QEMU) = 0")
        qt.writel(BAR0_ADDR + R_DEV_CTRL, 1)
        check(qt.readl(BAR0_ADDR + R_DEV_STATUS) & 1, "device enabled (DEV_STATUS)")
        vector = NO_VECTOR
        if full and args.msix:
            setup_msix(qt, p)
            vector = 0
        setup_queue(qt, 0, vector)
        tail = run_jobs(qt, 0)
        check(qt.readl(qreg(0, Q_COMPLETED)) == 3, "Q_COMPLETED = 3")
        if vector != NO_VECTOR:
            got = wait_for(lambda: qt.readl(MSI_ADDR) == MSI_DATA, "the MSI-X message in guest RAM", 5)
            check(got, f"MSI-X vector 0 wrote {MSI_DATA:#x} to {MSI_ADDR:#x} (eventfd -> QEMU -> guest RAM)")
        check(qt.cmd(f"readq {qreg(0, Q_SQ_BASE):#x}") == f"{SQ_ADDR:#018x}", "8-byte read of Q_SQ_BASE")
        if vector != NO_VECTOR:
            # Guest masks the vector: without KVM QEMU sends nothing and
            # latches the interrupt itself; unmasking delivers it.
            ent = BAR0_ADDR + MSIX_TABLE_OFFSET + vector * 16
            qt.writel(ent + 12, 1)
            qt.writel(MSI_ADDR, 0)
            tail = run_jobs(qt, 0, tail)
            time.sleep(0.05)
            check(qt.readl(MSI_ADDR) == 0, "masked MSI-X vector: no message while masked")
            # Informational: QEMU latches the pending bit itself but forwards
            # PBA reads to the server (vfio_user_pba_read).
            pba = qt.readl(BAR0_ADDR + 0x3000)
            print(f"  info PBA read while vector {vector} masked and pending: {pba:#x}", flush=True)
            qt.writel(ent + 12, 0)
            wait_for(lambda: qt.readl(MSI_ADDR) == MSI_DATA, "the pending MSI-X message after unmask", 5)
            check(True, "unmasking delivered the pending message")
        # Another batch, to show the ring keeps going past one doorbell.
        tail = run_jobs(qt, 0, tail)
        tail = bad_address_jobs(qt, 0, tail)
        # A refused register access: latched, the bus access itself succeeds.
        qt.writel(BAR0_ADDR + R_ID, 0)
        check(qt.readl(BAR0_ADDR + R_ERR_CODE) == 4, "write to read-only ID latched ERR_CODE ReadOnly")
        qt.writel(BAR0_ADDR + R_ERR_STATUS, 1)
        check(qt.readl(BAR0_ADDR + R_ERR_STATUS) == 0, "ERR_STATUS cleared by W1C")
        if full:
            flr(qt, p)
            # Linux restores config space after an FLR; here only the
            # command register matters (QEMU keeps BARs and its own copy).
            p.write16(0x04, p.read16(0x04) | 0x0006)
            qt.writel(BAR0_ADDR + R_DEV_CTRL, 1)
            setup_queue(qt, 0)
            run_jobs(qt, 0)
        if full and args.reset:
            out = hmp(msock, "system_reset")
            # QEMU's reset zeroes the BARs in config space (vfio_user_pci_reset).
            wait_for(lambda: p.read32(0x10) & ~0xF == 0, "BAR0 cleared by system_reset")
            check(True, "system_reset: BAR0 cleared " + ("" if "rror" not in out else out))
            check(p.read16(0x04) & 0x6 == 0, "system_reset: memory + bus master off")
            enable_function(qt, p)
            check(qt.readl(BAR0_ADDR + R_ID) == ID_MAGIC, "ID readable after reset")
            check(qt.readl(BAR0_ADDR + R_DEV_STATUS) == 0, "DEV_STATUS back to 0 after reset")
            check(qt.readl(qreg(0, Q_STATUS)) == 0, "queue 0 disabled after reset")
            check(qt.readl(qreg(0, Q_MSIX_VECTOR)) == NO_VECTOR, "queue 0 vector back to 0xffff")
            qt.writel(BAR0_ADDR + R_DEV_CTRL, 1)
            setup_queue(qt, 0)
            run_jobs(qt, 0)
        errs = qemu_errors(log_path)
        check(not errs, f"QEMU printed no vfio-user errors {errs or ''}")
        print(f"[{tag}] {qt.count} qtest commands", flush=True)
    finally:
        # Kill QEMU itself (the first run with SIGKILL, as abrupt as a crash;
        # later runs with SIGTERM, a normal shutdown); its mounts live in its
        # own mount namespace and go with it.
        sig = signal.SIGKILL if full else signal.SIGTERM
        try:
            with open(pidf) as f:
                qpid = int(f.read().strip())
            os.kill(qpid, sig)
            print(f"[{tag}] sent {sig.name} to QEMU (pid {qpid})", flush=True)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            proc.kill()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        for f in (pidf, msock, pidf.replace("/qemu-", "/qtest-").replace(".pid", ".sock")):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
    if args.server_pid:
        time.sleep(0.3)
        try:
            os.kill(args.server_pid, 0)
        except ProcessLookupError:
            raise Fail(f"wdvirt (pid {args.server_pid}) died when QEMU was killed")
        check(True, f"wdvirt (pid {args.server_pid}) still running after QEMU was killed")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chroot", default=os.environ.get("WDVIRT_CHROOT", "/var/tmp/wdvirt-trixie"))
    ap.add_argument("--socket", default="/run/wd0.sock", help="vfio-user socket path inside the chroot")
    ap.add_argument("--runs", type=int, default=2, help="QEMU processes to run one after the other")
    ap.add_argument("--server-pid", type=int, default=0, help="check this process survives each QEMU")
    ap.add_argument("--logdir", default="/tmp")
    ap.add_argument("--no-msix", dest="msix", action="store_false")
    ap.add_argument("--no-reset", dest="reset", action="store_false")
    args = ap.parse_args()
    if not os.path.exists(args.chroot + args.socket):
        print(f"FAIL: no socket at {args.chroot + args.socket} (start wdvirt serve first)")
        return 1
    t0 = time.monotonic()
    try:
        for i in range(args.runs):
            print(f"== QEMU run {i + 1}/{args.runs}", flush=True)
            one_run(args, f"q{i + 1}", full=(i == 0))
    except Fail as e:
        print(f"FAIL: {e}", flush=True)
        return 1
    print(f"expect: {EXPECT['ok']} jobs ok, {EXPECT['failed']} failed", flush=True)
    print(f"PASS ({args.runs} QEMU runs, {time.monotonic() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
