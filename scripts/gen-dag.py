#!/usr/bin/env python3
"""Writes a synthetic build graph as a Nix expression: sleep-based derivations with given
durations and output sizes, for the build benchmarks and tests.

  gen-dag.py SHAPE N SEED OUT.nix [OPTIONS]   SHAPE: layered | nixpkgs | wide | chain | trivial

It also writes OUT.json, the same graph for `offload simulate --dag`.

Options (none: the graph and expression are exactly as without them):
  --output-size BYTES  every output holds BYTES of random, incompressible data (from
                       /dev/urandom in the build) instead of a few KiB of zeros
  --speed              each build sleeps its duration times the integer in the file
                       /speed-$system, else /speed, else 1: a machine made slow shows
                       such a file in its sandbox (extra-sandbox-paths), the local
                       machine none (scripts/bench-fleet.sh)
  --aarch64 K          K nodes (drawn from those with both inputs and dependents, where
                       there are enough) become aarch64-linux derivations, with short
                       durations (0.2-0.6 s at speed 1), so that only a machine that
                       declares aarch64-linux builds them

The expression takes `salt` (so every run gets fresh output paths) and evaluates to a
list of the graph's sinks. The graph's critical path and total work, in seconds, are
printed as `critical_path=… total_work=… nodes=…`.
"""
import argparse
import random
import sys

ap = argparse.ArgumentParser(usage="gen-dag.py SHAPE N SEED OUT.nix [--output-size BYTES] [--speed] [--aarch64 K]")
ap.add_argument("shape")
ap.add_argument("n", type=int)
ap.add_argument("seed", type=int)
ap.add_argument("out")
ap.add_argument("--output-size", type=int)
ap.add_argument("--speed", action="store_true")
ap.add_argument("--aarch64", type=int, default=0)
opts = ap.parse_args()
shape, n, seed, out = opts.shape, opts.n, opts.seed, opts.out
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
systems = ["x86_64-linux"] * len(nodes)
if opts.output_size is not None:
    nodes = [(name, dur, opts.output_size, deps) for name, dur, size, deps in nodes]
if opts.aarch64:
    pick = random.Random(seed + 1000)
    inner = [i for i, (_, _, _, deps) in enumerate(nodes) if deps and dependents[i]]
    pool = inner if len(inner) >= opts.aarch64 else list(range(len(nodes)))
    for i in pick.sample(pool, min(opts.aarch64, len(pool))):
        name, _, size, deps = nodes[i]
        nodes[i] = (name, round(pick.uniform(0.2, 0.6), 2), size, deps)
        systems[i] = "aarch64-linux"
finish = []
for name, dur, size, deps in nodes:
    finish.append(dur + max((finish[d] for d in deps), default=0.0))

plain = opts.output_size is None and not opts.speed and not opts.aarch64
with open(out, "w") as f:
    if plain:
        f.write("{ salt ? \"0\" }:\nlet\n  mk = name: dur: size: deps: derivation {\n")
        f.write("    inherit name salt deps; system = builtins.currentSystem; builder = \"/bin/sh\"; PATH = \"/bin:/usr/bin\";\n")
        f.write("    args = [ \"-c\" \"sleep ${dur}; mkdir $out; head -c ${toString size} /dev/zero > $out/data; echo $deps > $out/deps\" ];\n  };\n")
    else:
        # `centis`: the duration in hundredths of a second, scaled in shell arithmetic.
        sleep = ("f=1; for s in /speed-$system /speed; do if [ -r $s ]; then read f < $s; break; fi; done; "
                 "t=$((${toString centis} * f)); sleep $((t / 100)).$((t / 10 % 10))$((t % 10)); ") if opts.speed else "sleep ${dur}; "
        source = "/dev/urandom" if opts.output_size is not None else "/dev/zero"
        f.write("{ salt ? \"0\" }:\nlet\n  mk = name: system: dur: centis: size: deps: derivation {\n")
        f.write("    inherit name system salt deps; builder = \"/bin/sh\"; PATH = \"/bin:/usr/bin\";\n")
        f.write(f"    args = [ \"-c\" \"{sleep}mkdir $out; head -c ${{toString size}} {source} > $out/data; echo $deps > $out/deps\" ];\n  }};\n")
    for i, (name, dur, size, deps) in enumerate(nodes):
        if plain:
            f.write(f'  n{i} = mk "{name}" "{dur}" {size} [ {" ".join(f"n{d}" for d in deps)} ];\n')
        else:
            system = "builtins.currentSystem" if systems[i] == "x86_64-linux" else f'"{systems[i]}"'
            f.write(f'  n{i} = mk "{name}" {system} "{dur}" {round(dur * 100)} {size} [ {" ".join(f"n{d}" for d in deps)} ];\n')
    sinks = [i for i in range(len(nodes)) if dependents[i] == 0]
    f.write(f'in [ {" ".join(f"n{i}" for i in sinks)} ]\n')
# The same graph in the schema of `offload simulate --dag`.
import json
with open(out.rsplit(".", 1)[0] + ".json", "w") as f:
    # Ids are the derivation names: Nix works its goals in the order of their names.
    json.dump({"nodes": [{"id": name, "deps": [nodes[d][0] for d in deps], "duration_s": dur,
                          "system": systems[i], "required_features": [], "output_bytes": size}
                         for i, (name, dur, size, deps) in enumerate(nodes)]}, f)
print(f"critical_path={max(finish):.2f} total_work={sum(x[1] for x in nodes):.2f} nodes={len(nodes)}")
