#!/usr/bin/env bash
# Build-hook benchmark: `nix-build` with offload's hook (`--option build-hook`, a script
# running `offload hook`), alone and with `offload agent` running, against `nix-build`
# with Nix 2.8's own hook, same machines (`--builders`), fresh output paths each run (a
# salt). Prints the times and the ratios.
#
#   scripts/bench-hook.sh            # both cases below
#   CASES=loopback scripts/bench-hook.sh
#
# Cases:
#   loopback  the layered graph of 40 derivations (scripts/gen-dag.py) on three loopback
#             builders x 2 slots (chroot stores, `ssh://localhost?remote-store=DIR`, run
#             as local processes) + 2 local slots
#   sshd      200 trivial derivations over three real sshd hosts x 4 slots
#             (scripts/sshfleet.sh), nothing local (-j0)
#
# Nix's hook, and offload's without the agent, open a session per build (the hook
# protocol hands over one derivation per hook process); with the agent, offload's hook
# builds on the agent's warm sessions.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-"loopback sshd"}
WORK=${WORK:-/tmp/offload-bench-hook}
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}
bash scripts/setup.sh >/dev/null
cargo build --release -q -p offload
OFFLOAD=$PWD/target/release/offload
rm -rf "$WORK"; mkdir -p "$WORK"
cat > "$WORK/nix-store-fleet" <<'SH'
#!/bin/sh
exec nix-store --option build-users-group '' "$@"
SH
cat > "$WORK/hook" <<SH
#!/bin/sh
export OFFLOAD_SLOTS_DIR=$WORK/slots OFFLOAD_HISTORY=$WORK/history.sqlite
export OFFLOAD_AGENT_SOCKET=$WORK/agent.sock
exec $OFFLOAD hook "\$@"
SH
chmod +x "$WORK/nix-store-fleet" "$WORK/hook"

now() { date +%s.%N; }
secs() { awk "BEGIN {printf \"%.2f\", $2 - $1}"; }
remote() { grep -c "^building '.*' on 'ssh" "$1" || true; }

# compare NAME FILE SPEC JOBS: nix-build with each hook, printed side by side.
compare() {
  local name=$1 file=$2 spec=$3 jobs=$4 salt
  salt=$(date +%s%N)
  local t0 t1 t2 t3
  t0=$(now)
  nix-build "$file" --argstr salt "nix-$salt" --builders "$spec" -j "$jobs" --no-out-link >/dev/null 2>"$WORK/nix.log"
  t1=$(now)
  nix-build "$file" --argstr salt "offload-$salt" --builders "$spec" -j "$jobs" --no-out-link \
    --option build-hook "$WORK/hook" >/dev/null 2>"$WORK/offload.log"
  t2=$(now)
  OFFLOAD_AGENT_SOCKET=$WORK/agent.sock OFFLOAD_SLOTS_DIR=$WORK/slots "$OFFLOAD" agent 2>"$WORK/agent.log" &
  local agent=$!
  while [ ! -S "$WORK/agent.sock" ]; do sleep 0.05; done
  local t2a
  t2a=$(now)
  nix-build "$file" --argstr salt "agent-$salt" --builders "$spec" -j "$jobs" --no-out-link \
    --option build-hook "$WORK/hook" >/dev/null 2>"$WORK/agent-build.log"
  t3=$(now)
  kill "$agent"; wait "$agent" || true
  local tn to ta
  tn=$(secs "$t0" "$t1"); to=$(secs "$t1" "$t2"); ta=$(secs "$t2a" "$t3")
  echo "== $name"
  printf '   nix-build, Nix'"'"'s hook:            %7.2f s  (%s builds remote)\n' "$tn" "$(remote "$WORK/nix.log")"
  printf '   nix-build, offload hook:        %7.2f s  (%s builds remote), %.2fx\n' "$to" "$(remote "$WORK/offload.log")" "$(awk "BEGIN {print $tn / $to}")"
  printf '   nix-build, offload hook+agent:  %7.2f s  (%s builds remote), %.2fx\n' "$ta" "$(remote "$WORK/agent-build.log")" "$(awk "BEGIN {print $tn / $ta}")"
}

for case in $CASES; do
  case $case in
    loopback)
      spec=""
      for i in 1 2 3; do
        spec+="ssh://localhost?remote-store=$WORK/m$i&remote-program=$WORK/nix-store-fleet x86_64-linux - 2 1;"
      done
      python3 scripts/gen-dag.py layered 40 1 "$WORK/layered.nix" >/dev/null
      compare "layered, 40 derivations, 3 loopback builders x 2 slots + 2 local slots" "$WORK/layered.nix" "$spec" 2
      ;;
    sshd)
      NIX_SSHOPTS="$(bash scripts/sshfleet.sh up 3 "$WORK/fleet")"
      export NIX_SSHOPTS
      trap 'bash scripts/sshfleet.sh down "$WORK/fleet"' EXIT
      spec=""
      for i in 1 2 3; do spec+="ssh://fleet$i x86_64-linux - 4 1;"; done
      python3 scripts/gen-dag.py trivial 200 1 "$WORK/trivial.nix" >/dev/null
      compare "trivial, 200 derivations, 3 sshd hosts x 4 slots, -j0" "$WORK/trivial.nix" "$spec" 0
      ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
  esac
done
