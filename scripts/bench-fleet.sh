#!/usr/bin/env bash
# Fleet benchmark for "a planner that knows the real fleet": `nix-build --builders` (Nix
# 2.8's build hook) against `offload build` on the SAME fleet of three real sshd
# builders (scripts/sshfleet.sh: sshd on 127.0.0.1, private /nix and /etc/nix), side by
# side in one run, fresh output paths each time (a salt). offload runs twice: run 1
# with an empty duration history, run 2 with the history of run 1 (same graph, other
# salt). Prints each time, the lower bound, and the ratios.
#
#   scripts/bench-fleet.sh                               # every case below
#   CASES=slow-link scripts/bench-fleet.sh
#   RUNS=3 scripts/bench-fleet.sh                        # medians of three runs each
#   OFFLOAD=/path/to/offload scripts/bench-fleet.sh      # this binary instead of a build of this repo
#
# Cases (every one: 3 builders x 2 slots + 2 local slots, a layered graph of 30
# derivations from scripts/gen-dag.py unless said, sleep-based builds):
#   slow-link              outputs of 16 MiB each (random, incompressible); fleet3 is
#                          reached only through scripts/shape-link.py at $MBIT Mbit/s and
#                          $DELAY_MS ms one-way delay each direction (a slow link).
#                          Lower bound max(critical path, total work / 8 slots).
#                          Target: offload run 2 <= 1.3x the bound and >= 2x faster than Nix.
#   slow-builders          every builder is $SLOW times slower than this machine while the
#                          machines file says speed factor 1 everywhere. Target: offload
#                          run 2 <= 1.15x the bound. No schedule meets it on this graph:
#                          the optimum (below) is 1.22x the bound, since its first layer
#                          of three leaves most of the fleet idle whatever the plan.
#   slow-builders-90       the same fleet on a layered graph of 90 derivations, whose
#                          optimum is within 1 % of the bound. Target: run 2 <= 1.15x
#                          the bound.
#   slow-builders-aarch64  the same, and fleet3 also declares aarch64-linux (its nix.conf
#                          has `extra-platforms = aarch64-linux`) and builds it
#                          $AARCH64_SLOW times slower than its native system; 4 of the 30
#                          derivations are aarch64-linux, so only fleet3 builds them.
#                          Target: offload run 2 <= 1.15x the bound. The optimum is 1.24x
#                          the bound on this graph.
#   slow-builders-aarch64-90  the same fleet on a layered graph of 90, 4 of them
#                          aarch64-linux, whose optimum is within 1 % of the bound.
#                          Target: run 2 <= 1.15x the bound.
#   turned-slow            builders as fast as this machine, but fleet3 turns $TURNED
#                          times slower after run 1 (its speed file says 1 for run 1, the
#                          history, and $TURNED for nix-build and run 2). Target: run 2
#                          <= 1.25x the CP-SAT optimum for the true speeds.
#   tiny                   200 trivial derivations (scripts/gen-dag.py trivial: each makes
#                          a 16-byte file at once) on the three builders x 4 slots, nothing
#                          local (-j0): what a build costs besides itself. Nix's hook pays
#                          an ssh handshake per build. Target: offload run 1 and run 2 each
#                          >= 15x faster than nix-build.
#
# How a builder is made slow: its `remote-program` is a wrapper that runs `nix-store`
# with `--option extra-sandbox-paths /speed=FILE` (and `/speed-aarch64-linux=FILE`), and
# the derivations (gen-dag.py --speed) sleep their duration times the number in
# /speed-$system, else /speed, else 1 (this machine has no such file). The lower bound
# uses these true speeds (scripts/fleet-bound.py): critical path with each node on the
# fastest machine able to build it, and all work over sum(slots x true speed), aarch64
# work counted on fleet3, the one machine able to build it.
#
# Environment: CASES, RUNS, OFFLOAD, WORK (default /tmp/offload-bench-fleet), MBIT (20),
# DELAY_MS (20), SLOW (3), AARCH64_SLOW (5), TURNED (6), TIMEOUT per build command in seconds (900),
# KEEP=1 keeps the builders' stores and this run's outputs in the local store; RUN3=1
# adds a third offload run with the history of the first two (how far learning goes).
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-"slow-link slow-builders slow-builders-90 slow-builders-aarch64 slow-builders-aarch64-90"}
RUNS=${RUNS:-1}
WORK=${WORK:-/tmp/offload-bench-fleet}
MBIT=${MBIT:-20}
DELAY_MS=${DELAY_MS:-20}
SLOW=${SLOW:-3}
AARCH64_SLOW=${AARCH64_SLOW:-5}
TURNED=${TURNED:-6}
TIMEOUT=${TIMEOUT:-900}
KEEP=${KEEP:-}
RUN3=${RUN3:-}
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}

die() { # die WHAT HINT
  printf 'error: %s\n\nhint: %s\n' "$1" "$2" >&2
  exit 2
}

[ "$(id -u)" -eq 0 ] || die "bench-fleet.sh runs as root: its sshd hosts mount a private /nix in their own mount namespace" \
  "run it as root (sudo bash scripts/bench-fleet.sh)"
bash scripts/setup.sh
[ -x /usr/sbin/sshd ] || die "sshd not found at /usr/sbin/sshd" "install openssh-server: bash scripts/setup.sh does"
command -v nix-build >/dev/null || die "nix-build not found" "install Nix 2.8 (nix-bin): bash scripts/setup.sh does"
if [ -z "${OFFLOAD:-}" ]; then
  cargo build --release -q -p offload
  OFFLOAD=$PWD/target/release/offload
fi
[ -x "$OFFLOAD" ] || die "OFFLOAD=$OFFLOAD is not an executable" \
  "build it (cargo build --release -p offload) or point OFFLOAD at an offload binary"
"$OFFLOAD" --version >/dev/null 2>&1 || die "$OFFLOAD --version failed (mid-rebuild?)" \
  "wait for the build to finish, or build your own copy with cargo build --release -p offload"
for c in $CASES; do
  case $c in slow-link | slow-builders | slow-builders-90 | slow-builders-aarch64 | slow-builders-aarch64-90 | turned-slow | tiny) ;;
  *) die "unknown case $c" "CASES takes slow-link, slow-builders, slow-builders-90, slow-builders-aarch64, slow-builders-aarch64-90, turned-slow and tiny" ;;
  esac
done

# The Python that has OR-Tools, for scripts/fleet-optimum.py: this one, or a venv made
# once under /var/cache/offload-test (from the Python package registry).
ORTOOLS_PYTHON=${ORTOOLS_PYTHON:-python3}
if ! "$ORTOOLS_PYTHON" -c 'import ortools' 2>/dev/null; then
  venv=/var/cache/offload-test/ortools-venv
  if ! "$venv/bin/python3" -c 'import ortools' 2>/dev/null; then
    { dpkg -s python3-venv >/dev/null 2>&1 || apt-get install -y -q python3-venv; } >/dev/null 2>&1 || true
    { rm -rf "$venv.tmp" && python3 -m venv "$venv.tmp" && "$venv.tmp/bin/pip" install -q ortools &&
      rm -rf "$venv" && mv "$venv.tmp" "$venv"; } >/dev/null 2>&1 || true
  fi
  "$venv/bin/python3" -c 'import ortools' 2>/dev/null && ORTOOLS_PYTHON=$venv/bin/python3
fi

FLEET=$WORK/fleet
PROXY_PID=
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  bash scripts/sshfleet.sh down "$FLEET" 2>/dev/null || true
  [ -n "$KEEP" ] || rm -rf "$FLEET"/h*/nix
}
# A previous run that did not get to clean up.
[ -f "$WORK/proxy.pid" ] && kill "$(cat "$WORK/proxy.pid")" 2>/dev/null || true
[ -d "$FLEET" ] && bash scripts/sshfleet.sh down "$FLEET" 2>/dev/null || true
rm -rf "$WORK"
mkdir -p "$WORK"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "offload: $OFFLOAD ($("$OFFLOAD" --version))"
# The fleet: three sshd hosts with empty stores, shared by every case.
NIX_SSHOPTS=$(bash scripts/sshfleet.sh up 3 "$FLEET" 2>"$WORK/sshfleet.log") ||
  die "the sshd hosts did not start: $(tail -n 3 "$WORK/sshfleet.log" | tr '\n' ' ')" \
    "a port may have been taken between choosing and binding it: run again; $WORK/sshfleet.log has sshd's messages"
export NIX_SSHOPTS
port_of() { awk -v h="$1" '$1 == "Host" {cur = $2} cur == h && $1 == "Port" {print $2}' "$FLEET/ssh_config"; }

# fleet3 through the slow link: `fleet3-slow` is fleet3 behind the proxy (same host key).
port3=$(port_of fleet3)
python3 scripts/shape-link.py "127.0.0.1:$port3" --mbit "$MBIT" --delay-ms "$DELAY_MS" \
  --port-file "$WORK/proxy.port" 2>"$WORK/proxy.log" &
PROXY_PID=$!
echo "$PROXY_PID" >"$WORK/proxy.pid"
for _ in $(seq 50); do [ -s "$WORK/proxy.port" ] && break; sleep 0.1; done
[ -s "$WORK/proxy.port" ] || die "the slow-link proxy (scripts/shape-link.py) did not start: $(tail -n 2 "$WORK/proxy.log" | tr '\n' ' ')" \
  "see $WORK/proxy.log; python3 must be 3.7 or later"
printf 'Host fleet3-slow\n  HostName 127.0.0.1\n  Port %s\n  HostKeyAlias [127.0.0.1]:%s\n  User root\n  IdentityFile %s\n  IdentitiesOnly yes\n  UserKnownHostsFile %s\n  BatchMode yes\n\n' \
  "$(cat "$WORK/proxy.port")" "$port3" "$FLEET/client_key" "$FLEET/known_hosts" >>"$FLEET/ssh_config"
ssh -F "$FLEET/ssh_config" fleet3-slow true ||
  die "fleet3 is not reachable through the slow-link proxy (ssh fleet3-slow)" "see $WORK/proxy.log and run ssh -v -F $FLEET/ssh_config fleet3-slow true"
# What the slow link really carries (ssh and TCP over the proxy's $MBIT Mbit/s), for the
# simulator's model of this fleet: 16 MiB through one ssh, less an empty ssh's time.
head -c $((16 << 20)) /dev/urandom >"$WORK/probe.bin"
t0=$(date +%s.%N)
ssh -F "$FLEET/ssh_config" fleet3-slow true
t1=$(date +%s.%N)
ssh -F "$FLEET/ssh_config" fleet3-slow 'cat >/dev/null' <"$WORK/probe.bin"
t2=$(date +%s.%N)
rm -f "$WORK/probe.bin"
SLOW_LINK_BPS=$(awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN {printf "%.0f", (16 * 1048576) / ((c - b) - (b - a))}')
echo "slow link: $(awk -v r="$SLOW_LINK_BPS" 'BEGIN {printf "%.2f", r / 1e6}') MB/s through ssh (proxy set to $MBIT Mbit/s)"
# fleet3 can build aarch64-linux (the /bin/sh builder runs there); only a machines file
# that says so sends it aarch64 builds.
echo 'extra-platforms = aarch64-linux' >>"$FLEET/h3/etc-nix/nix.conf"
# The speed files and the remote-programs that show them in the builders' sandboxes.
echo "$SLOW" >"$WORK/speed-native"
echo "$((SLOW * AARCH64_SLOW))" >"$WORK/speed-aarch64"
cat >"$WORK/nix-store-slow" <<SH
#!/bin/sh
exec nix-store --option extra-sandbox-paths "/speed=$WORK/speed-native" "\$@"
SH
cat >"$WORK/nix-store-slow-aarch64" <<SH
#!/bin/sh
exec nix-store --option extra-sandbox-paths "/speed=$WORK/speed-native /speed-aarch64-linux=$WORK/speed-aarch64" "\$@"
SH
# turned-slow: fleet3's speed file changes between the runs, its machine (and so its
# history) stays the same.
echo 1 >"$WORK/speed-turn"
cat >"$WORK/nix-store-turn" <<SH
#!/bin/sh
exec nix-store --option extra-sandbox-paths "/speed=$WORK/speed-turn" "\$@"
SH
chmod +x "$WORK/nix-store-slow" "$WORK/nix-store-slow-aarch64" "$WORK/nix-store-turn"

now() { date +%s.%N; }
secs() { awk "BEGIN {printf \"%.2f\", $2 - $1}"; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }
# Where nix-build ran each build, from its log.
nix_places() {
  grep "^building '" "$1" | sed -n "s/.* on 'ssh:\/\/\([^?']*\).*/\1/p; t; s/.*/local/p" |
    sort | uniq -c | awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $2, $1}'
}
offload_places() { sed -n 's/^builds per machine: //p' "$1" | tail -n 1; }
# Deletes the outputs of the graph built with salt $2 from the local store.
forget() {
  [ -n "$KEEP" ] && return 0
  local drvs
  drvs=$(nix-instantiate "$1" --argstr salt "$2" 2>/dev/null) || return 0
  # shellcheck disable=SC2046
  nix-store -q --outputs $(nix-store -qR $drvs | grep '\.drv$') 2>/dev/null |
    while read -r p; do [ -e "$p" ] && echo "$p"; done | xargs -r nix-store --delete >/dev/null 2>&1 || true
}
# timed LOG CMD...: runs CMD with stderr to LOG, prints its seconds, or "failed".
timed() {
  local log=$1 t0 t1
  shift
  t0=$(now)
  if timeout "$TIMEOUT" "$@" >/dev/null 2>"$log"; then
    t1=$(now)
    secs "$t0" "$t1"
  else
    echo failed
  fi
}

for case in $CASES; do
  local_slots=2
  shape=layered
  nodes=30
  gen=(--speed)
  bound=(local:2:x86_64-linux=1)
  # The fleet as it was during run 1 (the history), for the simulated run 2; as it is
  # unless the case changes it between the runs.
  simhistory=()
  case $case in
    slow-link)
      gen=(--output-size $((16 * 1024 * 1024)))
      spec="ssh://fleet1 x86_64-linux - 2 1; ssh://fleet2 x86_64-linux - 2 1; ssh://fleet3-slow x86_64-linux - 2 1"
      bound+=(fleet1:2:x86_64-linux=1 fleet2:2:x86_64-linux=1 fleet3:2:x86_64-linux=1)
      simspec="ssh://fleet1 x86_64-linux - 2 1; ssh://fleet2 x86_64-linux - 2 1; ssh://fleet3-slow x86_64-linux - 2 1"
      echo "{\"links\": {\"fleet3-slow\": {\"bandwidth\": $SLOW_LINK_BPS, \"latency\": $(awk "BEGIN {print $DELAY_MS / 1000}")}}}" >"$WORK/$case-simfleet.json"
      title="slow link: 30 derivations with 16 MiB outputs; fleet3 over $MBIT Mbit/s, $DELAY_MS ms"
      target="run 2 <= 1.30x the bound and >= 2x faster than nix-build"
      ;;
    slow-builders | slow-builders-90)
      [ "$case" = slow-builders-90 ] && nodes=90
      spec=""
      for i in 1 2 3; do spec+="ssh://fleet$i?remote-program=$WORK/nix-store-slow x86_64-linux - 2 1; "; done
      spec=${spec%; }
      bound+=(fleet1:2:x86_64-linux="$SLOW" fleet2:2:x86_64-linux="$SLOW" fleet3:2:x86_64-linux="$SLOW")
      true_speed=$(awk "BEGIN {print 1 / $SLOW}")
      simspec="ssh://fleet1 x86_64-linux - 2 1; ssh://fleet2 x86_64-linux - 2 1; ssh://fleet3 x86_64-linux - 2 1"
      printf '{"speeds": {"fleet1": {"x86_64-linux": %s}, "fleet2": {"x86_64-linux": %s}, "fleet3": {"x86_64-linux": %s}}}\n' \
        "$true_speed" "$true_speed" "$true_speed" >"$WORK/$case-simfleet.json"
      title="slow builders: $nodes derivations; builders ${SLOW}x slower than this machine, speed factor 1 declared"
      target="run 2 <= 1.15x the bound"
      ;;
    slow-builders-aarch64 | slow-builders-aarch64-90)
      [ "$case" = slow-builders-aarch64-90 ] && nodes=90
      gen+=(--aarch64 4)
      spec="ssh://fleet1?remote-program=$WORK/nix-store-slow x86_64-linux - 2 1; "
      spec+="ssh://fleet2?remote-program=$WORK/nix-store-slow x86_64-linux - 2 1; "
      spec+="ssh://fleet3?remote-program=$WORK/nix-store-slow-aarch64 x86_64-linux,aarch64-linux - 2 1"
      bound+=(fleet1:2:x86_64-linux="$SLOW" fleet2:2:x86_64-linux="$SLOW")
      bound+=(fleet3:2:x86_64-linux="$SLOW",aarch64-linux=$((SLOW * AARCH64_SLOW)))
      true_speed=$(awk "BEGIN {print 1 / $SLOW}")
      simspec="ssh://fleet1 x86_64-linux - 2 1; ssh://fleet2 x86_64-linux - 2 1; ssh://fleet3 x86_64-linux,aarch64-linux - 2 1"
      printf '{"speeds": {"fleet1": {"x86_64-linux": %s}, "fleet2": {"x86_64-linux": %s}, "fleet3": {"x86_64-linux": %s, "aarch64-linux": %s}}}\n' \
        "$true_speed" "$true_speed" "$true_speed" "$(awk "BEGIN {print 1 / ($SLOW * $AARCH64_SLOW)}")" >"$WORK/$case-simfleet.json"
      title="slow builders + aarch64: $nodes derivations, 4 of them aarch64-linux (fleet3 only, ${AARCH64_SLOW}x slower than its native system)"
      target="run 2 <= 1.15x the bound"
      ;;
    turned-slow)
      spec="ssh://fleet1 x86_64-linux - 2 1; ssh://fleet2 x86_64-linux - 2 1; "
      spec+="ssh://fleet3?remote-program=$WORK/nix-store-turn x86_64-linux - 2 1"
      bound+=(fleet1:2:x86_64-linux=1 fleet2:2:x86_64-linux=1 fleet3:2:x86_64-linux="$TURNED")
      simspec="ssh://fleet1 x86_64-linux - 2 1; ssh://fleet2 x86_64-linux - 2 1; ssh://fleet3 x86_64-linux - 2 1"
      printf '{"speeds": {"fleet3": {"x86_64-linux": %s}}}\n' "$(awk "BEGIN {print 1 / $TURNED}")" >"$WORK/$case-simfleet.json"
      echo '{}' >"$WORK/$case-simhistory.json"
      simhistory=(--history-fleet "$WORK/$case-simhistory.json")
      title="turned slow: $nodes derivations; fleet3 ${TURNED}x slower than in run 1 (the history), the others as fast as this machine"
      target="run 2 <= 1.25x the optimum"
      ;;
    tiny)
      shape=trivial nodes=200 local_slots=0
      gen=()
      bound=()
      spec="ssh://fleet1 x86_64-linux - 4 1; ssh://fleet2 x86_64-linux - 4 1; ssh://fleet3 x86_64-linux - 4 1"
      simspec=$spec
      echo '{}' >"$WORK/$case-simfleet.json"
      title="tiny builds: $nodes trivial derivations on 3 sshd builders x 4 slots, nothing local"
      target="run 1 and run 2 each >= 15x faster than nix-build"
      ;;
  esac
  nix=$WORK/$case.nix
  python3 scripts/gen-dag.py "$shape" "$nodes" 1 "$nix" "${gen[@]}" >/dev/null
  if [ "$case" = tiny ]; then
    # Builds of no duration: no bound or optimum to measure against, only Nix.
    lb=0 cp=0 cap=0 excl=0 opt=- proven=-
  else
    read -r lb cp cap excl < <(python3 scripts/fleet-bound.py "${nix%.nix}.json" "${bound[@]}" |
      sed 's/[a-z_]*=//g')
    read -r opt proven < <("$ORTOOLS_PYTHON" scripts/fleet-optimum.py "${nix%.nix}.json" "${bound[@]}" 2>>"$WORK/optimum.log" |
      sed 's/[a-z_]*=//g')
  fi
  hist=$WORK/history-$case.sqlite
  # offload's scheduler on the simulator's model of this fleet: the machines file as
  # declared ($simspec) and its true speeds and links ($case-simfleet.json; the slow link
  # at what one 16 MiB copy through ssh carried over it, measured above). Run 1
  # (--cold) plans with what the machines file says, every estimate the default; run 2
  # (--second-run) with what offload fits from a simulated run 1, as it fits its state.
  simulate() {
    "$OFFLOAD" simulate --dag "${nix%.nix}.json" --builders "$simspec" --local-slots "$local_slots" \
      --fleet "$WORK/$case-simfleet.json" --policy offload --json "$@" 2>/dev/null |
      python3 -c 'import json, sys; print("%.2f" % json.loads(sys.stdin.readline())["makespan_s"])' 2>/dev/null || echo -
  }
  sim_warm=$(simulate --second-run "${simhistory[@]}")
  sim_cold=$(simulate --cold)

  echo "== $title"
  echo "   $local_slots local slots; machines: $spec"
  [ "$case" != tiny ] && echo "   lower bound ${lb} s: critical path ${cp} s, work / capacity ${cap} s, work only one machine can build ${excl} s"
  if [ "$case" = tiny ]; then
    :
  elif [ "$opt" = - ]; then
    echo "   optimum: not computed (scripts/fleet-optimum.py needs the ortools Python package; see $WORK/optimum.log)"
  else
    if [ "$proven" = yes ]; then
      echo "   optimum ${opt} s ($(ratio "$opt" "$lb")x the bound, proven by CP-SAT): no schedule is shorter, transfers counted as free"
    else
      echo "   best schedule the solver found in its time: ${opt} s ($(ratio "$opt" "$lb")x the bound; not proven optimal)"
    fi
  fi
  nix_t=(); one_t=(); two_t=(); three_t=()
  for run in $(seq 1 "$RUNS"); do
    salt=$(date +%s%N)
    [ "$case" = turned-slow ] && echo "$TURNED" >"$WORK/speed-turn"
    nix_t+=("$(timed "$WORK/$case-nix.log" nix-build "$nix" --argstr salt "nix-$salt" --builders "$spec" -j "$local_slots" --no-out-link)")
    forget "$nix" "nix-$salt"
    rm -f "$hist"
    # turned-slow: run 1, the history, sees fleet3 at full speed.
    [ "$case" = turned-slow ] && echo 1 >"$WORK/speed-turn"
    one_t+=("$(timed "$WORK/$case-offload1.log" "$OFFLOAD" build "$nix" --argstr salt "a-$salt" --builders "$spec" -j "$local_slots" \
      --no-out-link --no-build-output --history "$hist" --trace "$WORK/$case-offload1.trace.json")")
    forget "$nix" "a-$salt"
    [ "$case" = turned-slow ] && echo "$TURNED" >"$WORK/speed-turn"
    two_t+=("$(timed "$WORK/$case-offload2.log" "$OFFLOAD" build "$nix" --argstr salt "b-$salt" --builders "$spec" -j "$local_slots" \
      --no-out-link --no-build-output --history "$hist" --trace "$WORK/$case-offload2.trace.json")")
    forget "$nix" "b-$salt"
    if [ -n "$RUN3" ]; then
      three_t+=("$(timed "$WORK/$case-offload3.log" "$OFFLOAD" build "$nix" --argstr salt "c-$salt" --builders "$spec" -j "$local_slots" \
        --no-out-link --no-build-output --history "$hist" --trace "$WORK/$case-offload3.trace.json")")
      forget "$nix" "c-$salt"
    fi
    [ "$RUNS" -gt 1 ] && echo "   run $run: nix-build ${nix_t[-1]} s, offload run 1 ${one_t[-1]} s, run 2 ${two_t[-1]} s"
  done
  # What offload's state holds about the fleet after the runs (learned speeds, links).
  "$OFFLOAD" machines --builders "$spec" -j "$local_slots" --history "$hist" >"$WORK/$case-machines.txt" 2>&1 || true
  report() { # report LABEL TIMES... ; the median, its ratio to the bound and Nix's time
    local label=$1 t
    shift
    if printf '%s\n' "$@" | grep -q failed; then
      printf '   %-34s failed (see %s)\n' "$label" "$LOG"
      return
    fi
    t=$(median "$@")
    printf '   %-34s %7.2f s' "$label" "$t"
    [ "$lb" != 0 ] && printf '  %5sx the bound' "$(ratio "$t" "$lb")"
    [ -n "${tn:-}" ] && [ "$tn" != failed ] && printf ', nix/offload %sx' "$(ratio "$tn" "$t")"
    printf '   [%s]\n' "$PLACES"
  }
  tn=
  LOG=$WORK/$case-nix.log PLACES="builds: $(nix_places "$WORK/$case-nix.log")" report "nix-build --builders:" "${nix_t[@]}"
  printf '%s\n' "${nix_t[@]}" | grep -q failed && tn=failed || tn=$(median "${nix_t[@]}")
  LOG=$WORK/$case-offload1.log PLACES="builds: $(offload_places "$WORK/$case-offload1.log")" report "offload run 1 (empty history):" "${one_t[@]}"
  LOG=$WORK/$case-offload2.log PLACES="builds: $(offload_places "$WORK/$case-offload2.log")" report "offload run 2 (history of run 1):" "${two_t[@]}"
  if [ -n "$RUN3" ]; then
    LOG=$WORK/$case-offload3.log PLACES="builds: $(offload_places "$WORK/$case-offload3.log")" report "offload run 3 (history of runs 1-2):" "${three_t[@]}"
  fi
  for log in "$WORK/$case-offload1.log" "$WORK/$case-offload2.log"; do
    dup=$(grep '^duplicates of builds' "$log" | tail -n 1 || true)
    [ -n "$dup" ] && echo "   $(basename "$log" .log): $dup"
  done
  if [ "$case" = tiny ]; then
    met="not met"
    if ! printf '%s\n' "${one_t[@]}" "${two_t[@]}" | grep -q failed && [ "$tn" != failed ]; then
      met=$(awk -v n="$tn" -v a="$(median "${one_t[@]}")" -v b="$(median "${two_t[@]}")" \
        'BEGIN {print (n >= 15 * a && n >= 15 * b) ? "met" : "not met"}')
    fi
    echo "   target: $target: $met"
  elif ! printf '%s\n' "${two_t[@]}" | grep -q failed; then
    t2=$(median "${two_t[@]}")
    limit=1.15
    [ "$case" = slow-link ] && limit=1.30
    [ "$case" = turned-slow ] && limit=1.25
    met=$(awk -v t="$t2" -v lb="$lb" -v lim="$limit" -v n="$tn" -v c="$case" -v opt="$opt" \
      'BEGIN {ok = t <= lim * lb; if (c == "slow-link") ok = ok && n != "failed" && n >= 2 * t;
              if (c == "turned-slow") ok = opt != "-" && t <= lim * opt; print ok ? "met" : "not met"}')
    echo "   target: $target: $met"
  fi
  sim_vs() { # sim_vs SIM MEASURED...: the simulated time beside the measured median
    local t
    printf '%s\n' "${@:2}" | grep -q failed && { echo "$1 s (measured: failed)"; return; }
    t=$(median "${@:2}")
    [ "$1" = - ] && { echo "not simulated"; return; }
    echo "$1 s, measured $t s ($(awk -v s="$1" -v m="$t" 'BEGIN {printf "%+.0f %%", 100 * (s - m) / m}'))"
  }
  echo "   simulator (offload's scheduler on a model of this fleet): run 1 $(sim_vs "$sim_cold" "${one_t[@]}"); run 2 $(sim_vs "$sim_warm" "${two_t[@]}")"
  if [ "$opt" != - ] && ! printf '%s\n' "${two_t[@]}" | grep -q failed; then
    echo "   run 2 is $(ratio "$(median "${two_t[@]}")" "$opt")x the optimum"
  fi
  echo "   what offload learned (offload machines, $WORK/$case-machines.txt):"
  sed 's/^/     /' "$WORK/$case-machines.txt"
done
