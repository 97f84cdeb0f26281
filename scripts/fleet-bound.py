#!/usr/bin/env python3
"""The lower bound of a build graph's makespan on a fleet whose TRUE speeds are known,
for scripts/bench-fleet.sh.

  fleet-bound.py DAG.json MACHINE...
  MACHINE = NAME:SLOTS:SYSTEM=FACTOR[,SYSTEM=FACTOR...]

DAG.json is the graph scripts/gen-dag.py writes beside its expression (`duration_s` is
the time at speed 1, i.e. on the local machine). FACTOR is how many times longer a
build of SYSTEM takes on that machine (1: as fast as the local machine); a machine builds
only the systems it lists, and its first one is its native system. Prints

  lower_bound=… critical_path=… capacity=… exclusive=…

- critical_path: the longest path with each node on the fastest machine able to build it;
- capacity: all the work over the fleet's capacity, sum(slots / native factor), each node
  counted at what it costs the machine that builds it most cheaply, in native seconds of
  that machine at speed 1 (an aarch64-linux build taking 15 s on a machine whose native
  factor is 3 uses what would have been 5 s of local work);
- exclusive: for each machine, the work only it can build over its slots;
- lower_bound: the largest of the three.
"""
import json
import sys

if len(sys.argv) < 3:
    sys.exit(__doc__)
nodes = json.load(open(sys.argv[1]))["nodes"]
machines = []
for arg in sys.argv[2:]:
    name, slots, factors = arg.split(":", 2)
    table = {}
    for item in factors.split(","):
        system, factor = item.split("=")
        table[system] = float(factor)
    native = float(factors.split(",")[0].split("=")[1])
    machines.append((name, int(slots), table, native))

by_id = {n["id"]: n for n in nodes}
finish = {}
cheapest = 0.0
exclusive = {name: 0.0 for name, _, _, _ in machines}
for node in nodes:  # gen-dag writes nodes after their dependencies
    able = [(slots, table[node["system"]], native, name) for name, slots, table, native in machines
            if node["system"] in table and not node["required_features"]]
    if not able:
        sys.exit(f"fleet-bound: no machine builds {node['id']} ({node['system']})")
    d = node["duration_s"]
    fastest = min(f for _, f, _, _ in able)
    finish[node["id"]] = d * fastest + max((finish[dep] for dep in node["deps"]), default=0.0)
    cheapest += min(d * f / native for _, f, native, _ in able)
    if len(able) == 1:
        slots, f, _, name = able[0]
        exclusive[name] += d * f / slots
capacity = cheapest / sum(slots / native for _, slots, _, native in machines)
cp = max(finish.values(), default=0.0)
excl = max(exclusive.values(), default=0.0)
print(f"lower_bound={max(cp, capacity, excl):.2f} critical_path={cp:.2f} capacity={capacity:.2f} exclusive={excl:.2f}")
