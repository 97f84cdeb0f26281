#!/usr/bin/env bash
# A fleet of real sshd "hosts" on this machine, for benchmarks (tests use
# offload-test-support's SshFleet, which does the same from Rust).
#
#   scripts/sshfleet.sh up N DIR     # hosts fleet1..fleetN; prints the ssh options to use
#   scripts/sshfleet.sh down DIR
#
# Each host is an sshd on 127.0.0.1 (a free port) in its own mount namespace with a
# private /nix (its own store) and /etc/nix whose nix.conf has `build-users-group =`:
# the nixbld users are shared by every host here, and Nix kills all processes of a build
# user around each build. Host aliases live in DIR/ssh_config, used through
# `NIX_SSHOPTS="-F DIR/ssh_config"`; ~/.ssh is left alone.
set -euo pipefail
cmd=${1:?up N DIR | down DIR}
if [ "$cmd" = down ]; then
  D=${2:?DIR}
  for p in "$D"/h*/sshd.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  exit 0
fi
n=${2:?N}; D=${3:?DIR}
mkdir -p "$D"
[ -f "$D/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$D/client_key"
cp "$D/client_key.pub" "$D/authorized_keys"
: > "$D/known_hosts"; : > "$D/ssh_config"
mkdir -p /run/sshd
for i in $(seq 1 "$n"); do
  h="$D/h$i"; mkdir -p "$h/nix" "$h/etc-nix"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  { grep -v '^build-users-group' /etc/nix/nix.conf 2>/dev/null || true; echo 'build-users-group ='; } > "$h/etc-nix/nix.conf"
  [ -f "$h/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$h/host_key"
  cat > "$h/sshd_config" <<CFG
Port $port
ListenAddress 127.0.0.1
HostKey $h/host_key
PidFile $h/sshd.pid
AuthorizedKeysFile $D/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
MaxStartups 100
MaxSessions 100
CFG
  [ -f "$h/sshd.pid" ] && kill "$(cat "$h/sshd.pid")" 2>/dev/null || true
  unshare -m --propagation private sh -c "mount --bind '$h/nix' /nix && mount --bind '$h/etc-nix' /etc/nix && exec /usr/sbin/sshd -f '$h/sshd_config'"
  echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$h/host_key.pub")" >> "$D/known_hosts"
  printf 'Host fleet%s\n  HostName 127.0.0.1\n  Port %s\n  User root\n  IdentityFile %s\n  IdentitiesOnly yes\n  UserKnownHostsFile %s\n  BatchMode yes\n\n' \
    "$i" "$port" "$D/client_key" "$D/known_hosts" >> "$D/ssh_config"
done
sleep 0.5
for i in $(seq 1 "$n"); do ssh -F "$D/ssh_config" "fleet$i" true || { echo "fleet$i unreachable" >&2; exit 1; }; done
echo "-F $D/ssh_config"
