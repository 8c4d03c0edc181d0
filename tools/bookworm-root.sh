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
    rm -rf "$ROOT.new"
    "$(dirname "$0")/debootstrap-root.sh" bookworm "$ROOT.new" \
        ca-certificates,python3,python3-venv,gcc,libc6-dev,libslurm-dev
    # Package scripts must not start services in the test root.
    printf '#!/bin/sh\nexit 101\n' > "$ROOT.new/usr/sbin/policy-rc.d"
    chmod 755 "$ROOT.new/usr/sbin/policy-rc.d"
    chroot "$ROOT.new" apt-get clean
    touch "$ROOT.new/.privtmpd-ready"
    rm -rf "$ROOT"
    mv "$ROOT.new" "$ROOT"
fi
echo "$ROOT"
