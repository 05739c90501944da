#!/usr/bin/env bash
# Builds (idempotently) what a wdvirt test guest boots from: the trixie
# kernel and an initramfs holding a static busybox, the static wdvirt-guest
# tool and guest/initramfs/init. Builds the trixie chroot first if needed
# (scripts/qemu-chroot.sh); repacks the initramfs only when the tool, the
# init, busybox or the kernel changed.
#
#   bash scripts/guest-image.sh          build, then print the image directory
#   bash scripts/guest-image.sh --help   this text
#
# Output, inside the chroot so that QEMU there can read it:
#   $WDVIRT_CHROOT/var/lib/wdvirt-guest/{vmlinuz,initrd.cpio}
# Needs root. Boot it with scripts/guest-boot.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${WDVIRT_CHROOT:-/var/tmp/wdvirt-trixie}
export WDVIRT_CHROOT=$DIR
IMG_IN=/var/lib/wdvirt-guest # as QEMU sees it, inside the chroot
IMG=$DIR$IMG_IN
TARGET=x86_64-unknown-linux-gnu

log() { echo "guest-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "${1:-}" in
  "") ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "guest-image: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root (chroot)"

t0=$(date +%s)
bash scripts/qemu-chroot.sh build

# The tool, static: no libc in the initramfs. relocation-model=static makes
# it a plain static executable rather than a static-pie (DESIGN.md).
log "cargo build -p wdvirt-guest --release --target $TARGET (static)"
# (RUSTFLAGS, if set, would override the per-target flags: drop it.)
env -u RUSTFLAGS \
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static -C strip=symbols' \
  cargo build -q -p wdvirt-guest --release --target "$TARGET" --locked
TOOL=target/$TARGET/release/wdvirt-guest
# A dynamic executable would fail in the guest with a bare "not found": it
# must be an ELF file with no program interpreter (no PT_INTERP header).
python3 - "$TOOL" <<'PY' || die "$TOOL is not a static executable"
import struct, sys
d = open(sys.argv[1], "rb").read()
assert d[:4] == b"\x7fELF" and d[4] == 2, "not a 64-bit ELF file"
phoff, = struct.unpack_from("<Q", d, 0x20)
phentsize, phnum = struct.unpack_from("<HH", d, 0x36)
types = [struct.unpack_from("<I", d, phoff + i * phentsize)[0] for i in range(phnum)]
assert 3 not in types, "it has a program interpreter (dynamically linked)"
PY

kernel=$(ls "$DIR"/boot/vmlinuz-* 2>/dev/null | sort -V | tail -n1 || true)
[ -n "$kernel" ] || die "no kernel in $DIR/boot (scripts/qemu-chroot.sh build installs linux-image-amd64)"

mkdir -p "$IMG"
# What the initramfs is made of; repack only when this changes.
inputs=$(sha256sum "$TOOL" guest/initramfs/init "$DIR/usr/bin/busybox" | awk '{print $1}' | sha256sum | cut -c1-16)
if [ -s "$IMG/initrd.cpio" ] && [ "$(cat "$IMG/initrd.inputs" 2>/dev/null)" = "$inputs" ] &&
  cmp -s "$kernel" "$IMG/vmlinuz"; then
  log "initramfs up to date ($inputs)"
else
  stage=$IMG/stage
  rm -rf "$stage"
  mkdir -p "$stage"/{bin,proc,sys,dev,tmp}
  cp "$DIR/usr/bin/busybox" "$stage/bin/busybox"
  cp "$TOOL" "$stage/bin/wdvirt-guest"
  install -m 0755 guest/initramfs/init "$stage/init"
  # newc cpio, uncompressed: the kernel unpacks it fastest, and it is small.
  chroot "$DIR" /bin/sh -c "cd $IMG_IN/stage && find . | LC_ALL=C sort | cpio -o -H newc --quiet" >"$IMG/initrd.cpio.tmp"
  mv "$IMG/initrd.cpio.tmp" "$IMG/initrd.cpio"
  cp "$kernel" "$IMG/vmlinuz"
  echo "$inputs" >"$IMG/initrd.inputs"
  rm -rf "$stage"
  log "packed $IMG/initrd.cpio ($(($(stat -c %s "$IMG/initrd.cpio") / 1024)) KiB) with ${kernel##*/}"
fi
log "ready in $(($(date +%s) - t0)) s"
echo "$IMG"
