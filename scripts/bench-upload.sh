#!/usr/bin/env bash
# Upload benchmark: the inputs of one build going to a fresh builder. A derivation takes
# PATHS input paths of MB MiB in all (random bytes); `offload build -j0` builds it on a
# builder with an empty store, so the build's time is the upload's. Two offload binaries
# side by side in one run, each to its own fresh builder, ROUNDS times (best of):
# OLD (default: the last commit before the transfer engine, built into
# $WORK/old, which copied one path at a time to a machine) and this checkout's.
#
#   scripts/bench-upload.sh                      # 200 paths, 400 MiB, loopback builders
#   LINK=sshd scripts/bench-upload.sh            # real sshd builders behind a proxy with
#                                                # DELAY_MS ms each way (needs root)
#   OLD=/path/to/offload PATHS=50 MB=100 scripts/bench-upload.sh
#
# Prints both times and the ratio, and checks each builder's store with
# `nix-store --verify --check-contents`.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=${PATHS:-200}
MB=${MB:-400}
ROUNDS=${ROUNDS:-3}
LINK=${LINK:-loopback}
DELAY_MS=${DELAY_MS:-10}
OLD_COMMIT=${OLD_COMMIT:-76bc42e^}
WORK=${WORK:-/tmp/offload-bench-upload}
export NIX_CONFIG=${NIX_CONFIG:-"substituters ="}
case $LINK in loopback | sshd) ;; *) echo "error: LINK=$LINK: use loopback or sshd" >&2; exit 2 ;; esac

cargo build --release -q -p offload
NEW=$PWD/target/release/offload
if [ -z "${OLD:-}" ]; then
  old_tree=$WORK/old
  if [ ! -x "$old_tree/target/release/offload" ]; then
    # A plain copy of that commit's tree, so the repository gains no worktree.
    rm -rf "$old_tree"
    mkdir -p "$old_tree"
    git archive "$OLD_COMMIT" | tar -x -C "$old_tree"
    (cd "$old_tree" && cargo build --release -q -p offload)
  fi
  OLD=$old_tree/target/release/offload
fi

# A state left by an earlier run may hold a quarantine of a builder that is gone.
rm -rf "$WORK/data" "$WORK"/b-* "$WORK/fleet" "$WORK"/history-*.sqlite*
mkdir -p "$WORK"
python3 scripts/gen-paths.py "$WORK/data" "$PATHS" "$MB"
{
  echo 'let leaves = ['
  for i in $(seq 0 $((PATHS - 1))); do echo "  (builtins.path { path = $WORK/data/p$i; name = \"leaf-$i\"; })"; done
  echo ']; in { salt }: derivation { name = "upload-root"; system = builtins.currentSystem; builder = "/bin/sh";'
  echo '  PATH = "/bin:/usr/bin"; inherit leaves salt; args = ["-c" "echo $leaves > $out"]; }'
} >"$WORK/root.nix"
nix-instantiate "$WORK/root.nix" --argstr salt probe >/dev/null
SYSTEM=$(nix-instantiate --eval -E builtins.currentSystem | tr -d '"')

program=$WORK/nix-store-builder
printf '#!/bin/sh\nexec nix-store --option build-users-group "" "$@"\n' >"$program"
chmod +x "$program"
PROXY_PID=
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  [ "$LINK" = sshd ] && bash scripts/sshfleet.sh down "$WORK/fleet" >/dev/null 2>&1 || true
}
trap cleanup EXIT
if [ "$LINK" = sshd ]; then
  [ "$(id -u)" -eq 0 ] || { echo "error: LINK=sshd needs root (sshd hosts with a private /nix)" >&2; exit 2; }
  NIX_SSHOPTS=$(bash scripts/sshfleet.sh up 1 "$WORK/fleet" 2>"$WORK/sshfleet.log")
  export NIX_SSHOPTS
  port=$(awk '$1 == "Host" {h = $2} h == "fleet1" && $1 == "Port" {print $2}' "$WORK/fleet/ssh_config")
  # A port file left by an earlier run would name a proxy that is gone.
  rm -f "$WORK/proxy.port"
  python3 scripts/shape-link.py "127.0.0.1:$port" --mbit 10000 --delay-ms "$DELAY_MS" \
    --port-file "$WORK/proxy.port" 2>"$WORK/proxy.log" &
  PROXY_PID=$!
  for _ in $(seq 50); do [ -s "$WORK/proxy.port" ] && break; sleep 0.1; done
  printf 'Host fleet1-far\n  HostName 127.0.0.1\n  Port %s\n  HostKeyAlias [127.0.0.1]:%s\n  User root\n  IdentityFile %s\n  IdentitiesOnly yes\n  UserKnownHostsFile %s\n  BatchMode yes\n' \
    "$(cat "$WORK/proxy.port")" "$port" "$WORK/fleet/client_key" "$WORK/fleet/known_hosts" >>"$WORK/fleet/ssh_config"
fi
# builder NAME: a machines-file line for a fresh builder (a chroot store on the sshd
# host behind the proxy, or a loopback one here).
builder() {
  if [ "$LINK" = sshd ]; then
    echo "ssh://fleet1-far?remote-store=$(store_of "$1")&remote-program=$program $SYSTEM - 1 1"
  else
    echo "ssh://localhost?remote-store=$(store_of "$1")&remote-program=$program $SYSTEM - 1 1"
  fi
}
# The sshd host shares this machine's /tmp (only its /nix is its own).
store_of() { if [ "$LINK" = sshd ]; then echo "/tmp/upload-$1"; else echo "$WORK/b-$1"; fi; }
fresh() { rm -rf "$(store_of "$1")"; }
echo "inputs: $PATHS paths, $(du -sm "$WORK/data" | cut -f1) MiB; link: $LINK$([ "$LINK" = sshd ] && echo " ($DELAY_MS ms each way)")"
best_old=; best_new=
for r in $(seq 1 "$ROUNDS"); do
  times=()
  for which in old new; do
    bin=$OLD; [ "$which" = new ] && bin=$NEW
    fresh "$which"
    t0=$(date +%s.%N)
    "$bin" build "$WORK/root.nix" --argstr salt "$which-$r-$(date +%s%N)" -j0 --builders "$(builder "$which")" \
      --no-out-link --history "$WORK/history-$which.sqlite" >/dev/null 2>"$WORK/$which.log" ||
      { echo "FAIL: $which (see $WORK/$which.log)"; tail -n 5 "$WORK/$which.log"; exit 1; }
    t1=$(date +%s.%N)
    times+=("$(awk "BEGIN {print $t1 - $t0}")")
  done
  echo "round $r: one at a time (old) ${times[0]} s, transfer engine (this checkout) ${times[1]} s"
  best_old=$(awk "BEGIN {b = \"$best_old\"; print (b == \"\" || ${times[0]} < b) ? ${times[0]} : b}")
  best_new=$(awk "BEGIN {b = \"$best_new\"; print (b == \"\" || ${times[1]} < b) ? ${times[1]} : b}")
done
for which in old new; do
  nix-store --store "$(store_of "$which")" --verify --check-contents 2>&1 | grep -v '^checking\|^reading' || true
done
echo "builders verified: nix-store --verify --check-contents clean"
printf 'old (one at a time): %6.2f s\nthis checkout:       %6.2f s\nspeed-up: %.2fx\n' \
  "$best_old" "$best_new" "$(awk "BEGIN {print $best_old / $best_new}")"
