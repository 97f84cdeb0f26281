#!/usr/bin/env bash
# Checks that two builds of offload simulate alike: runs `offload simulate` of BEFORE and
# of AFTER over the graphs and fleets of the README's and scripts/bench-*.sh benchmarks
# (bench-fleet.sh's cases, bench-build.sh's, bench-sim.sh's and the README's examples),
# and the generated shapes at three sizes, with and without local slots, with a fleet
# file of slow links, a slow builder and failures, each policy, cold, warm and second
# run, text and JSON, and a Chrome trace; compares each output byte for byte (stdout,
# stderr, exit status) and prints how many bytes it compared and every difference.
#
#   cargo build --release -p offload && cp target/release/offload /tmp/offload-before
#   # ...change the code...
#   cargo build --release -p offload
#   bash scripts/sim-identical.sh /tmp/offload-before target/release/offload
#
# Exits 0 when every output is identical. QUICK=1 leaves out the 100,000-derivation graph.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BEFORE AFTER (two offload binaries)" >&2; exit 2; }
before=$(realpath "$1")
after=$(realpath "$2")
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

runs=0
bytes=0
differ=0

# sim ARGS...: `offload simulate ARGS` of both binaries, compared.
sim() {
  local out
  for which in before after; do
    out=$work/$which
    mkdir -p "$out"
    rm -f "$out"/trace*
    local bin=$before
    [ $which = after ] && bin=$after
    # A trace, when asked for, goes to the binary's own directory.
    local args=("${@//@TRACE@/$out/trace.json}")
    (cd "$out" && { "$bin" simulate "${args[@]}" >stdout 2>stderr; echo "exit $?" >status; }) || true
  done
  runs=$((runs + 1))
  local f
  for f in stdout stderr status $(cd "$work/before" && ls trace* 2>/dev/null); do
    if cmp -s "$work/before/$f" "$work/after/$f"; then
      bytes=$((bytes + $(stat -c %s "$work/before/$f")))
    else
      differ=$((differ + 1))
      echo "DIFFERS ($f): offload simulate $*"
      diff "$work/before/$f" "$work/after/$f" | head -n 10 || true
    fi
  done
}

# scripts/bench-fleet.sh: its five cases, simulated as it simulates them (run 1 with
# --cold, run 2 with --second-run), and each policy besides.
SLOW=3
AARCH64_SLOW=5
slow=$(awk "BEGIN {print 1 / $SLOW}")
slow_arm=$(awk "BEGIN {print 1 / ($SLOW * $AARCH64_SLOW)}")
three="ssh://fleet1 x86_64-linux - 2 1; ssh://fleet2 x86_64-linux - 2 1; ssh://fleet3 x86_64-linux - 2 1"
arm="ssh://fleet1 x86_64-linux - 2 1; ssh://fleet2 x86_64-linux - 2 1; ssh://fleet3 x86_64-linux,aarch64-linux - 2 1"
echo '{"links": {"fleet3-slow": {"bandwidth": 2400000, "latency": 0.02}}}' >"$work/slow-link-fleet.json"
printf '{"speeds": {"fleet1": {"x86_64-linux": %s}, "fleet2": {"x86_64-linux": %s}, "fleet3": {"x86_64-linux": %s}}}\n' \
  "$slow" "$slow" "$slow" >"$work/slow-builders-fleet.json"
printf '{"speeds": {"fleet1": {"x86_64-linux": %s}, "fleet2": {"x86_64-linux": %s}, "fleet3": {"x86_64-linux": %s, "aarch64-linux": %s}}}\n' \
  "$slow" "$slow" "$slow" "$slow_arm" >"$work/slow-arm-fleet.json"
python3 scripts/gen-dag.py layered 30 1 "$work/slow-link.nix" --output-size $((16 * 1024 * 1024)) >/dev/null
python3 scripts/gen-dag.py layered 30 1 "$work/slow-builders.nix" --speed >/dev/null
python3 scripts/gen-dag.py layered 90 1 "$work/slow-builders-90.nix" --speed >/dev/null
python3 scripts/gen-dag.py layered 30 1 "$work/slow-arm.nix" --speed --aarch64 4 >/dev/null
python3 scripts/gen-dag.py layered 90 1 "$work/slow-arm-90.nix" --speed --aarch64 4 >/dev/null
fleet_case() { # fleet_case GRAPH BUILDERS FLEETFILE
  for mode in --second-run --cold; do
    sim --dag "$work/$1.json" --builders "$2" --local-slots 2 --fleet "$work/$3-fleet.json" --policy offload --json "$mode"
  done
  sim --dag "$work/$1.json" --builders "$2" --local-slots 2 --fleet "$work/$3-fleet.json"
}
fleet_case slow-link "${three/fleet3/fleet3-slow}" slow-link
fleet_case slow-builders "$three" slow-builders
fleet_case slow-builders-90 "$three" slow-builders
fleet_case slow-arm "$arm" slow-arm
fleet_case slow-arm-90 "$arm" slow-arm

# scripts/bench-build.sh: loopback builders, Nix's hook, offload cold and warm.
echo '{"bandwidth": 1e9, "latency": 0.002}' >"$work/loopback.json"
for case in layered:40:1:3x2:2 trivial:200:1:3x4:4 nixpkgs:300:1:4x4:4 wide:200:1:4x4:4 chain:40:1:4x4:0; do
  IFS=: read -r shape n seed fleet local <<<"$case"
  python3 scripts/gen-dag.py "$shape" "$n" "$seed" "$work/$shape-$n.nix" >/dev/null
  spec=""
  for i in $(seq 1 "${fleet%x*}"); do spec+="m$i x86_64-linux - ${fleet#*x} 1;"; done
  for p in "--policy nix" "--policy offload --cold" "--policy offload"; do
    # shellcheck disable=SC2086
    sim --dag "$work/$shape-$n.json" --builders "$spec" --local-slots "$local" \
      --fleet "$work/loopback.json" --json $p
  done
done

# Generated shapes at three sizes, on builders of two systems, with and without local
# slots; a fleet file with slow links, a slow builder, an emulated system and failures.
builders="ssh://b1 x86_64-linux - 4 2; ssh://b2 x86_64-linux,aarch64-linux - 2 1; ssh://b3 x86_64-linux - 8 1 big-parallel,kvm; ssh://a1 aarch64-linux - 4 1"
cat >"$work/faults.json" <<'JSON'
{"bandwidth": 50000000, "latency": 0.01,
 "links": {"b2": {"bandwidth": 2000000, "latency": 0.05}, "a1": {"latency": 0.1}},
 "speeds": {"b3": {"x86_64-linux": 0.3}, "b2": {"aarch64-linux": 0.2}},
 "failures": [{"machine": "b1", "at": 4.0}, {"machine": "a1", "at": 30.0}]}
JSON
# (A run that learns refits at every build's end: at 2,000 derivations, one shape.)
for shape in layered nixpkgs nixpkgs-mixed wide chain; do
  for n in 30 300 2000; do
    modes=("" --cold --second-run)
    [ "$n" = 2000 ] && [ "$shape" != nixpkgs ] && modes=("")
    for local in "" "--local-slots 8"; do
      for mode in "${modes[@]}"; do
        # shellcheck disable=SC2086
        sim --generate "$shape:$n:7" --builders "$builders" $local --fleet "$work/faults.json" $mode
      done
      [ "$n" = 2000 ] && continue
      # shellcheck disable=SC2086
      sim --generate "$shape:$n:3" --builders "$builders" $local --policy offload --second-run --json
    done
  done
done
sim --generate nixpkgs-mixed:1000:2 --generate-fleet mixed:40:3 --local-slots 4 --fleet "$work/faults.json" --cold --json
sim --generate layered:300:5 --builders "$builders" --local-slots 2 --fleet "$work/faults.json" --second-run --trace @TRACE@

# The README's examples and scripts/bench-sim.sh (one graph of 100,000 derivations).
printf 'ssh://b%s x86_64-linux - 8 %s\n' 1 1 2 2 3 1 4 4 >"$work/machines"
sim --generate nixpkgs:2000:1 --builders "@$work/machines" --local-slots 8
if [ "${QUICK:-0}" != 1 ]; then
  sim --generate nixpkgs-mixed:100000:1 --generate-fleet mixed:1000:5 --local-slots 8
fi

echo "sim-identical: $runs simulations, $bytes bytes compared, $differ outputs differ"
if [ "$differ" -ne 0 ]; then
  echo "sim-identical: NOT identical" >&2
  exit 1
fi
echo "sim-identical: identical"
