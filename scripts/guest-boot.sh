#!/usr/bin/env bash
# Boots a Linux guest (trixie kernel + busybox initramfs with the wdvirt-guest
# tool) under QEMU 11.1 with one wdvirt device per --socket, and shows the
# guest's serial console. The guest runs one job list and powers off.
#
#   bash scripts/guest-boot.sh [OPTIONS] [KEY=VALUE ...]
#
# Try it by hand against a running instance:
#   bash scripts/guest-image.sh                  # once: chroot, QEMU, kernel, initramfs
#   DIR=$(bash scripts/qemu-chroot.sh path)      # /var/tmp/wdvirt-trixie
#   cargo run --release -- serve --socket $DIR/run/wdvirt/wd0.sock &
#   bash scripts/guest-boot.sh mode=run jobs=gzip,sha256,crc32c size=4M
#
# Options:
#   --socket PATH   the instance's vfio-user socket; it must lie inside the
#                   chroot's tree (QEMU runs there). Default
#                   $DIR/run/wdvirt/wd0.sock. Waits up to --wait SECS
#                   (default 60) for it to appear.
#   --mem MIB       guest RAM (default 256)
#   --timeout SECS  kill QEMU after this long (default 300)
#   --log FILE      also write the console to FILE
#   --append ARGS   more kernel parameters (e.g. loglevel=7 for kernel warnings)
#   --no-build      do not run scripts/guest-image.sh first
# KEY=VALUE words become wdvirt.KEY=VALUE on the kernel command line, read by
# the tool in the guest: mode=probe|run|garbage (default probe), jobs=LIST,
# size=BYTES, seed=N, level=L, count=N, widths=1,2,4, queue=Q, depth=D,
# hugepages=N (default 8), timeout=SECS, shell=1 (a busybox shell after the
# tool, before power-off; needs a terminal).
#
# Exit status: the tool's (0 when its WDVIRT-RESULT says ok), 124 on timeout,
# QEMU's own when the guest never reported. Needs root.
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."
# A path given on the command line, as the caller meant it.
from_caller() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER_PWD/$1" ;; esac; }

DIR=${WDVIRT_CHROOT:-/var/tmp/wdvirt-trixie}
export WDVIRT_CHROOT=$DIR
IMG_IN=/var/lib/wdvirt-guest

die() { echo "guest-boot: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

sockets=()
mem=256
timeout=300
wait_secs=60
logfile=""
extra=""
build=1
params=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --socket) [ $# -ge 2 ] || die "--socket needs a path"; sockets+=("$(from_caller "$2")"); shift 2 ;;
    --mem) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--mem needs a number of MiB"; mem=$2; shift 2 ;;
    --timeout) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--timeout needs a number of seconds"; timeout=$2; shift 2 ;;
    --wait) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--wait needs a number of seconds"; wait_secs=$2; shift 2 ;;
    --log) [ $# -ge 2 ] || die "--log needs a file"; logfile=$(from_caller "$2"); shift 2 ;;
    --append) [ $# -ge 2 ] || die "--append needs kernel parameters"; extra="$extra $2"; shift 2 ;;
    --no-build) build=0; shift ;;
    *=*)
      [[ $1 =~ ^[a-z]+=[^[:space:]]+$ ]] || die "bad parameter '$1' (KEY=VALUE, no spaces)"
      params+=("wdvirt.$1")
      shift
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "must run as root (chroot, mount namespace)"
[ ${#sockets[@]} -gt 0 ] || sockets=("$DIR/run/wdvirt/wd0.sock")

hugepages=8
for p in "${params[@]}"; do
  case "$p" in wdvirt.hugepages=*) hugepages=${p#*=} ;; esac
done
[[ $hugepages =~ ^[0-9]+$ ]] || die "hugepages=$hugepages is not a number"
[ $((hugepages * 2 + 64)) -le "$mem" ] || die "hugepages=$hugepages (2 MiB each) does not fit in --mem $mem with 64 MiB to spare"

if [ "$build" = 1 ]; then
  bash scripts/guest-image.sh >/dev/null
fi
[ -s "$DIR$IMG_IN/initrd.cpio" ] || die "no guest image in $DIR$IMG_IN; run: bash scripts/guest-image.sh"

devices=()
root=$(realpath "$DIR")
for s in "${sockets[@]}"; do
  abs=$(realpath -m "$s")
  case "$abs" in
    "$root"/*) ;;
    *) die "socket $s is outside the chroot $root: QEMU runs inside it and cannot reach it. Serve the instance at $root/run/wdvirt/NAME.sock" ;;
  esac
  for ((i = 0; i < wait_secs * 10; i++)); do
    [ -S "$abs" ] && break
    [ "$i" = 10 ] && echo "guest-boot: waiting up to $wait_secs s for $abs" >&2
    sleep 0.1
  done
  [ -S "$abs" ] || die "no socket at $abs: start the instance first (wdvirt serve --socket $abs)"
  devices+=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"${abs#"$root"}\"}}")
done

# loglevel=1: kernel warnings (a TCG clocksource complaint, say) would land
# in the middle of the tool's one-line result on the same serial port.
append="console=ttyS0 quiet loglevel=1 panic=-1 hugepages=$hugepages ${params[*]}$extra"
out=$(mktemp /tmp/wdvirt-guest-console.XXXXXX)
trap 'rm -f "$out"' EXIT
echo "guest-boot: QEMU 11.1 (TCG), ${#sockets[@]} wdvirt device(s), $mem MiB, cmdline: $append" >&2

# From a terminal, QEMU must stay in the foreground process group: it sets
# the terminal's modes for -serial stdio and would be stopped otherwise.
fg=()
[ -t 0 ] && fg=(--foreground)
set +e
timeout "${fg[@]}" --kill-after=10 "$timeout" \
  bash scripts/qemu-chroot.sh run -- qemu-system-x86_64 \
  -accel tcg -cpu max -smp 1 -m "${mem}M" \
  -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" \
  -machine q35,memory-backend=mem \
  -nodefaults -display none -no-reboot -serial stdio \
  -kernel "$IMG_IN/vmlinuz" -initrd "$IMG_IN/initrd.cpio" -append "$append" \
  "${devices[@]}" | tee "$out" ${logfile:+"$logfile"}
rc=${PIPESTATUS[0]}
set -e
status=$(sed -n 's/^WDVIRT-EXIT \([0-9]*\).*/\1/p' "$out" | tail -n1)
if [ "$rc" = 124 ]; then
  echo "guest-boot: timed out after $timeout s" >&2
  exit 124
elif [ -n "$status" ]; then
  exit "$status"
else
  echo "guest-boot: the guest never reported (QEMU exit $rc)" >&2
  exit $((rc == 0 ? 1 : rc))
fi
