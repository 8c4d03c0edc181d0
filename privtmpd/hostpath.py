"""sbcast=yes: the job's private /tmp reachable by its owner from the host.

sbcast (Slurm 22.05) writes as the job's user from slurmd's namespace, the
host's: `sbcast f /tmp/f` lands in the node's shared /tmp, not in the job's.
The job's /tmp is the directory $base.J.R/tmp on the host, the same path on
every node of the job (same base, job id and restart count), which the
entry helper exports as PRIVTMPD_HOST_TMP (plugin argument host_tmp=BASE).

Only the top $base.J.R, root's, changes: from 0700 to 0711, so the owner
can traverse it (not list it).  Every directory in it stays the user's and
owner-only (config refuses sbcast=yes with a mode= that gives group or
others any access), so other users get EACCES one level down, as for any
user's 0700 directory.  Nothing here makes root act on a user-controlled
name: the top is opened fd-relative with O_NOFOLLOW and must still be the
root-owned directory create_job_dir just placed (in a sticky parent only
root can rename it).
"""

import errno
import os
import stat

from . import safefs

TOP_MODE = 0o711


def open_top_to_owner(parent_fd, name, tmp_identity):
    """chmod 0711 the job directory name in parent_fd, which must still be
    root's and hold the tmp directory (st_dev, st_ino) == tmp_identity that
    create_job_dir made in it."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        st = os.fstat(fd)
        sub = safefs.lstat_at(fd, "tmp")
        if (st.st_uid != 0 or not stat.S_ISDIR(st.st_mode)
                or (sub.st_dev, sub.st_ino) != tuple(tmp_identity)):
            raise safefs.UnsafePath(errno.EPERM, f"{name} is no longer the job directory just made")
        os.fchmod(fd, TOP_MODE)
    finally:
        os.close(fd)


def host_tmp(cfg, job, restart):
    """The host path of job's private /tmp (what PRIVTMPD_HOST_TMP says)."""
    return f"{cfg.base}.{job}.{restart}/tmp"
