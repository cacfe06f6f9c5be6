#!/usr/bin/env bash
# duet's local demo on loopback, with a file-backed volume (glue only; all logic is in duet).
# Part 1: one standalone node. Part 2: a replicating pair (two daemons on loopback) with a UDP
# and a serial (pty) heartbeat. Part 3: the master is killed and the slave takes over by itself.
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
SOCAT=""
cleanup() {
  for p in "$DAEMON" "$ALPHA" "$BETA" "$SOCAT"; do
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
state_dir = "$WORK/state"
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
HA="${DEMO_HB_PORT:-7694}"
HB=$((HA + 1))
step "part 2: a replicating pair, alpha and beta, on loopback (two daemons, two 128 MiB files)"
truncate -s 128M "$P/alpha.img" "$P/beta.img"
(umask 077 && head -c 32 /dev/urandom | base64 >"$P/secret")
# The serial heartbeat: a null-modem cable between two pseudo-terminals.
socat "pty,raw,echo=0,link=$P/ttyA" "pty,raw,echo=0,link=$P/ttyB" &
SOCAT=$!
disown "$SOCAT"
for _ in $(seq 50); do [ -e "$P/ttyA" ] && [ -e "$P/ttyB" ] && break; sleep 0.1; done
cat >"$P/duet.toml" <<TOML
[cluster]
name = "demo-pair"
secret_file = "$P/secret"
configured_master = "alpha"
control_socket = "$P/alpha.sock"
state_dir = "$P/state"
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

[heartbeat]
keepalive_ms = 200
deadtime_ms = 1000
initdead_ms = 5000

[[heartbeat.link]]
kind = "udp"
[heartbeat.link.on.alpha]
bind = "127.0.0.1:$HA"
peer = "127.0.0.1:$HB"
[heartbeat.link.on.beta]
bind = "127.0.0.1:$HB"
peer = "127.0.0.1:$HA"

[[heartbeat.link]]
kind = "serial"
baud = 115200
[heartbeat.link.on.alpha]
device = "$P/ttyA"
[heartbeat.link.on.beta]
device = "$P/ttyB"
TOML
A=("$DUET" --config "$P/duet.toml" --node alpha)
B=("$DUET" --config "$P/duet.toml" --node beta)
"${A[@]}" create-md
"${B[@]}" create-md

step "starting both daemons; 'duet make-master --force' on alpha makes its data the source"
DUET_LOG=warn "${A[@]}" daemon 2>"$P/alpha.log" &
ALPHA=$!
DUET_LOG=warn "${B[@]}" daemon 2>"$P/beta.log" &
BETA=$!
for _ in $(seq 100); do
  "${A[@]}" status >/dev/null 2>&1 && "${B[@]}" status >/dev/null 2>&1 && break
  sleep 0.1
done
for _ in $(seq 100); do "${A[@]}" status | grep -q 'peer alive' && break; sleep 0.1; done
"${A[@]}" make-master --force
synced() {
  "${A[@]}" status 2>/dev/null | grep -q 'disk UpToDate, connection Connected' &&
    "${B[@]}" status 2>/dev/null | grep -q 'disk UpToDate, connection Connected' &&
    "${B[@]}" status 2>/dev/null | grep -q 'out of sync 0 B'
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

# ---------------------------------------------------------------------------- part 3: failover
step "part 3: SIGKILL the master (alpha); beta must take over by itself"
kill -KILL "$ALPHA"
wait "$ALPHA" 2>/dev/null || true
ALPHA=""
T0=$(date +%s%N)
for _ in $(seq 300); do
  "${B[@]}" status | grep -q 'this node is master' && "${B[@]}" status | grep -q 'NBD export vol0 on' && break
  sleep 0.05
done
"${B[@]}" status | grep -q 'this node is master' || { cat "$P/beta.log" >&2; echo "beta did not take over" >&2; exit 1; }
ok "beta is the running master $(( ($(date +%s%N) - T0) / 1000000 )) ms after the kill (deadtime 1000 ms)"
"${B[@]}" events | tail -n 6 | sed 's/^/    /'

step "reading the data back through the new master (nbdcopy from beta's export)"
truncate -s 0 "$P/back.img"
truncate -s 128M "$P/back.img"
nbdcopy "nbd://127.0.0.1:$PORT/vol0" "$P/back.img"
cmp -n $((32 << 20)) "$P/data.bin" "$P/back.img"
qemu-io -f raw "nbd://127.0.0.1:$PORT/vol0" -c "read -P 0x5a 40M 4M" -c "write -P 0x77 60M 1M" -c "flush" >"$P/qemu-io.out"
grep -q "verification failed" "$P/qemu-io.out" && { cat "$P/qemu-io.out" >&2; exit 1; }
ok "every byte written through alpha is served by beta, and beta takes new writes"

step "alpha comes back: it rejoins as the slave and resyncs what it missed"
DUET_LOG=warn "${A[@]}" daemon 2>>"$P/alpha.log" &
ALPHA=$!
for _ in $(seq 600); do synced && break; sleep 0.1; done
synced || { cat "$P/alpha.log" "$P/beta.log" >&2; echo "alpha did not resync" >&2; exit 1; }
"${A[@]}" status | head -n 4
sa=$(head -c "$SIZE" "$P/alpha.img" | sha256sum | cut -c1-16)
sb=$(head -c "$SIZE" "$P/beta.img" | sha256sum | cut -c1-16)
[ "$sa" = "$sb" ] || { echo "REPLICAS DIFFER after the resync" >&2; exit 1; }
ok "alpha is a slave again, in sync; replicas identical ($sa...)"

step "stopping both daemons"
kill -TERM "$ALPHA" "$BETA"
wait "$ALPHA" "$BETA"
ALPHA=""
BETA=""
ok "both exited cleanly"

printf '\nDemo complete: a single node, a replicating pair, and a failover served a volume over NBD; every check passed.\n'
