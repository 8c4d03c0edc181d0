"""What mount_options= and tmpfs= mean for one job's namespace.

config.py checks the words; this module turns them into what the namespace
thread mounts (namespace._setup_in): extra MS_* flags for a job directory's
bind, or a private tmpfs with its size= and mode, and answers the questions
the rest of the daemon asks about a job's mount points (which have a
directory under base, which can be kept).
"""

import os
from typing import List

from . import config, kernel

# Flags every private mount gets whatever the configuration says: the job's
# user writes there, so a setuid binary or a device node in it must never
# take effect.
ALWAYS = kernel.MS_NOSUID | kernel.MS_NODEV

_FLAG_OF = {"noexec": kernel.MS_NOEXEC, "nosuid": kernel.MS_NOSUID, "nodev": kernel.MS_NODEV, "exec": 0}

# A private tmpfs is the job's /tmp: world-writable with the sticky bit and
# root's, exactly what programs expect of /tmp (some refuse a /tmp without
# the sticky bit).  Only the job's own processes are in the namespace, so
# 1777 opens it to nobody else.
TMPFS_MODE = "1777"


def extra_flags(cfg, mount):
    """MS_* flags mount_options= adds to mount's bind (on top of ALWAYS)."""
    flags = 0
    for word in cfg.options_of(mount):
        flags |= _FLAG_OF[word]
    return flags


# The mount source of each private tmpfs names its job: privtmpd.<job>, and
# privtmpd.<job>:job:N% for one sized from the job's memory (tmpfs=<dir>:
# job:N%, shm=job:N%).
# - The daemon cannot know the job's memory on the node when the Prolog
#   runs, so it mounts N% of the RAM; the entry helper finds these mounts by
#   their source in the job's /proc/self/mountinfo and resizes each to N% of
#   S_JOB_ALLOC_MEM in the job's first task (spank/privtmpd_spank.c reads
#   the same format).  The mark cannot be forged there: the pinned
#   namespace belongs to the initial user namespace, so only root on the
#   host mounts in it.
# - Teardown finds the job's processes in namespaces copied from the job's
#   (a user's unshare -Urm) by this source when the job has no directory
#   under base to look for (every mount point a tmpfs=, and its pin gone):
#   see proc._Matcher.  A user can put the source on a tmpfs of their own
#   user namespace, but the matcher only counts the job user's processes.


def tmpfs_source(size, job):
    """The mount source of job's tmpfs of this size=."""
    return f"privtmpd.{job}:{size}" if size.startswith("job:") else f"privtmpd.{job}"


def tmpfs_marks(job):
    """How job's tmpfs mounts look in /proc/PID/mountinfo (after " - "):
    whole-field patterns of their fstype and source, for proc._Matcher."""
    return (f" - tmpfs privtmpd.{job} ".encode(), f" - tmpfs privtmpd.{job}:".encode())


# One inode per 4 KiB of size.  The kernel's default is half the RAM's
# pages whatever the size, and an inode costs ~1 KiB of kernel memory that
# size= does not count (nor the memory cgroup, on cgroup v1 without kmem
# accounting): a job could pin gigabytes with millions of empty files in a
# small tmpfs.  4 KiB keeps that under a quarter of the size and still lets
# a file per page in (ext4 makes one inode per 16 KiB).
BYTES_PER_INODE = 4096
MIN_INODES = 1024


def tmpfs_inodes(size):
    """nr_inodes for a tmpfs of this size= (job:N% counts as N% of the RAM,
    its size until the entry helper resizes it)."""
    v = size.removeprefix("job:")
    if v.endswith("%"):
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * int(v[:-1]) // 100
    else:
        parsed = config.parse_size(v)
        total = parsed[1] if parsed else 0
    return max(total // BYTES_PER_INODE, MIN_INODES)


def tmpfs_data(size):
    """The tmpfs mount data for a tmpfs= size ("4g", "10%", "job:50%": 50%
    of the RAM until the entry helper resizes it)."""
    return f"size={size.removeprefix('job:')},nr_inodes={tmpfs_inodes(size)},mode={TMPFS_MODE},uid=0,gid=0"


def disk_mounts(cfg, mounts):
    """The mount points of `mounts` that have a directory under base."""
    return [m for m in mounts if not cfg.tmpfs_size(m)]


def tmpfs_plan(cfg):
    """[(mount point, tmpfs size, extra flags)] for every tmpfs= point."""
    return [(m, cfg.tmpfs_size(m), extra_flags(cfg, m)) for m in sorted(cfg.mounts) if cfg.tmpfs_size(m)]


def mount_tmpfs(target, size, extra, job):
    """Mount a fresh tmpfs on target: the directory open at an O_PATH fd
    opened with O_NOFOLLOW before anything was mounted (the mount lands on
    that inode, never on whatever a path resolves to later), or /dev/shm.
    Runs in the namespace thread, so the tmpfs exists only in the job's
    namespace: no file of it is ever on the host's disk, and it is freed
    when the namespace is (unpinned, last process gone)."""
    where = target if isinstance(target, str) else f"/proc/self/fd/{target}"
    kernel.mount(tmpfs_source(size, job), where, "tmpfs", ALWAYS | extra, tmpfs_data(size))


def is_tmpfs_state(state, mount):
    """Whether a job's state file records mount as a tmpfs= point."""
    t = state.get("tmpfs")
    return isinstance(t, dict) and mount in t


def statvfs_usage(path):
    """(bytes used, bytes size, entries) of the filesystem at path; entries
    are the inodes in use but the root's (None where the filesystem counts
    no inodes: a tmpfs with nr_inodes=0)."""
    v = os.statvfs(path)
    entries = v.f_files - v.f_ffree - 1 if v.f_files else None
    return (v.f_blocks - v.f_bfree) * v.f_frsize, v.f_blocks * v.f_frsize, entries


USAGE_SECONDS = 2.0


def open_namespace(pin_path):
    """An O_RDONLY fd on the mount namespace pinned at pin_path, or None."""
    try:
        fd = os.open(pin_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if kernel.ns_type(fd) == kernel.CLONE_NEWNS:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


EMPTY_TRIES = 3


def empty_tmpfs(nsfd, mounts):
    """Runs in a removal worker (a forked child: single-threaded, as setns
    needs): join the job's namespace, which nsfd keeps alive, remove
    everything in each tmpfs= point, then shrink each to what is still in
    use (an open unlinked file keeps its pages, as on disk), so that a
    directory of it held open from outside the job cannot be filled
    again.  A name created meanwhile makes the shrink fail (EINVAL): then
    again, EMPTY_TRIES times.  Returns a removal report."""
    from . import safefs

    kernel.setns(nsfd, kernel.CLONE_NEWNS)
    stats = safefs.RemoveStats()
    for m in mounts:
        for attempt in range(EMPTY_TRIES):
            fd = safefs.open_dir(m)
            try:
                for name in os.listdir(fd):
                    safefs.remove_tree(fd, name, stats)
                v = os.statvfs(fd)
            finally:
                os.close(fd)
            used = max((v.f_blocks - v.f_bfree) * v.f_frsize, 4096)
            inodes = max(v.f_files - v.f_ffree, 1)
            keep = v.f_flag & (os.ST_RDONLY | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME)
            try:
                kernel.mount(None, m, None, kernel.MS_REMOUNT | ALWAYS | keep, f"size={used},nr_inodes={inodes}")
                break
            except OSError as e:
                if attempt == EMPTY_TRIES - 1:
                    stats.fail("mount", m, e.errno)
    return stats


def tmpfs_usage(namespaces):
    """[{mount point: [bytes used, bytes size, entries]}, ...] of the
    tmpfs= points of each (namespace fd, mount points) in namespaces, read
    with statvfs from inside each namespace; a {} for each one that could
    not be read whole.

    The tmpfs exists only in the job's namespace, so a forked child
    (single-threaded, as setns needs; the daemon itself never leaves the
    host namespace) joins each namespace in turn and reports: one fork
    however many jobs are asked about.  statvfs is one call per mount
    point whatever the jobs wrote; the time limit, shared by all, bounds a
    mount point the job's user made hang (a FUSE mount over it).  One
    job's namespace must not cost the others their figures: an error in
    it skips that job only, and at the time limit the jobs already read
    keep theirs (each job's lines go out in one write, closed by a line
    that says it is whole, so a job cut short is never half-reported)."""
    from . import forked

    wanted = [[m for m in mounts if isinstance(m, str) and m.startswith("/") and "\n" not in m]
              for _, mounts in namespaces]
    if not any(wanted):
        return [{} for _ in namespaces]

    def probe(w):
        for i, ((nsfd, _), points) in enumerate(zip(namespaces, wanted)):
            if not points:
                continue
            try:
                kernel.setns(nsfd, kernel.CLONE_NEWNS)
                out = []
                for m in points:
                    used, size, entries = statvfs_usage(m)
                    out.append(f"{i} {used} {size} {-1 if entries is None else entries} {m}\n")
            except OSError:
                continue
            out.append(f"{i} whole\n")
            os.write(w, "".join(out).encode())

    data = forked.run(probe, USAGE_SECONDS, partial=True)
    usage: List[dict] = [{} for _ in namespaces]
    read: dict = {}
    # Split on "\n" only: a mount point name may hold any other character
    # (str.splitlines would also break at \r, \x1c, \u2028...).
    for line in (data or b"").decode(errors="replace").split("\n"):
        fields = line.split(" ", 4)
        try:
            i = int(fields[0])
            if fields[1:] == ["whole"]:
                usage[i] = read.pop(i, {})
            elif len(fields) == 5:
                read.setdefault(i, {})[fields[4]] = [int(fields[1]), int(fields[2]),
                                                     None if fields[3] == "-1" else int(fields[3])]
        except (ValueError, IndexError):
            continue        # the last line of a child killed at the time limit
    return usage


def tmpfs_totals(usage):
    """{"bytes", "files"} over the tmpfs_usage of a job's points, for its
    op=usage line; None when a point could not be read or counts no
    inodes (a partial sum would read as the job's usage)."""
    if not usage or any(u[2] is None for u in usage.values()):
        return None
    return {"bytes": sum(u[0] for u in usage.values()), "files": sum(u[2] for u in usage.values())}


def config_json(cfg):
    """The per-mount-point settings for `status` and `config check --json`."""
    return {"mount_options": {m: ",".join(o) for m, o in cfg.mount_options}, "tmpfs": dict(cfg.tmpfs),
            "sbcast": cfg.sbcast, "host_leftovers": cfg.host_leftovers}


def exec_lost_to_noexec_base(cfg):
    """None when no mount point asks for exec (or base's filesystem cannot
    be read: check_base says why); else ([mount points whose exec is lost],
    the mount point of base's filesystem).  Only the explicit exec matters:
    without it, noexec inherited from base's filesystem is what the admin
    already has for every other directory there.  tmpfs= points are fresh
    mounts, and with limit= the job's directories are in a loop-mounted
    image of their own, mounted exec: neither sees base's flags."""
    if cfg.limit:
        return None
    wanted = [m for m in sorted(cfg.mounts) if "exec" in cfg.options_of(m) and not cfg.tmpfs_size(m)]
    if not wanted:
        return None
    from . import proc

    try:
        noexec = bool(os.statvfs(cfg.base_parent).f_flag & os.ST_NOEXEC)
        real = os.path.realpath(cfg.base_parent)
        fs = max((m.mountpoint for m in proc.mounts() if config.is_under(real, m.mountpoint)), key=len, default="/")
    except OSError:
        return None
    return (wanted if noexec else []), fs


def noexec_base_warning(cfg, points, fs):
    shown = ", ".join(f"mount_options={m}:exec" for m in points)
    return (f"{shown} has no effect: base={cfg.base} is on {fs}, mounted noexec, and a job's bind keeps the "
            f"noexec of the filesystem it comes from; programs in the job's {', '.join(points)} cannot run")
