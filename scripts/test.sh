#!/usr/bin/env bash
# Everything the tests need, then every test. Idempotent; safe to re-run.
# Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== unit, wire and end-to-end tests (cargo test --workspace)"
cargo test --workspace --locked 2>&1

echo "== benchmark compiles (run it with: cargo bench --bench datapath)"
cargo build --benches --locked 2>&1 | tail -1
