#!/usr/bin/env python3
"""Writes the recorded sysfs trees under tests/sysfs/ (run from anywhere:
`python3 tests/sysfs/make-trees.py`). The trees are committed; this script
says where every value comes from, so that they can be checked and rebuilt.

Layouts and attribute formats follow the kernel's documented ABI:
  * NUMA nodes: Documentation/ABI/stable/sysfs-devices-node (cpulist,
    distance = one SLIT row over the online nodes in id order, meminfo lines
    "Node N MemTotal: X kB"), has_generic_initiator (ACPI 6.3 GI nodes).
  * PCI functions: Documentation/ABI/testing/sysfs-bus-pci (vendor, device,
    class as 0x-hex, numa_node, local_cpulist, iommu_group link to
    kernel/iommu_groups/N, config = the 4 KiB config space with its extended
    capability list: AER -> ATS -> PASID (ID 001Bh, Max PASID Width in bits
    12:8 of its capability register) -> PRI).
  * UACCE: Documentation/ABI/testing/sysfs-driver-uacce (api, flags,
    available_instances, algorithms one per line, region_mmio_size,
    region_dus_size, isolate, isolate_strategy); /sys/class/uacce/NAME links
    to the device under its PCI parent, named "%s-%d" after the PCI driver
    (drivers/misc/uacce/uacce.c: hisi_zip, hisi_sec2, hisi_hpre). Values as
    drivers/crypto/hisilicon/qm.c computes them for a QM v2 (Kunpeng 920):
    api "hisi_qm_v2", flags 1 (UACCE_DEV_SVA), mmio 2 pages (doorbell page +
    QM_DOORBELL_SQ_CQ_BASE_V2 / PAGE_SIZE), dus = (PAGE_SIZE - 1 +
    sqe_size 128 * QM_Q_DEPTH 1024 + 16 * 1024 + PAGE_SIZE) >> PAGE_SHIFT
    pages of 4 KiB; algorithms from zip_dev_algs / sec_dev_algs /
    hpre_dev_algs.
  * IDXD: Documentation/ABI/stable/sysfs-driver-dma-idxd (dsaN/iaxN with
    state, op_cap in the 6.1+ "%*pb" format, max_engines, max_work_queues,
    pasid_enabled, version, numa_node; wqN.M with type, mode, state, size,
    group_id, priority, name); /sys/bus/dsa/devices/* link into the device
    tree under the PCI function. op_cap bits are the DSA 1.0 and IAA 1.0
    opcode tables (DSA spec 5.x; IAA spec 8.x).
Chosen (not from a real machine): CPU counts, memory sizes, PCI bus
numbers, IOMMU group numbers, queue counts in use, class codes.
"""

import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode) as f:
        f.write(text)


def link(root, rel, target_rel):
    """A symlink at rel pointing at target_rel (both relative to root),
    written relative, as sysfs's own links are."""
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    target = os.path.relpath(os.path.join(root, target_rel), os.path.dirname(path))
    os.symlink(target, path)


def cpulist(cpus):
    if not cpus:
        return "\n"
    out, start, prev = [], cpus[0], cpus[0]
    for c in cpus[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(out) + "\n"


def numa(root, nodes, slit, generic_initiators=()):
    """nodes: [(id, cpus, mem_kib)]"""
    base = "devices/system/node"
    ids = [n[0] for n in nodes]
    write(root, f"{base}/online", cpulist(ids))
    write(root, f"{base}/possible", cpulist(ids))
    write(root, f"{base}/has_cpu", cpulist([n[0] for n in nodes if n[1]]))
    write(root, f"{base}/has_memory", cpulist([n[0] for n in nodes if n[2]]))
    write(root, f"{base}/has_generic_initiator", cpulist(list(generic_initiators)))
    all_cpus = []
    for (nid, cpus, mem) in nodes:
        d = f"{base}/node{nid}"
        write(root, f"{d}/cpulist", cpulist(cpus))
        write(root, f"{d}/distance", " ".join(str(x) for x in slit[nid]) + "\n")
        write(
            root,
            f"{d}/meminfo",
            f"Node {nid} MemTotal:       {mem} kB\n"
            f"Node {nid} MemFree:        {mem * 9 // 10} kB\n"
            f"Node {nid} MemUsed:        {mem - mem * 9 // 10} kB\n",
        )
        all_cpus += cpus
    all_cpus.sort()
    write(root, "devices/system/cpu/online", cpulist(all_cpus))
    write(root, "devices/system/cpu/possible", cpulist(all_cpus))


def config_space(vendor, device, class_code, pasid_reg):
    c = bytearray(4096)
    struct.pack_into("<HHHH", c, 0, vendor, device, 0x0006, 0x0010)
    c[8] = 0x21  # revision
    c[9:12] = bytes([class_code & 0xFF, (class_code >> 8) & 0xFF, class_code >> 16])
    c[0x34] = 0x40
    struct.pack_into("<BBH", c, 0x40, 0x10, 0x00, 0x0002)  # PCIe capability, v2

    def ext(at, cap_id, nxt, reg=0):
        struct.pack_into("<IH", c, at, cap_id | 1 << 16 | nxt << 20, reg)

    ext(0x100, 0x0001, 0x150)  # AER
    if pasid_reg is None:
        ext(0x150, 0x000F, 0x170)  # ATS, no PASID
    else:
        ext(0x150, 0x000F, 0x160)  # ATS
        ext(0x160, 0x001B, 0x170, pasid_reg)  # PASID
    ext(0x170, 0x0013, 0x000)  # PRI
    return bytes(c)


def pci(root, bridge, addr, vendor, device, class_code, node, local_cpus, group, pasid_reg=0x1400):
    """A PCI function below root port `bridge` of host bridge pciDDDD:BB."""
    host = "pci" + bridge[:7]
    dev = f"devices/{host}/{bridge}/{addr}"
    write(root, f"{dev}/vendor", f"0x{vendor:04x}\n")
    write(root, f"{dev}/device", f"0x{device:04x}\n")
    write(root, f"{dev}/class", f"0x{class_code:06x}\n")
    write(root, f"{dev}/numa_node", f"{node}\n")
    write(root, f"{dev}/local_cpulist", cpulist(local_cpus))
    write(root, f"{dev}/config", config_space(vendor, device, class_code, pasid_reg))
    os.makedirs(os.path.join(root, f"kernel/iommu_groups/{group}/devices"), exist_ok=True)
    link(root, f"{dev}/iommu_group", f"kernel/iommu_groups/{group}")
    link(root, f"kernel/iommu_groups/{group}/devices/{addr}", dev)
    link(root, f"bus/pci/devices/{addr}", dev)
    # The root port itself is a PCI function too (a bridge, no PASID).
    rp = f"devices/{host}/{bridge}"
    if not os.path.exists(os.path.join(root, rp, "vendor")):
        write(root, f"{rp}/vendor", f"0x{vendor:04x}\n")
        write(root, f"{rp}/device", "0xa120\n")
        write(root, f"{rp}/class", "0x060400\n")
        write(root, f"{rp}/numa_node", f"{node}\n")
        write(root, f"{rp}/local_cpulist", cpulist(local_cpus))
        write(root, f"{rp}/config", config_space(vendor, 0xA120, 0x060400, None))
        link(root, f"bus/pci/devices/{bridge}", rp)
    return dev


HISI = 0x19E5
ZIP_ALGS = "zlib\ngzip\ndeflate\nlz77_zstd\n"
SEC_ALGS = "cipher\ndigest\naead\n"
HPRE_ALGS = "rsa\ndh\necdh\nx25519\nx448\necdsa\nsm2\n"
PAGE = 4096
QM_V2_MMIO = (1 + 0x1000 // PAGE) * PAGE
QM_DUS = ((PAGE - 1 + 128 * 1024 + 16 * 1024 + PAGE) // PAGE) * PAGE


def uacce(root, pci_dev, name, algs, available, isolate=0):
    d = f"{pci_dev}/uacce/{name}"
    write(root, f"{d}/api", "hisi_qm_v2\n")
    write(root, f"{d}/flags", "1\n")
    write(root, f"{d}/available_instances", f"{available}\n")
    write(root, f"{d}/algorithms", algs)
    write(root, f"{d}/region_mmio_size", f"{QM_V2_MMIO}\n")
    write(root, f"{d}/region_dus_size", f"{QM_DUS}\n")
    write(root, f"{d}/isolate", f"{isolate}\n")
    write(root, f"{d}/isolate_strategy", "0\n")
    write(root, f"{d}/dev", "239:0\n")
    link(root, f"{d}/device", pci_dev)
    link(root, f"class/uacce/{name}", d)


def kunpeng(root):
    """Two sockets, four nodes (two dies each), the Kunpeng 920 SLIT. Each
    socket's IO die has a ZIP, a SEC and an HPRE; the ZIPs report the first
    die of their socket, the SECs the second: ZIP and SEC on different
    nodes."""
    cpus = [list(range(i * 24, i * 24 + 24)) for i in range(4)]
    slit = [[10, 12, 20, 22], [12, 10, 22, 24], [20, 22, 10, 12], [22, 24, 12, 10]]
    numa(root, [(i, cpus[i], 64 * 1024 * 1024) for i in range(4)], slit)
    zip0 = pci(root, "0000:74:00.0", "0000:75:00.0", HISI, 0xA250, 0x120000, 0, cpus[0], 31)
    sec2 = pci(root, "0000:74:02.0", "0000:76:00.0", HISI, 0xA255, 0x100000, 1, cpus[1], 32)
    hpre4 = pci(root, "0000:78:00.0", "0000:79:00.0", HISI, 0xA258, 0x100000, 0, cpus[0], 33)
    zip1 = pci(root, "0000:b4:00.0", "0000:b5:00.0", HISI, 0xA250, 0x120000, 2, cpus[2], 41)
    sec3 = pci(root, "0000:b4:02.0", "0000:b6:00.0", HISI, 0xA255, 0x100000, 3, cpus[3], 42)
    hpre5 = pci(root, "0000:b8:00.0", "0000:b9:00.0", HISI, 0xA258, 0x100000, 2, cpus[2], 43)
    uacce(root, zip0, "hisi_zip-0", ZIP_ALGS, 64)
    uacce(root, zip1, "hisi_zip-1", ZIP_ALGS, 40)  # 24 queues used by others
    uacce(root, sec2, "hisi_sec2-2", SEC_ALGS, 256)
    uacce(root, sec3, "hisi_sec2-3", SEC_ALGS, 256)
    uacce(root, hpre4, "hisi_hpre-4", HPRE_ALGS, 64)
    uacce(root, hpre5, "hisi_hpre-5", HPRE_ALGS, 64)


INTEL = 0x8086
DSA_OPCAP = "00000000,00000000,00000000,00000000,00000000,00000000,00000001,003f03ff"
IAA_OPCAP = "00000000,00000000,00000000,00000000,00000000,007f331c,00000000,00000005"


def idxd(root, pci_dev, name, op_cap, engines, wqs):
    """wqs: [(n, type, mode, state, size)]"""
    dev_id = name[3:]
    d = f"{pci_dev}/{name}"
    write(root, f"{d}/state", "enabled\n")
    write(root, f"{d}/op_cap", op_cap + "\n")
    write(root, f"{d}/version", "0x100\n")
    write(root, f"{d}/max_engines", f"{engines}\n")
    write(root, f"{d}/max_work_queues", "8\n")
    write(root, f"{d}/max_groups", "4\n")
    write(root, f"{d}/max_work_queues_size", "128\n")
    write(root, f"{d}/pasid_enabled", "1\n")
    write(root, f"{d}/configurable", "1\n")
    with open(os.path.join(root, pci_dev, "numa_node")) as f:
        write(root, f"{d}/numa_node", f.read())
    link(root, f"bus/dsa/devices/{name}", d)
    for e in range(engines):
        write(root, f"{d}/engine{dev_id}.{e}/group_id", "0\n")
        link(root, f"bus/dsa/devices/engine{dev_id}.{e}", f"{d}/engine{dev_id}.{e}")
    for (n, kind, mode, state, size) in wqs:
        w = f"{d}/wq{dev_id}.{n}"
        write(root, f"{w}/type", kind + "\n")
        write(root, f"{w}/mode", mode + "\n")
        write(root, f"{w}/state", state + "\n")
        write(root, f"{w}/size", f"{size}\n")
        write(root, f"{w}/group_id", "0\n")
        write(root, f"{w}/priority", "10\n")
        write(root, f"{w}/name", f"app{dev_id}{n}\n" if kind == "user" else "dmaengine\n")
        link(root, f"bus/dsa/devices/wq{dev_id}.{n}", w)


def sapphire_rapids(root):
    """Two sockets, one node each; a DSA and an IAA per socket. dsa2 has a
    kernel work queue (not for instances) besides its user one."""
    cpus = [list(range(0, 56)), list(range(56, 112))]
    numa(root, [(0, cpus[0], 256 * 1024 * 1024), (1, cpus[1], 256 * 1024 * 1024)], [[10, 21], [21, 10]])
    dsa0 = pci(root, "0000:6a:00.0", "0000:6a:01.0", INTEL, 0x0B25, 0x088000, 0, cpus[0], 11, 0x1404)
    iax1 = pci(root, "0000:6a:00.0", "0000:6a:02.0", INTEL, 0x0CFE, 0x088000, 0, cpus[0], 12, 0x1404)
    dsa2 = pci(root, "0000:e7:00.0", "0000:e7:01.0", INTEL, 0x0B25, 0x088000, 1, cpus[1], 21, 0x1404)
    iax3 = pci(root, "0000:e7:00.0", "0000:e7:02.0", INTEL, 0x0CFE, 0x088000, 1, cpus[1], 22, 0x1404)
    idxd(root, dsa0, "dsa0", DSA_OPCAP, 4, [(0, "user", "dedicated", "enabled", 16), (1, "user", "shared", "enabled", 32)])
    idxd(root, iax1, "iax1", IAA_OPCAP, 8, [(0, "user", "shared", "enabled", 128)])
    idxd(root, dsa2, "dsa2", DSA_OPCAP, 4, [(0, "kernel", "dedicated", "enabled", 32), (1, "user", "dedicated", "enabled", 16), (2, "user", "dedicated", "disabled", 16)])
    idxd(root, iax3, "iax3", IAA_OPCAP, 8, [(0, "user", "shared", "enabled", 128)])


def hbm_shared(root):
    """Alan Cox's example: two CPU packages (nodes 0, 1), an HBM node (2)
    with memory and no CPU, far from both packages, and two accelerators
    that are generic initiators (nodes 3, 4; ACPI 6.3 GI affinity), each
    close to one package and both close to the HBM. Two more accelerators
    sit plainly on the packages' nodes."""
    cpus = [list(range(0, 32)), list(range(32, 64))]
    slit = [
        [10, 21, 31, 12, 24],
        [21, 10, 31, 24, 12],
        [31, 31, 10, 13, 13],
        [12, 24, 13, 10, 20],
        [24, 12, 13, 20, 10],
    ]
    numa(
        root,
        [(0, cpus[0], 128 * 1024 * 1024), (1, cpus[1], 128 * 1024 * 1024),
         (2, [], 64 * 1024 * 1024), (3, [], 0), (4, [], 0)],
        slit,
        generic_initiators=(3, 4),
    )
    zip0 = pci(root, "0000:30:00.0", "0000:31:00.0", HISI, 0xA250, 0x120000, 3, [], 5)
    sec1 = pci(root, "0000:40:00.0", "0000:41:00.0", HISI, 0xA255, 0x100000, 4, [], 6)
    zip2 = pci(root, "0000:74:00.0", "0000:75:00.0", HISI, 0xA250, 0x120000, 0, cpus[0], 7)
    sec3 = pci(root, "0000:b4:00.0", "0000:b5:00.0", HISI, 0xA255, 0x100000, 1, cpus[1], 8)
    uacce(root, zip0, "hisi_zip-0", ZIP_ALGS, 64)
    uacce(root, sec1, "hisi_sec2-1", SEC_ALGS, 256)
    uacce(root, zip2, "hisi_zip-2", ZIP_ALGS, 64)
    uacce(root, sec3, "hisi_sec2-3", SEC_ALGS, 256)


TREES = {
    "kunpeng920-2s": kunpeng,
    "spr-dsa-iaa": sapphire_rapids,
    "hbm-shared": hbm_shared,
}

if __name__ == "__main__":
    for name, build in TREES.items():
        root = os.path.join(HERE, name)
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        build(root)
        print("wrote", os.path.relpath(root))
