#!/usr/bin/env bash
# Records what a real nix-daemon answers to the worker protocol's realisation
# operations (`nix-daemon --stdio` with the `ca-derivations` feature, as `offload hook`
# runs it to register a floating content-addressed output it brought home), for Nix 2.8
# and, when the Debian 13 root that scripts/newer-nix.sh makes is there, Nix 2.26:
# fixtures/worker/realisation-{requests,replies}-{2.8,2.26}.bin and the realisation sent,
# realisation-{2.8,2.26}.json. The requests (written by the Python below): the handshake
# at 1.38, QueryRealisation of an id the store lacks, RegisterDrvOutput of that id
# for a valid path (the JSON), QueryRealisation of it again. Run as root. See
# fixtures/README.md.
set -euo pipefail
. "$(dirname "$0")/lib/newer-daemon.sh"
here=$(cd "$(dirname "$0")/.." && pwd)
out=$here/fixtures/worker
root=${OFFLOAD_TEST_CACHE:-/var/cache/offload-test}/nix-trixie-1
work=$(mktemp -d /tmp/offload-realisation-capture.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
export NIX_CONFIG='substituters =
experimental-features = ca-derivations'

cat > "$work/requests.py" <<'PY'
import struct, sys
version = int(sys.argv[1], 0)  # the version the daemon will agree on
json_text = open(sys.argv[2]).read().strip()
ident = 'sha256:' + '5' * 64 + '!out'
o = bytearray()
def u64(n): o.extend(struct.pack('<Q', n))
def s(b):
    if isinstance(b, str): b = b.encode()
    u64(len(b)); o.extend(b); o.extend(b'\0' * ((8 - len(b) % 8) % 8))
u64(0x6e697863); u64(0x126)
if version >= 0x126: u64(0)          # no features
u64(0); u64(0)                       # CPU affinity, reserve space
u64(43); s(ident)                    # QueryRealisation: none yet
u64(42); s(json_text)                # RegisterDrvOutput, as JSON from 1.31
u64(43); s(ident)                    # QueryRealisation: the one registered
sys.stdout.buffer.write(bytes(o))
PY

realisation() {  # the JSON Nix writes for a realisation of id …!out at $1 (base name)
  printf '{"dependentRealisations":{},"id":"sha256:%s!out","outPath":"%s","signatures":[]}\n' \
    "$(printf '5%.0s' $(seq 64))" "$1"
}
echo "realisation fixture: an output" > "$work/file.txt"

# Nix 2.8: a chroot store of its own.
store=$work/store
valid=$(nix-store --store "$store" --add "$work/file.txt")
realisation "$(basename "$valid")" > "$out/realisation-2.8.json"
python3 "$work/requests.py" 0x122 "$out/realisation-2.8.json" > "$out/realisation-requests-2.8.bin"
(cat "$out/realisation-requests-2.8.bin"; sleep 2) \
  | nix-daemon --stdio --store "$store" > "$out/realisation-replies-2.8.bin"

# Nix 2.26: its daemon in the Debian 13 root, in a mount namespace of its own.
if [ -x "$root/usr/bin/nix-daemon" ]; then
  realisation "$(basename "$valid")" > "$out/realisation-2.26.json"
  python3 "$work/requests.py" 0x126 "$out/realisation-2.26.json" > "$out/realisation-requests-2.26.bin"
  daemon_in_root "$root" "$work/file.txt" "$out/realisation-requests-2.26.bin" "$out/realisation-replies-2.26.bin" 2
fi
ls -l "$out"/realisation-*
