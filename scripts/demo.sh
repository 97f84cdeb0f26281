#!/usr/bin/env bash
# The main-job demo: sets the machine up (scripts/setup.sh), builds offload, then moves a
# build closure around a loopback fleet of three machines — chroot stores reached as
# `ssh://localhost?remote-store=DIR`, which Nix and offload run as local processes.
#
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "building offload (release)"
cargo build --release -q -p offload
OFFLOAD=$PWD/target/release/offload
FLEET=${FLEET:-/tmp/offload-demo}
rm -rf "$FLEET"; mkdir -p "$FLEET"
m() { echo "ssh://localhost?remote-store=$FLEET/m$1"; }

step "building a demo closure in the local store (20 derivations, a few MB)"
SALT=$(date +%s%N)
cat > "$FLEET/demo.nix" <<NIX
let
  mk = name: deps: size: derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    PATH = "/bin:/usr/bin"; salt = "$SALT";
    args = [ "-c" "mkdir -p \$out/bin; head -c \${toString size} /dev/urandom > \$out/data; echo \$deps > \$out/deps; printf '#!/bin/sh\\\\necho hi\\\\n' > \$out/bin/run; chmod +x \$out/bin/run" ];
  };
  libs = builtins.genList (i: mk "lib\${toString i}" [] (100000 * (i + 1))) 12;
  mids = builtins.genList (i: mk "mid\${toString i}" [ (builtins.elemAt libs i) (builtins.elemAt libs (i + 4)) ] 50000) 7;
in mk "demo-app" mids 1000
NIX
ROOT=$(nix-build --no-out-link "$FLEET/demo.nix" 2>/dev/null)
echo "$ROOT ($(nix-store -qR "$ROOT" | wc -l) paths in its closure)"

step "offload copy --to m1: only what m1 lacks moves"
"$OFFLOAD" copy --to "$(m 1)" "$ROOT"
step "offload copy --to m1 again: nothing to do"
"$OFFLOAD" copy --to "$(m 1)" "$ROOT"
step "offload copy --from m1 --to m2: machine to machine, streamed through offload"
"$OFFLOAD" copy --from "$(m 1)" --to "$(m 2)" "$ROOT"
step "offload copy --from m2 --store m3-as-local: into another store"
"$OFFLOAD" copy --from "$(m 2)" --store "$FLEET/m3" "$ROOT"

step "checking every store with nix-store --verify --check-contents"
for i in 1 2 3; do
  nix-store --store "$FLEET/m$i" --verify --check-contents 2>&1 | grep -v '^checking' || true
  printf 'm%s: %s paths of the closure valid\n' "$i" "$(nix-store --store "$FLEET/m$i" -qR "$ROOT" | wc -l)"
done
