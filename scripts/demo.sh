#!/usr/bin/env bash
# The main job: a protected VM pair on this machine, a byte-checking client, a live mode switch, the
# controller switching by itself (auto, watched live) and a planned failover; then the comparator's
# capture replay. Everything is torn down at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
HFT=.venv/bin/hybridft
out=${DEMO_DIR:-build/demo}
work="$out/pair"
mkdir -p "$out"

step() { printf '\n=== %s\n' "$*"; }
cleanup() { $HFT pair down --workdir "$work" >/dev/null 2>&1 || true; }
trap cleanup EXIT

step "Which QEMU and accelerator, and why"
$HFT qemu which

step "Starting a protected pair in MC mode (50 ms epochs)"
$HFT pair down --workdir "$work" >/dev/null 2>&1 || true
$HFT pair up --workdir "$work" --mode mc --epoch-ms 50 --json | tee "$out/pair-up.json"
ns=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["client_netns"])' "$out/pair-up.json")
ip=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["guest_ip"])' "$out/pair-up.json")
probe() { ip netns exec "$ns" .venv/bin/python -m experiments.probe "$@"; }

step "MC: download /blob (8 MiB, every byte checked) and echo round trips"
probe blob "$ip" --count 2
probe echo "$ip" --rounds 50
$HFT status --workdir "$work"

step "Switching to COLO at the next checkpoint"
$HFT mode colo --workdir "$work"
sleep 1
probe blob "$ip" --count 2
probe echo "$ip" --rounds 50
$HFT status --workdir "$work"

step "auto: the controller picks the mode itself (cost-model), watched live"
# net-divergent: every answer differs between the two VMs (a token service), so in COLO each request
# forces a checkpoint; the policy sees the divergences and moves the pair to MC (a SWITCH banner below).
$HFT mode auto --policy cost-model --workdir "$work"
.venv/bin/python -m experiments.probe workload net-divergent --workdir "$work" --seconds 25 \
  > "$out/net-divergent.json" &
load=$!
$HFT status --workdir "$work" --watch --interval 1 --count 22
wait "$load" || { echo "net-divergent: a client saw a wrong byte: $(cat "$out/net-divergent.json")"; exit 1; }
cat "$out/net-divergent.json"
$HFT policy show --workdir "$work"

step "Planned failover to the secondary; the client is served by it"
$HFT failover --workdir "$work"
probe blob "$ip"
probe echo "$ip" --rounds 20
$HFT pair down --workdir "$work"

step "Comparator: replaying a generated capture pair"
$HFT compare demo --out "$out"
