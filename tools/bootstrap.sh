#!/bin/bash
# Install what privtmpd, its tests and its demo need on a Debian/Ubuntu
# machine (as root), and a virtualenv with the Python dependencies in
# $REPO/.venv.  Idempotent and quick when everything is already there.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "bootstrap: run as root (it installs packages and creates namespaces)" >&2; exit 1; }

# rpm (rpmbuild, rpm2archive), python3-setuptools, systemd
# (systemd-analyze), man-db and groff-base: the packaging tests build the
# RPM, verify the unit and render the man pages.  libpam0g-dev: the PAM
# module (pam/) and its test driver; e2fsprogs: limit= makes ext4 images;
# dpkg-dev: tools/build-deb.sh; debootstrap: the clean Debian 12 roots the
# installation tests install into and the unit's test boots;
# systemd-container (systemd-nspawn): that boot, with systemd as PID 1
# (tests/systemdlab.py).
PKGS="slurmctld slurmd slurm-client munge libslurm-dev gcc make python3 python3-venv python3-pip
      util-linux e2fsprogs strace procps iproute2 rpm systemd man-db groff-base python3-setuptools
      libpam0g-dev dpkg-dev debootstrap systemd-container"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "bootstrap: installing:$missing"
    # Package scripts must not start services: the demo and tests start
    # munge and Slurm themselves (there may be no systemd).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x "$REPO/.venv/bin/python" ] || ! "$REPO/.venv/bin/python" -c 'import daemon, psutil, pytest, hypothesis, wheel, prometheus_client, mypy, ruff' 2>/dev/null; then
    echo "bootstrap: creating $REPO/.venv"
    "$PY" -m venv "$REPO/.venv"
    log=$(mktemp)
    if ! "$REPO/.venv/bin/pip" install -q -e "$REPO[test]" >"$log" 2>&1; then
        cat "$log" >&2
        echo "bootstrap: pip install failed" >&2
        exit 1
    fi
    rm -f "$log"
fi
make -s -C "$REPO/spank" >/dev/null
echo "bootstrap: ready ($("$REPO/.venv/bin/python" --version), $(slurmd -V 2>/dev/null))"
