#!/usr/bin/env bash
# Sets up a Debian machine for offload: Nix 2.8 (nix-bin) and its build users, OpenSSH
# client and server, the nix.conf line chroot-store builds need, a Debian 13 root with
# Nix 2.26 for the tests' builder and client on a newer Nix (scripts/newer-nix.sh),
# PostgreSQL for the shared state's tests, and a Rust toolchain with rustfmt and clippy. Idempotent: it installs only what is missing, and says
# nothing else when everything is there.
#
#   bash scripts/setup.sh
set -euo pipefail

SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: run as root, or install sudo" >&2; exit 2; }
  SUDO=sudo
fi

# Debian package → a file it installs.
declare -A WANT=(
  [nix-bin]=/usr/bin/nix-store
  [openssh-client]=/usr/bin/ssh
  [openssh-server]=/usr/sbin/sshd
  [util-linux]=/usr/bin/unshare
  [python3]=/usr/bin/python3
  [time]=/usr/bin/time
  [git]=/usr/bin/git
  [tmux]=/usr/bin/tmux
  [chromium]=/usr/bin/chromium
  [man-db]=/usr/bin/man
  [groff-base]=/usr/bin/groff
  [curl]=/usr/bin/curl
  # The sandbox shell of Nix's own remote-build tests (scripts/nix-remote-tests.sh).
  [busybox-static]=/bin/busybox
)
missing=()
for pkg in "${!WANT[@]}"; do
  [ -e "${WANT[$pkg]}" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The shared state's tests start a private PostgreSQL server (Debian's, any version).
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  echo "setup: installing postgresql"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

# Local builds run as the `nixbld` build users. Debian creates them in the package
# nix-setup-systemd, which needs systemd; without it, make the same group and ten users.
if ! getent group nixbld >/dev/null; then
  echo "setup: creating the nixbld group and build users nixbld1..nixbld10"
  $SUDO groupadd --system nixbld
fi
for i in $(seq 1 10); do
  if ! getent passwd "nixbld$i" >/dev/null; then
    $SUDO useradd --system --no-create-home --home-dir /var/empty --shell /usr/sbin/nologin \
      --gid nixbld --groups nixbld --comment "Nix build user $i" "nixbld$i"
  fi
done

# Builds in chroot stores (`--store DIR`, `remote-store=DIR`) run without a sandbox
# here and need the host's /bin and libraries.
CONF=/etc/nix/nix.conf
if ! grep -qs '^extra-sandbox-paths' "$CONF"; then
  echo "setup: adding extra-sandbox-paths to $CONF"
  $SUDO mkdir -p /etc/nix
  echo 'extra-sandbox-paths = /bin /lib /lib64 /usr' | $SUDO tee -a "$CONF" >/dev/null
fi
# The test fleet's builder and client on a newer Nix: a Debian 13 root with its Nix 2.26,
# and a Debian unstable root with the newest Nix Debian has, each made once (about a
# minute) and kept in /var/cache/offload-test/.
$SUDO bash "$(dirname "$0")/newer-nix.sh"
$SUDO bash "$(dirname "$0")/newer-nix.sh" sid
# sshd refuses to start without its privilege-separation directory.
[ -d /run/sshd ] || $SUDO mkdir -p /run/sshd

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: installing Debian's Rust toolchain (offload needs Rust 1.85 or later)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cargo rustc >/dev/null
fi

# The checks scripts/test.sh runs besides the tests: `cargo fmt` and `cargo clippy`.
# Under rustup they are components of the toolchain; otherwise Debian packages them.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null; then
    echo "setup: adding the rustfmt and clippy components"
    rustup component add rustfmt clippy
  else
    echo "setup: installing rustfmt and rust-clippy"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rustfmt rust-clippy >/dev/null
  fi
fi
