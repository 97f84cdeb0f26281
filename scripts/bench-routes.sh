#!/usr/bin/env bash
# Routes benchmark: "bytes take the shortest way". Three sshd builders that reach each
# other directly at loopback speed and a deploy target beside them; this machine (the
# client) reaches each of the four through a user-space proxy of its own, shaped to
# $MBIT Mbit/s and $DELAY_MS ms one-way delay each way, shared by all connections to
# that host, which counts the bytes it carries (offload-test-support's two-view fleet:
# crates/test-support/examples/two-view-fleet.rs). Each host's own ssh reaches the
# others by the names the client uses for them.
#
#   scripts/bench-routes.sh                          # every case, once
#   N=12 MB=2 scripts/bench-routes.sh                # a smaller graph
#   CASES="offload relay" RUNS=3 scripts/bench-routes.sh
#
# Graph: scripts/gen-dag.py layered $N (30), seed 1, outputs of $MB (8) MiB of random
# data, sleep-based builds of 0.2-3 s (/bin/sh builder); three builders x 2 slots, -j0.
# Cases, side by side in one run, each on a fleet started afresh (empty stores) and a
# graph salted afresh (new output paths):
#   nix          nix-build -j0 --builders …, then nix copy --to ssh://target (Nix 2.8)
#   offload      offload build -j0 --builders … --to ssh://target
#   relay        the same with --relay: every copy through this machine
#   cache        offload build … --to file:///DIR?compression=none --sign-key KEY, then
#                nix copy --from file:///DIR into a fresh chroot store with KEY's public
#                half trusted (it must accept them)
#   unreachable  as offload, with builder 1 unable to reach builder 2 (its alias for it
#                points at a closed port): the run finishes, the note is printed
# For each: wall time, bytes over the client's links (the proxies' counts, both ways,
# all four hosts), offload's own bytes line, the ratios to Nix (time Nix / time, bytes /
# Nix's bytes), the makespan lower bound max(critical path, work / 6 slots), and the
# target checked: every output's closure valid there, `nix-store --verify-path` of each
# path and `nix-store --verify --check-contents` clean; how many outputs are in this
# machine's store. With scripts/fleets/routes.json (a model of this fleet), the
# simulator's predicted makespan (`offload simulate --policy offload`) is printed
# beside the measured one.
#
# Environment: N (30), MB (8), RUNS (1), MBIT (20), DELAY_MS (20), CASES (all of the
# above), TIMEOUT per command in seconds (1800), OFFLOAD (a binary instead of a release
# build of this repo), KEEP=1 keeps the run's directory (logs, caches; a new
# /tmp/offload-bench-routes.XXXXXX each run, so that runs at once do not meet).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-30}
MB=${MB:-8}
RUNS=${RUNS:-1}
MBIT=${MBIT:-20}
DELAY_MS=${DELAY_MS:-20}
CASES=${CASES:-"nix offload relay cache unreachable"}
KEEP=${KEEP:-}
TIMEOUT=${TIMEOUT:-1800}
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}
NIX_CMD=(--extra-experimental-features nix-command)

die() { # die WHAT HINT
  printf 'error: %s\n\nhint: %s\n' "$1" "$2" >&2
  exit 2
}

[ "$(id -u)" -eq 0 ] || die "bench-routes.sh runs as root: its sshd hosts mount a private /nix in their own mount namespace" \
  "run it as root (sudo bash scripts/bench-routes.sh)"
[ -x /usr/sbin/sshd ] || die "sshd not found at /usr/sbin/sshd" "install openssh-server: bash scripts/setup.sh does"
command -v nix-build >/dev/null || die "nix-build not found" "install Nix 2.8 (nix-bin): bash scripts/setup.sh does"
for c in $CASES; do
  case $c in nix | offload | relay | cache | unreachable) ;;
  *) die "unknown case $c" "CASES takes nix, offload, relay, cache and unreachable" ;;
  esac
done
cargo build --release -q -p offload-test-support --example two-view-fleet
FLEET_BIN=$PWD/target/release/examples/two-view-fleet
if [ -z "${OFFLOAD:-}" ]; then
  cargo build --release -q -p offload
  OFFLOAD=$PWD/target/release/offload
fi
"$OFFLOAD" --version >/dev/null 2>&1 || die "$OFFLOAD --version failed" \
  "build it (cargo build --release -p offload) or point OFFLOAD at an offload binary"

WORK=$(mktemp -d /tmp/offload-bench-routes.XXXXXX)
FLEET_PID=
fleet_down() { # stops the fleet (its hosts, proxies, stores); the last byte counts stay
  [ -n "$FLEET_PID" ] || return 0
  exec 7>&- || true
  wait "$FLEET_PID" 2>/dev/null || true
  FLEET_PID=
}
cleanup() {
  if [ -n "$FLEET_PID" ]; then
    exec 7>&- || true
    # Given a moment to stop its hosts and remove its directory, then killed (its
    # watcher then stops the hosts).
    for _ in $(seq 50); do kill -0 "$FLEET_PID" 2>/dev/null || break; sleep 0.1; done
    kill "$FLEET_PID" 2>/dev/null || true
  fi
  if [ -n "$KEEP" ]; then echo "logs and caches kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# fleet_up [--unreachable I,J]: four hosts, the fourth the target; sets NIX_SSHOPTS.
fleet_up() {
  rm -f "$WORK/fleet.info" "$WORK/fleet.info.bytes" "$WORK/fleet.ctl"
  mkfifo "$WORK/fleet.ctl"
  "$FLEET_BIN" "$WORK/fleet.info" --hosts 4 --target 4 --mbit "$MBIT" --delay-ms "$DELAY_MS" "$@" \
    <"$WORK/fleet.ctl" >"$WORK/fleet.log" 2>&1 &
  FLEET_PID=$!
  exec 7>"$WORK/fleet.ctl"
  for _ in $(seq 600); do [ -s "$WORK/fleet.info.bytes" ] && break; kill -0 "$FLEET_PID" 2>/dev/null || break; sleep 0.1; done
  [ -s "$WORK/fleet.info.bytes" ] || die "the fleet did not start: $(tail -n 3 "$WORK/fleet.log" | tr '\n' ' ')" \
    "KEEP=1 keeps $WORK/fleet.log"
  # shellcheck disable=SC1091
  . "$WORK/fleet.info"
  export NIX_SSHOPTS="-F $SSH_CONFIG"
}
# Bytes through the client's proxies since the fleet started (all hosts, both ways).
client_bytes() { awk '{s += $2 + $3} END {print s + 0}' "$WORK/fleet.info.bytes"; }
on_target() { ssh -F "$DIRECT_CONFIG" offload-test-h4 "NIX_CONFIG='substituters =' $1"; }

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b - a}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.1f", 100 * a / b; else print "-"}'; }
mb() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1e6}'; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
# run LOG CMD...: CMD with stdout appended to LOG.out, stderr to LOG, under TIMEOUT.
run() {
  local log=$1
  shift
  timeout "$TIMEOUT" "$@" >>"$log.out" 2>>"$log"
}

# The target holds every output's closure, each path verifies, its store is clean.
check_target() { # check_target OUTPUTS...: prints what it found
  local closure n
  if [ $# -eq 0 ]; then
    echo "target: no output paths were printed"
    return 1
  fi
  if ! closure=$(on_target "nix-store -qR $*" 2>/dev/null); then
    echo "target: outputs NOT valid there"
    return 1
  fi
  n=$(printf '%s\n' "$closure" | grep -c .)
  # shellcheck disable=SC2086
  if on_target "nix-store --verify-path $(echo $closure) && nix-store --verify --check-contents" >/dev/null 2>"$WORK/verify.log"; then
    echo "target: $n closure paths valid, verify clean"
  else
    echo "target: $n closure paths valid, VERIFY FAILED ($(tail -n 1 "$WORK/verify.log"))"
    return 1
  fi
}
# How many of OUTPUTS are in this machine's store.
at_home() {
  local n=0 p
  for p in "$@"; do nix-store --check-validity "$p" 2>/dev/null && n=$((n + 1)); done
  echo "$n/$#"
}
# Removes the graph's outputs (salt $1) from this machine's store, to keep it small.
forget() {
  local drvs
  drvs=$(nix-instantiate "$GRAPH" --argstr salt "$1" 2>/dev/null) || return 0
  # shellcheck disable=SC2046,SC2086
  nix-store -q --outputs $(nix-store -qR $drvs | grep '\.drv$') 2>/dev/null |
    while read -r p; do [ -e "$p" ] && echo "$p"; done | xargs -r nix-store --delete >/dev/null 2>&1 || true
}

GRAPH=$WORK/graph.nix
system=$(nix-instantiate --eval -E builtins.currentSystem | tr -d '"')
python3 scripts/gen-dag.py layered "$N" 1 "$GRAPH" --output-size $((MB << 20)) >/dev/null
read -r lb cp cap _ < <(python3 scripts/fleet-bound.py "$WORK/graph.json" \
  h1:2:"$system"=1 h2:2:"$system"=1 h3:2:"$system"=1 | sed 's/[a-z_]*=//g')
spec="ssh://offload-test-h1 $system - 2 1; ssh://offload-test-h2 $system - 2 1; ssh://offload-test-h3 $system - 2 1"
TARGET=ssh://offload-test-h4
nix-store --generate-binary-cache-key bench-routes-1 "$WORK/key.sec" "$WORK/key.pub"
sim=-
if [ -f scripts/fleets/routes.json ]; then
  sim=$("$OFFLOAD" simulate --dag "$WORK/graph.json" --builders "$spec" --local-slots 0 \
    --fleet scripts/fleets/routes.json --policy offload --json 2>"$WORK/simulate.log" |
    python3 -c 'import json, sys; print("%.2f" % json.loads(sys.stdin.readline())["makespan_s"])' 2>/dev/null) || sim=-
fi

echo "offload: $OFFLOAD ($("$OFFLOAD" --version))"
echo "== routes: layered graph of $N, $MB MiB outputs; 3 sshd builders x 2 slots (-j0) reaching each other at loopback speed, a target beside them;"
echo "   the client reaches each host through its own proxy at $MBIT Mbit/s, $DELAY_MS ms each way"
echo "   lower bound $lb s: critical path $cp s, work / 6 slots $cap s"
[ "$sim" = - ] || echo "   simulator (scripts/fleets/routes.json, --policy offload): $sim s"

declare -A T B
for run_no in $(seq 1 "$RUNS"); do
  salt=$(date +%s%N)
  for c in $CASES; do
    log=$WORK/$c-$run_no.log
    : >"$log"
    : >"$log.out"
    note=""
    if [ "$c" = unreachable ]; then fleet_up --unreachable 1,2; else fleet_up; fi
    hist=$WORK/history-$c-$run_no.sqlite
    off=("$OFFLOAD" build "$GRAPH" --argstr salt "$c-$salt" --builders "$spec" -j0 --no-build-output --history "$hist")
    ok=yes
    t0=$(now)
    case $c in
      nix)
        if run "$log" nix-build "$GRAPH" --argstr salt "$c-$salt" --builders "$spec" -j0 --no-out-link; then
          t1=$(now)
          # shellcheck disable=SC2046
          run "$log" nix "${NIX_CMD[@]}" copy --to "$TARGET" $(cat "$log.out") || ok=no
          note="build $(secs "$t0" "$t1") s + copy $(secs "$t1" "$(now)") s"
        else ok=no; fi
        ;;
      offload | unreachable) run "$log" "${off[@]}" --to "$TARGET" || ok=no ;;
      relay) run "$log" "${off[@]}" --to "$TARGET" --relay || ok=no ;;
      cache)
        cache="file://$WORK/cache-$run_no?compression=none"
        run "$log" "${off[@]}" --to "$cache" --sign-key "$WORK/key.sec" || ok=no
        ;;
    esac
    t=$(secs "$t0" "$(now)")
    mapfile -t outs < <(grep '^/nix/store/' "$log.out" || true)
    if [ "$c" = cache ] && [ "$ok" = yes ]; then
      fresh=$WORK/fresh-$run_no
      narinfos=$(find "$WORK/cache-$run_no" -name '*.narinfo' | wc -l)
      signed=$(grep -l '^Sig: bench-routes-1:' "$WORK/cache-$run_no"/*.narinfo 2>/dev/null | wc -l)
      if nix "${NIX_CMD[@]}" copy --from "file://$WORK/cache-$run_no" --to "local?root=$fresh" \
        --option trusted-public-keys "$(cat "$WORK/key.pub")" "${outs[@]}" 2>>"$log" &&
        nix-store --store "local?root=$fresh" --verify --check-contents 2>>"$log"; then
        n=$(nix-store --store "local?root=$fresh" -qR "${outs[@]}" | wc -l)
        check="cache: $narinfos NARs, $signed signed; a fresh store with the key trusted took $n closure paths, verify clean"
      else
        check="cache: $narinfos NARs, $signed signed; a fresh store with the key trusted REFUSED them (see $log)"
        ok=no
      fi
      rm -rf "$fresh"
    elif [ "$ok" = yes ]; then
      check=$(check_target "${outs[@]}") || ok=no
    else
      check="failed (see $log; KEEP=1 keeps it)"
    fi
    home=$(at_home "${outs[@]}")
    fleet_down
    bytes=$(client_bytes)
    [ "$ok" = yes ] || t=failed
    T[$c]="${T[$c]:-} $t"
    B[$c]="${B[$c]:-} $bytes"
    line="$(printf '%-12s' "$c:") "
    if [ "$t" = failed ]; then line+="failed"; else line+="$(printf '%7.2f s (%sx the bound)' "$t" "$(ratio "$t" "$lb")")"; fi
    line+=", client links $(mb "$bytes") MB"
    if [ "$c" != nix ] && [ -n "${T[nix]:-}" ]; then
      tn=$(echo "${T[nix]}" | awk '{print $NF}')
      bn=$(echo "${B[nix]}" | awk '{print $NF}')
      [ "$tn" = failed ] || [ "$t" = failed ] || line+=", nix/this $(ratio "$tn" "$t")x time"
      line+=", $(pct "$bytes" "$bn") % of Nix's bytes"
    fi
    echo "   run $run_no $line"
    [ -n "$note" ] && echo "        $note"
    echo "        $check; outputs in this machine's store: $home"
    grep -h '^bytes moved:' "$log" | sed 's/^/        offload: /' || true
    if [ "$c" = unreachable ]; then
      grep -h 'cannot reach' "$log" | sed 's/^/        note: /' || echo "        note: (no 'cannot reach' line)"
    fi
    [ "$c" = offload ] && [ "$sim" != - ] && [ "$t" != failed ] &&
      echo "        simulator predicted $sim s ($(awk -v s="$sim" -v m="$t" 'BEGIN {printf "%+.0f %%", 100 * (s - m) / m}') against measured)"
    forget "$c-$salt"
  done
done
if [ "$RUNS" -gt 1 ]; then
  echo "   medians of $RUNS runs:"
  for c in $CASES; do
    # shellcheck disable=SC2086
    if echo "${T[$c]}" | grep -q failed; then t=failed; else t=$(median ${T[$c]}); fi
    # shellcheck disable=SC2086
    echo "     $(printf '%-12s' "$c:") $t s, client links $(mb "$(median ${B[$c]})") MB"
  done
fi
