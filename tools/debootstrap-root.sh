#!/bin/bash
# debootstrap-root.sh SUITE DIR PACKAGES: a minbase Debian root filesystem
# of SUITE in DIR (which must not exist), with PACKAGES (comma-separated)
# from the machine's own Debian mirror, and the machine's extra CA
# certificates and pip configuration (pip behind a TLS proxy, the machine's
# indexes).  The one builder behind the Debian 13 leg, the clean Debian 12
# root of the installation tests and the systemd container; each caller
# adds its own finishing touches and marks the tree ready.
set -euo pipefail
[ $# = 3 ] || { echo "usage: $0 SUITE DIR PACKAGES" >&2; exit 2; }
suite=$1 dir=$2 packages=$3
[ "$(id -u)" = 0 ] || { echo "debootstrap-root: run as root" >&2; exit 1; }
[ ! -e "$dir" ] || { echo "debootstrap-root: $dir exists" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap-root: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "debootstrap-root: no Debian mirror in the machine's apt sources" >&2; exit 1; }
mkdir -p "$(dirname "$dir")"
debootstrap --variant=minbase --include="$packages" "$suite" "$dir" "$mirror" >"$dir.log" 2>&1 || {
    tail -20 "$dir.log" >&2
    exit 1
}
if [ -d /usr/local/share/ca-certificates ]; then
    cp -r /usr/local/share/ca-certificates/. "$dir/usr/local/share/ca-certificates/"
    chroot "$dir" update-ca-certificates >/dev/null 2>&1 || true
fi
for f in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt; do
    if [ -e "$f" ]; then mkdir -p "$dir$(dirname "$f")"; cp "$f" "$dir$f"; fi
done
