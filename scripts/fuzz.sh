#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) under libFuzzer with AddressSanitizer for a fixed
# number of executions each: the short pass of the test suite (default), or a long one, e.g.
#   scripts/fuzz.sh 10000000
# The sanitizer flags are nightly features: the stable toolchain is let use them with
# RUSTC_BOOTSTRAP=1 (the same compiler as the rest of the build). Installs cargo-fuzz if missing.
# A crash stops the run and leaves its input in fuzz/artifacts/TARGET/. FUZZ_SANITIZER=none
# drops AddressSanitizer (several times faster; safe Rust gains little from it, and panics,
# overflow checks and the targets' own assertions still count); FUZZ_TARGETS limits the run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
runs=${1:-20000}
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
san=(--sanitizer "${FUZZ_SANITIZER:-address}")
cargo fuzz build "${san[@]}"
for t in ${FUZZ_TARGETS:-$(cargo fuzz list)}; do
  corpus="corpus/$t"
  mkdir -p "$corpus"
  echo "==> fuzz $t: $runs executions"
  # -max_len covers two superblock copies (2 x 4 KiB) and a long option.
  log="$(mktemp)"
  if ! cargo fuzz run "${san[@]}" "$t" "$corpus" "seeds/$t" -- \
    -runs="$runs" -max_len=16384 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz $t FAILED: the input that crashed is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E "^Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb" "$log" || true
  rm -f "$log"
done
echo "==> fuzz: every target ran $runs executions without a crash"
