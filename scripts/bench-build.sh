#!/usr/bin/env bash
# Build benchmark: `nix-build --builders` (Nix 2.8's build hook) against `offload build
# --builders` on the same loopback fleet, side by side in one run, fresh output paths
# each time (a salt). offload runs twice: with an empty duration history, then with the
# history of that first run (same graph, other salt).
#
#   scripts/bench-build.sh                     # both cases of the offload build issue
#   CASES="layered:40:1:3x2:2" scripts/bench-build.sh
#   RUNS=3 scripts/bench-build.sh              # medians of three runs each
#
# A case is SHAPE:N:SEED:BUILDERSxSLOTS:LOCALSLOTS (shapes: layered nixpkgs wide chain
# trivial, see scripts/gen-dag.py). Loopback machines are chroot stores reached as
# `ssh://localhost?remote-store=DIR`, which both tools run as local processes.
#
# Each measured figure is followed by what `offload simulate` predicts for the same
# graph and fleet (its model of Nix's hook, offload's own scheduler), plus the time to
# evaluate the expression, which both tools do first and the simulator does not model.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-"layered:40:1:3x2:2 trivial:200:1:3x4:4"}
RUNS=${RUNS:-1}
WORK=${WORK:-/tmp/offload-bench-build}
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}
bash scripts/setup.sh
cargo build --release -q -p offload
OFFLOAD=$PWD/target/release/offload
mkdir -p "$WORK"
# Builds on loopback machines run without build users: they are shared by every store
# on this machine, and Nix kills all processes of a build user around each build.
cat > "$WORK/nix-store-fleet" <<'SH'
#!/bin/sh
exec nix-store --option build-users-group '' "$@"
SH
chmod +x "$WORK/nix-store-fleet"

now() { date +%s.%N; }
secs() { awk "BEGIN {printf \"%.2f\", $2 - $1}"; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

for case in $CASES; do
  IFS=: read -r shape n seed fleet local <<<"$case"
  builders=${fleet%x*}; slots=${fleet#*x}
  spec=""
  for i in $(seq 1 "$builders"); do
    spec+="ssh://localhost?remote-store=$WORK/m$i&remote-program=$WORK/nix-store-fleet x86_64-linux - $slots 1;"
  done
  nix=$WORK/$shape-$n.nix
  stats=$(python3 scripts/gen-dag.py "$shape" "$n" "$seed" "$nix")
  cp=$(sed 's/.*critical_path=\([0-9.]*\).*/\1/' <<<"$stats")
  work=$(sed 's/.*total_work=\([0-9.]*\).*/\1/' <<<"$stats")
  total_slots=$((builders * slots + local))
  lb=$(awk "BEGIN {w = $work / $total_slots; printf \"%.2f\", ($cp > w ? $cp : w)}")
  hist=$WORK/history-$shape-$n.sqlite

  echo "== $shape, $n derivations, $builders builders x $slots slots + $local local slots"
  echo "   critical path ${cp}s, total work ${work}s / $total_slots slots: lower bound ${lb}s"
  nix_times=(); cold_times=(); warm_times=()
  for run in $(seq 1 "$RUNS"); do
    salt=$(date +%s%N)
    rm -f "$hist"
    t0=$(now)
    nix-build "$nix" --argstr salt "nix-$salt" --builders "$spec" -j "$local" --no-out-link >/dev/null 2>"$WORK/nix.log"
    t1=$(now)
    "$OFFLOAD" build "$nix" --argstr salt "cold-$salt" --builders "$spec" -j "$local" --no-out-link \
      --history "$hist" --no-build-output >/dev/null 2>"$WORK/offload-cold.log"
    t2=$(now)
    "$OFFLOAD" build "$nix" --argstr salt "warm-$salt" --builders "$spec" -j "$local" --no-out-link \
      --history "$hist" --no-build-output >/dev/null 2>"$WORK/offload-warm.log"
    t3=$(now)
    nix_times+=("$(secs "$t0" "$t1")"); cold_times+=("$(secs "$t1" "$t2")"); warm_times+=("$(secs "$t2" "$t3")")
  done
  [ "$RUNS" -gt 1 ] && echo "   runs: Nix ${nix_times[*]}; offload cold ${cold_times[*]}; warm ${warm_times[*]} (medians below)"
  tn=$(median "${nix_times[@]}"); tc=$(median "${cold_times[@]}"); tw=$(median "${warm_times[@]}")
  # The simulator's view of the same run.
  e0=$(now); nix-instantiate "$nix" --argstr salt "eval-$salt" >/dev/null 2>&1; e1=$(now)
  te=$(secs "$e0" "$e1")
  sim_spec=""
  for i in $(seq 1 "$builders"); do sim_spec+="m$i x86_64-linux - $slots 1;"; done
  echo '{"bandwidth": 1e9, "latency": 0.002}' > "$WORK/loopback.json"
  simulate() {
    "$OFFLOAD" simulate --dag "${nix%.nix}.json" --builders "$sim_spec" --local-slots "$local" \
      --fleet "$WORK/loopback.json" --json "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["makespan_s"])'
  }
  sn=$(simulate --policy nix); sc=$(simulate --policy offload --cold); sw=$(simulate --policy offload)
  vs_sim() { awk -v t="$1" -v s="$2" -v e="$te" 'BEGIN {printf "simulated %.2f s + %.2f s evaluation: %+.1f %%", s, e, 100 * (s + e - t) / t}'; }
  vs_lb() { awk -v t="$1" -v lb="$lb" 'BEGIN {if (lb > 0) printf "%.2fx the lower bound", t / lb; else printf "lower bound 0"}'; }
  printf '   nix-build --builders:        %7.2f s  (%s)\n' "$tn" "$(vs_lb "$tn")"
  printf '   offload, empty history:      %7.2f s  (%s, %.2fx faster than Nix)\n' "$tc" "$(vs_lb "$tc")" "$(awk "BEGIN {print $tn / $tc}")"
  printf '   offload, with history:       %7.2f s  (%s, %.2fx faster than Nix)\n' "$tw" "$(vs_lb "$tw")" "$(awk "BEGIN {print $tn / $tw}")"
  printf '   simulator, Nix:              %s\n' "$(vs_sim "$tn" "$sn")"
  printf '   simulator, offload cold:     %s\n' "$(vs_sim "$tc" "$sc")"
  printf '   simulator, offload warm:     %s\n' "$(vs_sim "$tw" "$sw")"
  grep -h '^built' "$WORK/offload-cold.log" "$WORK/offload-warm.log" | sed 's/^/   /'
done
