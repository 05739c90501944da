#!/usr/bin/env bash
# The operator's workflow on the embedded default (the built-in software
# accelerator): a wdvirt daemon with the instance types of
# policies/default.yaml, two instances defined and started through the CLI,
# each driven by the in-process VMM with every result verified against a
# direct library call, then listed with the daemon's own counters, stopped
# and undefined. Everything lives in a temporary directory.
# Usage: bash scripts/demo.sh [wdvirt demo options, e.g. --rounds 16 --size 65536]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked --bin wdvirt
W=$PWD/target/release/wdvirt

tmp=$(mktemp -d -t wdvirt-demo-XXXXXX)
daemon_pid=
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
export WDVIRT_API=$tmp/api.sock

show() { echo "\$ wdvirt $*" >&2; "$W" "$@"; }

echo "== a daemon with the types of policies/default.yaml (state and sockets in $tmp)" >&2
"$W" daemon --config policies/default.yaml --state-dir "$tmp/state" --run-dir "$tmp/run" &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$WDVIRT_API" ] && break; sleep 0.05; done

show types
show define --type all-4q --name vm1 >/dev/null
show define --type all-4q --name vm2 --auto >/dev/null
s1=$(show start vm1)
s2=$(show start vm2)
echo "== the in-process VMM drives each instance over its vfio-user socket" >&2
show demo --connect "$s1" --connect "$s2" "$@"
show list
show stop vm1
show stop vm2
show undefine vm1
show undefine vm2
show list --defined
