#!/bin/bash
# Make (once) the clean Debian 12 root filesystem that the installation
# tests install privtmpd into: debootstrap minbase from the machine's own
# Debian mirror, with what a node has before privtmpd (Python, and gcc and
# Slurm's headers for the virtualenv path, which builds the entry helper).
# python3-psutil and python3-daemon are deliberately left out: installing
# the .deb must fetch them from the distribution.  Kept in
# $PRIVTMPD_BOOKWORM_ROOT (default /var/cache/privtmpd/bookworm-pkg); the
# tests never change it (they run on an overlay of it).  Prints its path.
set -euo pipefail
ROOT=${PRIVTMPD_BOOKWORM_ROOT:-/var/cache/privtmpd/bookworm-pkg}
[ "$(id -u)" = 0 ] || { echo "bookworm-root: run as root" >&2; exit 1; }
if [ ! -e "$ROOT/.privtmpd-ready" ]; then
    command -v debootstrap >/dev/null || { echo "bookworm-root: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || { echo "bookworm-root: no Debian mirror in the machine's apt sources" >&2; exit 1; }
    rm -rf "$ROOT.new"
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv,gcc,libc6-dev,libslurm-dev \
        bookworm "$ROOT.new" "$mirror" >"$ROOT.log" 2>&1 || { tail -20 "$ROOT.log" >&2; exit 1; }
    # The machine's extra CA certificates and pip setup (pip behind a TLS proxy).
    if [ -d /usr/local/share/ca-certificates ]; then
        cp -r /usr/local/share/ca-certificates/. "$ROOT.new/usr/local/share/ca-certificates/"
        chroot "$ROOT.new" update-ca-certificates >/dev/null 2>&1 || true
    fi
    for f in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt; do
        if [ -e "$f" ]; then mkdir -p "$ROOT.new$(dirname "$f")"; cp "$f" "$ROOT.new$f"; fi
    done
    # Package scripts must not start services in the test root.
    printf '#!/bin/sh\nexit 101\n' > "$ROOT.new/usr/sbin/policy-rc.d"
    chmod 755 "$ROOT.new/usr/sbin/policy-rc.d"
    chroot "$ROOT.new" apt-get clean
    touch "$ROOT.new/.privtmpd-ready"
    rm -rf "$ROOT"
    mv "$ROOT.new" "$ROOT"
fi
echo "$ROOT"
