#!/usr/bin/env bash
# Installs what building and testing wdvirt needs on a fresh Debian 12 machine.
# Idempotent: checks before it installs.
set -euo pipefail

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v python3 >/dev/null || need_apt+=(python3) # scripts/qtest-smoke.py, scripts/guest-image.sh
command -v tmux >/dev/null || need_apt+=(tmux) # tests/stats.rs: wdvirt top in a real terminal
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }
# rustfmt and clippy come with the toolchain's default profile; add them if not.
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$c"
  fi
done
