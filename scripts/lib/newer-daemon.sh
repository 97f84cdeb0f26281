# Sourced by the fixture-capture scripts: runs Nix 2.26's `nix-daemon --stdio` of the
# Debian 13 root on a fresh store holding one added file, feeding it a file of requests
# and keeping its replies.
#
#   daemon_in_root ROOT FILE REQUESTS REPLIES SECONDS
#
# ROOT is the root scripts/newer-nix.sh makes; FILE is added to the store first; input
# stays open SECONDS after the requests (the daemon stops a build when its input closes).
# Everything happens in a mount namespace of its own, on a tmpfs /tmp in the root.
daemon_in_root() {
  local root=$1 file=$2 requests=$3 replies=$4 seconds=$5
  unshare -m --propagation private sh -c "
    set -e
    mount -t tmpfs capture '$root/tmp'
    mount -t proc proc '$root/proc'
    mount --rbind /dev '$root/dev'
    cp '$file' '$root/tmp/file.txt'
    chroot '$root' env NIX_CONFIG=\"\$NIX_CONFIG\" nix-store --store /tmp/store --add /tmp/file.txt > /dev/null
    (cat '$requests'; sleep $seconds) \
      | chroot '$root' env NIX_CONFIG=\"\$NIX_CONFIG\" nix-daemon --stdio --store /tmp/store \
      > '$replies'
  "
}
