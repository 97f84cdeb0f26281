#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a few seconds each, seeded with the committed
# corpus (fuzz/corpus/TARGET, left unchanged: new inputs go to a scratch directory).
# A crash fails the run and leaves the input under fuzz/artifacts/TARGET.
#
#   bash scripts/fuzz.sh [SECONDS]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (cargo-fuzz needs it): rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --quiet --locked cargo-fuzz
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for target in $(cargo +nightly fuzz list --fuzz-dir fuzz); do
  mkdir -p "$scratch/$target"
  echo "fuzz: $target for ${seconds} s"
  if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$scratch/$target" "fuzz/corpus/$target" \
      -- -max_total_time="$seconds" -print_final_stats=1 2>"$scratch/$target.log"; then
    tail -40 "$scratch/$target.log" >&2
    echo "fuzz: $target failed" >&2
    status=1
  else
    grep -E '^stat::number_of_executed_units' "$scratch/$target.log" | sed "s/^/fuzz: $target /" || true
  fi
done
exit "$status"
