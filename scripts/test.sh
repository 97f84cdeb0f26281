#!/usr/bin/env bash
# Runs what CI runs: sets the machine up (scripts/setup.sh), checks formatting, clippy,
# rustdoc, the crate layering and the modules' sizes and imports (scripts/check-modules.py),
# fuzzes every parser briefly (scripts/fuzz.sh), then `cargo test`. Every check runs even
# when an earlier one fails; the script exits non-zero if any check or test failed.
# Tests drive real Nix, real OpenSSH (sshd hosts on loopback in private mount
# namespaces) and real SQLite. The last line totals cargo's per-binary summaries.
#
#   bash scripts/test.sh [cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# No binary cache is reachable here: without this every Nix call retries it for seconds.
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}
# Setup installed Nix and OpenSSH, so an end-to-end test that cannot run is a failure
# here, not a skip.
export OFFLOAD_REQUIRE_E2E=1
# A snapshot that differs, or is missing, fails instead of being written.
export INSTA_UPDATE=no
unset INSTA_FORCE_PASS

failed=()
check() {
  local name=$1
  shift
  echo "check: $name" >&2
  "$@" || failed+=("$name")
}
check fmt cargo fmt --all --check
check clippy cargo clippy --workspace --all-targets -- -D warnings
check rustdoc env RUSTDOCFLAGS='-D warnings' cargo doc --workspace --no-deps --document-private-items
check crate-layers bash scripts/check-deps.sh
# The largest files and functions, no import loop among the top-level modules of the
# driver or the CLI, every CLI test file in its index, no file over 600 lines, no
# function over 120, and a thin CLI (scripts/check-modules.py says which limits).
check modules-self-test python3 scripts/check-modules.py --self-test
check modules python3 scripts/check-modules.py --limits
# Every parser of remote or file input, fuzzed briefly from the committed corpus.
check fuzz bash scripts/fuzz.sh "${OFFLOAD_FUZZ_SECONDS:-5}"
# The planner and simulator at fleet scale: 100,000 derivations on 1,000 machines.
check sim-guard bash scripts/sim-guard.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
[ ${#failed[@]} -eq 0 ] || echo "checks failed: ${failed[*]}"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
[ ${#failed[@]} -eq 0 ] || exit 1
exit "$status"
