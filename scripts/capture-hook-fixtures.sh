#!/usr/bin/env bash
# Records what Nix 2.8 writes to a build hook: fixtures/hook/accept.nix-to-hook.bin.
# A recording hook (Python, below) reads Nix's settings and one `try`, accepts it on a
# made-up machine, reads the inputs and wanted outputs, saves every byte it read and
# fails the build (exit 1), so nothing is built. Run as root with the local store.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$here/fixtures/hook
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
cat > "$work/hook" <<PY
#!/usr/bin/env python3
import struct, sys
src, saved = sys.stdin.buffer, bytearray()
def read(n):
    b = src.read(n); saved.extend(b); return b
def u64(): return struct.unpack('<Q', read(8))[0]
def string():
    n = u64(); b = read(n); read((8 - n % 8) % 8); return b.decode()
def strings(): return [string() for _ in range(u64())]
while u64():
    string(); string()
string(); u64(); string(); string(); strings()
sys.stderr.write('# accept\nssh://recorded\n'); sys.stderr.flush()
strings(); strings()
open('$out/accept.nix-to-hook.bin', 'wb').write(saved)
sys.exit(1)
PY
chmod +x "$work/hook"
cat > "$work/graph.nix" <<'NIX'
let dep = derivation { name = "hook-fixture-dep"; system = "x86_64-linux"; builder = "/bin/sh";
                       args = [ "-c" "echo dep > $out" ]; };
in derivation { name = "hook-fixture"; system = "x86_64-linux"; builder = "/bin/sh";
                requiredSystemFeatures = [ "big-parallel" ];
                args = [ "-c" "cat ${dep} > $out" ]; src = ./graph.nix; }
NIX
# The dependency is built first without the recording hook, so the hook is offered
# only the top derivation, whose inputs are then valid.
drv=$(NIX_CONFIG='substituters =' nix-instantiate "$work/graph.nix" 2>/dev/null)
NIX_CONFIG='substituters =' nix-store -r "$(nix-store -q --references "$drv" | grep 'hook-fixture-dep.drv')" >/dev/null 2>&1
NIX_CONFIG='substituters =' nix-build "$work/graph.nix" --no-out-link \
  --option build-hook "$work/hook" --option system-features 'big-parallel' \
  --builders 'ssh://recorded x86_64-linux - 1 1 big-parallel' -j1 2>/dev/null || true
ls -l "$out"
