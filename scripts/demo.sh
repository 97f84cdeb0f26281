#!/usr/bin/env bash
# The main-job demo: sets the machine up (scripts/setup.sh), builds offload, then builds
# a 24-derivation graph over a loopback fleet — three machines that are chroot stores
# reached as `ssh://localhost?remote-store=DIR` (run as local processes, as Nix does),
# plus this machine — and ends with where each build ran and the wall time against the
# lower bound. Every run builds fresh derivations (a salt).
#
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}
step() { printf '\n==> %s\n' "$*"; }

step "building offload (release)"
cargo build --release -q -p offload
OFFLOAD=$PWD/target/release/offload
FLEET=${FLEET:-/tmp/offload-demo}
mkdir -p "$FLEET"
# Builds on loopback machines run without build users: they are shared by every store
# on this machine, and Nix kills all processes of a build user around each build.
printf '#!/bin/sh\nexec nix-store --option build-users-group %s "$@"\n' "''" > "$FLEET/nix-store-fleet"
chmod +x "$FLEET/nix-store-fleet"
BUILDERS=""
for i in 1 2 3; do
  BUILDERS+="ssh://localhost?remote-store=$FLEET/m$i&remote-program=$FLEET/nix-store-fleet x86_64-linux - 2 1;"
done

step "a build graph: 24 derivations in 4 layers, 0.2-3 s each (scripts/gen-dag.py)"
python3 scripts/gen-dag.py layered 24 7 "$FLEET/graph.nix"

step "offload build over 3 loopback machines x 2 slots + 2 local slots"
cd "$FLEET"
"$OFFLOAD" build graph.nix --argstr salt "$(date +%s%N)" --builders "$BUILDERS" -j 2 \
  --no-build-output --history "$FLEET/history.sqlite"

step "the results: linked like nix-build, valid in the local store"
ls -l "$FLEET"/result* | head -3
nix-store --verify-path $(nix-store -qR "$FLEET"/result*) && echo "all outputs and their closures verify"
