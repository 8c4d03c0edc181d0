"""One thin ctypes wrapper per system call that Python's os module lacks.

Python 3.9-3.11 has no os.mount/os.unshare/os.setns, so these call libc
directly.  Every wrapper raises KernelError (an OSError) carrying the real
errno, the syscall name and the path it acted on, plus a hint for the admin
when the errno has a well-known cause.  Nothing here decides policy: callers
(namespace.py, safefs.py) decide what is safe to do.
"""

import ctypes
import errno
import fcntl
import sys
import os
from typing import Dict, Optional, Type

_libc = ctypes.CDLL(None, use_errno=True)

# <linux/sched.h>
CLONE_NEWNS = 0x00020000

# <linux/mount.h> (classic mount flags)
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21

# umount2 flags
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# <linux/nsfs.h>: _IO(0xb7, 0x3)
NS_GET_NSTYPE = 0xB703
NS_GET_OWNER_UID = 0xB704

# <linux/openat2.h>
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

# renameat2 flags
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1

AT_FDCWD = -100

# openat2 has the same number on every architecture that has it (unified table).
_SYS_openat2 = 437

_HINTS = {
    ("mount", errno.EINVAL): "a pin target on a shared mount, or a source from another mount namespace",
    ("mount", errno.EPERM): "privtmpd must run as root in the host user namespace",
    ("mount", errno.ENOENT): "the mount point or source does not exist",
    ("umount2", errno.EINVAL): "not a mount point (already unmounted?)",
    ("setns", errno.EINVAL): "not a mount-namespace file, or the process is multi-threaded",
    ("unshare", errno.EPERM): "privtmpd must run as root (CAP_SYS_ADMIN)",
    ("openat2", errno.EXDEV): "the path crosses a mount point",
    ("openat2", errno.ELOOP): "the path contains a symbolic link",
    ("fallocate", errno.ENOSPC): "the filesystem has less free space than the size asked for",
}


class KernelError(OSError):
    """A failed system call: errno, syscall name, path and a hint."""

    errno: int          # always set, unlike OSError's

    def __init__(self, err: int, syscall: str, path: str = "", hint: str = "") -> None:
        self.syscall = syscall
        self.path = path
        self.hint = hint or _HINTS.get((syscall, err), "")
        msg = f"{syscall}({path}): {os.strerror(err)}"
        if self.hint:
            msg += f" ({self.hint})"
        super().__init__(err, msg)
        self.filename = path or None

    def __str__(self) -> str:
        return self.strerror or ""


_ERRNO_CLASSES: Dict[Type[OSError], Type[KernelError]] = {}


def _error(err: int, syscall: str, path: str = "") -> KernelError:
    """A KernelError that is also the built-in OSError subclass for err
    (FileNotFoundError for ENOENT, ...), as os.* functions raise: callers
    write `except FileNotFoundError` around openat2 just as around os.open,
    and a plain KernelError would slip past those handlers."""
    builtin = type(OSError(err, ""))
    if builtin is OSError:
        return KernelError(err, syscall, path)
    cls = _ERRNO_CLASSES.get(builtin)
    if cls is None:
        cls = _ERRNO_CLASSES[builtin] = type(f"Kernel{builtin.__name__}", (KernelError, builtin), {})
    return cls(err, syscall, path)


def _check(ret: int, syscall: str, path: str = "") -> int:
    if ret < 0:
        raise _error(ctypes.get_errno(), syscall, path)
    return ret


def _b(value: Optional[str]) -> Optional[bytes]:
    return None if value is None else os.fsencode(value)


_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syscall.restype = ctypes.c_long


def mount(source: Optional[str], target: str, fstype: Optional[str], flags: int,
          data: Optional[str] = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int, path: str = "") -> None:
    _check(_libc.setns(fd, nstype), "setns", path)


PR_SET_PDEATHSIG = 1


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           "prctl")


def set_pdeathsig(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends sig to the caller when its
    parent dies."""
    prctl(PR_SET_PDEATHSIG, sig)


def fallocate(fd: int, offset: int, length: int, path: str = "") -> None:
    """fallocate(2) mode 0: allocate the blocks (unwritten extents, read as
    zeros) without writing them.  Unlike posix_fallocate, never falls back
    to writing zeros: a filesystem without fallocate raises EOPNOTSUPP."""
    _check(_libc.fallocate(fd, 0, offset, length), "fallocate", path)


def renameat2(olddirfd: int, oldname: str, newdirfd: int, newname: str, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, _b(oldname), newdirfd, _b(newname), flags), "renameat2", oldname)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, name: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): flags always get O_CLOEXEC; resolve restricts the lookup."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(ctypes.c_long(_SYS_openat2), ctypes.c_int(dirfd), ctypes.c_char_p(_b(name)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(fd, "openat2", name)


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32), ("attributes", ctypes.c_uint64),
                ("nlink", ctypes.c_uint32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("mode", ctypes.c_uint16), ("_spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64),
                ("size", ctypes.c_uint64), ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("atime", _StatxTimestamp), ("btime", _StatxTimestamp), ("ctime", _StatxTimestamp),
                ("mtime", _StatxTimestamp), ("rdev_major", ctypes.c_uint32), ("rdev_minor", ctypes.c_uint32),
                ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32), ("mnt_id", ctypes.c_uint64),
                ("_spare", ctypes.c_uint64 * 13)]


AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
AT_STATX_DONT_SYNC = 0x4000
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800
STATX_ATTR_MOUNT_ROOT = 0x2000


class Stat:
    """The fields of statx(2) that privtmpd uses, named as os.stat_result's."""
    __slots__ = ("st_mode", "st_uid", "st_gid", "st_ino", "st_dev", "st_nlink", "st_blocks", "st_size",
                 "st_mtime", "mount_root", "btime")
    st_mode: int
    st_uid: int
    st_gid: int
    st_ino: int
    st_dev: int
    st_nlink: int
    st_blocks: int
    st_size: int
    st_mtime: float
    mount_root: bool
    btime: Optional[float]      # creation time; None where the filesystem keeps none

    def __init__(self, sx: "_Statx") -> None:
        self.st_mode, self.st_uid, self.st_gid, self.st_ino = sx.mode, sx.uid, sx.gid, sx.ino
        self.st_dev = os.makedev(sx.dev_major, sx.dev_minor)
        self.st_nlink, self.st_blocks, self.st_size = sx.nlink, sx.blocks, sx.size
        self.mount_root = bool(sx.attributes & sx.attributes_mask & STATX_ATTR_MOUNT_ROOT)
        self.st_mtime = sx.mtime.tv_sec + sx.mtime.tv_nsec / 1e9
        self.btime = sx.btime.tv_sec + sx.btime.tv_nsec / 1e9 if sx.mask & STATX_BTIME else None


_SYS_statx = {"x86_64": 332, "aarch64": 291, "ppc64le": 383, "s390x": 379}.get(os.uname().machine, 332)
_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]


def statx_nofollow(dirfd: int, name: str) -> Stat:
    """statx(2) of dirfd/name without following a symlink, without
    triggering an automount, and without asking a network or FUSE
    filesystem for fresh attributes (AT_STATX_DONT_SYNC): the cached ones
    come back at once, so a user's FUSE mount point, which a plain lstat
    enters and asks, cannot hang the caller.  mount_root tells that the
    name is a mount point (Linux 5.8; False before)."""
    sx = _Statx()
    flags = AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT | AT_STATX_DONT_SYNC
    if _statx is not None:
        ret = _statx(dirfd, _b(name), flags, STATX_BASIC_STATS | STATX_BTIME, ctypes.byref(sx))
    else:               # glibc < 2.28
        ret = _libc.syscall(ctypes.c_long(_SYS_statx), ctypes.c_int(dirfd), ctypes.c_char_p(_b(name)),
                            ctypes.c_int(flags), ctypes.c_uint(STATX_BASIC_STATS | STATX_BTIME),
                            ctypes.byref(sx))
    _check(ret, "statx", name)
    return Stat(sx)


def ns_type(fd: int) -> Optional[int]:
    """NS_GET_NSTYPE on an nsfs file: the CLONE_NEW* constant, or None when the
    file is not a namespace (a plain file, e.g. a pin that was unmounted)."""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            return None
        raise


def ns_owner_uid(fd: int) -> int:
    """NS_GET_OWNER_UID on a user namespace's nsfs file: the uid that created
    it, as this process's user namespace sees it."""
    buf = fcntl.ioctl(fd, NS_GET_OWNER_UID, b"\0" * 4)
    return int.from_bytes(buf, sys.byteorder)
