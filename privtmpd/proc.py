"""Processes of a job's mount namespace: find them, kill them, and know
when none is left.  Also the one parser of /proc/PID/mountinfo.

Knowing that none is left is the hard part.  A scan of /proc lists PIDs,
then reads each one's namespace; a process that forks and exits (a fork
chain, one process alive at any instant) is always one step ahead: the
PID listed is gone when it is read, its child was created after the
listing.  One empty scan proves nothing.  What does: the kernel hands out
PIDs in increasing order from a cursor (/proc/loadavg, last field, "the
most recently created PID"), wrapping at pid_max.  A scan that finds
nothing, followed by a probe of every PID created since it began, and a
cursor that then stands still, has seen every process that was alive: any
process older than the scan was listed and checked, any younger one has a
PID in the probed range.  A fork chain cannot hide from that; it can only
keep the cursor moving until the deadline, and then the Epilog fails with
the count instead of saying ok.
"""

import os
import signal
import time

from . import cgroup

# Probing a range of new PIDs is only worth it while it is short; beyond
# that, a full scan of /proc is cheaper.
PROBE_MAX = 4096


# --- mountinfo -------------------------------------------------------------

def unescape(field):
    """mountinfo octal-escapes space, tab, newline and backslash."""
    if b"\\" not in field:
        return field
    out, i = bytearray(), 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out += field[i:i + 1]
            i += 1
    return bytes(out)


def mountinfo(pid="self"):
    """[(major:minor, root, mount point, rest of the line)] as bytes, unescaped."""
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        out = []
        for line in f:
            fields = line.split(b" ", 5)
            out.append((fields[2], unescape(fields[3]), unescape(fields[4]), fields[5]))
        return out


def is_mountpoint(path):
    target = os.fsencode(path)
    return any(mp == target for _, _, mp, _ in mountinfo())


def mount_roots(paths):
    """[(b"major:minor", root)]: how a bind mount of each directory appears
    in /proc/PID/mountinfo (device, and path within its filesystem)."""
    table = mountinfo()
    out = []
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}".encode()
        p = os.fsencode(path)
        best = None
        for mdev, root, mp, _ in table:
            if mdev == dev and (p == mp or p.startswith(mp.rstrip(b"/") + b"/")):
                if best is None or len(mp) > len(best[0]):
                    best = (mp, root)
        if best:
            mp, root = best
            rest = p[len(mp):].strip(b"/")
            out.append((dev, root.rstrip(b"/") + b"/" + rest if rest else root))
    return out


def _mounts_any_of(pid, roots):
    try:
        table = mountinfo(pid)
    except OSError:
        return False
    return any(mdev == dev and (root == top or root.startswith(top + b"/"))
               for mdev, root, _, _ in table for dev, top in roots)


# --- processes in a namespace ---------------------------------------------

class _Matcher:
    """Decides, per PID, whether a process belongs to the job's namespace.

    ns_id: (dev, ino) of the job's namespace.  holding: paths of the job's
    directories.  A job's user can create a user namespace and in it a mount
    namespace of their own (unshare -Urm): its processes carry copies of the
    job's mounts but are not in ns_id.  With holding, processes of any other
    namespace (except ours) that has one of the job's directories mounted
    are included; where those are mounted from (mount_roots) is only worked
    out when such a process turns up: it reads the host's mountinfo, one
    line per live job."""

    def __init__(self, ns_id, holding=(), uid=None):
        self.holding, self.uid = holding, uid
        self.roots = None
        self.valid = ns_id[0] == os.stat("/proc/self/ns/mnt").st_dev
        # Namespaces are told apart by readlink of /proc/PID/ns/mnt
        # ("mnt:[INODE]"): half the cost of a stat, which follows the magic
        # link into nsfs.  Every mount namespace is an inode of the one
        # nsfs device, so the inode identifies it (while it is pinned or
        # held: inode numbers are reused once it is freed).
        self.verdict = {f"mnt:[{ns_id[1]}]": True, os.readlink("/proc/self/ns/mnt"): False}

    def __call__(self, pid):
        try:
            ident = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            return False        # gone, or a zombie (which holds no namespace)
        if ident not in self.verdict:
            # Only the job's user can have made a namespace from the job's
            # (unless root did): reading every foreign namespace's mountinfo
            # would let any user slow every Epilog with many mounts.
            if not self.holding or (self.uid is not None and _proc_uid(pid) != self.uid):
                return False
            if self.roots is None:
                self.roots = mount_roots(self.holding)
            self.verdict[ident] = bool(self.roots) and _mounts_any_of(pid, self.roots)
        return self.verdict[ident]


def processes_in(ns_id, holding=(), uid=None):
    """PIDs whose mount namespace is ns_id (dev, ino), or (with holding) a
    namespace of the job's user that mounts one of the job's directories.
    A snapshot, good for display; kill_processes_in is what proves none."""
    match = _Matcher(ns_id, holding, uid)
    if not match.valid:
        return []               # not a namespace: no process can be in it
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and match(n)]


def _proc_uid(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def last_pid():
    """The PID most recently handed out in our PID namespace."""
    with open("/proc/loadavg", "rb") as f:
        return int(f.read().rsplit(b" ", 1)[1])


def _pid_max():
    with open("/proc/sys/kernel/pid_max", "rb") as f:
        return int(f.read())


def _new_pids(before, after, pid_max):
    """PIDs handed out after `before` up to `after`, in allocation order
    (wrapping at pid_max; PIDs below 300 are never reused after a wrap)."""
    if after >= before:
        return range(before + 1, after + 1)
    return [*range(before + 1, pid_max), *range(300, after + 1)]


class StillRunning(Exception):
    """Processes of the job outlived the kill deadline."""

    def __init__(self, pids, seen):
        self.pids, self.seen = pids, seen
        super().__init__(f"{len(pids)} processes still in the job's namespace after "
                         f"{len(seen)} were killed (e.g. {sorted(pids)[:10]}): uninterruptible I/O, "
                         f"or a fork chain faster than the kill; retry the Epilog later")


def kill_processes_in(ns_id, timeout, holding=(), uid=None, job=None, on_cgroup=None):
    """SIGKILL every process of the job's namespace (see _Matcher) until
    there is evidence that none is left (module docstring).  Slurm has had
    its chance to end them; what remains escaped its process tracking.

    job: with it, a process found in a root-owned cgroup of Slurm's for
    this job (.../job_<job>/...) has its whole cgroup killed at once
    (cgroup.kill, or freeze + kill + thaw on cgroup v1): nothing in it can
    fork meanwhile.  on_cgroup(path, count) is told about each.

    Returns the PIDs killed; raises StillRunning past the deadline."""
    match = _Matcher(ns_id, holding, uid)
    if not match.valid:
        return []
    me = os.getpid()
    killed, cgroups_done = [], set()
    seen = set()
    deadline = time.monotonic() + timeout
    pid_max = _pid_max()
    found = []

    def hit(pids):
        for pid in pids:
            if job is not None:
                cg = cgroup.job_cgroup_of(pid, job)
                if cg and cg not in cgroups_done:
                    cgroups_done.add(cg)
                    n = cgroup.kill_cgroup(cg)
                    if on_cgroup:
                        on_cgroup(cg, n)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass            # gone already (its cgroup's kill, or its own exit): found all the same
            if pid not in seen:
                seen.add(pid)
                killed.append(pid)

    while True:
        if time.monotonic() > deadline:
            raise StillRunning(found, seen)
        cursor = last_pid()
        found = [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != me and match(n)]
        if found:
            hit(found)
            time.sleep(0.001 if len(seen) < 64 else 0.01)
            continue
        # Nothing listed: now every PID handed out since the listing began,
        # until the cursor stands still.
        while not found and time.monotonic() <= deadline:
            now = last_pid()
            if now == cursor:
                return killed
            fresh = _new_pids(cursor, now, pid_max)
            if len(fresh) > PROBE_MAX:
                break           # a full scan again
            found = [p for p in fresh if p != me and match(p)]
            cursor = now
        if found:
            hit(found)
