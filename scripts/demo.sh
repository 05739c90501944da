#!/usr/bin/env bash
# Builds wdvirt and runs the demo on the built-in software accelerator:
# instances served over real vfio-user sockets, driven by the guest driver.
# Usage: bash scripts/demo.sh [wdvirt demo options, see --help]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked --bin wdvirt
exec target/release/wdvirt demo "$@"
