#!/usr/bin/env bash
# NAR writing benchmark: offload's NAR writer against `nix-store --dump` (Nix 2.8) on the
# same tree, page cache warm, best of ROUNDS each, alternating. Prints both throughputs,
# the ratio, and offload's peak RSS.
#
#   scripts/bench-nar-dump.sh              # a 1 GiB tree
#   SIZE_MB=256 scripts/bench-nar-dump.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-1024}
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/offload-bench-nar}
bash scripts/setup.sh
cargo build --release -q -p offload-nix --example nar_dump
OURS=$PWD/target/release/examples/nar_dump

# A few large files (80%) and many small ones (20%) in nested directories.
if [ ! -f "$WORK/.size-$SIZE_MB" ]; then
  rm -rf "$WORK"; mkdir -p "$WORK/tree"
  python3 - "$WORK/tree" "$SIZE_MB" <<'PY'
import os, random, sys
root, mb = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
block = rng.randbytes(1 << 20)
big = mb * 8 // 10
for i in range(4):
    with open(os.path.join(root, f"big{i}"), "wb") as f:
        for _ in range(big // 4):
            f.write(block)
small_total, n = (mb - big) << 20, 0
while small_total > 0:
    d = os.path.join(root, f"d{n % 50}", f"e{n % 7}")
    os.makedirs(d, exist_ok=True)
    size = rng.randrange(1, 64 << 10)
    with open(os.path.join(d, f"f{n}"), "wb") as f:
        f.write(block[:size])
    if n % 9 == 0:
        os.chmod(os.path.join(d, f"f{n}"), 0o755)
    small_total -= size
    n += 1
PY
  touch "$WORK/.size-$SIZE_MB"
fi
TREE=$WORK/tree
BYTES=$(nix-store --dump "$TREE" | wc -c)
cmp <(nix-store --dump "$TREE") <("$OURS" "$TREE") && echo "NARs identical: $BYTES bytes"

measure() { /usr/bin/time -f '%e %M' "$@" "$TREE" 2>&1 >/dev/null | tail -1; }
best_nix=; best_ours=; rss=0
for r in $(seq 1 "$ROUNDS"); do
  read -r tn _ < <(measure nix-store --dump)
  read -r to ko < <(measure "$OURS")
  echo "round $r: nix-store --dump ${tn}s, offload ${to}s (peak RSS ${ko} KiB)"
  best_nix=$(awk "BEGIN {b = \"$best_nix\"; print (b == \"\" || $tn < b) ? $tn : b}")
  best_ours=$(awk "BEGIN {b = \"$best_ours\"; print (b == \"\" || $to < b) ? $to : b}")
  rss=$(( ko > rss ? ko : rss ))
done
awk -v b="$BYTES" -v n="$best_nix" -v o="$best_ours" -v r="$rss" 'BEGIN {
  mbn = b / 1048576 / (n > 0 ? n : 0.001); mbo = b / 1048576 / (o > 0 ? o : 0.001)
  printf "nix-store --dump: %8.0f MiB/s (%.2f s)\noffload NAR:      %8.0f MiB/s (%.2f s)\n", mbn, n, mbo, o
  printf "throughput ratio offload/nix: %.2f\noffload peak RSS: %.1f MiB\n", mbo / mbn, r / 1024 }'
