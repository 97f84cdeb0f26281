#!/usr/bin/env python3
"""Writes a mixed fleet in Nix's machines-file syntax, for `offload simulate`:
60 % x86_64-linux (4/8/16 slots, speed 1-4, some with big-parallel and kvm), 40 %
aarch64-linux (4/8 slots, speed 1-2, some with big-parallel).

  gen-fleet.py N [SEED] > machines
"""
import random
import sys

n = int(sys.argv[1])
rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
for i in range(n):
    if i < n * 6 // 10:
        feats = "big-parallel,kvm" if i % 10 == 0 else "kvm" if i % 7 == 0 else "-"
        print(f"ssh://x{i} x86_64-linux - {rng.choice([4, 8, 16])} {rng.choice([1, 2, 3, 4])} {feats}")
    else:
        feats = "big-parallel" if i % 8 == 0 else "-"
        print(f"ssh://a{i} aarch64-linux - {rng.choice([4, 8])} {rng.choice([1, 2])} {feats}")
