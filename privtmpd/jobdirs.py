"""The entries of ours next to the job directories, in the base's parent:
job directories, kept directories, trash being removed, and the
temporary names of an interrupted job start.

One place decides what is ours there: a name that NameMatcher recognises
AND a directory owned by root (safefs.is_ours).  A user can create any
name in a world-writable parent such as /tmp, but not a root-owned
directory, so a squatted name is never renamed, kept or removed by us.
Every operation is relative to an fd on the parent and never follows a
symlink.
"""

import contextlib
import errno
import os
import secrets
from dataclasses import dataclass
from typing import Iterator, List, Optional

from . import limitfs, names, safefs
from .kernel import KernelError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def parent_fd(cfg) -> Iterator[int]:
    """An fd on the base's parent, checked by safefs.open_dir (no symlink
    on the way, root-owned), closed on exit."""
    fd = safefs.open_dir(cfg.base_parent)
    try:
        yield fd
    finally:
        os.close(fd)


def _nonce() -> str:
    # Trash and kept names must not be guessable: a user who could predict
    # one could squat it and make the rename fail (then the removal or the
    # keep would be refused, never misdirected: is_ours checks the target).
    return secrets.token_hex(6)


@dataclass
class Entry:
    """One entry of ours in the base's parent."""
    name: str
    kind: str                   # "job", "kept", "trash", "kept-trash", "temporary"
    job: Optional[int] = None
    restart: Optional[int] = None
    until: Optional[int] = None         # kept: Unix time its keeping ends
    exit_code: Optional[int] = None     # kept: the job's exit code


def classify(match: names.NameMatcher, name: str) -> Optional[Entry]:
    """What name is, by name alone (pure: no file system access)."""
    jr = match.job_dir(name)
    if jr:
        return Entry(name, "job", *jr)
    k = match.kept(name)
    if k:
        return Entry(name, "kept", k[0], k[1], k[2], k[3])
    if match.trash(name):
        return Entry(name, "kept-trash" if match.kept_trash(name) else "trash", job_of(match.base_name, name))
    if match.temporary(name):
        return Entry(name, "temporary", job_of(match.base_name, name))
    return None


def scan(cfg, kinds=None, job=None) -> List[Entry]:
    """Every entry of ours in the base's parent (optionally of these kinds,
    of this job), sorted by name.  Only names that match are stat'ed."""
    match = names.NameMatcher(cfg.base_name)
    out = []
    with parent_fd(cfg) as pfd:
        with os.scandir(pfd) as it:
            found = [e for e in (classify(match, d.name) for d in it) if e]
        for e in found:
            if (kinds is None or e.kind in kinds) and (job is None or e.job == job) and safefs.is_ours(pfd, e.name):
                out.append(e)
    return sorted(out, key=lambda e: e.name)


def job_dirs(cfg, job) -> List[str]:
    """Names of job's directories ($base.JOB.*, ours)."""
    return [e.name for e in scan(cfg, ("job",), job)]


def kept_dirs(cfg) -> List[dict]:
    """[{"name", "path", "job", "restart", "until", "exit_code", "uid"}] for
    every kept directory of ours, earliest expiry first."""
    out = []
    entries = scan(cfg, ("kept",))
    with parent_fd(cfg) as pfd:
        for e in entries:
            out.append({"name": e.name, "path": f"{cfg.base_parent}/{e.name}", "job": e.job, "restart": e.restart,
                        "until": e.until, "exit_code": e.exit_code, "uid": owner_uid(pfd, e.name)})
    return sorted(out, key=lambda k: (k["until"], k["name"]))


def job_of(base_name: str, name: str) -> Optional[int]:
    """Job id in a job, trash or temporary directory name, for log lines."""
    rest = name.lstrip(".")
    if rest.startswith(base_name + "."):
        head = rest[len(base_name) + 1:].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return None


def lexists_at(dirfd: int, path: str) -> bool:
    try:
        os.stat(path, dir_fd=dirfd, follow_symlinks=False)
        return True
    except OSError:
        return False


def owner_uid(pfd: int, name: str) -> Optional[int]:
    """The user whose files a directory of ours holds: the owner of its
    first subdirectory (the top is root's; with limit= the subdirectories
    are inside the image's filesystem at fs/).  None when it has none or
    cannot be read.  Only lstat: the daemon must not wait on a name lookup
    (LDAP); a removal worker may turn the uid into a name (owner_name)."""
    try:
        fd = os.open(name, _DIR, dir_fd=pfd)
    except OSError:
        return None
    try:
        with os.scandir(fd) as it:
            uids = [safefs.lstat_at(fd, e.name).st_uid for e in it
                    if e.name not in (limitfs.LIMITED_FS + ".img", limitfs.LIMITED_FS)]
        if not uids and lexists_at(fd, limitfs.LIMITED_FS):
            sfd = os.open(limitfs.LIMITED_FS, _DIR, dir_fd=fd)
            try:
                with os.scandir(sfd) as it:
                    uids = [safefs.lstat_at(sfd, e.name).st_uid for e in it if e.name != "lost+found"]
            finally:
                os.close(sfd)
        uids = [u for u in uids if u != 0]
        return uids[0] if uids else None
    except OSError:
        return None
    finally:
        os.close(fd)


def owner_name(pfd: int, name: str):
    """owner_uid as a user name where one exists (else the uid).  May wait
    on the name service: only for forked removal workers."""
    uid = owner_uid(pfd, name)
    if uid is None:
        return None
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid


def trash_if_ours(pfd: int, cfg, dname: str, job: int, restart: int, kept: bool = False) -> Optional[str]:
    """Rename a directory of ours to a trash name (one renameat2 in the
    same directory: O(1) whatever the tree holds), after detaching a
    limit= filesystem still mounted in it.  Returns the trash name, or None
    when dname is not ours or vanished.

    A directory whose user could reach it from the host (kept, or a job's
    under sbcast=yes: its top is not 0700) gets a kept-trash name, removed
    with its owner's rights (names.trash_name): its user could have moved
    other users' files in, which root must not delete for them.  Decided by
    the directory itself, so a restart or a changed configuration decides
    the same.  Its top stays as it is: the owner's remover goes through it."""
    if not safefs.is_ours(pfd, dname):
        return None
    try:
        fd = os.open(dname, _DIR, dir_fd=pfd)
    except FileNotFoundError:
        return None         # gone meanwhile; any other error is the caller's (the Epilog fails, is retried)
    try:
        st = os.fstat(fd)
        if st.st_uid != 0:
            return None
        if st.st_mode & 0o077:
            kept = True
    finally:
        os.close(fd)
    limitfs.umount_limited_fs(cfg.base_parent, dname)
    tname = names.trash_name(cfg.base_name, job, restart, _nonce(), kept)
    if safefs.rename_aside(pfd, dname, tname):
        return tname
    return None


def keep_if_ours(pfd: int, cfg, dname: str, job: int, restart: int, until: float, exit_code: int):
    """Rename a job directory of ours to its kept name and let its owner
    reach it: the top stays root's (that marks it ours) with mode 0711, the
    subdirectories stay the user's, 0700.  Returns (kept name, None), or
    (None, why) when it cannot be kept (the caller removes it instead and
    logs why: a failure to keep is never silent)."""
    if not safefs.is_ours(pfd, dname):
        return None, "not a directory of privtmpd's"
    for _ in range(8):
        kname = names.kept_name(cfg.base_name, job, restart, int(until), exit_code, _nonce())
        try:
            if not safefs.rename_aside(pfd, dname, kname):
                return None, "the job directory vanished"
            break
        except (OSError, KernelError) as e:
            if e.errno != errno.EEXIST:
                return None, f"renameat2 {kname}: {os.strerror(e.errno or 0)}"
            # Taken (by a guess at a random name): another nonce.
    else:
        return None, "every kept name tried was taken"
    fd = os.open(kname, _DIR, dir_fd=pfd)
    try:
        _owner_only(fd)
        os.fchmod(fd, 0o711)
    finally:
        os.close(fd)
    return kname, None


def _owner_only(fd: int, depth: int = 0) -> None:
    """While the job ran, the 0700 root-owned top kept other users out of
    its directories; a kept top opens to 0711, so each user directory in it
    (and in the limit= image, one level down) drops group and other access
    whatever mode= gave it.  fd-relative, O_NOFOLLOW, fchmod on the inode."""
    with os.scandir(fd) as it:
        subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
    for name in subdirs:
        try:
            cfd = os.open(name, _DIR, dir_fd=fd)
        except OSError:
            continue
        try:
            st = os.fstat(cfd)
            if st.st_uid != 0:
                os.fchmod(cfd, st.st_mode & 0o700)
            elif depth == 0:
                _owner_only(cfd, 1)
        finally:
            os.close(cfd)
