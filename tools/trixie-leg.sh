#!/bin/bash
# Run the whole test suite in a Debian 13 (trixie) root filesystem: Slurm
# 24.11, Python 3.13, gcc 14, groff 1.23, /tmp on a tmpfs (trixie's
# default).  Run as root on a Debian/Ubuntu machine; CI runs it after the
# main suite.  Extra arguments go to pytest.
#
# The root filesystem is made once with debootstrap (minbase) and kept in
# $PRIVTMPD_TRIXIE_ROOT (default /var/cache/privtmpd/trixie) for later
# runs; the checkout is copied in fresh every time.  It is entered with
# pivot_root in new mount and PID namespaces, not chroot: the tests setns()
# into job namespaces, which would leave a chroot.  Nothing of the host is
# changed but that cache directory: the mounts live in the new mount
# namespace and go with it.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${PRIVTMPD_TRIXIE_ROOT:-/var/cache/privtmpd/trixie}
[ "$(id -u)" = 0 ] || { echo "trixie-leg: run as root" >&2; exit 1; }

if [ "${1:-}" = "--inside" ]; then
    # In the new mount and PID namespaces (PID 1 is this script).
    shift
    mount --make-rprivate /
    mount --bind "$ROOT" "$ROOT"
    mount -t proc proc "$ROOT/proc"
    mount --rbind /sys "$ROOT/sys"
    mount --rbind /dev "$ROOT/dev"
    mount -t tmpfs -o mode=755 run "$ROOT/run"
    mount -t tmpfs -o mode=1777 tmp "$ROOT/tmp"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    cp /etc/hosts "$ROOT/etc/hosts"
    mkdir -p "$ROOT/.oldroot"
    cd "$ROOT"
    pivot_root . .oldroot
    umount -l /.oldroot
    cd /work/privtmpd
    # Not exec: this shell stays PID 1 (it reaps orphans), and the test
    # suite is not mistaken for init (a daemon started by PID 1 does not
    # detach: python-daemon's rule, right for systemd, wrong here).
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        PRIVTMPD_REQUIRE_PRIVILEGED="${PRIVTMPD_REQUIRE_PRIVILEGED:-}" tools/test.sh "$@"
    exit $?
fi

start=$(date +%s)
if [ ! -e "$ROOT/.privtmpd-ready" ]; then
    command -v debootstrap >/dev/null || {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
    }
    rm -rf "$ROOT.new"
    echo "trixie-leg: debootstrap trixie into $ROOT (once)"
    "$REPO/tools/debootstrap-root.sh" trixie "$ROOT.new" ca-certificates,git
    touch "$ROOT.new/.privtmpd-ready"
    rm -rf "$ROOT"
    mv "$ROOT.new" "$ROOT"
fi
# A fresh copy of the checkout's files (tracked and untracked, not ignored).
rm -rf "$ROOT/work/privtmpd"
mkdir -p "$ROOT/work/privtmpd"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) |
    tar -xf - -C "$ROOT/work/privtmpd"
echo "trixie-leg: root filesystem ready in $(( $(date +%s) - start )) s"
export ROOT
exec unshare --mount --pid --fork --propagation private "$0" --inside "$@"
