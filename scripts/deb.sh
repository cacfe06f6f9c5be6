#!/usr/bin/env bash
# Builds the Debian package: target/debian/duet_VERSION_ARCH.deb with the binary, the systemd
# units, /etc/duet/duet.toml (the commented example, a conffile), the man pages and the shell
# completions. Installs cargo-deb if missing.
#   scripts/deb.sh                  # a release build
#   scripts/deb.sh --binary PATH    # package that binary as it is (the suite: its test build;
#                                   # nothing is rebuilt, faster compression)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
  echo "==> installing cargo-deb"
  cargo install cargo-deb --locked
fi
profile=release
if [ "${1:-}" = "--binary" ]; then
  profile=given
  bin="${2:?--binary needs a path}"
else
  cargo build --release --locked -p duet
  bin="target/release/duet"
fi
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/completions" "$assets/bin"
"$bin" generate man "$assets/man"
"$bin" generate completions bash > "$assets/completions/duet"
"$bin" generate completions zsh > "$assets/completions/_duet"
"$bin" generate completions fish > "$assets/completions/duet.fish"
cp "$bin" "$assets/bin/duet"
fast=()
if [ "$profile" = given ]; then fast=(--fast); fi
cargo deb -p duet --no-build --no-strip "${fast[@]}" --output target/debian/
