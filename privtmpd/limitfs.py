"""limit=: each job's directories in an ext4 image of their own, so a job
that fills its /tmp gets ENOSPC at its limit and the node's disk and other
jobs are unaffected.  The image and its mount point live in the root-owned
job directory: <dir>/fs.img, loop-mounted at <dir>/fs."""

import errno
import os

from . import kernel, safefs
from .kernel import KernelError


class LimitFsError(Exception):
    """Making a job's limit= filesystem failed; message is for the admin."""


LIMITED_FS = "fs"      # limit=: mount point of the job's filesystem in its job directory


def make_image(img, size, reserve):
    """The job's image file, `size` bytes.  Sparse, it takes on disk only
    what the job writes, so the images of all jobs can together promise
    more than the disk holds, and a job writing into its image when the
    disk is full gets EIO, not ENOSPC.  With reserve, its blocks are
    allocated now (fallocate: unwritten extents, nothing is written, ~60 ms
    for 20 GB on ext4).  Returns whether they were; when the disk has not
    got them, the image stays sparse: the job still starts (a failed Prolog
    would drain the node), and the daemon logs it."""
    fd = os.open(img, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if reserve:
            try:
                kernel.fallocate(fd, 0, size, img)
                return True
            except KernelError as e:
                if e.errno not in (errno.ENOSPC, errno.EOPNOTSUPP, errno.EDQUOT, errno.EFBIG):
                    raise
                os.ftruncate(fd, 0)     # gives back what a failed fallocate took
        os.ftruncate(fd, size)
        return False
    finally:
        os.close(fd)


def make_limited_fs(cfg, dpath, subs, uid, gid, size):
    """limit=: an ext4 image of `size` bytes (see make_image) in the
    root-owned job directory, loop-mounted on the host side at <dir>/fs (so
    the directories of a failed job can be kept and read), with the job's
    directories in it.  At the limit the job gets ENOSPC; the node's disk
    and other jobs are unaffected.  The loop device is released when the
    mount goes (autoclear).  Returns (the job's directories as
    make_user_dirs gives them, whether the image is allocated in full)."""
    import subprocess
    img = f"{dpath}/{LIMITED_FS}.img"
    reserved = make_image(img, size, cfg.limit_reserve)
    mnt = f"{dpath}/{LIMITED_FS}"
    os.mkdir(mnt, 0o700)
    # No journal, no reserved blocks: scratch space, all of it the job's.
    for argv in ([config_mkfs(), "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "nodiscard", img],
                 ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", img, mnt]):
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode:
            raise LimitFsError(f"limit=: {' '.join(argv[:2])} failed: {(r.stderr or r.stdout).strip()[:500]}")
    fsfd = safefs.open_dir(mnt)
    try:
        return safefs.make_user_dirs(fsfd, subs, uid, gid, cfg.mode), reserved
    finally:
        os.close(fsfd)


def config_mkfs():
    from .config import mkfs_path
    return mkfs_path() or "mkfs.ext4"


def umount_limited_fs(pfd_path, dname):
    """Detach a job directory's limit= filesystem (if any) before the
    directory is removed: removal never crosses a mount point."""
    path = f"{pfd_path}/{dname}/{LIMITED_FS}"
    for _ in range(8):
        try:
            kernel.umount2(path, kernel.MNT_DETACH | kernel.UMOUNT_NOFOLLOW)
        except KernelError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                return
            raise


def limited_fs_usage(dpath):
    """(used, size) bytes of a job's limit= filesystem, or None."""
    try:
        v = os.statvfs(f"{dpath}/{LIMITED_FS}")
        if os.stat(f"{dpath}/{LIMITED_FS}").st_dev == os.stat(dpath).st_dev:
            return None
    except OSError:
        return None
    return ((v.f_blocks - v.f_bfree) * v.f_frsize, v.f_blocks * v.f_frsize)


def limited_fs_counts(dpath):
    """(used bytes, used inodes) of a job's limit= filesystem, or None: one
    statvfs, whatever the job wrote (the per-job usage at teardown)."""
    try:
        if os.stat(f"{dpath}/{LIMITED_FS}").st_dev == os.stat(dpath).st_dev:
            return None
        v = os.statvfs(f"{dpath}/{LIMITED_FS}")
    except OSError:
        return None
    return (v.f_blocks - v.f_bfree) * v.f_frsize, v.f_files - v.f_ffree
