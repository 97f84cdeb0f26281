#!/usr/bin/env bash
# Simulation figures: (1) the simulator against the measured runs of
# scripts/bench-build.sh (same graphs, loopback-like links), (2) the policy table and
# planning cost for a nixpkgs-like 100,000-derivation graph on 1,000 mixed machines.
#
#   bash scripts/bench-sim.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p offload
OFFLOAD=$PWD/target/release/offload
WORK=${WORK:-/tmp/offload-bench-sim}
mkdir -p "$WORK"
echo '{"bandwidth": 1e9, "latency": 0.002}' > "$WORK/loopback.json"
python3 scripts/gen-dag.py layered 40 1 "$WORK/layered-40.nix" >/dev/null
python3 scripts/gen-dag.py trivial 200 1 "$WORK/trivial-200.nix" >/dev/null
b() { for i in 1 2 3; do printf 'h%s x86_64-linux - %s 1;' "$i" "$1"; done; }

echo "== validation graphs (compare with scripts/bench-build.sh)"
echo "-- layered 40, 3 builders x 2 + 2 local (offload with history, then without)"
"$OFFLOAD" simulate --dag "$WORK/layered-40.json" --builders "$(b 2)" --local-slots 2 --fleet "$WORK/loopback.json" | tail -3
"$OFFLOAD" simulate --dag "$WORK/layered-40.json" --builders "$(b 2)" --local-slots 2 --fleet "$WORK/loopback.json" --cold --policy offload | tail -1
echo "-- trivial 200, 3 builders x 4 + 4 local"
"$OFFLOAD" simulate --dag "$WORK/trivial-200.json" --builders "$(b 4)" --local-slots 4 --fleet "$WORK/loopback.json" | tail -3

echo "== nixpkgs-like graph, 100,000 derivations, 1,000 mixed machines + 8 local slots"
python3 scripts/gen-fleet.py 1000 > "$WORK/fleet-1000.machines"
for p in offload nix hydra; do
  /usr/bin/time -f "   $p: %U s CPU, %M KiB peak RSS" "$OFFLOAD" simulate --generate nixpkgs-mixed:100000:1 \
    --machines "$WORK/fleet-1000.machines" --local-slots 8 --policy "$p" 2>&1 | tail -2
done
