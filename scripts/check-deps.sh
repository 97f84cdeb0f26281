#!/usr/bin/env bash
# Checks that the workspace's crate dependencies point down only, as the style guide
# asks: nix (formats) → sched (pure scheduler) → learn (pure learning) → sim
# (simulation) and driver (machines) → cli (the binary), with test-support for tests
# only. Reads the real graph from `cargo metadata` and fails naming every edge the list
# below does not allow.
#
#   bash scripts/check-deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# "from to" pairs a normal (or build) dependency may take, by package name. A dev
# dependency may take these too, and offload-test-support besides.
ALLOWED='
offload-learn offload-sched
offload-sim offload-nix
offload-sim offload-sched
offload-sim offload-learn
offload-driver offload-nix
offload-driver offload-sched
offload-driver offload-learn
offload offload-nix
offload offload-sched
offload offload-sim
offload offload-driver
'
TEST_ONLY=offload-test-support

cargo metadata --format-version 1 --no-deps |
  ALLOWED="$ALLOWED" TEST_ONLY="$TEST_ONLY" python3 -c '
import json, os, sys

allowed = {tuple(line.split()) for line in os.environ["ALLOWED"].splitlines() if line.strip()}
test_only = os.environ["TEST_ONLY"]
packages = json.load(sys.stdin)["packages"]
members = {p["name"] for p in packages}
bad = []
for p in packages:
    for d in p["dependencies"]:
        if d["name"] not in members:
            continue
        kind = d["kind"] or "normal"
        edge = (p["name"], d["name"])
        source, target = edge
        if edge in allowed or (kind == "dev" and d["name"] == test_only):
            continue
        why = (f"{test_only} is for tests only ([dev-dependencies])" if d["name"] == test_only
               else "it points up or sideways in the layering")
        bad.append(f"check-deps: {source} -> {target} ({kind} dependency) is not allowed: {why}")
if bad:
    print("\n".join(bad), file=sys.stderr)
    print("check-deps: allowed edges are listed in scripts/check-deps.sh", file=sys.stderr)
    sys.exit(1)
'
