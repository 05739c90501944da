#!/usr/bin/env bash
# One command: wdvirt against the real QEMU 11.1 vfio-user-pci client, with
# no guest OS (-accel qtest). Builds the trixie chroot (idempotent, about a
# minute the first time), builds wdvirt, serves one instance with a socket
# inside the chroot, runs two QEMU processes one after the other driven by
# scripts/qtest-smoke.py, stops wdvirt, and prints PASS or FAIL.
#
#   bash scripts/qemu-smoke.sh
#
# Needs root (chroot, mounts). Env: WDVIRT_CHROOT (default
# /var/tmp/wdvirt-trixie), WDVIRT_SMOKE_LOGS (default: a new temp dir; kept),
# WDVIRT_PROFILE (release, the default, or dev).
# scripts/test.sh runs it (after the cargo tests).
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=${WDVIRT_CHROOT:-/var/tmp/wdvirt-trixie}
export WDVIRT_CHROOT=$DIR
LOGS=${WDVIRT_SMOKE_LOGS:-$(mktemp -d /tmp/wdvirt-qemu-smoke.XXXXXX)}
mkdir -p "$LOGS"
SOCK_IN=/run/wdvirt-smoke.sock # as QEMU sees it, inside the chroot
SOCK=$DIR$SOCK_IN

fail() {
  echo "FAIL: $*"
  echo "logs: $LOGS"
  exit 1
}

t0=$(date +%s)
echo "== chroot ($DIR)"
bash scripts/qemu-chroot.sh build || fail "chroot build"
t1=$(date +%s)

# WDVIRT_PROFILE=dev reuses the debug build `cargo test` made (scripts/test.sh).
PROFILE=${WDVIRT_PROFILE:-release}
case "$PROFILE" in release) OUT=release ;; dev) OUT=debug ;; *) fail "WDVIRT_PROFILE is release or dev" ;; esac
echo "== cargo build --profile $PROFILE --bin wdvirt"
cargo build --profile "$PROFILE" --bin wdvirt >"$LOGS/build.log" 2>&1 || { tail -n 20 "$LOGS/build.log"; fail "build"; }
t2=$(date +%s)

echo "== wdvirt serve --socket $SOCK"
./target/$OUT/wdvirt serve --log "info,wdvirt::transport=trace" --socket "$SOCK" \
  >"$LOGS/wdvirt.out" 2>"$LOGS/wdvirt.log" &
WD=$!
stop_wd() {
  if kill -0 "$WD" 2>/dev/null; then
    kill -TERM "$WD" 2>/dev/null || true
    wait "$WD" 2>/dev/null || true
  fi
}
trap stop_wd EXIT
for _ in $(seq 100); do
  [ -S "$SOCK" ] && break
  kill -0 "$WD" 2>/dev/null || fail "wdvirt serve exited: $(cat "$LOGS/wdvirt.log")"
  sleep 0.05
done
[ -S "$SOCK" ] || fail "no socket at $SOCK"

echo "== QEMU + qtest (scripts/qtest-smoke.py)"
rc=0
python3 scripts/qtest-smoke.py --chroot "$DIR" --socket "$SOCK_IN" --server-pid "$WD" \
  --logdir "$LOGS" | tee "$LOGS/qtest-smoke.out" || rc=$?
t3=$(date +%s)

echo "== stopping wdvirt (SIGTERM)"
kill -TERM "$WD"
wd_rc=0
wait "$WD" || wd_rc=$?
trap - EXIT
cat "$LOGS/wdvirt.out"
sed 's/\x1b\[[0-9;]*m//g' "$LOGS/wdvirt.log" >"$LOGS/wdvirt.txt"
msgs=$(grep -c 'TRACE.*vfio-user: ' "$LOGS/wdvirt.txt" || true)
refused=$(grep -c 'refused\|connection failed' "$LOGS/wdvirt.txt" || true)
echo "wdvirt: $msgs vfio-user messages traced, $refused refused; exit $wd_rc"
echo "time: chroot $((t1 - t0)) s, build $((t2 - t1)) s, QEMU runs $((t3 - t2)) s"

[ "$rc" -eq 0 ] || fail "qtest-smoke.py"
[ "$wd_rc" -eq 0 ] || fail "wdvirt serve exited $wd_rc"
grep -q '2 connection(s)' "$LOGS/wdvirt.out" || fail "wdvirt did not count 2 connections"
expect=$(sed -n 's/^expect: \([0-9]* jobs ok, [0-9]* failed\)$/\1/p' "$LOGS/qtest-smoke.out")
[ -n "$expect" ] && grep -q "$expect" "$LOGS/wdvirt.out" ||
  fail "wdvirt's job counts differ from the script's ($expect)"
[ "$refused" -eq 0 ] || fail "wdvirt refused $refused vfio-user messages (see $LOGS/wdvirt.txt)"
echo "logs: $LOGS"
echo "PASS"
