#!/usr/bin/env bash
# The planner at fleet scale, guarded: `offload simulate` of a nixpkgs-like graph of
# 100,000 derivations on 1,000 machines (the machines file below: a quarter
# aarch64-linux, 2-32 slots, speed factors 1-4, some big-parallel, kvm or benchmark),
# all three policies, once, from a release build. Prints the CPU time it took, the
# limit, peak memory and each policy's makespan against the lower bound; fails when the
# CPU time is over the limit (15 s: three times the 5 s target, so that a loaded machine
# cannot trip it) or the run fails.
#
#   bash scripts/sim-guard.sh            # SIM_GUARD_LIMIT=SECONDS to change the limit
set -euo pipefail
. "$(dirname "$0")/lib/sim-machines.sh"
cd "$(dirname "$0")/.."
limit=${SIM_GUARD_LIMIT:-15}
cargo build --release -q -p offload
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sim_machines "$work/machines" 1000 1000
/usr/bin/time -f '%U %S %M' -o "$work/time" target/release/offload simulate \
  --generate nixpkgs:100000:7 --machines "$work/machines" >"$work/out"
read -r user sys rss <"$work/time"
cpu=$(awk "BEGIN {printf \"%.2f\", $user + $sys}")
grep -E '^(policy|offload|nix|hydra) ' "$work/out"
echo "sim-guard: 100,000 derivations on 1,000 machines, all policies: ${cpu} s CPU (limit ${limit} s), $((rss / 1024)) MiB peak"
if awk "BEGIN {exit !($cpu > $limit)}"; then
  echo "sim-guard: over the limit: the planner or the simulator got slower at scale (profile: perf record -g target/release/offload simulate ...)" >&2
  exit 1
fi
