#!/usr/bin/env bash
# Simulation figures: the policy table and planning cost for a nixpkgs-like 100,000-
# derivation graph on 1,000 mixed machines, and a layered one of the same size. (The
# simulator against measured runs is in scripts/bench-build.sh, which prints the
# simulated figure beside each measured one.)
#
# Then the planner at fleet scale on a machines file of 1,000 builders (scripts/sim-guard.sh
# writes it: a quarter aarch64-linux, 2-32 slots, speed 1-4, some big-parallel, kvm or
# benchmark): nixpkgs:100000:7, each policy; with SIM_1M=1 also nixpkgs:1000000:7 on
# 10,000 such builders, offload's policy (about a minute and a half of CPU).
#
#   bash scripts/bench-sim.sh            # SIM_1M=1 for the 1,000,000-derivation case
set -euo pipefail
. "$(dirname "$0")/lib/sim-machines.sh"
cd "$(dirname "$0")/.."
cargo build --release -q -p offload
OFFLOAD=$PWD/target/release/offload

for graph in nixpkgs-mixed:100000:1 layered:100000:1; do
  echo "== $graph on 1,000 mixed machines (--generate-fleet mixed:1000:5) + 8 local slots"
  echo "policy    makespan   lower bound   ratio   utilisation   built        bytes moved"
  for p in offload nix hydra; do
    /usr/bin/time -f "   $p: %U s CPU, %M KiB peak RSS" "$OFFLOAD" simulate --generate "$graph" \
      --generate-fleet mixed:1000:5 --local-slots 8 --policy "$p" 2>&1 | grep -E "^$p +[0-9]|CPU"
  done
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sim_machines "$work/m1000" 1000 1000
echo "== nixpkgs:100000:7 on 1,000 builders (--machines FILE)"
for p in offload nix hydra; do
  /usr/bin/time -f "   $p: %U s CPU, %M KiB peak RSS" "$OFFLOAD" simulate --generate nixpkgs:100000:7 \
    --machines "$work/m1000" --policy "$p" 2>&1 | grep -E "^$p +[0-9]|CPU"
done
if [ "${SIM_1M:-0}" = 1 ]; then
  sim_machines "$work/m10000" 10000 10000
  echo "== nixpkgs:1000000:7 on 10,000 builders (--machines FILE), offload's policy"
  /usr/bin/time -f "   offload: %U s CPU, %M KiB peak RSS" "$OFFLOAD" simulate \
    --generate nixpkgs:1000000:7 --machines "$work/m10000" --policy offload 2>&1 |
    grep -E "^offload +[0-9]|CPU"
fi
