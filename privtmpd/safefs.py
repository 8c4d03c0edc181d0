"""Create, hand over and remove job directories without ever following a
symlink or crossing a mount point.

Job directories live next to paths any user can write (the original default
base is /tmp/slurm).  Every operation here is relative to a directory file
descriptor that was opened with O_NOFOLLOW, so a name swapped for a symlink
between two steps is never resolved, and ownership is changed through an fd
(fchown) on the inode we created, never through a path.

The one trust assumption: the parent of the job directories and all its
ancestors are root's, and the parent is either not writable by others or
sticky (config.check_filesystem enforces it).  In a sticky directory nobody
but root can rename or remove the root-owned job directory we create, so
once it is placed its name keeps pointing at it.
"""

import errno
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Set, Tuple

from . import forked, kernel, names
from .kernel import KernelError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_PATH = getattr(os, "O_PATH", 0o10000000)


class UnsafePath(OSError):
    """A path that is not what we created or expect (squatted, swapped, symlinked)."""


def open_dir(path: str, flags: int = _DIR_FLAGS, *, below: str = "/",
             check: Optional[Callable[[os.stat_result], None]] = None) -> int:
    """Open an absolute directory path component by component, refusing any
    symlink on the way (O_NOFOLLOW on each openat).  below: where the walk
    starts (opened as it is; path must lie under it); check: called with
    the fstat of each component opened after it, raises to refuse one."""
    if not path.startswith("/"):
        raise ValueError(f"not an absolute path: {path!r}")
    if below != "/" and not path.startswith(below.rstrip("/") + "/") and path != below:
        raise ValueError(f"{path!r} is not under {below!r}")
    if any(part in (".", "..") for part in path.split("/")):
        raise ValueError(f"not a normalised path: {path!r}")     # ".." would climb out of below
    fd = os.open(below, flags & ~os.O_NOFOLLOW)
    try:
        for part in path[len(below.rstrip("/")):].strip("/").split("/"):
            if not part:
                continue
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(e.errno, f"{path}: component {part!r} is a symlink or not a directory", path) from None
                raise OSError(e.errno, f"open {path}: {e.strerror}", path) from None
            os.close(fd)
            fd = nfd
            if check is not None:
                check(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_verified(path: str, dev: int, ino: int) -> int:
    """O_PATH fd on path (no symlink anywhere), checked to be exactly the
    inode (dev, ino) we created.  Used in the namespace child, which must
    reopen the job directories after unshare (a directory fd from the host
    namespace cannot be a bind-mount source there)."""
    fd = open_dir(path, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dev, ino):
        os.close(fd)
        raise UnsafePath(errno.ESTALE, f"{path} is no longer the directory privtmpd created "
                                       f"(replaced or swapped while the job started)", path)
    return fd


def _nonce() -> str:
    return secrets.token_hex(6)


@dataclass
class Placement:
    """Result of create_job_dir."""
    subdirs: Dict[str, Tuple[int, int]]     # name -> (st_dev, st_ino)
    displaced: str = ""      # what was found at the job path and moved aside, for the log
    displaced_name: str = ""
    displaced_ours: bool = False


def create_job_dir(parent_fd: int, name: str, subdirs: Iterable[str], uid: int, gid: int, mode: int) -> Placement:
    """Create <parent>/<name> (root, 0700) with one subdirectory per mount,
    owned by uid:gid, and place it atomically at <name>.

    The directory is built under a random name first and then renamed into
    place with RENAME_NOREPLACE; if something already sits at <name> (a
    squatter's directory, a symlink, a FIFO, or our own leftover) it is
    swapped out with RENAME_EXCHANGE.  Either way <name> ends up being our
    inode, and nothing anyone pre-created is ever used or followed."""
    for _ in range(16):
        tmp = names.temporary_name(name, "new", _nonce())
        try:
            os.mkdir(tmp, 0o700, dir_fd=parent_fd)
            break
        except FileExistsError:
            continue
    else:
        raise UnsafePath(errno.EEXIST, f"cannot create a temporary directory next to {name}")
    placed = False
    ours = None
    try:
        jfd = os.open(tmp, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            st = os.fstat(jfd)
            if st.st_uid != 0 or not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(errno.EPERM, f"{tmp} was replaced before it could be opened")
            ours = (st.st_dev, st.st_ino)
            os.fchmod(jfd, 0o700)
            made = make_user_dirs(jfd, subdirs, uid, gid, mode)
        finally:
            os.close(jfd)
        result = Placement(made)
        _place(parent_fd, tmp, name, result)
        placed = True
        return result
    finally:
        if not placed:
            _remove_if_ours(parent_fd, tmp, ours)


def _remove_if_ours(parent_fd: int, tmp: str, ours: Optional[Tuple[int, int]]) -> None:
    # Once RENAME_EXCHANGE has swapped our directory into place, tmp holds
    # whatever a user had put at the job path; if noting it failed, that is
    # the user's, and root never deletes what a user made.
    try:
        st = lstat_at(parent_fd, tmp)
    except FileNotFoundError:
        return
    if ours is None or (st.st_dev, st.st_ino) == ours:
        remove_tree(parent_fd, tmp)


def make_user_dirs(dirfd: int, subdirs: Iterable[str], uid: int, gid: int, mode: int) -> Dict[str, Tuple[int, int]]:
    """mkdir each of subdirs in dirfd (a root-owned directory nobody else
    can write), then hand it to uid:gid with mode through an fd on the new
    inode.  Returns {name: (st_dev, st_ino)}, the identity the namespace
    child checks before binding it."""
    made = {}
    for sub in subdirs:
        os.mkdir(sub, 0o700, dir_fd=dirfd)
        sfd = os.open(sub, _DIR_FLAGS, dir_fd=dirfd)
        try:
            os.fchown(sfd, uid, gid)
            os.fchmod(sfd, mode)
            st = os.fstat(sfd)
            made[sub] = (st.st_dev, st.st_ino)
        finally:
            os.close(sfd)
    return made


def _place(parent_fd: int, tmp: str, name: str, result: Placement) -> None:
    for _ in range(16):
        try:
            kernel.renameat2(parent_fd, tmp, parent_fd, name, kernel.RENAME_NOREPLACE)
            return
        except KernelError as e:
            if e.errno == errno.EINVAL:       # filesystem without renameat2 flags
                return _place_plain(parent_fd, tmp, name, result)
            if e.errno != errno.EEXIST:
                raise
        try:
            kernel.renameat2(parent_fd, tmp, parent_fd, name, kernel.RENAME_EXCHANGE)
        except KernelError as e:
            if e.errno == errno.ENOENT:       # it vanished meanwhile: try again
                continue
            if e.errno == errno.EBUSY:
                # A mount point cannot be renamed: a user mounted something
                # (FUSE, on a directory of theirs) at the job's path to fail
                # the Prolog and drain the node.  The path is the job's:
                # detach that mount (the user's filesystem is not touched,
                # only unhooked from this path) and try again.
                kernel.umount2(f"/proc/self/fd/{parent_fd}/{name}", kernel.MNT_DETACH | kernel.UMOUNT_NOFOLLOW)
                result.displaced = f"a mount at the job path, detached; {result.displaced}".rstrip("; ")
                continue
            raise
        # Our directory is at <name>; whatever was there is now at tmp.
        _note_displaced(parent_fd, tmp, name, result)
        return
    raise UnsafePath(errno.EEXIST, f"{name} keeps being re-created while the job starts")


def _place_plain(parent_fd: int, tmp: str, name: str, result: Placement) -> None:
    # Without RENAME_NOREPLACE, rename(2) would silently replace an empty
    # directory of a user's at the job path: move whatever is there aside
    # first, and only then rename ours in.  What is left is a window of one
    # system call in which a user could still slip in an empty directory;
    # closing it needs the flag this filesystem lacks.
    for _ in range(16):
        aside = names.temporary_name(name, "aside", _nonce())
        try:
            os.rename(name, aside, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except FileNotFoundError:
            pass
        else:
            _note_displaced(parent_fd, aside, name, result)
            continue            # look again: something may have taken its place
        try:
            os.rename(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
    raise UnsafePath(errno.EEXIST, f"{name} keeps being re-created while the job starts")


def _note_displaced(parent_fd: int, at: str, name: str, result: Placement) -> None:
    """Whatever sat at the job path: our own leftover (root-owned directory)
    is left under `at` for the caller to remove; anything else belongs to a
    user and is renamed <name>.squatted.<nonce> and left alone: root never
    deletes what a user made, and never uses it.

    Never raises: our directory is already in place, and the squatter (who
    owns the displaced entry, in a sticky directory) may remove or rename
    it at any moment; that must not fail the Prolog and drain the node."""
    try:
        st = lstat_at(parent_fd, at)
    except OSError as e:
        result.displaced = f"an entry that its owner removed meanwhile ({e.strerror})"
        return
    kind = stat.filemode(st.st_mode)
    if st.st_uid == 0 and stat.S_ISDIR(st.st_mode):
        result.displaced_ours = True
        result.displaced_name = at
        result.displaced = f"a leftover root-owned directory ({kind})"
        return
    squatted = f"{name}.squatted.{_nonce()}"
    try:
        os.rename(at, squatted, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except OSError as e:
        result.displaced = f"{kind} owned by uid {st.st_uid}, moved away by its owner ({e.strerror})"
        return
    result.displaced_name = squatted
    result.displaced = f"{kind} owned by uid {st.st_uid}, moved to {squatted}"


def lstat_at(dirfd: int, name: str) -> kernel.Stat:
    """lstat of dirfd/name that cannot hang: a user may put a FUSE mount on
    any name they own (in a sticky /tmp, in their kept directory), and a
    plain lstat of a mount point asks the mounted filesystem, which may
    never answer.  See kernel.statx_nofollow; .mount_root says it is one."""
    return kernel.statx_nofollow(dirfd, name)


def is_ours(parent_fd: int, name: str) -> bool:
    """parent/name is a directory owned by root: the mark of everything
    privtmpd makes next to user-writable places (users cannot create
    root-owned entries; they can create anything else with our names)."""
    try:
        st = lstat_at(parent_fd, name)
    except OSError:
        # Gone, or a user's FUSE mount, which denies even root (no
        # allow_other): nothing of ours is ever either.
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.mount_root


def rename_aside(parent_fd: int, name: str, new_name: str) -> bool:
    """Atomically take a job directory out of its path.  False if absent."""
    try:
        kernel.renameat2(parent_fd, name, parent_fd, new_name, kernel.RENAME_NOREPLACE)
    except KernelError as e:
        if e.errno == errno.ENOENT:
            return False
        if e.errno != errno.EINVAL:
            raise
        os.rename(name, new_name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    return True


# --- removal -------------------------------------------------------------

_RESOLVE = (kernel.RESOLVE_NO_XDEV | kernel.RESOLVE_NO_SYMLINKS
            | kernel.RESOLVE_NO_MAGICLINKS | kernel.RESOLVE_BENEATH)
_have_openat2 = True

# Deeper subtrees are moved up to the top directory and removed from there,
# so a 100 000-level tree needs neither recursion nor 100 000 open fds.
MAX_DEPTH = 64
# New passes over a tree start only this long (a deep tree needs one
# pass per MAX_DEPTH levels, each quick; a busy writer would need forever).
PASSES_SECONDS = 300.0
MAX_ERRORS_KEPT = 20


def _mnt_id(fd: int) -> Optional[int]:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return None


def _open_child_dir(dirfd: int, name: str) -> int:
    """Open a subdirectory for removal: never a symlink, never another mount
    (a bind or any mount made under the job's directory, in the host
    namespace, is skipped, not emptied)."""
    global _have_openat2
    if _have_openat2:
        try:
            return kernel.openat2(dirfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, _RESOLVE)
        except KernelError as e:
            if e.errno != errno.ENOSYS:
                raise
            _have_openat2 = False
    fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    if _mnt_id(fd) != _mnt_id(dirfd):
        os.close(fd)
        raise KernelError(errno.EXDEV, "openat", name)
    return fd


class OverBudget(Exception):
    """remove_tree stopped at its Budget; what is left is still in place
    (the RemoveStats passed in count what was removed)."""


class Paused(OverBudget):
    """remove_tree stopped because the Budget's interrupt() said the caller
    has something more urgent; the same Budget (and RemoveStats) carry on
    where it stopped when passed to remove_tree again."""


class Budget:
    """Bounds one removal done inside the daemon: entries, bytes and a
    deadline.  Bytes matter because unlinking a big file frees its extents
    synchronously, and that cannot be interrupted: a file over the budget
    is left for a worker, before it is unlinked.  Charged once per entry,
    before acting on it."""

    __slots__ = ("entries", "bytes", "deadline", "interrupt")

    INTERRUPT_EVERY = 64        # entries between two calls of interrupt()

    def __init__(self, entries: int, nbytes: int, deadline: float,
                 interrupt: Optional[Callable[[], bool]] = None) -> None:
        self.entries, self.bytes, self.deadline = entries, nbytes, deadline
        self.interrupt = interrupt

    def charge(self, nbytes: int = 0) -> None:
        self.entries -= 1
        self.bytes -= nbytes
        if self.entries < 0 or self.bytes < 0 or time.monotonic() > self.deadline:
            raise OverBudget()
        if self.interrupt is not None and self.entries % self.INTERRUPT_EVERY == 0 and self.interrupt():
            self.entries += 1           # not acted on: charged again when resumed
            self.bytes += nbytes
            raise Paused()


@dataclass
class RemoveStats:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    sized: bool = True          # bytes counts every removed file (see remove_tree's sizes=)
    mounts_skipped: int = 0
    failures: int = 0
    errors: List[str] = field(default_factory=list)

    def fail(self, what: str, name: str, err: Optional[int]) -> None:
        self.failures += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{what}({name!r}): {os.strerror(err) if err else 'unknown error'}")

    @property
    def complete(self) -> bool:
        return self.failures == 0 and self.mounts_skipped == 0


def remove_tree(parent_fd: int, name: str, stats: Optional[RemoveStats] = None, budget: Optional[Budget] = None,
                sizes: bool = False) -> RemoveStats:
    """Remove parent/name and everything below it.  Unremovable entries
    (immutable files, mount points) are counted and reported; the rest is
    removed anyway.  Returns RemoveStats.  With a Budget, raises OverBudget
    once it is spent (stats then count what was removed).

    Bytes are counted when sizes is true or a Budget needs them: an lstat
    per file, one syscall more than unlink alone (measured on ext4: 1.29x
    the time of rm -rf for 1M files, against 1.02x without)."""
    stats = stats or RemoveStats()
    try:
        top = _open_child_dir(parent_fd, name)
    except FileNotFoundError:
        return stats
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            # Not a directory (or a symlink): unlinking the name is all there is to do.
            try:
                os.unlink(name, dir_fd=parent_fd)
                stats.files += 1
            except OSError as e2:
                stats.fail("unlinkat", name, e2.errno)
            return stats
        if e.errno == errno.EXDEV:
            stats.mounts_skipped += 1
            stats.fail("openat2", name, e.errno)
            return stats
        raise
    try:
        # Bounded: a process outside the job (holding a directory fd, or
        # via /proc/PID/root) could otherwise keep adding entries and hold
        # this worker forever.  What is left is reported, and the daemon
        # retries it later.
        deadline = time.monotonic() + PASSES_SECONDS
        while time.monotonic() < deadline:
            # Only the last pass's failures count: an entry that a pass
            # missed (directories modified while listed) is retried.
            stats.failures, stats.mounts_skipped, stats.errors = 0, 0, []
            before = (stats.files, stats.dirs)
            _empty(top, stats, budget, sizes or budget is not None)
            with os.scandir(top) as it:
                left = next(it, None) is not None
            if not left or (stats.files, stats.dirs) == before:
                break
        else:
            stats.fail("remove_tree", name, errno.EAGAIN)     # still changing: retried later
    finally:
        os.close(top)
    try:
        os.rmdir(name, dir_fd=parent_fd)
        stats.dirs += 1
    except FileNotFoundError:
        pass                    # removed by another worker meanwhile: done
    except OSError as e:
        stats.fail("rmdir", name, e.errno)
    return stats


def _reclaim(dirfd: int, fix: bool) -> bool:
    """With fix (removal with a user's credentials, see remove_as_owner): a
    directory of our own that denied us (a user may chmod their directories
    0500 or 0000) gets rwx for its owner back, as the user could do
    themselves.  True when it changed something worth a second try."""
    if not fix:
        return False
    st = os.fstat(dirfd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o700 == 0o700:
        return False
    os.fchmod(dirfd, stat.S_IMODE(st.st_mode) | 0o700)
    return True


def _in_dir(op: Callable[..., None], dirfd: int, name: str, fix: bool) -> None:
    """op(name, dir_fd=dirfd) (os.unlink, os.rmdir), once more after
    _reclaim when the directory denied us."""
    try:
        op(name, dir_fd=dirfd)
    except PermissionError:
        if not _reclaim(dirfd, fix):
            raise
        op(name, dir_fd=dirfd)


def _open_own_child_dir(dirfd: int, name: str, fix: bool) -> int:
    try:
        return _open_child_dir(dirfd, name)
    except PermissionError:
        if not fix:
            raise
        if _reclaim(dirfd, fix):            # no search permission in the parent
            try:
                return _open_child_dir(dirfd, name)
            except PermissionError:
                pass
        # The directory itself has no rwx for its owner: chmod it through
        # an O_PATH fd (which needs no permission on it and never follows a
        # symlink), if it is ours.
        pfd = os.open(name, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            st = os.fstat(pfd)
            if st.st_uid != os.geteuid():
                raise PermissionError(errno.EACCES, "a directory of another user's", name)
            os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(st.st_mode) | 0o700)
        finally:
            os.close(pfd)
        return _open_child_dir(dirfd, name)


# What a TreeWalk does with each entry, chosen by flags as systemd's
# rm_rf() takes them.  Without WALK_REMOVE it measures.
WALK_REMOVE = 1         # unlink each entry, rmdir each directory once emptied
WALK_SIZES = 2          # with WALK_REMOVE: statx each file first (its bytes, the Budget's)
WALK_RECLAIM = 4        # with WALK_REMOVE, as the owner: give back the rwx a directory denies us


class _DirIterator(Protocol):
    """What os.scandir returns: DirEntries, and close()."""

    def __iter__(self) -> Iterator["os.DirEntry[str]"]: ...

    def __next__(self) -> "os.DirEntry[str]": ...

    def close(self) -> None: ...


class _WalkOver(Exception):
    """Raised by an entry handler to end the walk where it is."""


class TreeWalk:
    """The one walker below removal and measurement: depth first from an
    open directory top, every step relative to a directory fd (a name
    swapped for a symlink between two steps is never resolved), no symlink
    ever followed, no other mount entered (openat2 RESOLVE_NO_XDEV, or
    mnt_id; statx's mount-root attribute when measuring), at most
    MAX_DEPTH directories open whatever the depth.  Where it stats a
    user's name it uses statx(AT_STATX_DONT_SYNC | AT_NO_AUTOMOUNT)
    (lstat_at), which cannot hang on a user's FUSE mount; removal otherwise
    goes by the type scandir read from the directory entry.

    The walker keeps the stack; flags choose the per-entry handler, which
    returns the fd of a directory to descend into, or None.  step() walks
    until the tree is done, a deadline passes or interrupt() says the
    caller has something more urgent, and goes on where it stopped at the
    next call (the daemon measures a user's tree a bounded step per turn).

    Measuring (no WALK_REMOVE): bytes and entries, each inode once (a file
    hard-linked 100 times into the tree is one file's size: a user must
    not inflate their kept directory, and with it the eviction of
    others'); complete is False, and why says why, when max_entries,
    MAX_DEPTH or a mount point inside cut the walk short.

    Removing (WALK_REMOVE): counts into stats (RemoveStats), charges the
    Budget once per entry before acting on it; a subtree deeper than
    MAX_DEPTH is moved up to top and removed from there by a later pass."""

    CHECK_EVERY = 256           # entries between two looks at the clock

    def __init__(self, top: int, flags: int, *, owns_top: bool, stats: Optional["RemoveStats"] = None,
                 budget: Optional[Budget] = None, max_entries: int = 10_000_000,
                 mounts_at_top: Iterable[str] = ()) -> None:
        self.flags, self.owns_top = flags, owns_top
        self._sizes, self._fix = bool(flags & WALK_SIZES), bool(flags & WALK_RECLAIM)
        self.stats = stats if stats is not None else RemoveStats()
        self.budget = budget
        self.bytes = self.entries = 0
        self.complete, self.done = True, False
        self.why = ""           # when not complete: what cut the walk short
        self.max_entries = max_entries
        # Names in top that are mount points of our own (limit='s image at
        # fs/, counted through its image file): skipped, not a reason to
        # call the walk incomplete.
        self.mounts_at_top = frozenset(mounts_at_top)
        self._linked: Set[Tuple[int, int]] = set()     # files with more than one link, counted once
        self._moved_up = 0
        self._visit = self._remove_entry if flags & WALK_REMOVE else self._measure_entry
        # (directory fd, its scandir, its name in the directory below; "" for top)
        self._stack: List[Tuple[int, _DirIterator, str]] = [(top, os.scandir(top), "")]

    def step(self, deadline: Optional[float] = None, interrupt: Optional[Callable[[], bool]] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> bool:
        """Walk on; True once the walk is over (then the fds are closed)."""
        n, visit = 0, self._visit
        paced = deadline is not None or interrupt is not None or progress is not None
        try:
            while self._stack:
                fd, it, _ = self._stack[-1]
                for e in it:
                    cfd = visit(fd, e)
                    if cfd is not None:
                        self._push(cfd, e.name)
                    if paced:
                        n += 1
                        # After the entry, not before: a pause loses nothing.
                        if n % self.CHECK_EVERY == 0:
                            if progress:
                                progress(self.entries, self.bytes)
                            if (deadline is not None and time.monotonic() > deadline) or (interrupt and interrupt()):
                                return False        # the iterators keep their place
                    if cfd is not None:
                        break
                else:
                    self._leave()
        except _WalkOver:
            self.close()
            return True
        except BaseException:
            self.close()
            raise
        self.done = True
        return True

    def close(self) -> None:
        for fd, it, name in self._stack:
            it.close()
            if name or self.owns_top:
                os.close(fd)
        self._stack = []
        self.done = True

    def _push(self, fd: int, name: str) -> None:
        try:
            it = os.scandir(fd)
        except BaseException:
            os.close(fd)
            raise
        self._stack.append((fd, it, name))

    def _leave(self) -> None:
        fd, it, name = self._stack.pop()
        it.close()
        if not self._stack:
            if self.owns_top:
                os.close(fd)
            return
        os.close(fd)
        if self.flags & WALK_REMOVE:
            try:
                _in_dir(os.rmdir, self._stack[-1][0], name, self._fix)
                self.stats.dirs += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                self.stats.fail("rmdir", name, e.errno)

    def _measure_entry(self, fd: int, e: "os.DirEntry[str]") -> Optional[int]:
        self.entries += 1
        if self.entries > self.max_entries:
            self.complete, self.why = False, f"more than {self.max_entries} entries"
            raise _WalkOver()
        try:
            st = lstat_at(fd, e.name)
        except OSError:
            return None
        if st.mount_root:
            # Another filesystem: not measured, never entered.
            if not (len(self._stack) == 1 and e.name in self.mounts_at_top):
                self.complete, self.why = False, f"a mount point inside ({e.name!r})"
            return None
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in self._linked:
                return None
            self._linked.add((st.st_dev, st.st_ino))
        self.bytes += st.st_blocks * 512
        if not stat.S_ISDIR(st.st_mode):
            return None
        if len(self._stack) >= MAX_DEPTH:
            self.complete, self.why = False, f"deeper than {MAX_DEPTH} levels"
            return None
        try:
            return _open_child_dir(fd, e.name)
        except OSError:
            return None

    def _remove_entry(self, fd: int, e: "os.DirEntry[str]") -> Optional[int]:
        stats, budget, nm, fix = self.stats, self.budget, e.name, self._fix
        try:
            is_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if is_dir and budget is not None:
            budget.charge()
        if not is_dir:
            try:
                if self._sizes:
                    # A name of a file with other names frees nothing: its
                    # blocks are counted at the last one (nlink 1), so a
                    # file linked 100 times is one file's size, not 100.
                    # The budget is charged every name's blocks: st_nlink
                    # is a snapshot, and the user may drop the file's other
                    # name (outside the tree) right after it, making this
                    # unlink the one that frees the blocks, synchronously.
                    st = lstat_at(fd, nm)
                    if budget is not None:
                        budget.charge(st.st_blocks * 512)
                    _in_dir(os.unlink, fd, nm, fix)
                    stats.bytes += st.st_blocks * 512 if st.st_nlink <= 1 else 0
                else:
                    _in_dir(os.unlink, fd, nm, fix)
                    stats.sized = False
                stats.files += 1
                return None
            except FileNotFoundError:
                return None
            except IsADirectoryError:
                pass            # replaced by a directory meanwhile
            except OSError as err:
                stats.fail("unlinkat", nm, err.errno)
                return None
        if len(self._stack) >= MAX_DEPTH:
            self._moved_up += 1
            try:
                os.rename(nm, f".deep.{self._moved_up}.{_nonce()}", src_dir_fd=fd, dst_dir_fd=self._stack[0][0])
            except FileNotFoundError:
                pass
            except OSError as err:
                stats.fail("renameat", nm, err.errno)
            return None
        try:
            return _open_own_child_dir(fd, nm, fix)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.EXDEV:
                stats.mounts_skipped += 1
                stats.fail("openat2", nm, err.errno)
            elif err.errno in (errno.ELOOP, errno.ENOTDIR):
                try:
                    _in_dir(os.unlink, fd, nm, fix)
                    stats.files += 1
                except OSError as e2:
                    stats.fail("unlinkat", nm, e2.errno)
            else:
                stats.fail("openat2", nm, err.errno)
            return None


def _empty(top: int, stats: RemoveStats, budget: Optional[Budget], sizes: bool, fix: bool = False) -> None:
    """Remove everything below the open directory top (left open): one
    removing TreeWalk, to the end or until the Budget stops it."""
    flags = WALK_REMOVE | (WALK_SIZES if sizes else 0) | (WALK_RECLAIM if fix else 0)
    TreeWalk(top, flags, owns_top=False, stats=stats, budget=budget).step()


def remove_as_owner(parent_fd: int, name: str) -> RemoveStats:
    """Remove parent/name, a kept job directory, with no more power over
    each user directory in it than its owner has.

    A kept directory is 0711 and reachable from a host shell, so its user
    can rename() into it an entry of another user's from any non-sticky
    world-writable directory on the same filesystem.  Root removing it all
    would delete what the user alone could not.  So each directory at the
    top is emptied by a child process with its owner's uid and gid (and no
    supplementary groups: never more than the owner); what that leaves is
    reported and stays.  Root then removes only what privtmpd itself put
    there: the top, the emptied directories, the limit= image file."""
    stats = RemoveStats()
    try:
        top = _open_child_dir(parent_fd, name)
    except FileNotFoundError:
        return stats
    try:
        with os.scandir(top) as it:
            entries = [(e.name, lstat_at(top, e.name)) for e in it]
        for sub, st in entries:
            if not stat.S_ISDIR(st.st_mode):
                if st.st_uid == 0 and stat.S_ISREG(st.st_mode):
                    os.unlink(sub, dir_fd=top)      # the limit= image, root's own file
                    stats.files += 1
                else:
                    stats.fail("unlinkat", sub, errno.EPERM)
                continue
            if st.st_uid == 0:
                _empty_child(top, sub, stats)        # root's own (the limit= mount point)
            else:
                _empty_as(top, sub, st.st_uid, st.st_gid, stats)
            try:
                os.rmdir(sub, dir_fd=top)
                stats.dirs += 1
            except OSError as e:
                stats.fail("rmdir", sub, e.errno)
    finally:
        os.close(top)
    if stats.failures or stats.mounts_skipped:
        return stats
    try:
        os.rmdir(name, dir_fd=parent_fd)
        stats.dirs += 1
    except FileNotFoundError:
        pass
    except OSError as e:
        stats.fail("rmdir", name, e.errno)
    return stats


def _empty_child(top: int, sub: str, stats: RemoveStats, fix: bool = False) -> None:
    try:
        fd = _open_own_child_dir(top, sub, fix)
    except OSError as e:
        if e.errno == errno.EXDEV:
            stats.mounts_skipped += 1
        stats.fail("openat2", sub, e.errno)
        return
    try:
        _empty(fd, stats, None, False, fix)
    finally:
        os.close(fd)


AS_OWNER_SECONDS = PASSES_SECONDS     # a remover with a user's rights has this long, then is killed


def _empty_as(top: int, sub: str, uid: int, gid: int, stats: RemoveStats) -> None:
    """_empty_child in a forked child that has only uid's and gid's rights.

    The child runs as the user (forked.become_user: no fd but its pipe and
    the top directory), so the user can signal it (SIGSTOP) or keep feeding
    its directory: it is killed after AS_OWNER_SECONDS and the removal
    reported incomplete (retried later)."""
    import json

    def remove(w: int) -> None:
        forked.become_user(uid, gid, keep=(top, w))
        child = RemoveStats()
        _empty_child(top, sub, child, fix=True)
        os.write(w, json.dumps(child.__dict__).encode()[:60000])

    data = forked.run(remove, AS_OWNER_SECONDS) or b""     # None: killed at the time limit
    try:
        got = json.loads(data)
    except ValueError:
        stats.fail("remove-as-owner", sub, errno.ETIMEDOUT if not data else errno.EIO)
        return
    for k in ("files", "dirs", "bytes", "mounts_skipped", "failures"):
        setattr(stats, k, getattr(stats, k) + got[k])
    stats.sized = False
    stats.errors += got["errors"][:MAX_ERRORS_KEPT - len(stats.errors)]


class UsageWalk(TreeWalk):
    """Bytes and entries of dirfd/name, measured by a TreeWalk in steps
    (see there), so the daemon can measure a user's tree of any size
    without making a Prolog wait (no work that grows with user data in one
    turn).  complete is False when max_entries, MAX_DEPTH or a mount point
    cut the walk short (callers that enforce a budget must then treat the
    tree as too big)."""

    def __init__(self, dirfd: int, name: str, max_entries: int = 10_000_000,
                 mounts_at_top: Iterable[str] = ()) -> None:
        top = _open_child_dir(dirfd, name)
        try:
            super().__init__(top, 0, owns_top=True, max_entries=max_entries, mounts_at_top=mounts_at_top)
        except BaseException:
            os.close(top)
            raise


def tree_usage(dirfd: int, name: str, max_entries: int = 10_000_000,
               progress: Optional[Callable[[int, int], None]] = None) -> Tuple[int, int, bool]:
    """(bytes, entries, complete) of dirfd/name in one go (see UsageWalk)."""
    walk = UsageWalk(dirfd, name, max_entries)
    walk.step(progress=progress)
    return walk.bytes, walk.entries, walk.complete
