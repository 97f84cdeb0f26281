#!/usr/bin/env bash
# Runs Nix's own functional tests for remote building with `build-hook` pointed at
# `offload hook` (without and with a running `offload agent`) and at Nix's own hook,
# and prints a pass/skip/fail table for each.
#
# Usage: scripts/nix-remote-tests.sh [NIX_SOURCE_DIR]
#   NIX_SOURCE_DIR  a checkout of Nix's source whose tests/ holds the six tests (one
#                   tag for all); without it, tests/ of tags 2.8.0 and 2.16.0 are taken
#                   from the mirror $NIX_MIRROR (default /work/.mirror/NixOS+nix/repo)
#                   with `git archive` into a scratch directory. Nothing of Nix's is
#                   copied into this repository.
# Environment:
#   OFFLOAD  the offload binary (default: target/debug/offload, built if missing)
#   HOOKS    which hooks to run: any of `nix offload agent` (default: all three)
#   TESTS    which tests (default: the six below)
#   KEEP=1   keep the scratch directory (printed) for the logs
#
# The tests: build-remote-input-addressed, build-remote-content-addressed-fixed,
# build-remote-content-addressed-floating, binary-cache-build-remote (tag 2.8.0), and
# build-remote-trustless-should-pass-0 / -1 (tag 2.16.0; the other trustless tests need
# Nix >= 2.16's --force-untrusted). They run against the installed Nix (Debian's 2.8).
#
# The least environment that makes them run against installed binaries (what Nix's
# build does with configure + `make installcheck`):
#   - tests/common.sh.in (2.8.0) or tests/common/vars-and-functions.sh.in (2.16.0) and
#     tests/config.nix.in become their .sh/.nix with the configure values substituted:
#     @bindir@ = the directory of `nix-build`, @coreutils@ = the directory of `cat`,
#     @bash@ = bash, @sandbox_shell@ = a static busybox (`apt install busybox-static`;
#     without one the sandboxed tests skip), @system@ = `nix eval --raw --impure --expr
#     builtins.currentSystem`, @PACKAGE_VERSION@ = `nix --version`, @dot@ empty.
#   - each test runs as `bash -e TEST.sh` in that tests/ directory after `init.sh`, with
#     TEST_NAME set to the test (TEST_ROOT = $TMPDIR/nix-test/TEST_NAME) and TMPDIR the
#     scratch directory, and NIX_STORE=/nix/store (as nixpkgs' stdenv sets it around
#     Nix's own `make installcheck`; 2.16's harness reads it under `set -u`, and an
#     empty one would be read by Nix as the store directory); exit 0 is a pass, 99
#     (Nix's convention) a skip.
#   - the hook: `build-hook = SCRIPT` appended to the test's own nix.conf after init.sh,
#     where SCRIPT runs `offload hook "$@"` (what `offload hook --print-config` writes).
#     For `agent`, one `offload agent` per test, started in the test's environment
#     (tests/common.sh sourced: builder sessions are the agent's children and must read
#     the test's nix.conf, as the ones Nix's hook starts do; NIX_STORE_DIR and
#     NIX_STATE_DIR unset for the tests that unset them), its socket under the
#     test's root and OFFLOAD_AGENT_SOCKET exported to the test, stopped after it.
#   - Nix's user-namespace sandbox must work (`unshare --user true`): the builds run in
#     chroot stores under TEST_ROOT, whose /nix/store exists only in the sandbox.
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NIX_SOURCE=${1:-}
mirror=${NIX_MIRROR:-/work/.mirror/NixOS+nix/repo}
hooks=${HOOKS:-nix offload agent}
tests=${TESTS:-build-remote-input-addressed build-remote-content-addressed-fixed build-remote-content-addressed-floating binary-cache-build-remote build-remote-trustless-should-pass-0 build-remote-trustless-should-pass-1}
offload=${OFFLOAD:-$here/target/debug/offload}

if [[ ! -x $offload ]]; then
    (cd "$here" && cargo build -q -p offload) || exit 2
fi
offload=$(readlink -f "$offload")

scratch=$(mktemp -d "${TMPDIR:-/tmp}/nix-remote-tests.XXXXXX")
if [[ -z ${KEEP:-} ]]; then
    trap 'chmod -R u+w "$scratch" 2>/dev/null; rm -rf "$scratch"' EXIT
fi

# Nix's tests take `busybox` as a Nix expression (`--arg busybox $busybox`) for a static
# busybox in the store. It runs as the builder with argv[0] its file name, and busybox
# runs as itself only under a name starting with `busybox`: so the store path is a
# directory holding bin/busybox, as Nix's own build has it (`builtins.path {…} + "/bin/busybox"`).
busybox=''
if found=$(command -v busybox) && file -L "$found" | grep -q 'statically linked'; then
    mkdir -p "$scratch/sandbox-shell/bin"
    cp "$found" "$scratch/sandbox-shell/bin/busybox"
    busybox="(builtins.path{path=\"$scratch/sandbox-shell\";name=\"busybox-sandbox-shell\";}+\"/bin/busybox\")"
fi
bindir=$(dirname "$(command -v nix-build)")
coreutils=$(dirname "$(command -v cat)")
system=$(nix eval --raw --impure --expr builtins.currentSystem 2>/dev/null || echo x86_64-linux)
version=$(nix --version | awk '{print $3}')

# The tag whose tests/ holds TEST.
tag_of() {
    case $1 in
        build-remote-trustless-*) echo 2.16.0 ;;
        *) echo 2.8.0 ;;
    esac
}

# tests/ of TAG (or of the given checkout), configured, in $scratch/src-TAG/tests.
prepare() {
    local tag=$1 dir=$scratch/src-$1
    [[ -d $dir/tests ]] && return 0
    mkdir -p "$dir"
    if [[ -n ${NIX_SOURCE:-} ]]; then
        cp -r "$NIX_SOURCE/tests" "$dir/"
    else
        git -C "$mirror" archive "$tag" tests | tar -x -C "$dir"
    fi
    local subst="s|@bindir@|$bindir|g; s|@coreutils@|$coreutils|g; s|@bash@|$(command -v bash)|g;
        s|\"@sandbox_shell@\"|'$busybox'|g; s|@system@|$system|g; s|@PACKAGE_VERSION@|$version|g;
        s|@dot@||g; s|@BUILD_SHARED_LIBS@|1|g"
    local f
    for f in "$dir"/tests/common.sh.in "$dir"/tests/common/vars-and-functions.sh.in \
        "$dir"/tests/config.nix.in; do
        [[ -f $f ]] && sed -e "$subst" "$f" >"${f%.in}"
    done
}

# The build-hook script for HOOK in DIR; empty for Nix's own hook.
hook_script() {
    local hook=$1 dir=$2
    [[ $hook == nix ]] && return 0
    printf '#!/bin/sh\nexec %q hook "$@"\n' "$offload" >"$dir/offload-build-hook"
    chmod +x "$dir/offload-build-hook"
    echo "$dir/offload-build-hook"
}

# Runs TEST with HOOK; prints pass, skip or fail; the log is $scratch/HOOK/TEST.log.
run_one() {
    local hook=$1 test=$2 tag src logdir log status agent_pid=''
    tag=$(tag_of "$test")
    if [[ -n ${NIX_SOURCE:-} ]]; then tag=given; fi
    prepare "$tag"
    src=$scratch/src-$tag/tests
    logdir=$scratch/$hook
    mkdir -p "$logdir"
    log=$logdir/$test.log
    local root=$scratch/tmp/nix-test/$test
    (
        cd "$src" || exit 2
        export TMPDIR=$scratch/tmp TEST_NAME=$test NIX_STORE=/nix/store
        mkdir -p "$TMPDIR"
        bash -e init.sh || exit 2
        script=$(hook_script "$hook" "$logdir")
        if [[ -n $script ]]; then
            echo "build-hook = $script" >>"$root/etc/nix.conf"
        fi
        if [[ $hook == agent ]]; then
            export OFFLOAD_AGENT_SOCKET=$root/offload-agent.sock
            # In the test's environment (its NIX_CONF_DIR, store and state dirs), as
            # the sessions Nix's hook opens are: they are the agent's children here.
            # The tests that build in chroot stores of /nix/store unset NIX_STORE_DIR
            # and NIX_STATE_DIR after common.sh (build-remote.sh and friends): so does
            # the agent for them.
            local unset_dirs='' sourced
            sourced=$(sed -n 's/^source \([^ ]*\).*/\1/p' "$test.sh")
            if grep -qs '^unset NIX_STORE_DIR' "$test.sh" $sourced; then
                unset_dirs='unset NIX_STORE_DIR NIX_STATE_DIR'
            fi
            (source common.sh && eval "$unset_dirs" && exec "$offload" agent) \
                >"$logdir/$test.agent.log" 2>&1 &
            agent_pid=$!
            for _ in $(seq 100); do
                [[ -S $OFFLOAD_AGENT_SOCKET ]] && break
                sleep 0.1
            done
        fi
        timeout 600 bash -e "$test.sh"
        status=$?
        if [[ -n $agent_pid ]]; then
            kill "$agent_pid" 2>/dev/null
            wait "$agent_pid" 2>/dev/null
        fi
        exit $status
    ) >"$log" 2>&1
    status=$?
    case $status in
        0) echo pass ;;
        99) echo skip ;;
        *) echo "fail($status)" ;;
    esac
}

printf '%-42s' test
for hook in $hooks; do printf ' %-10s' "$hook"; done
echo
for test in $tests; do
    printf '%-42s' "$test"
    for hook in $hooks; do
        printf ' %-10s' "$(run_one "$hook" "$test")"
    done
    echo
done
echo "logs: $scratch/HOOK/TEST.log${KEEP:+ (kept)}"
