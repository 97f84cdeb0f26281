#!/usr/bin/env bash
# Build benchmark: `nix-build --builders` (Nix 2.8's build hook) against `offload build
# --builders` on the same loopback fleet, side by side in one run, fresh output paths
# each time (a salt). offload runs twice: with an empty duration history, then with the
# history of that first run (same graph, other salt).
#
#   scripts/bench-build.sh                     # both cases of the offload build issue
#   CASES="layered:40:1:3x2:2" scripts/bench-build.sh
#
# A case is SHAPE:N:SEED:BUILDERSxSLOTS:LOCALSLOTS (shapes: layered nixpkgs wide chain
# trivial, see scripts/gen-dag.py). Loopback machines are chroot stores reached as
# `ssh://localhost?remote-store=DIR`, which both tools run as local processes.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-"layered:40:1:3x2:2 trivial:200:1:3x4:4"}
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
  salt=$(date +%s%N)
  hist=$WORK/history-$shape-$n.sqlite; rm -f "$hist"

  echo "== $shape, $n derivations, $builders builders x $slots slots + $local local slots"
  echo "   critical path ${cp}s, total work ${work}s / $total_slots slots: lower bound ${lb}s"
  t0=$(now)
  nix-build "$nix" --argstr salt "nix-$salt" --builders "$spec" -j "$local" --no-out-link >/dev/null 2>"$WORK/nix.log"
  t1=$(now)
  "$OFFLOAD" build "$nix" --argstr salt "cold-$salt" --builders "$spec" -j "$local" --no-out-link \
    --history "$hist" --no-build-output >/dev/null 2>"$WORK/offload-cold.log"
  t2=$(now)
  "$OFFLOAD" build "$nix" --argstr salt "warm-$salt" --builders "$spec" -j "$local" --no-out-link \
    --history "$hist" --no-build-output >/dev/null 2>"$WORK/offload-warm.log"
  t3=$(now)
  tn=$(secs "$t0" "$t1"); tc=$(secs "$t1" "$t2"); tw=$(secs "$t2" "$t3")
  vs_lb() { awk -v t="$1" -v lb="$lb" 'BEGIN {if (lb > 0) printf "%.2fx the lower bound", t / lb; else printf "lower bound 0"}'; }
  printf '   nix-build --builders:        %7.2f s  (%s)\n' "$tn" "$(vs_lb "$tn")"
  printf '   offload, empty history:      %7.2f s  (%s, %.2fx faster than Nix)\n' "$tc" "$(vs_lb "$tc")" "$(awk "BEGIN {print $tn / $tc}")"
  printf '   offload, with history:       %7.2f s  (%s, %.2fx faster than Nix)\n' "$tw" "$(vs_lb "$tw")" "$(awk "BEGIN {print $tn / $tw}")"
  grep -h '^built' "$WORK/offload-cold.log" "$WORK/offload-warm.log" | sed 's/^/   /'
done
