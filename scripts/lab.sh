#!/usr/bin/env bash
# duet's failover lab on one machine (root): network namespaces A and B (the nodes), C (a
# client) on a bridge, a dedicated veth A<->B for replication and the UDP heartbeat, a serial
# heartbeat over a socat pty pair, and a VIP. It shows a failover as the client sees it:
# power loss of the master (links down, daemon killed), the VIP moving, the client's ARP entry
# following, and the data intact through the new master. Glue only; all logic is in duet.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
install_deps
export PATH="$PATH:/usr/sbin:/sbin"
[ "$(id -u)" -eq 0 ] || { echo "the lab needs root (network namespaces)" >&2; exit 1; }

echo "==> building duet"
cargo build --locked -q -p duet
DUET="$PWD/target/debug/duet"
ID="lab$$"
A="duetA-$ID"; B="duetB-$ID"; C="duetC-$ID"; S="duetS-$ID"
W="$(mktemp -d /var/tmp/duet-lab.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for n in "$A" "$B" "$C" "$S"; do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
  done
  rm -rf "$W"
}
trap cleanup EXIT
step() { printf '\n==> %s\n' "$*"; }
ok() { printf '    OK: %s\n' "$*"; }

step "namespaces: $A, $B (nodes), $C (client), $S (switch); LAN 10.77.0.0/24, dedicated 10.78.0.0/30"
for n in "$A" "$B" "$C" "$S"; do ip netns add "$n"; ip -n "$n" link set lo up; done
ip -n "$S" link add br0 type bridge; ip -n "$S" link set br0 up
i=0
for n in "$A" "$B" "$C"; do
  ip link add lan0 netns "$n" type veth peer name "p$i" netns "$S"
  ip -n "$S" link set "p$i" master br0; ip -n "$S" link set "p$i" up
  ip -n "$n" link set lan0 up
  i=$((i + 1))
done
ip -n "$A" addr add 10.77.0.1/24 dev lan0
ip -n "$B" addr add 10.77.0.2/24 dev lan0
ip -n "$C" addr add 10.77.0.10/24 dev lan0
ip link add ded0 netns "$A" type veth peer name ded0 netns "$B"
ip -n "$A" addr add 10.78.0.1/30 dev ded0; ip -n "$A" link set ded0 up
ip -n "$B" addr add 10.78.0.2/30 dev ded0; ip -n "$B" link set ded0 up
socat "pty,raw,echo=0,link=$W/ttyA" "pty,raw,echo=0,link=$W/ttyB" &
PIDS+=($!); disown $!
for _ in $(seq 50); do [ -e "$W/ttyA" ] && [ -e "$W/ttyB" ] && break; sleep 0.1; done

truncate -s 128M "$W/alpha.img" "$W/beta.img"
(umask 077 && head -c 32 /dev/urandom | base64 >"$W/secret")
cat >"$W/duet.toml" <<TOML
[cluster]
name = "lab"
secret_file = "$W/secret"
configured_master = "alpha"
control_socket = "$W/alpha.sock"
state_dir = "$W/state"
metrics_listen = ""

[node.alpha]
[node.beta]
control_socket = "$W/beta.sock"

[[resource]]
name = "vol0"
nbd_listen = "0.0.0.0:10809"
[resource.on.alpha]
disk = "$W/alpha.img"
replication_address = "10.78.0.1:7789"
[resource.on.beta]
disk = "$W/beta.img"
replication_address = "10.78.0.2:7789"

[heartbeat]
keepalive_ms = 100
warntime_ms = 200
deadtime_ms = 300
initdead_ms = 3000
[[heartbeat.link]]
kind = "udp"
[heartbeat.link.on.alpha]
bind = "10.78.0.1:694"
peer = "10.78.0.2:694"
[heartbeat.link.on.beta]
bind = "10.78.0.2:694"
peer = "10.78.0.1:694"
[[heartbeat.link]]
kind = "serial"
[heartbeat.link.on.alpha]
device = "$W/ttyA"
[heartbeat.link.on.beta]
device = "$W/ttyB"

[[vip]]
interface = "lan0"
address = "10.77.0.100/24"
TOML
DA=("$DUET" --config "$W/duet.toml" --node alpha)
DB=("$DUET" --config "$W/duet.toml" --node beta)
"${DA[@]}" create-md >/dev/null
"${DB[@]}" create-md >/dev/null

step "starting alpha in $A and beta in $B; 'make-master --force' on alpha (first start)"
DUET_LOG=warn ip netns exec "$A" "${DA[@]}" daemon 2>"$W/alpha.log" &
PIDS+=($!); ALPHA=$!; disown $!
DUET_LOG=warn ip netns exec "$B" "${DB[@]}" daemon 2>"$W/beta.log" &
PIDS+=($!); disown $!
for _ in $(seq 100); do "${DA[@]}" status 2>/dev/null | grep -q 'peer alive' && break; sleep 0.1; done
"${DA[@]}" make-master --force
for _ in $(seq 600); do
  "${DB[@]}" status 2>/dev/null | grep -q 'disk UpToDate, connection Connected' && break; sleep 0.1
done
"${DA[@]}" status | head -n 4
ip -n "$A" -o addr show dev lan0 | grep -q '10.77.0.100/' && ok "alpha holds the VIP 10.77.0.100"

step "the client ($C) writes 16 MiB through the VIP"
head -c 16M /dev/urandom >"$W/data.bin"
ip netns exec "$C" nbdcopy "$W/data.bin" nbd://10.77.0.100/vol0
echo "    client's ARP entry: $(ip -n "$C" neigh show 10.77.0.100)"
echo "    alpha's lan0 MAC:   $(ip -n "$A" -o link show lan0 | grep -o 'link/ether [0-9a-f:]*')"
echo "    beta's lan0 MAC:    $(ip -n "$B" -o link show lan0 | grep -o 'link/ether [0-9a-f:]*')"

step "power loss of alpha: its links go down and its daemon is killed"
T0=$(date +%s%N)
ip -n "$A" link set lan0 down; ip -n "$A" link set ded0 down
kill -KILL "$ALPHA"
n=0
# Each attempt gets 250 ms: a SYN sent to the dead master's MAC would otherwise wait for TCP's
# one-second retransmission.
until ip netns exec "$C" timeout 0.25 qemu-io -f raw nbd://10.77.0.100/vol0 -c "write -P 0x42 100M 4k" >/dev/null 2>&1; do
  n=$((n + 1)); [ "$n" -lt 600 ] || { cat "$W/beta.log" >&2; echo "no write through the VIP" >&2; exit 1; }
  sleep 0.01
done
ok "first write through the VIP $(( ($(date +%s%N) - T0) / 1000000 )) ms after the power loss (deadtime 300 ms)"
echo "    client's ARP entry now: $(ip -n "$C" neigh show 10.77.0.100)"
"${DB[@]}" events | tail -n 8 | sed 's/^/    /'

step "reading the 16 MiB back through the VIP (from beta now)"
truncate -s 128M "$W/back.img"
ip netns exec "$C" nbdcopy nbd://10.77.0.100/vol0 "$W/back.img"
cmp -n $((16 << 20)) "$W/data.bin" "$W/back.img"
ok "every byte the client wrote through alpha is served by beta"
printf '\nLab complete.\n'
