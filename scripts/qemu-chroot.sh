#!/usr/bin/env bash
# Builds (idempotently) a Debian trixie chroot holding QEMU 11.1 from
# trixie-backports and what a Linux guest boots from (kernel, busybox, cpio),
# and runs commands inside it. The host is Debian 12, whose
# QEMU (7.2) has no vfio-user-pci client; trixie-backports has 11.1.
#
#   bash scripts/qemu-chroot.sh [build]          build the chroot (skips what is done)
#   bash scripts/qemu-chroot.sh run -- CMD...    run CMD inside, with /dev and /proc
#                                                mounted in a private mount namespace
#   bash scripts/qemu-chroot.sh path             print the chroot directory
#   bash scripts/qemu-chroot.sh libvirt          build, then add libvirt 11.3 (libvirtd,
#                                                virsh) set to run QEMU as root
#                                                (docs/libvirt.md)
#
# With SYSFS=1, `run` also mounts sysfs on the chroot's /sys (libvirtd needs it).
#
# DIR is $WDVIRT_CHROOT, default /var/tmp/wdvirt-trixie. Needs root. Nothing it
# builds belongs in the repository.
set -euo pipefail

DIR=${WDVIRT_CHROOT:-/var/tmp/wdvirt-trixie}
STAMP_DIR="$DIR/.wdvirt-stamps"

log() { echo "qemu-chroot: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, mount)"

# The Debian mirror the host's apt already uses (deb822 or one-line format);
# deb.debian.org if none is found.
host_mirror() {
  local url=""
  url=$(grep -hsE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
    awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
  if [ -z "$url" ]; then
    url=$(grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      sed -E 's/\[[^]]*\]//' | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
  fi
  echo "${url:-http://deb.debian.org/debian}"
}

done_step() { [ -e "$STAMP_DIR/$1" ]; }
mark_step() { mkdir -p "$STAMP_DIR" && touch "$STAMP_DIR/$1"; }

# CMD inside the chroot, in a private mount namespace (unshare --mount) with
# /dev and /proc mounted: the mounts exist for this command alone and vanish
# with it, so commands side by side never unmount each other's, and a killed
# command leaves nothing mounted on the host. With EXEC=1 this shell becomes
# CMD (exec all the way down), so signals sent to it reach CMD itself.
in_chroot() {
  SYSFS=${SYSFS:-} ${EXEC:+exec} unshare --mount --propagation private -- /bin/sh -c '
    d=$1
    shift
    mount --bind /dev "$d/dev" && mount -t proc proc "$d/proc" || exit 125
    if [ -n "$SYSFS" ]; then mount -t sysfs sysfs "$d/sys" || exit 125; fi
    exec chroot "$d" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"' sh "$DIR" "$@"
}

# apt_install STEP LOG PACKAGE... [apt options]: one install step in the chroot.
apt_install() {
  local step=$1 logf=$2
  shift 2
  in_chroot apt-get update -qq >"$logf" 2>&1 &&
    in_chroot apt-get install -y -qq --no-install-recommends "$@" >>"$logf" 2>&1 &&
    in_chroot apt-get clean >>"$logf" 2>&1 ||
    { tail -n 20 "$logf" >&2; die "$step: apt-get install failed; see $logf"; }
  mark_step "$step"
}

build() {
  local t0 t
  t0=$(date +%s)
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap on the host"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi

  local mirror
  mirror=$(host_mirror)

  if done_step debootstrap; then
    log "debootstrap: done already ($DIR)"
  else
    log "debootstrap --variant=minbase trixie $DIR $mirror"
    t=$(date +%s)
    mkdir -p "$DIR"
    # A half-finished debootstrap leaves debootstrap/ behind; start it over.
    if [ -d "$DIR/debootstrap" ]; then
      log "removing a half-finished debootstrap in $DIR"
      mountpoint -q "$DIR/dev" && umount "$DIR/dev" || true
      mountpoint -q "$DIR/proc" && umount "$DIR/proc" || true
      rm -rf --one-file-system "${DIR:?}"/*
    fi
    debootstrap --variant=minbase trixie "$DIR" "$mirror" >"$DIR.debootstrap.log" 2>&1 ||
      die "debootstrap failed; see $DIR.debootstrap.log"
    mark_step debootstrap
    log "debootstrap: $(($(date +%s) - t)) s"
  fi

  if done_step backports; then
    log "trixie-backports source: done already"
  else
    cat >"$DIR/etc/apt/sources.list.d/trixie-backports.sources" <<EOF
Types: deb
URIs: $mirror
Suites: trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    mark_step backports
    log "trixie-backports source: added ($mirror)"
  fi

  if done_step qemu && [ -x "$DIR/usr/bin/qemu-system-x86_64" ]; then
    log "qemu-system-x86 (trixie-backports): done already"
  else
    log "apt-get install -t trixie-backports qemu-system-x86 (under a minute)"
    t=$(date +%s)
    apt_install qemu "$DIR.apt.log" -t trixie-backports qemu-system-x86
    log "qemu-system-x86: $(($(date +%s) - t)) s"
  fi
  # What a Linux guest boots from (scripts/guest-image.sh): the trixie kernel,
  # busybox for the initramfs, and cpio to pack it (the host has none).
  if done_step guest && [ -x "$DIR/usr/bin/cpio" ] && [ -x "$DIR/usr/bin/busybox" ] &&
    compgen -G "$DIR/boot/vmlinuz-*" >/dev/null; then
    log "linux-image-amd64, busybox-static, cpio: done already"
  else
    log "apt-get install linux-image-amd64 busybox-static cpio (about 30 s)"
    t=$(date +%s)
    apt_install guest "$DIR.apt-guest.log" linux-image-amd64 busybox-static cpio
    log "guest packages: $(($(date +%s) - t)) s"
  fi
  # Where instances put their sockets so that QEMU in here can reach them.
  mkdir -p "$DIR/run/wdvirt"
  log "ready: $(in_chroot qemu-system-x86_64 --version | head -n1) in $DIR ($(($(date +%s) - t0)) s this run)"
}

# libvirt 11.3 from trixie beside QEMU 11.1, run as root with what the
# chroot lacks turned off (DESIGN.md): no cgroups, no security driver, and no
# private mount namespace per domain (QEMU fails without `namespaces = [ ]`:
# "Failed disable mount propagation out of the root filesystem").
QEMU_CONF_MARK="# wdvirt test settings (scripts/qemu-chroot.sh)"
build_libvirt() {
  local t
  build
  if done_step libvirt && [ -x "$DIR/usr/sbin/libvirtd" ] && [ -x "$DIR/usr/bin/virsh" ]; then
    log "libvirt: done already"
  else
    log "apt-get install libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients (about 30 s)"
    t=$(date +%s)
    apt_install libvirt "$DIR.apt-libvirt.log" libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients
    log "libvirt: $(($(date +%s) - t)) s"
  fi
  local conf="$DIR/etc/libvirt/qemu.conf"
  [ -f "$conf" ] || die "no $conf after installing libvirt"
  if ! grep -qF "$QEMU_CONF_MARK" "$conf"; then
    cat >>"$conf" <<EOF

$QEMU_CONF_MARK
user = "root"
group = "root"
cgroup_controllers = [ ]
security_driver = "none"
namespaces = [ ]
EOF
    log "libvirt: qemu.conf set to run QEMU as root, without cgroups or namespaces"
  fi
  mkdir -p "$DIR/etc/libvirt/hooks/qemu.d"
  log "libvirt ready: $(in_chroot libvirtd --version)"
}

run() {
  [ -x "$DIR/usr/bin/qemu-system-x86_64" ] || die "no chroot at $DIR; run: bash $0 build"
  [ $# -gt 0 ] || die "usage: $0 run -- CMD..."
  EXEC=1 in_chroot "$@"
}

case "${1:-build}" in
  build) build ;;
  run)
    shift
    [ "${1:-}" = "--" ] && shift
    run "$@"
    ;;
  path) echo "$DIR" ;;
  libvirt) build_libvirt ;;
  *) die "usage: $0 [build | run -- CMD... | path | libvirt]" ;;
esac
