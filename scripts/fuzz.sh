#!/usr/bin/env bash
# Runs each fuzz target in fuzz/ for a bounded time, one after another, and
# prints how many inputs each executed. CI (scripts/test.sh) runs it with a
# short time per target so a regression fails the build; longer runs are
# for finding new bugs (see docs/fuzzing.md).
#
# Usage: bash scripts/fuzz.sh [SECONDS] [--asan] [TARGET...]
#   SECONDS   time per target (default 30)
#   --asan    build with AddressSanitizer (about 6x slower; needs
#             RUSTC_BOOTSTRAP=1 on the stable toolchain, set here)
#   TARGET    only these targets (default: all eight)
# Corpora grow in fuzz/corpus/TARGET (git-ignored); committed seeds in
# fuzz/seeds/TARGET are read too. A crash leaves its input in
# fuzz/artifacts/TARGET and makes this script exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=30
asan=0
targets=()
for arg in "$@"; do
  case "$arg" in
    --asan) asan=1 ;;
    ''|*[!0-9]*) targets+=("$arg") ;;
    *) secs="$arg" ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(regs_decode descriptors bar0_accesses vfio_user_session config_yaml migration_stream device_state libvirt_metadata)

# libfuzzer-sys compiles libFuzzer, which is C++.
if ! command -v c++ >/dev/null; then
  echo "== installing g++ (libFuzzer is C++)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
fi
if ! cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0\.13'; then
  echo "== installing cargo-fuzz 0.13"
  cargo install cargo-fuzz --version '^0.13' --locked
fi

if [ "$asan" = 1 ]; then
  export RUSTC_BOOTSTRAP=1   # cargo-fuzz passes -Z flags for sanitizers
  san=(--sanitizer address)
else
  san=(--sanitizer none)
fi

cd fuzz
logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT
summary=()
failed=0
for t in "${targets[@]}"; do
  echo "== $t: ${secs}s ${san[*]}"
  mkdir -p "corpus/$t"
  dirs=("corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("seeds/$t")
  set +e
  cargo fuzz run "${san[@]}" "$t" "${dirs[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
    >"$logdir/$t.log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logdir/$t.log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logdir/$t.log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$logdir/$t.log" | tail -1 | cut -d' ' -f2)
  if [ "$rc" = 0 ]; then
    status=ok
  else
    status="FAILED (exit $rc)"
    failed=1
    grep -E 'panicked at|^SUMMARY|Test unit written|^Error' "$logdir/$t.log" | head -8 || true
    cp "$logdir/$t.log" "artifacts/$t.log" 2>/dev/null || true
  fi
  summary+=("$(printf '%-18s %-10s execs %-10s exec/s %-8s cov %s' "$t" "$status" "${runs:-?}" "${rate:-?}" "${cov:-?}")")
done

echo "== summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
exit "$failed"
