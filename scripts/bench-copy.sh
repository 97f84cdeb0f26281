#!/usr/bin/env bash
# Copy benchmark: `offload copy` against `nix copy` (Nix 2.8) for the same closure, from
# the same source store to fresh loopback stores (`ssh://localhost?remote-store=DIR`,
# which both tools run as a local process), side by side in one run.
#
#   scripts/bench-copy.sh            # 1000 source paths + 1 root, about 200 MB
#   PATHS=200 MB=20 scripts/bench-copy.sh
#   SHAPE=deep scripts/bench-copy.sh # a chain: each path refers to the one before
#   ROUNDS=3 scripts/bench-copy.sh   # the best of three rounds each
#
# SHAPE=flat (the default): every path hangs off the root, so all can travel at once.
# SHAPE=deep: a chain of PATHS text files, each referring to the one before, so a
# copy that sends a path only after what it refers to is valid there sends them one at
# a time.
#
# Prints both times, the ratio, and checks both destinations with
# `nix-store --verify --check-contents`.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=${PATHS:-1000}
SHAPE=${SHAPE:-flat}
case $SHAPE in flat | deep) ;; *) echo "error: SHAPE=$SHAPE: use flat or deep" >&2; exit 2 ;; esac
MB=${MB:-200}
ROUNDS=${ROUNDS:-1}
JOBS=${JOBS:-4}
WORK=${WORK:-/tmp/offload-bench-copy}
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}

cargo build --release -q -p offload
OFFLOAD=$PWD/target/release/offload

rm -rf "$WORK"; mkdir -p "$WORK/data"
# Deterministic data: sizes spread around MB/PATHS, some directories with several files.
if [ "$SHAPE" = deep ]; then
  python3 scripts/gen-paths.py "$WORK/data" "$PATHS" "$MB" --text
else
  python3 scripts/gen-paths.py "$WORK/data" "$PATHS" "$MB"
fi
if [ "$SHAPE" = deep ]; then
  cat >"$WORK/root.nix" <<NIX
let link = prev: i: builtins.toFile "chain-\${toString i}"
      "\${prev}\n\${builtins.readFile (/. + "$WORK/data/t\${toString i}")}";
    tip = builtins.foldl' link (builtins.toFile "chain-start" "start") (builtins.genList (i: i) $PATHS);
in derivation { name = "bench-root"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/bin:/usr/bin"; inherit tip; args = ["-c" "echo \$tip > \$out"]; }
NIX
else
  {
    echo 'let leaves = ['
    for i in $(seq 0 $((PATHS - 1))); do echo "  (builtins.path { path = $WORK/data/p$i; name = \"leaf-$i\"; })"; done
    echo ']; in derivation { name = "bench-root"; system = builtins.currentSystem; builder = "/bin/sh";'
    echo '  PATH = "/bin:/usr/bin"; inherit leaves; args = ["-c" "echo $leaves > $out"]; }'
  } >"$WORK/root.nix"
fi
SRC=$WORK/src
ROOT=$(nix-build --store "$SRC" --option extra-sandbox-paths '/bin /lib /lib64 /usr' --no-out-link "$WORK/root.nix" 2>/dev/null)
COUNT=$(nix-store --store "$SRC" -qR "$ROOT" | wc -l)
BYTES=$(nix-store --store "$SRC" -qR "$ROOT" | xargs nix-store --store "$SRC" -q --size | awk '{s += $1} END {print s}')
echo "closure ($SHAPE): $COUNT paths, $((BYTES / 1024 / 1024)) MiB (source store $SRC)"

best_nix=; best_off=
for r in $(seq 1 "$ROUNDS"); do
  rm -rf "$WORK/dst-nix" "$WORK/dst-offload"
  t0=$(date +%s.%N)
  nix --extra-experimental-features nix-command --store "$SRC" copy --quiet \
    --to "ssh://localhost?remote-store=$WORK/dst-nix" "$ROOT" 2>/dev/null
  t1=$(date +%s.%N)
  "$OFFLOAD" copy --store "$SRC" --jobs "$JOBS" --to "ssh://localhost?remote-store=$WORK/dst-offload" "$ROOT"
  t2=$(date +%s.%N)
  tn=$(awk "BEGIN {print $t1 - $t0}"); to=$(awk "BEGIN {print $t2 - $t1}")
  echo "round $r: nix copy ${tn}s, offload copy ${to}s"
  best_nix=$(awk "BEGIN {b = \"$best_nix\"; print (b == \"\" || $tn < b) ? $tn : b}")
  best_off=$(awk "BEGIN {b = \"$best_off\"; print (b == \"\" || $to < b) ? $to : b}")
done

for d in dst-nix dst-offload; do
  n=$(nix-store --store "$WORK/$d" -qR "$ROOT" | wc -l)
  [ "$n" = "$COUNT" ] || { echo "FAIL: $d holds $n of $COUNT paths"; exit 1; }
  nix-store --store "$WORK/$d" --verify --check-contents 2>&1 | grep -v '^checking' || true
done
echo "destinations verified: $COUNT paths each, nix-store --verify --check-contents clean"
printf 'nix copy:     %6.2f s\noffload copy: %6.2f s (jobs %s)\nratio offload/nix: %.2f\n' \
  "$best_nix" "$best_off" "$JOBS" "$(awk "BEGIN {print $best_off / $best_nix}")"
