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

echo "== benchmark compiles (run it with: cargo bench --bench datapath)"
cargo build --benches --locked 2>&1 | tail -1

# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
