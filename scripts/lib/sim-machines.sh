# Sourced by scripts/sim-guard.sh and scripts/bench-sim.sh.
# sim_machines FILE N SEED: N builders in Nix's machines-file syntax (a quarter
# aarch64-linux, 2-32 slots, speed factors 1-4, some big-parallel, kvm or benchmark).
sim_machines() {
  python3 - "$@" <<'PY'
import random, sys
path, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
with open(path, "w") as f:
    for i in range(n):
        sysname = "x86_64-linux" if i % 4 else "aarch64-linux"
        feats = ",".join(x for x in ("big-parallel", "kvm", "benchmark") if r.random() < 0.3) or "-"
        f.write("ssh://b%d %s - %d %d %s -\n" % (i, sysname, r.choice([2, 4, 8, 16, 32]), r.choice([1, 1, 2, 3, 4]), feats))
PY
}
