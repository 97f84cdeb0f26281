#!/usr/bin/env python3
"""Writes a synthetic build graph as a Nix expression: sleep-based derivations with given
durations and output sizes, for the build benchmarks and tests.

  gen-dag.py SHAPE N SEED OUT.nix        SHAPE: layered | nixpkgs | wide | chain | trivial

It also writes OUT.json, the same graph for `offload simulate --dag`.

The expression takes `salt` (so every run gets fresh output paths) and evaluates to a
list of the graph's sinks. The graph's critical path and total work, in seconds, are
printed as `critical_path=… total_work=… nodes=…`.
"""
import random
import sys

shape, n, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
nodes = []  # (name, duration, output_bytes, deps)

if shape == "layered":
    layers = [max(1, n // 8), n // 4, n // 4]
    layers.append(n - sum(layers))
    prev = []
    for li, count in enumerate(layers):
        cur = []
        for _ in range(count):
            deps = rng.sample(prev, min(len(prev), rng.randint(1, 3))) if prev else []
            nodes.append((f"l{li}-{len(nodes)}", round(rng.uniform(0.2, 3.0), 2), rng.randint(1, 64) * 1024, deps))
            cur.append(len(nodes) - 1)
        prev = cur
elif shape == "nixpkgs":
    # A few long toolchain builds in a chain, then many short leaves on top.
    chain = []
    for i in range(max(2, n // 10)):
        nodes.append((f"toolchain{i}", round(rng.uniform(2.0, 4.0), 2), 512 * 1024, chain[-1:]))
        chain.append(len(nodes) - 1)
    while len(nodes) < n:
        deps = [rng.choice(chain[len(chain) // 2:])] + rng.sample(range(len(chain), len(nodes)), min(2, len(nodes) - len(chain)) if rng.random() < 0.3 else 0)
        nodes.append((f"pkg{len(nodes)}", round(rng.uniform(0.1, 1.0), 2), rng.randint(1, 32) * 1024, deps))
elif shape == "wide":
    nodes = [(f"w{i}", round(rng.uniform(0.2, 2.0), 2), 4096, []) for i in range(n)]
elif shape == "chain":
    for i in range(n):
        nodes.append((f"c{i}", round(rng.uniform(0.1, 1.0), 2), 4096, [i - 1] if i else []))
elif shape == "trivial":
    nodes = [(f"t{i}", 0.0, 16, []) for i in range(n)]
else:
    sys.exit(f"unknown shape {shape}")

dependents = [0] * len(nodes)
for _, _, _, deps in nodes:
    for d in deps:
        dependents[d] += 1
finish = []
for name, dur, size, deps in nodes:
    finish.append(dur + max((finish[d] for d in deps), default=0.0))

with open(out, "w") as f:
    f.write("{ salt ? \"0\" }:\nlet\n  mk = name: dur: size: deps: derivation {\n")
    f.write("    inherit name salt deps; system = builtins.currentSystem; builder = \"/bin/sh\"; PATH = \"/bin:/usr/bin\";\n")
    f.write("    args = [ \"-c\" \"sleep ${dur}; mkdir $out; head -c ${toString size} /dev/zero > $out/data; echo $deps > $out/deps\" ];\n  };\n")
    for i, (name, dur, size, deps) in enumerate(nodes):
        f.write(f'  n{i} = mk "{name}" "{dur}" {size} [ {" ".join(f"n{d}" for d in deps)} ];\n')
    sinks = [i for i in range(len(nodes)) if dependents[i] == 0]
    f.write(f'in [ {" ".join(f"n{i}" for i in sinks)} ]\n')
# The same graph in the schema of `offload simulate --dag`.
import json
with open(out.rsplit(".", 1)[0] + ".json", "w") as f:
    # Ids are the derivation names: Nix works its goals in the order of their names.
    json.dump({"nodes": [{"id": name, "deps": [nodes[d][0] for d in deps], "duration_s": dur,
                          "system": "x86_64-linux", "required_features": [], "output_bytes": size}
                         for i, (name, dur, size, deps) in enumerate(nodes)]}, f)
print(f"critical_path={max(finish):.2f} total_work={sum(x[1] for x in nodes):.2f} nodes={len(nodes)}")
