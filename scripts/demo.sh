#!/usr/bin/env bash
# The main job: a protected VM pair on this machine, a byte-checking client, a live mode switch, the
# controller switching by itself on a phased workload (auto, watched live, then its phases beside the
# shipped reference run's static modes, and a timeline plot) and a planned failover; then the
# comparator's capture replay. Everything is torn down at the end.
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

step "auto: the controller picks the mode itself, watched live, on a workload that changes character"
# The policy with the best phased score in the shipped phased run (experiments/results/phased), else
# cost-model. `phased`: 15 s of deterministic RPC (COLO's case: answers leave as soon as both VMs agree),
# then 15 s of divergent answers (a token service: every answer differs, so COLO would checkpoint on each
# one, and MC serves it better). The SWITCH lines below show each switch as it happens, and why.
best=$(.venv/bin/python - <<'PY'
import json
try:
    rows = [r for r in json.load(open("experiments/results/phased/headline.json")) if r["workload"] == "phased"]
    print(max(rows, key=lambda r: r["score"])["policy"])
except (OSError, ValueError, KeyError):
    print("cost-model")
PY
)
echo "policy: $best"
$HFT mode auto --policy "$best" --workdir "$work"
.venv/bin/python -m experiments.probe workload phased --workdir "$work" --seconds 30 --phase-seconds 15 \
  > "$out/phased.json" &
load=$!
$HFT status --workdir "$work" --watch --interval 1 --count 34
wait "$load" || { echo "phased: a client saw a wrong byte: $(cat "$out/phased.json")"; exit 1; }
cat "$out/phased.json"
$HFT policy show --workdir "$work"
$HFT experiment versus "$out/phased.json" --reference experiments/results/phased --policy "auto $best" \
  --workdir "$work" --plot "$out/phased-timeline.png"

step "Planned failover to the secondary; the client is served by it"
$HFT failover --workdir "$work"
probe blob "$ip"
probe echo "$ip" --rounds 20
$HFT pair down --workdir "$work"

step "Comparator: replaying a generated capture pair"
$HFT compare demo --out "$out"
