#!/usr/bin/env bash
# The whole test suite: system packages, build, lints, unit + integration tests.
# Tests that need root (loop devices, mounts, namespaces) print SKIP when not root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
install_deps
export PATH="$PATH:/usr/sbin:/sbin"

echo "==> build"
cargo build --workspace --all-targets --locked
echo "==> format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> packaging tool (cargo-deb, for the .deb test)"
cargo deb --version >/dev/null 2>&1 || cargo install cargo-deb --locked
echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  echo "(cargo-nextest not installed; using cargo test)"
  cargo test --workspace --locked --no-fail-fast
fi
echo "==> fuzz (every target, a short fixed count)"
./scripts/fuzz.sh 20000
echo "==> all tests passed"
