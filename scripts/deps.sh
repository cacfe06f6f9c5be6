#!/usr/bin/env bash
# Installs the Debian packages duet's demo and tests use (glue only). Sourced by demo.sh/test.sh.
# Runs apt-get only when something is missing; needs root or sudo then.

DUET_PACKAGES=(libnbd-bin nbdkit fio qemu-utils iproute2 nftables socat e2fsprogs xfsprogs fuse3 util-linux faketime openssl prometheus chromium)
DUET_TOOLS=(nbdinfo nbdcopy nbdfuse nbdkit fio qemu-io qemu-nbd ip nft socat mkfs.ext4 e2fsck mkfs.xfs fusermount3 losetup nsenter faketime openssl promtool chromium)

install_deps() {
  local missing=()
  for t in "${DUET_TOOLS[@]}"; do
    command -v "$t" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  echo "==> installing system packages (missing: ${missing[*]})"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "error: ${missing[*]} missing and not root (no sudo): install ${DUET_PACKAGES[*]}" >&2
      return 1
    fi
  fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${DUET_PACKAGES[@]}"
}
