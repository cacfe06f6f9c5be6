#!/usr/bin/env bash
# duet's local demo on loopback, with a file-backed volume (glue only; all logic is in duet).
# Part 1: one standalone node. Part 2: a replicating pair (two daemons on loopback).
# It grows into a failover as duet does.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
install_deps
export PATH="$PATH:/usr/sbin:/sbin"

PORT="${DEMO_PORT:-10809}"
echo "==> building duet"
cargo build --locked -q -p duet
DUET="$PWD/target/debug/duet"

WORK="$(mktemp -d /var/tmp/duet-demo.XXXXXX)"
DAEMON=""
ALPHA=""
BETA=""
cleanup() {
  for p in "$DAEMON" "$ALPHA" "$BETA"; do
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n==> %s\n' "$*"; }
ok() { printf '    OK: %s\n' "$*"; }

step "a 256 MiB file-backed volume and a single-node configuration in $WORK"
truncate -s 256M "$WORK/vol0.img"
cat >"$WORK/duet.toml" <<TOML
[cluster]
name = "demo"
configured_master = "alpha"
control_socket = "$WORK/duet.sock"
metrics_listen = ""

[node.alpha]

[[resource]]
name = "vol0"
nbd_listen = "127.0.0.1:$PORT"

[resource.on.alpha]
disk = "$WORK/vol0.img"
TOML
"$DUET" --config "$WORK/duet.toml" check-config

step "starting the daemon (node alpha, standalone primary)"
DUET_LOG=warn "$DUET" --config "$WORK/duet.toml" --node alpha daemon &
DAEMON=$!
for _ in $(seq 100); do
  "$DUET" --config "$WORK/duet.toml" --node alpha status >/dev/null 2>&1 && break
  sleep 0.1
done
"$DUET" --config "$WORK/duet.toml" --node alpha status

step "what an NBD client sees (nbdinfo)"
nbdinfo "nbd://127.0.0.1:$PORT/vol0" | grep -E 'export-size|can_flush|can_fua|can_trim|can_multi_conn|block_size'

step "writing 32 MiB of random data through NBD (nbdcopy), then reading it back"
head -c 32M /dev/urandom >"$WORK/data.bin"
nbdcopy "$WORK/data.bin" "nbd://127.0.0.1:$PORT/vol0"
truncate -s 256M "$WORK/back.img"
nbdcopy "nbd://127.0.0.1:$PORT/vol0" "$WORK/back.img"
want=$(sha256sum <"$WORK/data.bin" | cut -c1-16)
got=$(head -c 32M "$WORK/back.img" | sha256sum | cut -c1-16)
[ "$want" = "$got" ] || { echo "MISMATCH: wrote $want, read $got" >&2; exit 1; }
ok "read back through NBD matches what was written (sha256 $got...)"

step "pattern write / zero / discard / flush with qemu-io"
qemu-io -f raw "nbd://127.0.0.1:$PORT/vol0" \
  -c "write -P 0xd0 64M 1M" -c "write -z 65M 1M" -c "discard 66M 1M" -c "flush" \
  -c "read -P 0xd0 64M 1M" -c "read -P 0 65M 1M" >"$WORK/qemu-io.out"
grep -E '^(read|wrote)' "$WORK/qemu-io.out" | sed 's/^/    /'
if grep -q "verification failed" "$WORK/qemu-io.out" || [ "$(grep -c '^read' "$WORK/qemu-io.out")" -ne 2 ]; then
  cat "$WORK/qemu-io.out" >&2; exit 1
fi
ok "qemu-io patterns verified"

step "duet status after the I/O"
"$DUET" --config "$WORK/duet.toml" --node alpha status

step "stopping the daemon with SIGTERM (in-flight requests answered, data flushed)"
kill -TERM "$DAEMON"
wait "$DAEMON"
DAEMON=""
ok "daemon exited cleanly"
cmp -n $((32 << 20)) "$WORK/data.bin" "$WORK/vol0.img"
ok "the backing file holds the data written through NBD"


# ---------------------------------------------------------------------------- part 2: a pair
P="$WORK/pair"
mkdir -p "$P"
RA="${DEMO_REPL_PORT:-7788}"
RB=$((RA + 1))
step "part 2: a replicating pair, alpha and beta, on loopback (two daemons, two 128 MiB files)"
truncate -s 128M "$P/alpha.img" "$P/beta.img"
head -c 32 /dev/urandom | base64 >"$P/secret"
cat >"$P/duet.toml" <<TOML
[cluster]
name = "demo-pair"
secret_file = "$P/secret"
configured_master = "alpha"
control_socket = "$P/alpha.sock"
metrics_listen = ""

[node.alpha]
[node.beta]
control_socket = "$P/beta.sock"

[[resource]]
name = "vol0"
protocol = "C"
nbd_listen = "127.0.0.1:$PORT"

[resource.on.alpha]
disk = "$P/alpha.img"
meta = "internal"
replication_address = "127.0.0.1:$RA"

[resource.on.beta]
disk = "$P/beta.img"
meta = "internal"
replication_address = "127.0.0.1:$RB"
TOML
A=("$DUET" --config "$P/duet.toml" --node alpha)
B=("$DUET" --config "$P/duet.toml" --node beta)
"${A[@]}" create-md
"${B[@]}" create-md

step "starting both daemons; 'duet primary --force' on alpha makes its data the source"
DUET_LOG=warn "${A[@]}" daemon 2>"$P/alpha.log" &
ALPHA=$!
DUET_LOG=warn "${B[@]}" daemon 2>"$P/beta.log" &
BETA=$!
for _ in $(seq 100); do
  "${A[@]}" status >/dev/null 2>&1 && "${B[@]}" status >/dev/null 2>&1 && break
  sleep 0.1
done
"${A[@]}" primary --force
synced() {
  "${A[@]}" status | grep -q 'disk UpToDate, connection Connected' &&
    "${B[@]}" status | grep -q 'disk UpToDate, connection Connected' &&
    "${B[@]}" status | grep -q 'out of sync 0 B'
}
for _ in $(seq 600); do synced && break; sleep 0.1; done
synced || { cat "$P/alpha.log" "$P/beta.log" >&2; echo "initial sync did not finish" >&2; exit 1; }
ok "initial full sync done: both UpToDate and Connected"

step "writing through the primary (alpha) with real clients: nbdcopy 32 MiB, qemu-io patterns"
head -c 32M /dev/urandom >"$P/data.bin"
nbdcopy "$P/data.bin" "nbd://127.0.0.1:$PORT/vol0"
qemu-io -f raw "nbd://127.0.0.1:$PORT/vol0" -c "write -P 0x5a 40M 4M" -c "write -z 48M 1M" -c "flush" >/dev/null
ok "writes acknowledged (protocol C: on both disks before each reply)"

step "duet status of both nodes"
"${A[@]}" status
"${B[@]}" status

step "comparing the two replicas byte for byte"
SIZE=$("${A[@]}" dump-md | awk '/volume size/ {print $3}')
sa=$(head -c "$SIZE" "$P/alpha.img" | sha256sum | cut -c1-16)
sb=$(head -c "$SIZE" "$P/beta.img" | sha256sum | cut -c1-16)
echo "    alpha $sa  beta $sb  ($SIZE bytes each)"
[ "$sa" = "$sb" ] || { echo "REPLICAS DIFFER" >&2; exit 1; }
cmp -n $((32 << 20)) "$P/data.bin" "$P/beta.img"
ok "both replicas are identical, and beta holds the data written through alpha"

step "stopping both daemons"
kill -TERM "$ALPHA" "$BETA"
wait "$ALPHA" "$BETA"
ALPHA=""
BETA=""
ok "both exited cleanly"

printf '\nDemo complete: a single node, then a replicating pair, served a volume over NBD; every check passed.\n'
