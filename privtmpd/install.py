"""Where this installation's pieces are, and `privtmpctl install`.

Every way of installing privtmpd puts the pieces that slurm.conf,
plugstack.conf and systemd name at the same stable paths, none of which
contains the Python version (a Python upgrade must not break slurm.conf on
every node):

  /usr/sbin/privtmpd, /usr/sbin/privtmpctl   daemon (the unit's ExecStart) and CLI
  /usr/libexec/privtmpd/prolog, epilog       Prolog= and Epilog=
  /usr/lib/privtmpd/privtmpd_spank.so        plugstack.conf (/usr/lib64/privtmpd with the RPM)
  /lib/systemd/system/privtmpd.service       (/usr/lib/systemd/system with the RPM)

The .deb (tools/build-deb.sh) and the RPM (packaging/privtmpd.spec) ship
them; in a virtualenv (python3 -m venv /opt/privtmpd, the way around PEP 668
on Debian 12) `privtmpctl install` writes launchers and copies there and
records what it wrote, so that it never overwrites a file of a package or of
the admin.  Used by `privtmpctl slurm-config` and `doctor`.
"""

import errno
import hashlib
import json
import os
import stat
import sys

from . import __version__, safefs

_SRC_TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBIN_DIR = "/usr/sbin"
LIBEXEC_DIR = "/usr/libexec/privtmpd"
SPANK_DIR = "/usr/lib/privtmpd"
# Searched in this order; /usr/lib64/privtmpd is the RPM's.
SPANK_DIRS = (SPANK_DIR, "/usr/lib64/privtmpd", "/usr/local/lib/privtmpd")
CONF_PATH = "/etc/privtmpd/privtmpd.conf"
# What `privtmpctl install` wrote, with each file's SHA-256: the only files
# it will ever replace or remove.
MANIFEST = "/var/lib/privtmpd/install-manifest.json"
LAUNCHER_MARK = "# written by `privtmpctl install` for the virtualenv "


class InstallError(Exception):
    pass


def _package_hook(kind):
    try:
        from . import hooks     # type: ignore[attr-defined]  # scripts/, installed as privtmpd.hooks
        here = os.path.dirname(os.path.abspath(hooks.__file__))
    except ImportError:
        here = os.path.join(_SRC_TOP, "scripts")     # running from a source checkout
    return os.path.join(here, f"{kind}.py")


def _launcher_target(path):
    """The hook a launcher written by `privtmpctl install` runs, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    if LAUNCHER_MARK not in head:
        return None
    for line in head.splitlines():
        if line.startswith("hook="):
            return line[len("hook="):]
    return None


def hook_path(kind):
    """Prolog/Epilog path for slurm.conf: the stable /usr/libexec/privtmpd/
    one when it leads to this installation's hook (the package's symlink,
    or the launcher `privtmpctl install` wrote), else the hook itself."""
    pkg = os.path.realpath(_package_hook(kind))
    cand = os.path.join(LIBEXEC_DIR, kind)
    if os.path.lexists(cand):
        target = _launcher_target(cand) if not os.path.islink(cand) else cand
        if target and os.path.realpath(target) == pkg:
            return cand
    return _package_hook(kind)


def spank_path():
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in ([os.path.join(d, "privtmpd_spank.so") for d in SPANK_DIRS]
                 + [os.path.join(here, "lib", "privtmpd_spank.so"),
                    os.path.join(_SRC_TOP, "spank", "privtmpd_spank.so")]):
        if os.path.exists(cand):
            return cand
    return None


def plugstack_line(cfg, so=None):
    args = f"rundir={cfg.rundir} tmpdir={cfg.tmpdir_value}"
    if getattr(cfg, "sbcast", False):
        args += f" host_tmp={cfg.base}"      # PRIVTMPD_HOST_TMP for sbcast=yes
    return f"required {so or spank_path() or SPANK_DIR + '/privtmpd_spank.so'} {args}"


# --- privtmpctl install -------------------------------------------------------

# /lib/systemd/system on Debian 12 (the same directory as
# /usr/lib/systemd/system on merged-/usr systems, where the .deb puts it).
_UNIT_DIRS = ("/lib/systemd/system", "/usr/lib/systemd/system")

# Every path `privtmpctl install` can ever write: uninstall removes nothing
# else, whatever the manifest says (an edited or foreign manifest must not
# turn it into `rm` of any file as root).
INSTALLED_PATHS = frozenset(
    [f"{SBIN_DIR}/{prog}" for prog in ("privtmpd", "privtmpctl")]
    + [f"{LIBEXEC_DIR}/{kind}" for kind in ("prolog", "epilog")]
    + [f"{SPANK_DIR}/privtmpd_spank.so"]
    + [f"{d}/privtmpd.service" for d in _UNIT_DIRS])


def _unit_dir(root):
    for d in _UNIT_DIRS:
        if os.path.isdir(root + d):
            return d
    return "/lib/systemd/system"


def _shared_file(venv, shared, in_source):
    """A file pip installed from setup.cfg's data_files (share/privtmpd/...),
    or the same file in the source checkout (an editable install)."""
    for cand in (os.path.join(venv, "share", "privtmpd", shared), os.path.join(_SRC_TOP, in_source)):
        if os.path.isfile(cand):
            return cand
    return None


def _reinstall_hint(venv):
    return (f"python3 -m venv --clear {venv} && {venv}/bin/pip install <privtmpd checkout or release> && "
            f"{venv}/bin/privtmpctl install")


def _program_launcher(venv, prog, pyver):
    # A Python upgrade (3.11 -> 3.13 with Debian 13) leaves bin/python3 of
    # the virtualenv pointing at the new interpreter, which finds none of the
    # packages installed under lib/python3.11: say so instead of a traceback
    # about a missing module, and how to recreate the virtualenv.  -I: the
    # check must not find a privtmpd in the current directory.
    major, minor = pyver
    return f"""#!/bin/sh
{LAUNCHER_MARK}{venv}
# A stable path (the unit's ExecStart, slurm.conf, scripts) for the {prog} of
# that virtualenv, which was made for Python {major}.{minor}.
venv={venv}
if ! "$venv/bin/python3" -I -c 'import sys, privtmpd; sys.exit(sys.version_info[:2] != ({major}, {minor}))' \\
        2>/dev/null \\
        || [ ! -x "$venv/bin/{prog}" ]; then
    echo "{prog}: the virtualenv $venv (made for Python {major}.{minor}) no longer runs: it was removed, or" \\
         "Python was upgraded.  Recreate it: {_reinstall_hint(venv)}" >&2
    exit 1
fi
exec "$venv/bin/{prog}" "$@"
"""


def _hook_launcher(venv, kind, hook):
    # The hook needs nothing but the standard library: it runs with any
    # Python 3 as long as its file is there, so only that is checked (a
    # per-job check that starts Python twice would cost every job ~15 ms).
    return f"""#!/bin/sh
{LAUNCHER_MARK}{venv}
# Slurm's {kind.title()}= for privtmpd: a path that survives Python upgrades.
hook={hook}
if [ ! -f "$hook" ] || [ ! -x {venv}/bin/python3 ]; then
    msg="privtmpd-{kind}: $hook is missing: the virtualenv {venv} was removed or recreated for another Python.  Reinstall: {_reinstall_hint(venv)}"
    echo "$msg" >&2
    command -v logger >/dev/null 2>&1 && logger -t privtmpd-{kind} -- "$msg"
    exit 1
fi
exec {venv}/bin/python3 -IS "$hook" "$@"
"""


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


class _Untrusted(Exception):
    """A directory on the way to a file that someone other than root could
    have changed or redirected: what is in it proves nothing."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _root_only(st):
    return st.st_uid == 0 and not st.st_mode & 0o022


def _open_trusted_dir(root, d):
    """An fd on the directory root + d, checked to be one that only root
    can change: FileNotFoundError when it is missing, _Untrusted otherwise.

    A file's content proves it is ours only while nobody else can swap the
    directory it is in.  Every directory from --root down must be root's and
    writable by root alone, and a symlink on the way (merged /usr: /lib ->
    usr/lib) is honoured only when root made it in such a directory and it
    stays within --root.  The resolved path is then opened one component at
    a time with O_NOFOLLOW and each step checked again on the fd, so what
    is checked is what is used."""
    top = root or "/"
    prefix = root
    for part in d.strip("/").split("/"):
        prefix += "/" + part
        st = os.lstat(prefix)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                raise _Untrusted(f"{prefix} is a symlink owned by uid {st.st_uid}, not root")
        elif not stat.S_ISDIR(st.st_mode):
            raise _Untrusted(f"{prefix} is not a directory")
        elif not _root_only(st):
            raise _Untrusted(f"{prefix} is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}: "
                             f"not root's alone")
    real, real_top = os.path.realpath(root + d), os.path.realpath(top)
    if real != real_top and not real.startswith(real_top.rstrip("/") + "/"):
        raise _Untrusted(f"{root + d} leads through a symlink to {real}, outside {top}")
    def root_only(st):
        if not _root_only(st):
            raise _Untrusted(f"{real}: a directory on the way is uid {st.st_uid}, mode "
                             f"{stat.S_IMODE(st.st_mode):04o}: not root's alone")
    try:
        return safefs.open_dir(real, below=real_top, check=root_only)
    except safefs.UnsafePath as e:
        raise _Untrusted(f"{real} was replaced while it was checked ({e.strerror})") from None


def _read_manifest(root):
    """{path: SHA-256} of what install wrote.  The manifest decides what
    uninstall removes as root, so it is believed only when only root can
    have written it: a regular file (never followed through a symlink),
    root's, not writable by group or others, in a directory that is root's
    alone."""
    path = root + MANIFEST
    redo = (f"check what it lists, then chown root:root {path} && chmod 0644 {path} and run the command "
            f"again (or move it away and remove privtmpd's files yourself)")
    try:
        dfd = _open_trusted_dir(root, os.path.dirname(MANIFEST))
    except FileNotFoundError:
        return {}
    except _Untrusted as e:
        raise InstallError(f"{path} is not trusted: {e}; make every directory above it root's and writable by "
                           f"root only, then {redo}") from None
    try:
        fd = os.open(os.path.basename(MANIFEST), _FILE_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        return {}
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InstallError(f"{path} is a symlink, and privtmpctl install writes a regular file there: "
                               f"the list it leads to may be anyone's; remove the link, then check the stable "
                               f"paths by hand (privtmpctl install refuses to overwrite what it did not "
                               f"record)") from None
        raise InstallError(f"{path} cannot be read ({e.strerror}): move it away and run privtmpctl install "
                           f"again; it would then refuse to overwrite the files it wrote before") from None
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InstallError(f"{path} is not a regular file: move it away and run privtmpctl install again")
        if not _root_only(st):
            raise InstallError(f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}: "
                               f"only root may write the list of files privtmpctl removes as root, so nothing "
                               f"in it is trusted; {redo}")
        try:
            data = json.loads(f.read(1 << 20))
        except ValueError as e:
            raise InstallError(f"{path} cannot be read ({e}): move it away and run privtmpctl install again; "
                               f"it would then refuse to overwrite the files it wrote before") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {p: d for p, d in files.items() if isinstance(p, str) and isinstance(d, str)}


def _current_digest(path):
    """SHA-256 of the regular file at path; None when absent; "" for
    anything else (a symlink, a directory: never ours)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        h = hashlib.sha256()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
    finally:
        os.close(fd)


def _write_atomically(path, data, mode):
    """Replace path by a new file: a Prolog that starts meanwhile runs the
    old launcher or the new one, never half of one."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.privtmpctl-new"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _plain_path(path, what):
    """The launchers are shell scripts that every Prolog and Epilog runs as
    root: a path written into them must mean nothing to the shell (a space
    would break every job, a $( or ; would run code)."""
    import re
    if not re.fullmatch(r"/[A-Za-z0-9_./+@-]*", path):
        raise InstallError(f"{what} {path!r}: privtmpctl install writes it into shell launchers and accepts "
                           f"only absolute paths of letters, digits and _ . / + @ -; make the virtualenv "
                           f"somewhere plain (python3 -m venv /opt/privtmpd)")
    return path


def planned_files(venv, root="", with_spank=True):
    """{path: (bytes, mode)} that `privtmpctl install` writes for venv."""
    import privtmpd
    pkg = os.path.dirname(os.path.abspath(privtmpd.__file__))
    _plain_path(venv, "the virtualenv")
    files = {}
    for prog in ("privtmpd", "privtmpctl"):
        files[f"{SBIN_DIR}/{prog}"] = (_program_launcher(venv, prog, sys.version_info[:2]).encode(), 0o755)
    for kind in ("prolog", "epilog"):
        hook = _package_hook(kind)
        if not os.path.isfile(hook):
            raise InstallError(f"{hook} is missing: the privtmpd in {venv} is incomplete; reinstall it "
                               f"({venv}/bin/pip install --force-reinstall <privtmpd checkout or release>)")
        files[f"{LIBEXEC_DIR}/{kind}"] = (_hook_launcher(venv, kind, _plain_path(hook, "the hook")).encode(), 0o755)
    if with_spank:
        so = os.path.join(pkg, "lib", "privtmpd_spank.so")
        if not os.path.isfile(so) and os.path.isfile(os.path.join(_SRC_TOP, "spank", "privtmpd_spank.so")):
            so = os.path.join(_SRC_TOP, "spank", "privtmpd_spank.so")     # an editable install
        if not os.path.isfile(so):
            raise InstallError(f"the entry helper {so} was not built when pip installed privtmpd (Slurm's "
                               f"spank.h or gcc was missing): apt-get install libslurm-dev gcc (dnf install "
                               f"slurm-devel gcc), then {venv}/bin/pip install --force-reinstall <privtmpd "
                               f"checkout or release> and privtmpctl install again; or --no-spank to "
                               f"install without it")
        with open(so, "rb") as f:
            files[f"{SPANK_DIR}/privtmpd_spank.so"] = (f.read(), 0o644)
    unit = _shared_file(venv, "systemd/privtmpd.service", "systemd/privtmpd.service")
    if not unit:
        raise InstallError(f"privtmpd.service is not in {venv}/share/privtmpd/systemd: reinstall privtmpd in "
                           f"the virtualenv ({venv}/bin/pip install --force-reinstall ...)")
    with open(unit, "rb") as f:
        files[f"{_unit_dir(root)}/privtmpd.service"] = (f.read(), 0o644)
    return files


def current_venv():
    """The virtualenv this privtmpd runs from, or an InstallError saying why
    `privtmpctl install` is not for this installation."""
    if sys.prefix == getattr(sys, "base_prefix", sys.prefix):
        raise InstallError(f"this privtmpctl runs from {sys.prefix}, not from a virtualenv: privtmpctl install "
                           f"sets up the stable paths for a virtualenv installation (python3 -m venv "
                           f"/opt/privtmpd && /opt/privtmpd/bin/pip install <privtmpd> && "
                           f"/opt/privtmpd/bin/privtmpctl install); the .deb and the RPM install them "
                           f"themselves")
    return os.path.abspath(sys.prefix)


def _check_root(root):
    if root and not (root.startswith("/") and os.path.isdir(root)):
        raise InstallError(f"--root {root}: not an absolute path of a directory (the root filesystem to "
                           f"install into)")
    if root:
        # Files are written below it as root, through directories made on
        # the way: a root another user can change could lead them elsewhere.
        st = os.stat(root)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise InstallError(f"--root {root}: must be root's and writable by root only (it is uid "
                               f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
    return root.rstrip("/")


def install(root="", with_spank=True, venv=None):
    """Write the launchers, the entry helper and the unit; return
    [(path, what)] with what in written/unchanged/kept.  Nothing is written
    when any target exists that this command did not write."""
    root = _check_root(root)
    venv = venv or current_venv()
    plan = planned_files(venv, root, with_spank)
    recorded = _read_manifest(root)
    conflicts, actions = [], []
    for path, (data, _mode) in plan.items():
        have = _current_digest(root + path)
        want = _sha256(data)
        if have is None:
            actions.append((path, "written"))
        elif have == want and recorded.get(path) == want:
            actions.append((path, "unchanged"))
        elif have and recorded.get(path) == have:
            actions.append((path, "written"))     # ours, as we left it: replaced
        elif recorded.get(path):
            conflicts.append(f"{root + path} was changed after privtmpctl install wrote it: move your version "
                             f"away (or put changes in a drop-in/wrapper), then run privtmpctl install again")
        else:
            conflicts.append(f"{root + path} exists and was not written by privtmpctl install (a package's "
                             f"file? dpkg -S {path} / rpm -qf {path}): if the privtmpd package is installed, use "
                             f"it rather than a virtualenv (or remove it: apt-get remove privtmpd / dnf remove "
                             f"privtmpd); otherwise move the file away and run privtmpctl install again")
    if conflicts:
        raise InstallError("nothing installed: " + "; ".join(conflicts))
    for path, what in actions:
        if what == "written":
            data, mode = plan[path]
            _write_atomically(root + path, data, mode)
            recorded[path] = _sha256(data)
    # The configuration is the admin's: written from the example once, never replaced.
    conf = root + CONF_PATH
    if os.path.lexists(conf):
        actions.append((CONF_PATH, "kept"))
    else:
        example = _shared_file(venv, "privtmpd.conf.example", "docs/privtmpd.conf.example")
        with open(example, "rb") as f:
            _write_atomically(conf, f.read(), 0o644)
        actions.append((CONF_PATH, "written"))
    manifest = {"venv": venv, "version": __version__, "python": "%d.%d" % sys.version_info[:2],
                "files": {p: d for p, d in sorted(recorded.items())
                          if p in INSTALLED_PATHS and (p in plan or os.path.lexists(root + p))}}
    _write_atomically(root + MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), 0o644)
    return actions


def _remove_if_unchanged(root, path, digest):
    """Remove root + path if it is still the file install wrote; return
    what happened.  The file is opened without following a symlink, in a
    directory only root can change, hashed through that fd and unlinked
    only if the name still names that inode."""
    d, name = os.path.split(path)
    try:
        dfd = _open_trusted_dir(root, d)
    except FileNotFoundError:
        return "absent"
    except _Untrusted as e:
        return (f"kept ({e}: a file there may not be the one privtmpctl install wrote; check it and remove it "
                f"yourself)")
    try:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return "absent"
        except OSError as e:
            if e.errno == errno.ELOOP:
                return ("kept (a symlink now, not the file privtmpctl install wrote; whatever it leads to is "
                        "left alone: remove the link yourself if it is not wanted)")
            return f"kept (cannot be opened: {e.strerror})"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return "kept (not a regular file: privtmpctl install wrote a regular file there)"
            h = hashlib.sha256()
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                h.update(chunk)
        finally:
            os.close(fd)
        if h.hexdigest() != digest:
            return "kept (changed since privtmpctl install wrote it)"
        now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return "kept (replaced while it was checked; run privtmpctl install --uninstall again)"
        os.unlink(name, dir_fd=dfd)
        return "removed"
    finally:
        os.close(dfd)


def uninstall(root=""):
    """Remove what install wrote and nobody changed since; return [(path, what)].

    Only the stable paths install itself writes are candidates, whatever
    else the manifest lists, and each only while its content is what was
    recorded."""
    root = _check_root(root)
    recorded = _read_manifest(root)
    actions, left = [], {}
    for path, digest in sorted(recorded.items()):
        if path not in INSTALLED_PATHS:
            actions.append((path, f"refused (not a path privtmpctl install writes: {root + MANIFEST} was edited "
                                  f"or is not its own; nothing was done to this file, remove it yourself if it "
                                  f"really is privtmpd's)"))
            continue
        what = _remove_if_unchanged(root, path, digest)
        actions.append((path, what))
        if what.startswith("kept"):
            left[path] = digest
    for d in (LIBEXEC_DIR, SPANK_DIR):
        try:
            pfd = _open_trusted_dir(root, os.path.dirname(d))
        except (OSError, _Untrusted):
            continue
        try:
            os.rmdir(os.path.basename(d), dir_fd=pfd)
        except OSError:
            pass
        finally:
            os.close(pfd)
    if left:
        _write_atomically(root + MANIFEST, (json.dumps({"files": left}, indent=1) + "\n").encode(), 0o644)
    elif os.path.lexists(root + MANIFEST):
        os.unlink(root + MANIFEST)
    return actions
