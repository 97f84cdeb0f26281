#!/usr/bin/env python3
"""The shortest makespan any schedule can reach for a build graph on a fleet whose true
speeds are known, found by a constraint solver (OR-Tools CP-SAT), for
scripts/bench-fleet.sh.

  fleet-optimum.py DAG.json MACHINE...
  MACHINE = NAME:SLOTS:SYSTEM=FACTOR[,SYSTEM=FACTOR...]   (as scripts/fleet-bound.py)

Each build runs on one slot of one machine able to build its system, for its
`duration_s` times that machine's FACTOR for the system, after all its dependencies
end. Transfers and per-build costs count as nothing, so the result is a lower bound of
every real run, tighter than max(critical path, work / capacity) because it counts
how little of the fleet a graph's first and last layers can use. Durations are in
centiseconds. Prints

  optimum=… proven=yes|no

(`proven=no`: the time limit, --seconds, ended the search before the solver proved its
best schedule optimal; `optimum` is then that schedule's makespan, an upper bound of the
optimum, not a lower bound of every run). Needs the `ortools` Python package; without
it prints `optimum=- proven=no` and says how to install it on stderr.
"""
import argparse
import json
import sys

parser = argparse.ArgumentParser(usage=__doc__)
parser.add_argument("dag")
parser.add_argument("machines", nargs="+")
parser.add_argument("--seconds", type=float, default=60.0)
args = parser.parse_args()
try:
    from ortools.sat.python import cp_model
except ImportError:
    print("optimum=- proven=no")
    sys.exit(
        "fleet-optimum.py: the ortools package is missing "
        "(python3 -m venv /opt/offload-bench && /opt/offload-bench/bin/pip install ortools, "
        "then run this script with /opt/offload-bench/bin/python3)"
    )

nodes = json.load(open(args.dag))["nodes"]
machines = []
for arg in args.machines:
    name, slots, factors = arg.split(":", 2)
    table = {}
    for item in factors.split(","):
        system, factor = item.split("=")
        table[system] = float(factor)
    machines.append((name, int(slots), table))

index = {n["id"]: i for i, n in enumerate(nodes)}
horizon = sum(
    round(100 * n["duration_s"] * max(t.get(n["system"], 0) for _, _, t in machines))
    for n in nodes
)
model = cp_model.CpModel()
start = [model.NewIntVar(0, horizon, f"start{i}") for i in range(len(nodes))]
end = [model.NewIntVar(0, horizon, f"end{i}") for i in range(len(nodes))]
per_machine = [[] for _ in machines]
for i, n in enumerate(nodes):
    choices = []
    for m, (name, slots, table) in enumerate(machines):
        if n["system"] not in table or slots == 0:
            continue
        on = model.NewBoolVar(f"n{i}-on-{name}")
        length = max(1, round(100 * n["duration_s"] * table[n["system"]]))
        per_machine[m].append(
            model.NewOptionalIntervalVar(start[i], length, end[i], on, f"n{i}@{name}")
        )
        choices.append(on)
    if not choices:
        sys.exit(f"fleet-optimum.py: no machine builds {n['id']} ({n['system']})")
    model.AddExactlyOne(choices)
    for dep in n["deps"]:
        model.Add(start[i] >= end[index[dep]])
for m, (_, slots, _) in enumerate(machines):
    if per_machine[m]:
        model.AddCumulative(per_machine[m], [1] * len(per_machine[m]), slots)
makespan = model.NewIntVar(0, horizon, "makespan")
model.AddMaxEquality(makespan, end)
model.Minimize(makespan)
solver = cp_model.CpSolver()
solver.parameters.max_time_in_seconds = args.seconds
solver.parameters.num_workers = 2
status = solver.Solve(model)
if status == cp_model.OPTIMAL:
    print(f"optimum={solver.Value(makespan) / 100:.2f} proven=yes")
elif status == cp_model.FEASIBLE:
    print(f"optimum={solver.Value(makespan) / 100:.2f} proven=no")
else:
    sys.exit(f"fleet-optimum.py: the solver found no schedule ({solver.StatusName(status)})")
