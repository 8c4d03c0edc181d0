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
PID in the probed range.  A fork chain cannot hide from that.  On a node
where other processes fork without pause the cursor may never stand
still; then 20 rounds over at least 50 ms, each probing the newest PIDs
first (where the live link of a chain is) and finding nothing of the job's,
end the wait: no longer a proof, but a chain would have to dodge every
probe.  Processes still found at the deadline fail the Epilog, with the
count, instead of an ok.
"""

import os
import signal
import time
from typing import List, NamedTuple

from . import cgroup, forked, kernel

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


class Mount(NamedTuple):
    """One mountinfo line as text (paths unescaped; bytes that are not
    UTF-8 kept by surrogateescape, so os.fsencode gives them back)."""
    mountpoint: str
    root: str
    options: List[str]          # per-mount options (ro, nosuid, ...)
    optional: List[str]         # propagation: shared:N, master:N, ...
    fstype: str
    source: str
    super_options: List[str]    # the filesystem's own options


def mounts(pid="self") -> List[Mount]:
    """Every mount of pid's mount namespace, parsed whole.  For doctor and
    the cgroup lookup; the Epilog's hot path uses mountinfo()."""
    out = []
    for _dev, root, mp, rest in mountinfo(pid):
        left, _, right = rest.rstrip(b"\n").partition(b" - ")
        opts, *optional = left.split(b" ")
        fstype, source, sopts = (right.split(b" ") + [b"", b""])[:3]
        out.append(Mount(os.fsdecode(mp), os.fsdecode(root), os.fsdecode(opts).split(","),
                         [os.fsdecode(o) for o in optional], os.fsdecode(fstype), os.fsdecode(unescape(source)),
                         os.fsdecode(sopts).split(",")))
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


def _mangle(path):
    """path as mountinfo writes it: space, tab, newline and backslash as
    octal escapes."""
    for c in b"\\ \t\n":
        path = path.replace(bytes([c]), b"\\%03o" % c)
    return path


def _table_holds(data, roots, marks=()):
    """Whether mountinfo text (raw bytes) has one of roots (job directories:
    device and root field) mounted, or a mount whose " - fstype source "
    part is one of marks (the job's tmpfs mounts, mountopts.tmpfs_marks).
    A search of the raw text, never a parse: the table is the user's to
    make as long as the kernel allows.  Fields are separated by plain
    spaces and every space inside one is escaped, so " DEV ROOT" can only
    be the device and root fields of a line."""
    if any(mark in data for mark in marks):
        return True
    for dev, top in roots:
        pat = b" " + dev + b" " + _mangle(top)
        i = data.find(pat)
        while i >= 0:
            if data[i + len(pat):i + len(pat) + 1] in (b" ", b"/"):
                return True
            i = data.find(pat, i + 1)
    return False


PROBE_SECONDS = 1.0         # all probes of one teardown together, at most


def _ns_mounts_any_of(nsfd, roots, marks=(), seconds=PROBE_SECONDS):
    """Whether the mount namespace open on nsfd has one of roots (or a
    mount marked with one of marks) mounted, seen from its own root; None
    when that was not known within `seconds`.

    A forked child (single-threaded, as setns needs) joins the namespace,
    which puts it at the namespace's root, and reads its own mountinfo: a
    user who chroots in a user+mount namespace of their own hides the job's
    mounts from /proc/PID/mountinfo, which shows only what is under the
    process's root.  It reads through the daemon's own /proc, opened before
    setns: after it, "/proc" is whatever the namespace's owner mounted
    there.  Never in the daemon itself: the table's size is the user's
    (up to fs.mount-max mounts on long paths: tens of megabytes)."""
    def probe(w):
        procfd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        kernel.setns(nsfd, kernel.CLONE_NEWNS)
        fd = os.open("thread-self/mountinfo", os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        os.write(w, b"1" if _table_holds(b"".join(chunks), roots, marks) else b"0")
    if seconds <= 0:
        return None
    data = forked.run(probe, seconds)
    return None if data is None else data == b"1"


# --- processes in a namespace ---------------------------------------------

class _Matcher:
    """Decides, per PID, whether a process belongs to the job's namespace.

    ns_id: (dev, ino) of the job's namespace.  holding: paths of the job's
    directories.  A job's user can create a user namespace and in it a mount
    namespace of their own (unshare -Urm, rootless podman): its processes
    carry copies of the job's mounts but are not in ns_id.  With holding,
    processes of any other namespace (except ours) that has one of the
    job's directories mounted are included, when the process is the job
    user's or its user namespace is (a container's processes run under
    subordinate uids).  Where those directories are mounted from
    (mount_roots) is only worked out when such a process turns up: it reads
    the host's mountinfo, one line per live job.  marks: the same for the
    job's tmpfs mounts, found by their source (mountopts.tmpfs_marks), for
    a job with no directory to look for.  Each such namespace is judged by
    a forked probe (_ns_mounts_any_of), never by reading its mount table in
    the daemon; the probes share PROBE_SECONDS.

    Verdicts are kept per namespace, and each judged namespace is held open
    (close() releases them): a namespace inode number is reused as soon as
    it is freed, and a new namespace must not inherit an old verdict."""

    def __init__(self, ns_id, holding=(), uid=None, marks=()):
        self.holding, self.uid, self.marks = holding, uid, marks
        # Seconds of probing left: time spent in probes, not since the
        # start (a namespace the user makes late in a long kill loop is
        # still probed).
        self.probe_left = PROBE_SECONDS
        self.roots = None
        self.held = []
        self.valid = ns_id[0] == os.stat("/proc/self/ns/mnt").st_dev
        # Namespaces are told apart by readlink of /proc/PID/ns/mnt
        # ("mnt:[INODE]"): half the cost of a stat, which follows the magic
        # link into nsfs.  Every mount namespace is an inode of the one
        # nsfs device, so the inode identifies it while it is alive; the
        # job's is held by its pin, ours by us.
        self.verdict = {f"mnt:[{ns_id[1]}]": True, os.readlink("/proc/self/ns/mnt"): False}

    def _ident(self, pid):
        try:
            return os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            pass
        # The thread group leader may have ended (the raw exit syscall)
        # while other threads live on: its /proc entry is a zombie's, and
        # only /proc/PID/task lists the living threads.
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        for tid in tids:
            try:
                return os.readlink(f"/proc/{pid}/task/{tid}/ns/mnt")
            except OSError:
                continue
        return None

    def _users(self, pid):
        """The job user's process, or one in a user namespace the job user
        made (directly or nested)."""
        if self.uid is None or _proc_uid(pid) == self.uid:
            return True
        try:
            fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return kernel.ns_owner_uid(fd) == self.uid
        except OSError:
            return False
        finally:
            os.close(fd)

    def __call__(self, pid):
        ident = self._ident(pid)
        if ident is None:
            return False        # gone, or a zombie (which holds no namespace)
        if ident not in self.verdict:
            # Only the job's user can have made a namespace from the job's
            # (unless root did): reading every foreign namespace's mountinfo
            # would let any user slow every Epilog with many mounts.
            if not (self.holding or self.marks) or not self._users(pid):
                return False
            try:
                self.held.append(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return False
            if os.readlink(f"/proc/self/fd/{self.held[-1]}") != ident:
                return False    # the process changed namespace meanwhile: judged next time
            if self.roots is None:
                self.roots = mount_roots(self.holding)
            if not (self.roots or self.marks):
                self.verdict[ident] = False
            else:
                # One time budget for every probe of this teardown; a
                # namespace of the job user's that could not be judged in
                # it counts as the job's (it is the user's own, and a mount
                # table made slow on purpose must not let it escape).
                t0 = time.monotonic()
                held = _ns_mounts_any_of(self.held[-1], self.roots, self.marks, self.probe_left)
                self.probe_left -= time.monotonic() - t0
                self.verdict[ident] = True if held is None else held
        return self.verdict[ident]

    def close(self):
        for fd in self.held:
            os.close(fd)
        self.held = []


def processes_in(ns_id, holding=(), uid=None, marks=()):
    """PIDs whose mount namespace is ns_id (dev, ino), or (with holding) a
    namespace of the job's user that mounts one of the job's directories.
    A snapshot, good for display; kill_processes_in is what proves none."""
    match = _Matcher(ns_id, holding, uid, marks)
    try:
        if not match.valid:
            return []           # not a namespace: no process can be in it
        return [int(n) for n in os.listdir("/proc") if n.isdigit() and match(n)]
    finally:
        match.close()


def _proc_uid(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def last_pid(fd=None):
    """The PID most recently handed out in our PID namespace.  fd: an open
    /proc/loadavg, read again from offset 0 (one system call per round of
    the kill loop, not three)."""
    if fd is None:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().rsplit(b" ", 1)[1])
    return int(os.pread(fd, 256, 0).rsplit(b" ", 1)[1])


def _pid_max():
    with open("/proc/sys/kernel/pid_max", "rb") as f:
        return int(f.read())


_PID_MAX = _pid_max()       # read at start-up: a sysctl change takes a restart


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


def _pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except (AttributeError, OSError):
        return -1               # no pidfd_open (Linux < 5.3): os.kill, as before


def kill_processes_in(ns_id, timeout, holding=(), uid=None, job=None, on_cgroup=None, marks=()):
    """SIGKILL every process of the job's namespace (see _Matcher) until
    there is evidence that none is left (module docstring).  Slurm has had
    its chance to end them; what remains escaped its process tracking.

    The evidence: an empty scan of /proc, then the PIDs handed out since,
    probed newest first (the newest is the live link of a fork chain),
    until the PID cursor stands still; on a node whose cursor never stands
    still (other jobs forking all the time), QUIET_ROUNDS such rounds over
    at least QUIET_SECONDS with nothing of the job's found.

    job: with it, a process found in a root-owned cgroup of Slurm's for
    this job (.../job_<job>/...) has its whole cgroup killed at once
    (cgroup.kill, or freeze + kill + thaw on cgroup v1): nothing in it can
    fork meanwhile.  on_cgroup(path, count) is told about each.

    A process is signalled through a pidfd opened before it is judged
    again, so a PID reused meanwhile is never hit.  Returns the PIDs
    killed; raises StillRunning when processes of the job are still found
    after `timeout` seconds."""
    match = _Matcher(ns_id, holding, uid, marks)
    loadavg = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not match.valid:
            return []
        return _kill_loop(match, timeout, job, on_cgroup, loadavg)
    finally:
        match.close()
        os.close(loadavg)


QUIET_ROUNDS = 20
QUIET_SECONDS = 0.05


def _kill_loop(match, timeout, job, on_cgroup, loadavg):
    me = os.getpid()
    killed, seen, cgroups_done = [], set(), set()
    deadline = time.monotonic() + timeout
    pid_max = _PID_MAX

    def hit(pids):
        late = time.monotonic() > deadline
        for pid in pids:
            fd = _pidfd(pid)
            if fd is None:
                continue        # gone
            try:
                if fd >= 0 and not match(pid):
                    continue    # not the process judged a moment ago (gone, PID reused)
                if job is not None:
                    cg = cgroup.job_cgroup_of(pid, job)
                    if cg and cg not in cgroups_done:
                        cgroups_done.add(cg)
                        n = cgroup.kill_cgroup(cg)
                        if on_cgroup:
                            on_cgroup(cg, n)
                try:
                    if fd >= 0:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass        # gone already (its cgroup's kill, or its own exit): found all the same
            finally:
                if fd >= 0:
                    os.close(fd)
            if pid not in seen:
                seen.add(pid)
                killed.append(pid)
        if late:
            raise StillRunning(pids, seen)
        time.sleep(0.001 if len(seen) < 64 else 0.01)

    quiet, quiet_since = 0, time.monotonic()
    while True:
        cursor = last_pid(loadavg)
        found = [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != me and match(n)]
        if found:
            hit(found)
            quiet, quiet_since = 0, time.monotonic()
            continue
        while True:
            quiet += 1
            if quiet >= QUIET_ROUNDS and time.monotonic() - quiet_since >= QUIET_SECONDS:
                return killed
            now = last_pid(loadavg)
            if now == cursor:
                return killed
            fresh = _new_pids(cursor, now, pid_max)
            cursor = now
            if len(fresh) > PROBE_MAX:
                break           # a full scan again
            found = [p for p in reversed(fresh) if p != me and match(p)]
            if found:
                hit(found)
                quiet, quiet_since = 0, time.monotonic()
                break
