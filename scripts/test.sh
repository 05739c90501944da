#!/usr/bin/env bash
# Everything the tests need, then every test. Idempotent; safe to re-run.
# Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== formatting and lints (cargo fmt --check, cargo clippy -D warnings)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -q -- -D warnings

echo "== unit, wire, end-to-end and CLI tests (cargo test --workspace)"
cargo test --workspace --locked 2>&1 | tee "$log"

t=$SECONDS
echo "== fuzz targets, 15 s each (scripts/fuzz.sh; a crash fails CI; long runs: docs/fuzzing.md)"
fuzz_log=$(mktemp)
bash scripts/fuzz.sh 15 >"$fuzz_log" 2>&1 || { cat "$fuzz_log"; rm -f "$fuzz_log"; exit 1; }
tail -n 8 "$fuzz_log"; rm -f "$fuzz_log"
echo "   ($((SECONDS - t)) s)"

echo "== benchmark compiles (run it with: cargo bench --bench datapath)"
cargo build --benches --locked 2>&1 | tail -1

# The real QEMU 11.1 from here on (root; the trixie chroot is built once and
# reused, see docs/linux-guest.md for what each stage costs).
t=$SECONDS
echo "== the real QEMU 11.1 vfio-user client, no guest OS (scripts/qemu-smoke.sh)"
WDVIRT_PROFILE=dev bash scripts/qemu-smoke.sh | tail -n 4
echo "   ($((SECONDS - t)) s)"

t=$SECONDS
echo "== Linux guests under QEMU (scripts/guest-image.sh, then tests/linux_guest.rs)"
bash scripts/guest-image.sh >/dev/null
cargo test --locked --test linux_guest -- --ignored --test-threads=1 2>&1 | tee -a "$log"
echo "   ($((SECONDS - t)) s)"

t=$SECONDS
echo "== libvirt 11.3 starts a guest with an instance (scripts/qemu-chroot.sh libvirt, then tests/libvirt.rs)"
bash scripts/qemu-chroot.sh libvirt 2>&1 | tail -n 1
cargo test --locked --test libvirt -- --ignored --test-threads=1 2>&1 | tee -a "$log"
echo "   ($((SECONDS - t)) s)"

# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
