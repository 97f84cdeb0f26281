#!/usr/bin/env bash
# Makes the root of the tests' newer Nix: Debian 13 (trixie) with its nix-bin (Nix 2.26),
# or with `sid`, Debian unstable with its nix-bin (the newest Nix Debian has: 2.34 when
# the root was made), each with openssh-client (for a client on that Nix reaching sshd
# builders), in /var/cache/offload-test/ (OFFLOAD_TEST_CACHE). A test builder on 2.26
# runs it through chroot, a test client enters it with pivot_root. The directory is
# made under a temporary name and renamed once complete, so a half-made root is never
# used; its name carries a recipe version, bumped when what it holds changes. Done once:
# when the root is there this does nothing. Needs root and Debian's mirrors.
#
#   bash scripts/newer-nix.sh [trixie|sid]
set -euo pipefail

SUITE=${1:-trixie}
CACHE=${OFFLOAD_TEST_CACHE:-/var/cache/offload-test}
case $SUITE in
  trixie) ROOT=$CACHE/nix-trixie-2 ;;
  sid) ROOT=$CACHE/nix-sid-1 ;;
  *) echo "newer-nix.sh: unknown suite '$SUITE': trixie or sid" >&2; exit 2 ;;
esac
# Renamed into place only when complete: if it is there, it is whole.
[ -d "$ROOT" ] && exit 0

if ! command -v debootstrap >/dev/null; then
  echo "setup: installing debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
echo "setup: making a Debian $SUITE root with its Nix in $ROOT (once; a few minutes)"
mkdir -p "$CACHE"
# What an attempt killed outright left behind (an attempt that fails removes its own).
find "$CACHE" -maxdepth 1 -name "${ROOT##*/}.tmp.*" -mmin +120 -exec rm -rf --one-file-system {} +
tmp=$(mktemp -d "$ROOT.tmp.XXXXXX")
# /proc and /dev are mounted only in a private mount namespace, so removing a failed
# attempt never reaches through them.
trap 'rm -rf --one-file-system "$tmp"' EXIT
debootstrap --variant=minbase "$SUITE" "$tmp" http://deb.debian.org/debian >"$tmp.log" 2>&1 ||
  { tail -n 20 "$tmp.log" >&2; echo "setup: debootstrap failed; log: $tmp.log" >&2; exit 1; }
unshare -m --propagation private sh -c '
  mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" &&
  DEBIAN_FRONTEND=noninteractive chroot "$1" apt-get install -y -qq --no-install-recommends nix-bin openssh-client
' sh "$tmp" >>"$tmp.log" 2>&1 ||
  { tail -n 20 "$tmp.log" >&2; echo "setup: installing nix-bin and openssh-client failed; log: $tmp.log" >&2; exit 1; }
chroot "$tmp" apt-get clean
# Mount points for the test host's own store, configuration and build directories.
mkdir -p "$tmp/nix" "$tmp/etc/nix" "$tmp/tmp"
version=$(unshare -m --propagation private sh -c \
  'mount -t proc proc "$1/proc" && chroot "$1" nix-store --version' sh "$tmp")
mv -T "$tmp" "$ROOT"
trap - EXIT
rm -f "$tmp.log"
echo "setup: $version in $ROOT"
