#!/usr/bin/env bash
# Runs the whole test suite: sets the machine up (scripts/setup.sh), then `cargo test`.
# Tests drive real Nix, real OpenSSH (sshd hosts on loopback in private mount
# namespaces) and real SQLite.
#
#   bash scripts/test.sh [cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# No binary cache is reachable here: without this every Nix call retries it for seconds.
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}
exec cargo test --workspace "$@"
