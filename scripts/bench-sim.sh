#!/usr/bin/env bash
# Simulation figures: the policy table and planning cost for a nixpkgs-like 100,000-
# derivation graph on 1,000 mixed machines, and a layered one of the same size. (The
# simulator against measured runs is in scripts/bench-build.sh, which prints the
# simulated figure beside each measured one.)
#
#   bash scripts/bench-sim.sh
set -euo pipefail
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
