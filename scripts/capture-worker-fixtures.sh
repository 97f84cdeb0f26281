#!/usr/bin/env bash
# Records what a real nix-daemon answers in the worker protocol (`nix-daemon --stdio`,
# as an ssh-ng:// builder runs it) to a fixed list of requests, for Nix 2.8 and, when
# the Debian 13 root that scripts/newer-nix.sh makes is there, Nix 2.26:
# fixtures/worker/{requests,replies}-{2.8,2.26}.bin. The requests (written by the Python
# below): the handshake at 1.38, QueryValidPaths of a valid and a missing path,
# QueryPathInfo of each, NarFromPath of the valid one, BuildDerivation of a derivation
# that logs a line and fails. Run as root. See fixtures/README.md.
set -euo pipefail
. "$(dirname "$0")/lib/newer-daemon.sh"
here=$(cd "$(dirname "$0")/.." && pwd)
out=$here/fixtures/worker
root=${OFFLOAD_TEST_CACHE:-/var/cache/offload-test}/nix-trixie-1
work=$(mktemp -d /tmp/offload-worker-capture.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
export NIX_CONFIG='substituters =
sandbox = false
build-users-group ='

cat > "$work/requests.py" <<'PY'
import struct, sys
version = int(sys.argv[1], 0)  # the version the daemon will agree on
valid, missing = sys.argv[2], sys.argv[3]
o = bytearray()
def u64(n): o.extend(struct.pack('<Q', n))
def s(b):
    if isinstance(b, str): b = b.encode()
    u64(len(b)); o.extend(b); o.extend(b'\0' * ((8 - len(b) % 8) % 8))
def strings(xs):
    u64(len(xs))
    for x in xs: s(x)
u64(0x6e697863); u64(0x126)
if version >= 0x126: u64(0)          # no features
u64(0); u64(0)                       # CPU affinity, reserve space
u64(31); strings([valid, missing]); u64(0)   # QueryValidPaths, no substitutes
u64(26); s(valid)                    # QueryPathInfo
u64(26); s(missing)
u64(38); s(valid)                    # NarFromPath
out = '/nix/store/' + '0' * 32 + '-captured-fail'
u64(36); s('/nix/store/' + '1' * 32 + '-captured-fail.drv')   # BuildDerivation
u64(1); s('out'); s(out); s(''); s('')
strings([]); s(sys.argv[4]); s('/bin/sh')
strings(['-c', 'echo captured log line; exit 3'])
env = sorted({'out': out, 'name': 'captured-fail', 'builder': '/bin/sh',
              'system': sys.argv[4], 'PATH': '/bin:/usr/bin'}.items())
u64(len(env))
for k, v in env: s(k); s(v)
u64(0)                               # bmNormal
sys.stdout.buffer.write(bytes(o))
PY

system=$(nix-instantiate --eval --expr builtins.currentSystem | tr -d '"')
echo "worker protocol fixture: a valid path" > "$work/file.txt"

# Nix 2.8: a chroot store of its own.
store=$work/store
valid=$(nix-store --store "$store" --add "$work/file.txt")
missing=/nix/store/$(printf 'a%.0s' $(seq 32))-missing
python3 "$work/requests.py" 0x122 "$valid" "$missing" "$system" > "$out/requests-2.8.bin"
# Input stays open while the daemon answers: it stops a build when its input closes.
(cat "$out/requests-2.8.bin"; sleep 5) \
  | nix-daemon --stdio --store "$store" > "$out/replies-2.8.bin"
echo "$valid" > "$out/paths-2.8.txt"

# Nix 2.26: its daemon in the Debian 13 root, in a mount namespace of its own.
if [ -x "$root/usr/bin/nix-daemon" ]; then
  python3 "$work/requests.py" 0x126 "$valid" "$missing" "$system" > "$out/requests-2.26.bin"
  daemon_in_root "$root" "$work/file.txt" "$out/requests-2.26.bin" "$out/replies-2.26.bin" 5
fi
ls -l "$out"
