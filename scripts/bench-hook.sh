#!/usr/bin/env bash
# Build-hook benchmark: `nix-build` with offload's hook (`--option build-hook`, a script
# running `offload hook`) against `nix-build` with Nix 2.8's own hook, same machines
# (`--builders`), fresh output paths each run (a salt). Prints both times and the ratio.
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
# Both hooks open a session per build (the hook protocol hands over one derivation per
# hook process), so the ssh handshake per build remains on the sshd case.
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
  local t0 t1 t2
  t0=$(now)
  nix-build "$file" --argstr salt "nix-$salt" --builders "$spec" -j "$jobs" --no-out-link >/dev/null 2>"$WORK/nix.log"
  t1=$(now)
  nix-build "$file" --argstr salt "offload-$salt" --builders "$spec" -j "$jobs" --no-out-link \
    --option build-hook "$WORK/hook" >/dev/null 2>"$WORK/offload.log"
  t2=$(now)
  local tn to
  tn=$(secs "$t0" "$t1"); to=$(secs "$t1" "$t2")
  echo "== $name"
  printf '   nix-build, Nix'"'"'s hook:      %7.2f s  (%s builds remote)\n' "$tn" "$(remote "$WORK/nix.log")"
  printf '   nix-build, offload hook:  %7.2f s  (%s builds remote)\n' "$to" "$(remote "$WORK/offload.log")"
  printf '   ratio Nix / offload:      %7.2fx\n' "$(awk "BEGIN {print $tn / $to}")"
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
