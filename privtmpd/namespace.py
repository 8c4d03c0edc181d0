"""Build one job's mount namespace and pin it.

A short-lived thread of the daemon unshares its mount namespace, makes /
rslave (host mounts such as autofs and NFS still reach the job; nothing
mounted inside leaks out), bind-mounts the job's directories over the
mount points (each source checked to be the very inode the daemon made),
opens /proc/thread-self/ns/mnt and ends; the daemon, in the older
namespace, then binds that namespace onto <rundir>/ns/J (runstate.pin).
The pin keeps the namespace alive with no process in it.  The job
lifecycle around this is in jobs.py.
"""

import errno
import os
import threading
from typing import List

from . import kernel, mountopts, runstate, safefs
from .kernel import KernelError


class NamespaceError(Exception):
    """Creating or entering a namespace failed; message is for the admin."""


# --- create --------------------------------------------------------------

def build_and_pin(cfg, job, binds, timeout):
    """Build the job's namespace and pin it, on another CPU if the kernel
    refuses the pin.

    The kernel binds a mount namespace file only if that namespace is newer
    than the caller's (the loop check compares namespace ids).  On recent
    kernels (seen on 6.18) those ids come from per-CPU batches, so a
    namespace made now on one CPU may have a smaller id than an older one
    made on another.  In the
    initial namespace (the oldest) that never matters; a daemon in a
    container's or a test node's mount namespace gets EINVAL for a
    namespace built on the wrong CPU (10-16 of 20 concurrent creates).  Ids
    only grow on each CPU, so building once on each allowed CPU in turn
    reaches the one where the daemon's own namespace was made."""
    cpus = sorted(os.sched_getaffinity(0))
    for cpu in [None] + cpus:
        nsfd = build_namespace(binds, cfg.shm, timeout, cpu, tmpfs=mountopts.tmpfs_plan(cfg), job=job)
        try:
            runstate.pin(cfg, job, nsfd)
            return
        except KernelError as e:
            if e.errno != errno.EINVAL or cpu == cpus[-1]:
                raise
            runstate.unpin(cfg, job)
        finally:
            os.close(nsfd)

def _mount_flags_of(fd):
    """Per-mount flags of the mount the source lives on, so a bind of a
    directory from a noexec or read-only filesystem does not gain exec or
    write; nosuid and nodev are always added."""
    f = os.statvfs(f"/proc/self/fd/{fd}").f_flag
    flags = kernel.MS_NOSUID | kernel.MS_NODEV
    for st_bit, ms_bit in ((os.ST_RDONLY, kernel.MS_RDONLY), (os.ST_NOEXEC, kernel.MS_NOEXEC),
                           (os.ST_NOATIME, kernel.MS_NOATIME), (os.ST_NODIRATIME, kernel.MS_NODIRATIME),
                           (os.ST_RELATIME, kernel.MS_RELATIME)):
        if f & st_bit:
            flags |= ms_bit
    return flags


def _setup_in(binds, shm, opened, tmpfs=(), job=0):
    """Runs in the namespace thread: unshare, rslave, bind, remount, mount
    the tmpfs= points.  Every fd it opens is appended to `opened` (the fd
    table is the daemon's).  binds: (target, source path, dev, ino[, extra
    MS_* flags]); tmpfs: (target, tmpfs= size, extra MS_* flags)."""
    # The thread shares the daemon's fd table and memory but not, after
    # this, its mount namespace or fs_struct (CLONE_NEWNS implies CLONE_FS;
    # only CLONE_VM/SIGHAND/THREAD/NEWUSER are refused to threads).  The
    # daemon's main thread stays in the host namespace throughout.
    kernel.unshare(kernel.CLONE_NEWNS)
    # rslave: host mounts made later (autofs, NFS) still reach the job, and
    # nothing mounted here propagates back to the host.  Never touch the
    # host's own propagation.
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_SLAVE)
    # Open every source and target first: mounting over /tmp hides a base
    # under /tmp, so the order of mount= must not matter.
    pairs = []
    for target, src_path, dev, ino, *extra in binds:
        src = safefs.open_verified(src_path, dev, ino)
        opened.append(src)
        tgt = safefs.open_dir(target, safefs.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        opened.append(tgt)
        pairs.append((target, src, tgt, extra[0] if extra else 0))
    fresh = []
    for target, size, extra in tmpfs:
        tgt = safefs.open_dir(target, safefs.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        opened.append(tgt)
        fresh.append((tgt, size, extra))
    for target, src, tgt, extra in pairs:
        # mount_options= only adds flags: the source's own (a noexec or
        # read-only filesystem, flags locked by a user namespace) are kept,
        # since a remount that drops a locked flag fails with EPERM.
        flags = _mount_flags_of(src) | extra
        kernel.mount(f"/proc/self/fd/{src}", f"/proc/self/fd/{tgt}", None, kernel.MS_BIND)
        # Remount through an fd on the new mount's root, checked to be the
        # job's directory (a bind's root is that very inode), not by path.
        st = os.fstat(src)
        top = safefs.open_verified(target, st.st_dev, st.st_ino)
        opened.append(top)
        kernel.mount(None, f"/proc/self/fd/{top}", None, kernel.MS_REMOUNT | kernel.MS_BIND | flags)
    for tgt, size, extra in fresh:
        mountopts.mount_tmpfs(tgt, size, extra, job)
    if shm:
        # shm=job:N% is marked like tmpfs=<dir>:job:N% for the entry helper.
        mountopts.mount_tmpfs("/dev/shm", shm, 0, job)
    # /proc/thread-self: /proc/self would name the main thread's namespace.
    return os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)


class _NamespaceThread(threading.Thread):
    """Builds one job's namespace in a thread of its own, which then ends:
    the namespace lives on in the fd it hands back, until pinned.

    A thread instead of a forked child: no fork of the daemon's memory
    (copy-on-write faults on both sides), no child to reap; the daemon's
    create went from 3.0 to 1.5 ms (docs/performance.md).  The thread never returns to the host
    namespace and is never reused, so nothing else ever runs in a job's
    namespace, and a failure half-way leaves nothing behind but a namespace
    no one references."""

    def __init__(self, binds, shm, cpu=None, tmpfs=(), job=0):
        super().__init__(name="privtmpd-ns", daemon=True)
        self.binds, self.shm, self.cpu, self.tmpfs, self.job = binds, shm, cpu, tmpfs, job
        self.lock = threading.Lock()
        self.abandoned = False      # the daemon gave up waiting (timeout)
        self.nsfd = None
        self.error = None

    def run(self):
        opened: List[int] = []
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})     # this thread only
            nsfd = _setup_in(self.binds, self.shm, opened, self.tmpfs, self.job)
        except BaseException as e:      # noqa: BLE001 - handed to the daemon
            self.error = e
            nsfd = None
        finally:
            for fd in opened:
                os.close(fd)
        with self.lock:
            if self.abandoned and nsfd is not None:
                os.close(nsfd)
            else:
                self.nsfd = nsfd

    def result(self, timeout):
        """The namespace fd (the caller closes it), or the error raised."""
        self.join(timeout)
        with self.lock:
            if self.is_alive() and self.nsfd is None and self.error is None:
                self.abandoned = True
                raise NamespaceError(f"namespace setup timed out after {timeout:.0f} s "
                                     f"(a mount point that does not answer?)")
        if self.error is not None:
            raise self.error
        return self.nsfd


def build_namespace(binds, shm, timeout=30.0, cpu=None, tmpfs=(), job=0):
    """A new mount namespace, a rslave copy of the host's with binds
    (target, source path, dev, ino[, extra flags]) mounted, tmpfs (target,
    tmpfs= size, extra flags) mounted and shm's tmpfs; returns an O_RDONLY fd on
    it.  cpu: build it on that CPU (see build_and_pin)."""
    t = _NamespaceThread(binds, shm, cpu, tmpfs, job)
    t.start()
    return t.result(timeout)
