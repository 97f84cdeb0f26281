#!/usr/bin/env bash
# Regenerates fixtures/ from the installed Nix (2.8): .drv files, NARs, an export
# stream and a serve-protocol session, all captured from the real binaries. See
# fixtures/README.md for what each file shows and which bytes vary between runs.
#
#   scripts/capture-fixtures.sh            # rewrites fixtures/{drv,nar,export,serve}
#   WORK=/tmp/somewhere scripts/capture-fixtures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FIX=$ROOT/fixtures
WORK=${WORK:-$(mktemp -d /tmp/offload-capture.XXXXXX)}
STORE=$WORK/store
# No network: nothing may be substituted.
export NIX_CONFIG='substituters ='
nix-store --version | grep -q ' 2\.8\.' || {
  echo "capture-fixtures: needs Nix 2.8, found: $(nix-store --version)" >&2
  exit 1
}
mkdir -p "$FIX"/{drv,nar,export,serve}

# --- .drv files: instantiated into a fresh chroot store, copied out byte for byte.
: > "$FIX/drv/paths.txt"
for attr in hi fod top fail; do
  drv=$(nix-instantiate --store "$STORE" "$FIX/drv/fixtures.nix" -A "$attr")
  cp "$STORE$drv" "$FIX/drv/$attr.drv"
  chmod 644 "$FIX/drv/$attr.drv"
  # The .drv path and output paths Nix computed, one `name path` per line.
  echo "drv $drv" >> "$FIX/drv/paths.txt"
  nix --extra-experimental-features nix-command show-derivation --store "$STORE" "$drv" \
    | python3 -c 'import json,sys
d = next(iter(json.load(sys.stdin).values()))
for name, o in sorted(d["outputs"].items()): print(name, o["path"])' \
    >> "$FIX/drv/paths.txt"
  nix --extra-experimental-features nix-command show-derivation --store "$STORE" "$drv" \
    > "$WORK/$attr.json"
done

# --- NARs: `nix-store --dump` of a one-file path and of a small tree.
mkdir -p "$WORK/tree/bin" "$WORK/tree/share/empty"
printf 'hi\n' > "$WORK/hi"
printf 'hello\n' > "$WORK/tree/a.txt"
printf '#!/bin/sh\necho run\n' > "$WORK/tree/bin/run"
chmod 755 "$WORK/tree/bin/run"
ln -sfn a.txt "$WORK/tree/link"
nix-store --dump "$WORK/hi" > "$FIX/nar/hi.nar"
nix-store --dump "$WORK/tree" > "$FIX/nar/tree.nar"

# --- A serve-protocol session against `nix-store --serve --write` on the chroot store.
# The client below writes each request by hand from Nix's own JSON view of the
# derivations, reads exactly one reply, and saves both sides as separate files.
python3 - "$STORE" "$FIX/serve" "$WORK" <<'PY'
import json, struct, subprocess, sys

store, out, work = sys.argv[1:]
server = subprocess.Popen(
    ["nix-store", "--serve", "--write", "--store", store],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    stderr=open(f"{work}/server.log", "wb"))

def u64(v): return struct.pack("<Q", v)
def string(s):
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b + b"\0" * (-len(b) % 8)
def strings(items): return u64(len(items)) + b"".join(string(i) for i in items)

class Reply:
    """Reads from the server, keeping every byte read."""
    def __init__(self): self.data = b""
    def take(self, n):
        b = b""
        while len(b) < n:
            chunk = server.stdout.read(n - len(b))
            if not chunk: sys.exit(f"server closed the stream; see {work}/server.log")
            b += chunk
        self.data += b
        return b
    def u64(self): return struct.unpack("<Q", self.take(8))[0]
    def string(self):
        n = self.u64()
        return self.take(n + (-n % 8))[:n].decode()
    def strings(self): return [self.string() for _ in range(self.u64())]

def exchange(name, request, read):
    server.stdin.write(request)
    server.stdin.flush()
    reply = Reply()
    value = read(reply)
    open(f"{out}/{name}.client.bin", "wb").write(request)
    open(f"{out}/{name}.server.bin", "wb").write(reply.data)
    return value

def drv(attr):
    path, d = next(iter(json.load(open(f"{work}/{attr}.json")).items()))
    return path, d

# What Nix 2.8's client sends by default (see fixtures/README.md).
SETTINGS = u64(0) + u64(0) + u64(0) + u64(0) + u64(1) + u64(0)

def build_derivation(attr, input_srcs):
    path, d = drv(attr)
    req = u64(8) + string(path) + u64(len(d["outputs"]))
    for name, o in sorted(d["outputs"].items()):
        req += string(name) + string(o["path"]) + string(o.get("hashAlgo", "")) + string(o.get("hash", ""))
    req += strings(sorted(input_srcs)) + string(d["system"]) + string(d["builder"])
    req += strings(d["args"]) + u64(len(d["env"]))
    for k, v in sorted(d["env"].items()):
        req += string(k) + string(v)
    return req + SETTINGS

def build_result(r):
    status, msg = r.u64(), r.string()
    times = [r.u64() for _ in range(4)]
    outputs = [(r.string(), r.string()) for _ in range(r.u64())]
    return status, msg, times, outputs

def path_infos(r):
    infos = {}
    while (path := r.string()):
        info = dict(deriver=r.string(), refs=r.strings(), download=r.u64(), nar_size=r.u64(),
                    nar_hash=r.string(), ca=r.string(), sigs=r.strings())
        infos[path] = info
    return infos

out_of = lambda attr, o="out": drv(attr)[1]["outputs"][o]["path"]
hi, fod, top = out_of("hi"), out_of("fod"), out_of("top")
missing = "/nix/store/00000000000000000000000000000000-missing"

exchange("01-handshake", u64(0x390c9deb) + u64(0x207), lambda r: (r.u64(), r.u64()))
assert exchange("02-build-hi", build_derivation("hi", []), build_result)[0] == 0
assert exchange("03-build-fail", build_derivation("fail", []), build_result)[0] == 3
assert exchange("04-build-fod", build_derivation("fod", []), build_result)[0] == 0
# As Nix's build hook does, the inputs of `top` are sent as sources: its input closure.
assert exchange("05-build-top", build_derivation("top", [hi, fod]), build_result)[0] == 0
exchange("06-query-valid-paths",
         u64(1) + u64(0) + u64(0) + strings([hi, missing]), lambda r: r.strings())
infos = exchange("07-query-path-infos",
                 u64(2) + strings(sorted([hi, top, missing])), path_infos)
exchange("08-query-closure", u64(7) + u64(0) + strings([top]), lambda r: r.strings())
exchange("09-dump-store-path", u64(3) + string(hi), lambda r: r.take(infos[hi]["nar_size"]))

def export_stream(r):
    while r.u64() == 1:
        r.take(infos[hi]["nar_size"])
        assert r.u64() == 0x4558494e
        r.string(); r.strings(); r.string()
        assert r.u64() == 0

exchange("10-export-paths", u64(5) + u64(0) + strings([hi]), export_stream)
server.stdin.close()
sys.exit(server.wait())
PY

# --- `nix-store --export` of the closure of top's `out` (top, hi and fod).
top_out=$(awk '$1 == "out" && $2 ~ /-top$/ {print $2}' "$FIX/drv/paths.txt")
# shellcheck disable=SC2046 # one argument per path
nix-store --store "$STORE" --export $(nix-store --store "$STORE" -qR "$top_out") \
  > "$FIX/export/top-closure.export"
nix-store --store "$STORE" -qR "$top_out" > "$FIX/export/top-closure.paths"

echo "fixtures written under $FIX (work files in $WORK)"
du -sh "$FIX"
