#!/bin/bash
# Build the Debian package of privtmpd from this checkout, offline, with
# Debian's own tools only (dpkg-deb, gcc, python3-setuptools; libslurm-dev
# and libpam0g-dev for the entry helper and the PAM module):
#
#   tools/build-deb.sh [--version VERSION] [--out DIR]
#
# writes DIR/privtmpd_VERSION_ARCH.deb (default DIR: dist/ of the checkout,
# VERSION: privtmpd.__version__ with Debian revision -1).  --version builds
# the same tree under another version (the upgrade tests use it).
#
# Layout (the same stable paths as packaging/privtmpd.spec and
# `privtmpctl install`; none contains the Python version):
#   /usr/lib/python3/dist-packages/privtmpd/    the package (every Python 3 reads it)
#   /usr/sbin/privtmpd, /usr/sbin/privtmpctl     daemon and CLI
#   /usr/libexec/privtmpd/prolog, epilog         the hooks, for slurm.conf
#   /usr/lib/privtmpd/privtmpd_spank.so          the entry helper, for plugstack.conf
#   /usr/lib/MULTIARCH/security/pam_privtmpd.so  the PAM module
#   /lib/systemd/system/privtmpd.service         ExecStart=/usr/sbin/privtmpd
#   /etc/privtmpd/privtmpd.conf                  conffile (kept on remove, purged on purge)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VERSION="" OUT="$REPO/dist"
while [ $# -gt 0 ]; do
    case $1 in
        --version) VERSION=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "build-deb: unknown argument $1 (usage: tools/build-deb.sh [--version V] [--out DIR])" >&2; exit 2 ;;
    esac
done
for tool in dpkg-deb gcc python3; do
    command -v $tool >/dev/null || { echo "build-deb: $tool is missing (apt-get install dpkg-dev gcc python3-setuptools libslurm-dev libpam0g-dev)" >&2; exit 1; }
done
[ -e /usr/include/slurm/spank.h ] || { echo "build-deb: slurm/spank.h is missing (apt-get install libslurm-dev)" >&2; exit 1; }
[ -e /usr/include/security/pam_modules.h ] || { echo "build-deb: security/pam_modules.h is missing (apt-get install libpam0g-dev)" >&2; exit 1; }
python3 -c 'import setuptools' 2>/dev/null || { echo "build-deb: python3-setuptools is missing (apt-get install python3-setuptools)" >&2; exit 1; }

UPSTREAM=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/privtmpd/__init__.py")
[ -n "$UPSTREAM" ] || { echo "build-deb: no __version__ in privtmpd/__init__.py" >&2; exit 1; }
[ -n "$VERSION" ] || VERSION="$UPSTREAM-1"
ARCH=$(dpkg --print-architecture)
MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)

WORK=$(mktemp -d /tmp/privtmpd-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/src PKG=$WORK/pkg
mkdir -p "$SRC"
# The checkout's files (tracked and untracked, not ignored): no stale build/.
# An unpacked release tarball has no git: everything but build output.
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
    tar -C "$REPO" --exclude=./build --exclude=./dist --exclude=./.venv --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - . | tar -xf - -C "$SRC"
fi
if [ "${VERSION%-*}" != "$UPSTREAM" ]; then
    # Another version of the same tree: the code reports what it is.
    sed -i "s/^__version__ = .*/__version__ = \"${VERSION%-*}\"/" "$SRC/privtmpd/__init__.py"
fi
(cd "$SRC" && SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(date +%s)} python3 setup.py -q build >"$WORK/build.log" 2>&1) ||
    { cat "$WORK/build.log" >&2; exit 1; }
# A platform build directory (build/lib.linux-...): the wheel carries a .so.
LIB=$(echo "$SRC"/build/lib*)
[ -e "$LIB/privtmpd/lib/privtmpd_spank.so" ] || { cat "$WORK/build.log" >&2; echo "build-deb: the entry helper was not built" >&2; exit 1; }

PY=$PKG/usr/lib/python3/dist-packages
install -d "$PY" "$PKG/usr/sbin" "$PKG/usr/libexec/privtmpd" "$PKG/usr/lib/privtmpd" \
    "$PKG/usr/lib/$MULTIARCH/security" "$PKG/lib/systemd/system" "$PKG/etc/privtmpd" \
    "$PKG/usr/share/doc/privtmpd" "$PKG/usr/share/privtmpd/spank" "$PKG/usr/share/man/man5" \
    "$PKG/usr/share/man/man8" "$PKG/DEBIAN"
cp -r "$LIB/privtmpd" "$PY/"
install -m 644 "$LIB/privtmpd/lib/privtmpd_spank.so" "$PKG/usr/lib/privtmpd/"
install -m 644 "$LIB/privtmpd/lib/pam_privtmpd.so" "$PKG/usr/lib/$MULTIARCH/security/"
rm -r "$PY/privtmpd/lib"
find "$PY" -name __pycache__ -prune -exec rm -rf {} +
find "$PY" -type f -exec chmod 644 {} +
chmod 755 "$PY/privtmpd/hooks/prolog.py" "$PY/privtmpd/hooks/epilog.py"
# The hooks run as Slurm runs them (/usr/bin/python3 -IS, the package found
# through the symlink's target): nothing in slurm.conf names a Python version.
for hook in prolog epilog; do
    ln -s "/usr/lib/python3/dist-packages/privtmpd/hooks/$hook.py" "$PKG/usr/libexec/privtmpd/$hook"
done
for prog in privtmpd:daemon privtmpctl:ctl; do
    printf '#!/usr/bin/python3\nimport sys\n\nfrom privtmpd.%s import main\n\nsys.exit(main())\n' "${prog#*:}" \
        > "$PKG/usr/sbin/${prog%%:*}"
    chmod 755 "$PKG/usr/sbin/${prog%%:*}"
done
install -m 644 "$SRC/systemd/privtmpd.service" "$PKG/lib/systemd/system/"
grep -q '^ExecStart=/usr/sbin/privtmpd ' "$PKG/lib/systemd/system/privtmpd.service" ||
    { echo "build-deb: systemd/privtmpd.service does not start /usr/sbin/privtmpd" >&2; exit 1; }
install -m 644 "$SRC/docs/privtmpd.conf.example" "$PKG/etc/privtmpd/privtmpd.conf"
install -m 644 "$SRC/spank/privtmpd_spank.c" "$SRC/spank/privtmpd_entry.h" "$SRC/spank/trusted_dir.h" "$SRC/spank/Makefile" "$PKG/usr/share/privtmpd/spank/"
install -m 644 "$SRC/docs/privtmpd.conf.example" "$PKG/usr/share/privtmpd/"
install -m 644 "$SRC/packaging/debian/copyright" "$PKG/usr/share/doc/privtmpd/"
install -m 644 "$SRC/README.md" "$SRC/docs/admin-guide.md" "$PKG/usr/share/doc/privtmpd/"
gzip -9n "$PKG/usr/share/doc/privtmpd/README.md" "$PKG/usr/share/doc/privtmpd/admin-guide.md"
install -m 644 "$SRC/man/privtmpd.conf.5" "$PKG/usr/share/man/man5/"
install -m 644 "$SRC/man/privtmpd.8" "$SRC/man/privtmpctl.8" "$PKG/usr/share/man/man8/"
gzip -9n "$PKG"/usr/share/man/man*/*

install -m 644 "$SRC/packaging/debian/conffiles" "$PKG/DEBIAN/"
install -m 755 "$SRC/packaging/debian/postinst" "$SRC/packaging/debian/prerm" "$SRC/packaging/debian/postrm" "$PKG/DEBIAN/"
SIZE=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" "$SRC/packaging/debian/control.in" > "$PKG/DEBIAN/control"
(cd "$PKG" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$PKG/DEBIAN/md5sums"
mkdir -p "$OUT"
deb="$OUT/privtmpd_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$PKG" "$deb" >/dev/null
echo "$deb"
