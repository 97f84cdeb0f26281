#!/usr/bin/env bash
# Runs the whole test suite: sets the machine up (scripts/setup.sh), then `cargo test`.
# Tests drive real Nix, real OpenSSH (sshd hosts on loopback in private mount
# namespaces) and real SQLite. The last line totals cargo's per-binary summaries.
#
#   bash scripts/test.sh [cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# No binary cache is reachable here: without this every Nix call retries it for seconds.
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
