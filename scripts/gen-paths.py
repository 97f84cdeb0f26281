#!/usr/bin/env python3
"""Deterministic files for the copy and upload benchmarks: N entries under DIR whose
sizes spread around MB/N MiB (random bytes, so nothing compresses), every fifth a
directory with two files, an executable and a symlink.

  gen-paths.py DIR N MB           # entries p0 … p(N-1)
  gen-paths.py DIR N MB --text    # text files t0 … t(N-1) (builtins.toFile takes no NUL)
"""
import os
import random
import sys

if len(sys.argv) < 4:
    sys.exit(__doc__)
root, n, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
text = "--text" in sys.argv[4:]
rng = random.Random(42)
avg = mb * 1024 * 1024 // n
os.makedirs(root, exist_ok=True)
if text:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789\n"
    chunk = "".join(rng.choice(alphabet) for _ in range(1 << 16))
    for i in range(n):
        size = max(1, int(avg * rng.uniform(0.2, 1.8)))
        off = rng.randrange(len(chunk))
        data = (chunk[off:] + chunk[:off]) * (size // len(chunk) + 1)
        with open(os.path.join(root, f"t{i}"), "w") as f:
            f.write(data[:size])
    sys.exit(0)
block = rng.randbytes(1 << 20)
for i in range(n):
    size = max(1, int(avg * rng.uniform(0.2, 1.8)))
    if i % 5 == 0:
        d = os.path.join(root, f"p{i}")
        os.makedirs(os.path.join(d, "bin"))
        for j, part in enumerate((size // 2, size - size // 2)):
            off = rng.randrange(0, len(block))
            with open(os.path.join(d, "bin" if j else "", f"f{j}"), "wb") as f:
                data = (block[off:] + block[:off]) * (part // len(block) + 1)
                f.write(data[:part])
        os.chmod(os.path.join(d, "bin", "f1"), 0o755)
        os.symlink("bin/f1", os.path.join(d, "link"))
    else:
        off = rng.randrange(0, len(block))
        with open(os.path.join(root, f"p{i}"), "wb") as f:
            f.write(((block[off:] + block[:off]) * (size // len(block) + 1))[:size])
