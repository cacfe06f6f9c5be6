#!/usr/bin/env bash
# Builds the Debian package: target/debian/duet_VERSION_ARCH.deb with the binary, the systemd
# units, /etc/duet/duet.toml (the commented example, a conffile), the man pages and the shell
# completions. Installs cargo-deb if missing.
#   scripts/deb.sh            # release build
#   scripts/deb.sh --debug    # the test build's binary, for the suite (no release build)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
  echo "==> installing cargo-deb"
  cargo install cargo-deb --locked
fi
profile=release
if [ "${1:-}" = "--debug" ]; then profile=debug; fi
if [ "$profile" = release ]; then
  cargo build --release --locked -p duet
else
  cargo build --locked -p duet
fi
bin="target/$profile/duet"
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/completions" "$assets/bin"
"$bin" generate man "$assets/man"
"$bin" generate completions bash > "$assets/completions/duet"
"$bin" generate completions zsh > "$assets/completions/_duet"
"$bin" generate completions fish > "$assets/completions/duet.fish"
cp "$bin" "$assets/bin/duet"
fast=()
if [ "$profile" = debug ]; then fast=(--fast); fi
cargo deb -p duet --no-build --no-strip "${fast[@]}" --output target/debian/
